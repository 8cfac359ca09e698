# Retort — the targets a person types.
SHELL := /bin/bash
PY    ?= python3
VENV  := .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/retort/torch_extensions
export RAY_AUTH_MODE ?= token
export PYTHONUNBUFFERED := 1

.PHONY: install system-deps demo test test-fast lint typecheck bench clean up down status

install: $(STAMP) system-deps

# torch is pinned and installed first so that nothing later can pull a CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# Debian's Prometheus and Redis, started later as plain processes on 127.0.0.1.
system-deps:
	@command -v prometheus >/dev/null && command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus redis-server >/dev/null; }
	@# the Debian packages start services of their own; Retort runs its own processes
	@-(systemctl stop prometheus redis-server 2>/dev/null; pkill -x prometheus-node-exporter 2>/dev/null) || true

demo: install
	$(BIN)/retort pipeline -c configs/pipeline/small.yaml

test: install
	$(BIN)/python -m pytest -q -m "not gpu" --timeout=900

test-fast: install
	$(BIN)/python -m pytest -q -m "not gpu and not integration and not slow"

lint: install
	$(BIN)/ruff check cluster train serve tests
	$(BIN)/ruff format --check cluster train serve tests

typecheck: install
	$(BIN)/mypy

up: install
	$(BIN)/retort up
down:
	$(BIN)/retort down
status:
	$(BIN)/retort status

clean:
	rm -rf runs .pytest_cache
