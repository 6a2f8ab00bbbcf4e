# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The repository root must never be on sys.path. Its folders kernels/, engine/ and cli/ are the
# sources of gradcam_batch.kernels, .engine and .cli, and on sys.path they shadow real packages of
# those names: transformers imports Hugging Face's `kernels`, and would get ours. `python -m` and
# `python -c` put the working directory first on sys.path, so the recipes call console scripts, and
# PYTHONSAFEPATH=1 keeps any python started below (tests' subprocesses included) from adding it.
# tests/test_sys_path.py runs these recipes with a probe in place of Python and checks the result.
export PYTHONSAFEPATH := 1

.PHONY: install demo test test-all test-lowest bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip "setuptools>=77" wheel

# Reinstall only when the project metadata changed.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/gradcam-batch demo

test: $(STAMP)
	$(BIN)/pytest -q

test-all: $(STAMP)
	$(BIN)/pytest -q -m 'not gpu'

bench: $(STAMP)
	$(BIN)/pytest -q benchmarks -m '' --benchmark-only -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# `make test-lowest`: the engine, kernel and Parquet tests on the oldest versions pyproject.toml admits,
# which are the GPU machine's stack (torch 2.11, triton 3.6, torchvision 0.26; numpy 2.4, the newest
# this Python gets, since the GPU machine's numpy 2.5 needs Python 3.12). Every runtime dependency, the
# build requirements and torchvision are installed at their lower bound (">=" read as "=="), so the
# bounds are exactly what this target proves. The project is installed as benchmarks/gpu.sh installs
# it: editable, without build isolation, on the lowest setuptools. A separate venv, cached like .venv.
# .ci/run runs it after `make test`: about 1.5 minutes to install and 4.5 to test on 2 cores.
# LOWEST_PYTHON=python3.12 builds it on the GPU machine's Python instead (delete .venv-lowest first).
LOWEST_PYTHON ?= $(PYTHON)
LOWEST_VENV := .venv-lowest
LOWEST_BIN := $(LOWEST_VENV)/bin
LOWEST_STAMP := $(LOWEST_VENV)/.installed
LOWEST_TESTS := tests/test_kernels.py tests/test_kernel_compile.py tests/test_engine_parity.py \
	tests/test_engine_equivalence.py tests/test_engine_edge_cases.py tests/test_localization.py \
	tests/test_compile.py tests/test_source.py tests/test_sink.py

$(LOWEST_BIN)/python:
	$(LOWEST_PYTHON) -m venv $(LOWEST_VENV)

$(LOWEST_VENV)/lowest.txt: pyproject.toml | $(LOWEST_BIN)/python
	{ sed -n '/^requires = \[/p; /^dependencies = \[/,/^\]/p' pyproject.toml; \
	  grep -E '^ *"(torchvision|pytest)>=' pyproject.toml | sort -u; } \
	  | grep -o '"[^"]*>=[^"]*"\|"wheel"' | tr -d '"' | sed 's/>=/==/' >$@

$(LOWEST_STAMP): $(LOWEST_VENV)/lowest.txt
	$(LOWEST_BIN)/pip install -q -r $(LOWEST_VENV)/lowest.txt
	$(LOWEST_BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(LOWEST_BIN)/pip check
	touch $@

test-lowest: $(LOWEST_STAMP)
	$(LOWEST_BIN)/pytest -q -p no:cacheprovider $(LOWEST_TESTS)

clean:
	rm -rf $(VENV) .venv-lowest build dist *.egg-info .pytest_cache
