# smsp: `make run` runs the service in mock mode, `make test` checks everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8080
HOST ?= 127.0.0.1

.DEFAULT_GOAL := help
.PHONY: help run test lint unit functional promtool promtool-install redis-install fuzz soak \
	soak-ci bench docker image-test clean

$(STAMP): requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 14

run: ## smsp in mock mode on 127.0.0.1:8080 (set HOST=0.0.0.0 or PORT= to change)
	@echo "smsp in mock mode on $(HOST):$(PORT), API key 'dev'. Try:"
	@echo '  curl -i -H "X-API-KEY: dev" -H "Content-Type: application/json" -d '\''{"fromaddress":"a@example.com","toaddress":"b@example.com","subject":"hi","plaintextbody":"hello"}'\'' http://127.0.0.1:$(PORT)/email'
	SMSP_MOCK_EMAIL_SERVICE=true SMSP_API_KEY=dev $(PYTHON) smsp.py --host $(HOST) --port $(PORT)

test: lint unit functional promtool soak-ci ## everything the tests need, installed, then lint, unit, functional, promtool, soak

lint: $(STAMP) ## ruff, mypy --strict and the deploy files
	$(BIN)/ruff check .
	$(BIN)/mypy --strict smsp.py
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/lint-deploy.sh

unit: $(STAMP) promtool-install redis-install ## the unit, fault and provider suites with coverage
	$(BIN)/python -m pytest -q test_*.py \
		--cov=smsp --cov-report=term-missing:skip-covered --cov-fail-under=90

functional: $(STAMP) ## the black-box suite against a live smsp, HTTP and HTTPS
	$(BIN)/python -m pytest -q functional_test.py
	SMSP_PROTOCOL=https $(BIN)/python -m pytest -q functional_test.py

# promtool is in Debian's prometheus package (/usr/bin/promtool); installed only
# when missing. Without recommends: they would add prometheus-node-exporter.
promtool-install:
	command -v promtool >/dev/null || (apt-get update && apt-get install -y --no-install-recommends prometheus)

# The idempotency-store tests run against a real redis-server (Debian's redis-server
# package, 7.0+ for SET ... NX GET), installed only when missing; and against Valkey too
# where the distribution has valkey-server (Debian 12 does not; the Valkey rows then skip).
redis-install:
	command -v redis-server >/dev/null || (apt-get update && apt-get install -y --no-install-recommends redis-server)
	command -v valkey-server >/dev/null || ! apt-cache show valkey-server >/dev/null 2>&1 || \
		apt-get install -y --no-install-recommends valkey-server

# The alerting rules: syntax and PromQL, then their unit tests.
promtool: promtool-install ## check and unit-test the alerting rules
	promtool check rules deploy/prometheus-rules.yaml
	promtool test rules deploy/prometheus-rules.test.yaml

fuzz: ## schemathesis against the live OpenAPI document
	bash scripts/fuzz.sh

soak: ## 50,000 mixed requests; threads and memory checked
	$(PYTHON) scripts/soak.py --requests 50000

soak-ci:
	$(PYTHON) scripts/soak.py --requests 5000

bench: ## the benchmark (minutes; see docs/benchmark.md)
	$(PYTHON) bench/run.py

docker:
	docker build -t smsp:latest .

image-test: ## build the image with podman and test it
	bash scripts/image-test.sh

clean: ## remove the venvs and caches
	rm -rf $(VENV) .venv-fuzz .pytest_cache .ruff_cache .coverage .hypothesis .schemathesis \
		__pycache__ */__pycache__
