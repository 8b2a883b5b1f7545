# Everything a fresh machine needs: `make test` and `make demo` build .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := demo-out

.PHONY: install test docs demo gpu-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,align,docs]'
	touch $(STAMP)

install: $(STAMP)

# mypy types pipeline/; lint-imports holds the layers (pyproject.toml's contracts); the
# docs build strictly; then the suite
test: install
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(MAKE) --no-print-directory docs
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The docs site into site/ (open site/index.html): the tables made from the code's
# schemas must be current (docs/generate.py rewrites them), and a broken link, a missing
# page or an API reference that names nothing fails the build.
docs: install
	$(BIN)/python docs/generate.py --check
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# On a machine with a GPU, in one short run: a preflight (every import and tool the run
# needs, in a second or two, before any model is built), the GPU tests (our CUDA kernels
# and inductor against their references, a real out-of-memory backed off), then `bench`
# at 1024 px paper defaults at the automatic batch size in fp32 (IEEE matmuls and
# convolutions), TF32 and bf16, and compiled, and after how many edits compiling pays
# back its warm-up. JSON documents land in $(GPU_OUT).
# GPU_PY: a Python with this project's dependencies: the venv `install` builds when there
# is one, else python3 (a lent GPU machine has torch but not our venv).
GPU_OUT ?= gpu-check
GPU_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
GPU_BENCH = $(GPU_PY) -m jobs.cli bench --preset 1024 --device cuda --batch auto --steps 3
gpu-check:
	$(GPU_PY) -m jobs.gpu_preflight
	mkdir -p $(GPU_OUT)
	TORCH_CUDA_ARCH_LIST=$${TORCH_CUDA_ARCH_LIST:-9.0} $(GPU_PY) -m pytest -q \
	    -p no:cacheprovider tests/test_gpu.py tests/test_extension.py
	$(GPU_BENCH) --no-compile --json $(GPU_OUT)/fp32.json
	$(GPU_BENCH) --no-compile --tf32 --json $(GPU_OUT)/tf32.json
	$(GPU_BENCH) --no-compile --autocast bf16 --json $(GPU_OUT)/bf16.json
	$(GPU_BENCH) --compile --json $(GPU_OUT)/fp32-compiled.json
	$(GPU_PY) -m jobs.cli bench --payback $(GPU_OUT)/fp32.json $(GPU_OUT)/fp32-compiled.json

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
	rm -rf $(DEMO) .pytest_cache site
