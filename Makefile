# smsp: `make run` runs the service in mock mode, `make test` checks everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8080

.PHONY: run test lint unit functional fuzz soak soak-ci bench docker image-test clean

$(STAMP): requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

run:
	@echo "smsp in mock mode on port $(PORT), API key 'dev'. Try:"
	@echo '  curl -i -H "X-API-KEY: dev" -H "Content-Type: application/json" -d '\''{"fromaddress":"a@example.com","toaddress":"b@example.com","subject":"hi","plaintextbody":"hello"}'\'' http://127.0.0.1:$(PORT)/email'
	SMSP_MOCK_EMAIL_SERVICE=true SMSP_API_KEY=dev $(PYTHON) smsp.py --port $(PORT)

test: lint unit functional soak-ci

lint: $(STAMP)
	$(BIN)/ruff check .
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/lint-deploy.sh

unit: $(STAMP)
	$(BIN)/python -m pytest -q test_smsp.py test_faults.py test_fakes.py test_hardening.py \
		--cov=smsp --cov-report=term-missing:skip-covered --cov-fail-under=90

functional: $(STAMP)
	$(BIN)/python -m pytest -q functional_test.py
	SMSP_PROTOCOL=https $(BIN)/python -m pytest -q functional_test.py

fuzz:
	bash scripts/fuzz.sh

soak:
	$(PYTHON) scripts/soak.py --requests 50000

soak-ci:
	$(PYTHON) scripts/soak.py --requests 5000

bench:
	$(PYTHON) bench/run.py

docker:
	docker build -t smsp:latest .

image-test:
	bash scripts/image-test.sh

clean:
	rm -rf $(VENV) .venv-fuzz .pytest_cache .ruff_cache .coverage .hypothesis .schemathesis \
		__pycache__ */__pycache__
