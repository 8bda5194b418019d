# relayd: the two commands are `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint typecheck unit integration bench clean system-deps

$(STAMP): setup.cfg requirements.lock
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || \
		{ apt-get update -q && apt-get install -y -q python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation \
		--config-settings editable_mode=compat -e .
	touch $(STAMP)

## run: start relayd on its example config (plain HTTP on 127.0.0.1:8080) with the
## fake upstream on 127.0.0.1:8900 standing in for the real providers.
run: $(STAMP)
	$(BIN)/python -m relayd.testing.demo

## test: lint, type-check and the whole test suite (unit + integration with real processes).
test: $(STAMP) system-deps lint typecheck
	$(BIN)/pytest -q tests

## system-deps: Debian packages the tests use (promtool), installed with apt when missing.
system-deps:
	@sh scripts/system-deps.sh

lint: $(STAMP)
	$(BIN)/ruff check relayd twisted tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/pytest -q tests/integration

bench: $(STAMP)
	$(BIN)/python bench/relay_bench.py

clean:
	rm -rf $(VENV) build *.egg-info twisted/plugins/dropin.cache
