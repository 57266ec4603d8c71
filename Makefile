# fedcompute — one-command set-up, stack, demo and tests.
# Every target installs what it needs first (`setup` is idempotent and fast when done).
SHELL := /bin/bash
.DEFAULT_GOAL := help
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
PY := .venv/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist

# Demo knobs (see README). PRIVATE=1: the private demo at 10,000 devices (README, "Private demo").
PRIVATE ?= 0
ifeq ($(PRIVATE),1)
ROUNDS ?= 25
DEVICES ?= 10000
REPORT_GOAL ?= 1000
NOISE ?= 1.0
CLIP ?= 1.0
endif
BASELINE ?= reference
PROCESSES ?= 2
TRADEOFF ?= 0,0.5,1.0,1.5
ROUNDS ?= 12
DEVICES ?= 200
REPORT_GOAL ?= 50
NOISE ?= 0.0
DP ?= fixed
EVAL ?= 0
CLIP ?= 10.0
RUNTIME ?= auto

.PHONY: help setup uv sync data browser proto up down status test test-unit test-integration test-e2e demo demo-tradeoff bench lint clean package deploy deploy-check destroy

help:
	@echo "make setup   install uv, the locked Python environment and the Fashion-MNIST data"
	@echo "make demo    run the main job: local stack, task built, fleet trains, metrics plotted"
	@echo "make demo PRIVATE=1   10,000 devices, central DP (epsilon <= 5) next to the non-private run"
	@echo "make demo-tradeoff    privacy/utility figure: noise $(TRADEOFF) -> final epsilon and accuracy"
	@echo "make test    lint, then run every test tier (unit, integration, e2e) against the real emulators"
	@echo "make lint    ruff (lint + import order) and mypy (types) on shared/, functions/ and benchmarks/"
	@echo "make up / down / status   start, stop, inspect the local serverless stack"
	@echo "make clean   stop the stack and delete its data (.fedcompute/: every local task), out/ and build/functions"
	@echo "make proto   regenerate the protobuf Python code from shared/fedcompute/proto/*.proto"
	@echo "make bench   run the benchmarks (figures go to BENCHMARKS.md by hand)"
	@echo "make package                          package the Cloud Functions into build/functions (zips for Terraform)"
	@echo "make deploy PROJECT=... REGION=...    package + terraform apply on Google Cloud (see infra/README.md)"
	@echo "make destroy PROJECT=... REGION=...   terraform destroy"

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

browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  echo "Installing Chromium (headless browser for the dashboard test) ..."; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null \
	    || echo "warning: could not install chromium; tests/integration/test_dashboard_browser.py will fail"; \
	else echo "warning: no apt-get; install Chromium yourself for tests/integration/test_dashboard_browser.py"; fi

setup: sync data browser

proto: sync
	$(PY) -m grpc_tools.protoc -I shared --python_out=shared --pyi_out=shared shared/fedcompute/proto/*.proto

up: setup
	$(PY) -m fedcompute.cli.main stack up

down:
	@if [ -x $(PY) ]; then $(PY) -m fedcompute.cli.main stack down; fi

status:
	$(PY) -m fedcompute.cli.main stack status

# Lint gate (pyproject.toml configures both): ruff (style, bugs, import order) and mypy (types).
lint: sync
	$(PY) -m ruff check shared functions tests benchmarks examples
	$(PY) -m mypy

test: setup lint
	$(PY) -m pytest -q tests

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-integration: setup
	$(PY) -m pytest -q tests/integration

test-e2e: setup
	$(PY) -m pytest -q tests/e2e

demo: setup
ifeq ($(PRIVATE),1)
	TF_CPP_MIN_LOG_LEVEL=3 $(PY) -m fedcompute.cli.main demo --private --rounds $(ROUNDS) --devices $(DEVICES) --report-goal $(REPORT_GOAL) --noise $(NOISE) --clip-norm $(CLIP) --processes $(PROCESSES) --baseline $(if $(filter 0 none,$(BASELINE)),none,$(if $(filter stack,$(BASELINE)),stack,reference)) $(if $(filter 1,$(DEMO_TRADEOFF)),--tradeoff $(TRADEOFF),)
else
	TF_CPP_MIN_LOG_LEVEL=3 $(PY) -m fedcompute.cli.main demo --rounds $(ROUNDS) --devices $(DEVICES) --report-goal $(REPORT_GOAL) --noise $(NOISE) --clip-norm $(CLIP) --dp $(DP) --runtime $(RUNTIME) $(if $(filter 1,$(EVAL)),--eval,)
endif

demo-tradeoff:
	$(MAKE) demo PRIVATE=1 DEMO_TRADEOFF=1

bench: setup
	$(PY) -m benchmarks.run_all

# Google Cloud deployment (infra/README.md). TF_BACKEND_BUCKET defaults to <project>-tfstate.
FUNCTIONS_BUILD ?= build/functions
TF_BACKEND_BUCKET ?= $(PROJECT)-tfstate
TF_VARS = -var project_id=$(PROJECT) -var region=$(REGION) -var functions_source_dir=$(abspath $(FUNCTIONS_BUILD))

package: sync
	$(PY) -m fedcompute.deploy.catalogue --write
	$(PY) -m fedcompute.deploy.package --out $(FUNCTIONS_BUILD)

deploy-check:
	@test -n "$(PROJECT)" -a -n "$(REGION)" || { echo "usage: make $(MAKECMDGOALS) PROJECT=<gcp-project-id> REGION=<region, e.g. us-central1>"; exit 2; }
	@command -v terraform >/dev/null || { echo "terraform is not installed: https://developer.hashicorp.com/terraform/install"; exit 2; }

deploy: deploy-check package
	terraform -chdir=infra init -input=false -backend-config="bucket=$(TF_BACKEND_BUCKET)"
	terraform -chdir=infra apply $(TF_VARS)

destroy: deploy-check package  # the config hashes the zips, so they must exist
	terraform -chdir=infra init -input=false -backend-config="bucket=$(TF_BACKEND_BUCKET)"
	terraform -chdir=infra destroy $(TF_VARS)

clean: down
	rm -rf .fedcompute out .pytest_cache build/functions
