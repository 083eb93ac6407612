# make demo / make test each create or reuse .venv and install exactly what they need (pinned in pyproject.toml).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-12)
TOOLS := .tools
export PYTHONUNBUFFERED := 1

.PHONY: demo test lint typecheck pytest venv tools manifests chart-lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[workloads,dev]'
	rm -f $(VENV)/.installed-*; touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/recupdate demo

test: $(STAMP) tools lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check operator workloads tests benchmarks
	$(BIN)/ruff format --check operator workloads tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) tools
	PATH=$(CURDIR)/$(TOOLS)/bin:$$PATH $(BIN)/pytest -q -ra

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache

tools:
	@true
