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
# random-weight checkpoints, checks every network, and edits one photo with them.
DEMO_STEPS := --set steps.latent=60 --set steps.noise=20 --set loss.start_steps.classf=30 \
              --set loss.start_steps.seg=30 --set dynamic_masking_iters=20 --set parser_size=64
demo: install
	@echo "demo: the main job (maskface run) does not exist yet; running what does:"
	@echo "      tiny checkpoints -> check every network -> maskface edit on one photo"
	$(BIN)/maskface weights make-tiny --dest $(DEMO)/weights --resolution 64
	$(BIN)/maskface weights check $(DEMO)/weights/models.yaml --parser-size 64
	$(BIN)/maskface edit jobs/demo/astronaut-64.png --attribute smiling \
	    --models $(DEMO)/weights/models.yaml --out $(DEMO)/edited $(DEMO_STEPS)
	@echo "demo: outputs in $(DEMO)/edited (tiny random weights: not a real edit)"

clean:
	rm -rf $(DEMO) .pytest_cache
