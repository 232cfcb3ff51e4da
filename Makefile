# ferry: `make demo` runs the main job, `make test` the test suite.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEBS := qemu-system-x86 qemu-utils redis-server redis-sentinel zstd xz-utils bzip2 lzop \
	binutils linux-image-amd64 busybox-static ovmf iproute2
STAMP := $(VENV)/.ferry-installed
TEST_JOBS ?= 2

.PHONY: setup demo test lint bench bench-streams faults mutants clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile scripts/devtools/setup.sh
	bash scripts/devtools/setup.sh "$(PY)" "$(VENV)" $(DEBS)
	touch $(STAMP)

demo: setup
	$(BIN)/ferry demo

test: setup lint
	$(BIN)/pytest -q -n $(TEST_JOBS) tests

lint: setup
	$(BIN)/ruff check config workers tasks scripts tests
	$(BIN)/mypy

faults: setup
	$(BIN)/python -m scripts.devtools.faults

bench: setup
	$(BIN)/python -m scripts.bench

# Deliberate bugs the tests must catch (scripts/devtools/mutants.py); not part of `make test`.
mutants: setup
	$(BIN)/python -m scripts.devtools.mutants $(MUTANTS_ARGS)
bench-streams: setup
	$(BIN)/python -m scripts.bench.streams

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
