# Everything a fresh machine needs: `make test` and `make demo` build .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := demo-out

.PHONY: install test demo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The main job (`maskface run`) is not built yet. Until it is, the demo makes tiny
# random-weight checkpoints and loads and runs every network from them.
demo: install
	@echo "demo: the main job (maskface run) does not exist yet; running what does:"
	@echo "      tiny checkpoints -> load every network strictly -> one forward pass each"
	$(BIN)/maskface weights make-tiny --dest $(DEMO)/weights --resolution 64
	$(BIN)/maskface weights check $(DEMO)/weights/models.yaml --parser-size 64

clean:
	rm -rf $(DEMO) .pytest_cache
