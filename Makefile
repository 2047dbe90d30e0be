# Weir: `make help` lists the targets. Everything runs from the project's own .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest
STAMP := $(VENV)/.installed
SPEC ?= examples/demo.yaml
DURATION ?= 60
RATE ?= 500
BENCH_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install deps up down status logs test test-unit test-integration test-faults lint fmt demo bench soak clean \
	up-cluster down-cluster test-cluster test-secure bench-hot

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-17s %s\n", $$1, $$2}'

deps: ## Debian packages (redis-server, prometheus, maven, JDK) when run as root
	@bash deploy/local/install-debian.sh

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: deps $(STAMP) ## virtualenv with pinned Python packages, plus deps

up: install ## start Kafka, Redis and Prometheus on 127.0.0.1 (idempotent)
	$(PY) deploy/local/stack.py up

down: ## stop the local stack and the local cluster; leaves no process behind
	@py=$(PY); [ -x $$py ] || py=python3; status=0; \
	$$py deploy/local/stack.py down || status=$$?; $$py deploy/local/cluster.py down || status=$$?; exit $$status

status: ## health of each server (and of the local cluster when it runs)
	@status=0; $(PY) deploy/local/stack.py status || status=$$?; \
	$(PY) deploy/local/cluster.py status --optional || status=$$?; exit $$status

up-cluster: install ## 3 KRaft brokers (19092-19094) and a Redis Cluster 3+3 (7000-7005) (idempotent)
	$(PY) deploy/local/cluster.py up

down-cluster: ## stop the local cluster only
	$(PY) deploy/local/cluster.py down

test-cluster: install ## tests against the local cluster (tests/cluster; starts it, stops what it started)
	$(PYTEST) -q -p no:cacheprovider tests/cluster --durations=0

logs: ## tail the servers' logs
	$(PY) deploy/local/stack.py logs

# bench/common.py by name: the only bench module with doctests, and bench/features.py would
# shadow the features package under pytest's default import mode.
test: install ## unit + integration tests against the real stack, and every module's doctests
	$(PYTEST) -q -p no:cacheprovider --doctest-modules tests/unit tests/integration weir streams models features bench/common.py --durations=15

test-unit: $(STAMP) ## unit tests only (no servers)
	$(PYTEST) -q tests/unit

test-integration: install ## integration tests only
	$(PYTEST) -q tests/integration

test-faults: install ## the fault suite: kill -9, paused/restarted servers, bad input (docs/reliability.md)
	$(PYTEST) -q -p no:cacheprovider -s tests/integration/test_faults.py --durations=0

test-secure: install ## Kafka SASL_SSL + Redis TLS end to end, own servers (deploy/local/secure.py; in `test` too)
	$(PYTEST) -q -p no:cacheprovider tests/unit/test_settings_transport.py tests/integration/test_secure_transport.py --durations=0

lint: $(STAMP) ## ruff, mypy, and shellcheck on the shell scripts in deploy/ and .ci/
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	@command -v shellcheck >/dev/null || { [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck; } || \
	  { echo "make lint: shellcheck is missing: sudo apt-get install -y shellcheck" >&2; exit 1; }
	shellcheck $$(grep -rlE '^#!(/usr/bin/env |/bin/)(ba|da)?sh' deploy .ci)

fmt: $(STAMP) ## format and autofix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

demo: up ## the demo: stack, worker, monitor, a drifting stream, live summary; stops all (DURATION=60)
	@status=0; $(VENV)/bin/weir demo $(SPEC) --duration $(DURATION) || status=$$?; \
	if [ -z "$(KEEP_STACK)" ]; then $(PY) deploy/local/stack.py down; fi; exit $$status

bench: up ## benchmarks against their baselines, ~10 min (QUICK=1: e2e smoke only; docs/performance.md)
ifdef QUICK
	$(PY) bench/e2e.py --quick $(BENCH_ARGS)
else
	$(PY) bench/e2e.py $(BENCH_ARGS)
	$(PY) bench/features.py
	$(PY) bench/drift_overhead.py
	$(PY) bench/join.py
endif

bench-hot: ## windowed aggregates of hot entities: tiles vs the previous engine (private Redis, ~10 min, docs/features.md)
	$(PY) bench/hot_entities.py

soak: up ## soak of roles all and split: Redis memory, RSS, lag over time (RATE=500 DURATION=60 s each)
	$(PY) bench/soak.py --rate $(RATE) --duration $(DURATION)

clean: down ## remove the virtualenv and local state
	rm -rf $(VENV) .weir
