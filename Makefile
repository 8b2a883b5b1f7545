# Everything a fresh machine needs: `make test` and `make demo` build .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := demo-out

.PHONY: install test demo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,align]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The demo: a manifest of four edits of the photo the repo ships (jobs/demo/), run by
# the main job on a local Ray with local storage. With MODELS=spec.yaml (or
# MASKFACE_MODELS) it uses real weights and the paper's schedule; without, tiny
# random weights and a short schedule (jobs/demo-tiny.yaml).
MODELS ?= $(MASKFACE_MODELS)
demo: install
	$(BIN)/python -m jobs.demo $(DEMO)/manifest.parquet
ifeq ($(strip $(MODELS)),)
	@echo "=================================================================="
	@echo " demo on TINY RANDOM WEIGHTS with a short schedule: the outputs are"
	@echo " NOT real edits. For real ones: make demo MODELS=weights/models.yaml"
	@echo "=================================================================="
	$(BIN)/maskface weights make-tiny --dest $(DEMO)/weights --resolution 64
	$(BIN)/maskface run jobs/demo-tiny.yaml
	@echo "the report: open $(abspath $(DEMO))/run/report/index.html in a browser"
else
	@echo "demo on real weights ($(MODELS)), the paper's schedule: on a CPU this takes hours per image"
	$(BIN)/maskface run jobs/demo.yaml --set models=$(MODELS)
	@echo "the report: open $(abspath $(DEMO))/run-real/report/index.html in a browser"
endif

clean:
	rm -rf $(DEMO) .pytest_cache
