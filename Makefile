# fedcompute — one-command set-up, stack, demo and tests.
# Every target installs what it needs first (`setup` is idempotent and fast when done).
SHELL := /bin/bash
.DEFAULT_GOAL := help
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
PY := .venv/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist

# Demo knobs (see README).
ROUNDS ?= 12
DEVICES ?= 200
REPORT_GOAL ?= 50
NOISE ?= 0.0
DP ?= fixed

.PHONY: help setup uv sync data proto up down status test test-unit test-integration test-e2e demo bench lint clean

help:
	@echo "make setup   install uv, the locked Python environment and the Fashion-MNIST data"
	@echo "make demo    run the main job: local stack, task built, fleet trains, metrics plotted"
	@echo "make test    run every test tier (unit, integration, e2e) against the real emulators"
	@echo "make up / down / status   start, stop, inspect the local serverless stack"
	@echo "make proto   regenerate the protobuf Python code from shared/fedcompute/proto/*.proto"
	@echo "make bench   run the benchmarks (figures go to BENCHMARKS.md by hand)"

uv:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv

sync: uv
	$(UV) sync --locked --quiet

data:
	@if [ -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  echo "Installing the Debian package dataset-fashion-mnist ..."; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
	    || echo "warning: could not install dataset-fashion-mnist; see README (Fashion-MNIST on other systems)"; \
	else echo "warning: no apt-get; put the Fashion-MNIST IDX files in $(FASHION_MNIST_DIR) or set FASHION_MNIST_DIR"; fi

setup: sync data

proto: sync
	$(PY) -m grpc_tools.protoc -I shared --python_out=shared --pyi_out=shared shared/fedcompute/proto/*.proto

up: setup
	$(PY) -m fedcompute.cli.main stack up

down:
	@if [ -x $(PY) ]; then $(PY) -m fedcompute.cli.main stack down; fi

status:
	$(PY) -m fedcompute.cli.main stack status

test: setup
	$(PY) -m pytest -q tests

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-integration: setup
	$(PY) -m pytest -q tests/integration

test-e2e: setup
	$(PY) -m pytest -q tests/e2e

demo: setup
	TF_CPP_MIN_LOG_LEVEL=3 $(PY) -m fedcompute.cli.main demo --rounds $(ROUNDS) --devices $(DEVICES) --report-goal $(REPORT_GOAL) --noise $(NOISE) --dp $(DP)

bench: setup
	$(PY) -m benchmarks.run_all

clean: down
	rm -rf .fedcompute out .pytest_cache
