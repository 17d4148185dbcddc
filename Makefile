# `make test` and `make bench` each set up .venv (torch, the build tools, swa_fast built with its
# kernels) and then run. Re-running rebuilds only when a source file changed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.h csrc/cpu/*.cpp csrc/cuda/*.cuh csrc/cuda/*.cu)
# When a CUDA toolkit is here, the build must contain the CUDA kernels; tests/test_build.py checks.
EXPECT_CUDA := $(shell (command -v nvcc || ls /usr/local/cuda*/bin/nvcc) >/dev/null 2>&1 && echo 1 || echo 0)

.PHONY: test bench lint info gpu-check clean

# What .venv needs is listed once, in pyproject.toml: the build's requirements, swa_fast's
# dependencies and these extras (scripts/requirements.py reads them; tomllib is Python 3.11's).
EXTRAS := test bench

$(BIN)/.deps: pyproject.toml scripts/requirements.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 'tomli; python_version < "3.11"'
	$(BIN)/python scripts/requirements.py $(EXTRAS) > $(VENV)/requirements.txt
	$(BIN)/pip install -q -r $(VENV)/requirements.txt
	touch $@

$(BIN)/.built: $(BIN)/.deps $(SOURCES)
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $@

# ruff's rules, the complexity limit among them, are in pyproject.toml. Lint needs no build, so
# `make test` runs it first: a lint error shows before the extension compiles.
lint: $(BIN)/.deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint $(BIN)/.built
	SWA_FAST_EXPECT_CUDA=$(EXPECT_CUDA) $(BIN)/python -m pytest tests -q

# Exits non-zero when a target is missed: `make bench BENCH_ARGS=--allow-missed` exits 0 then.
BENCH_ARGS ?=
bench: $(BIN)/.built
	$(BIN)/python -m swa_fast bench $(BENCH_ARGS)

info: $(BIN)/.built
	$(BIN)/python -m swa_fast info

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build *.egg-info swa_fast/*.so bench_results
