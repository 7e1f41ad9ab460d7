# One venv in .venv, installed from constraints.txt; every target below uses it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP_INSTALL := $(BIN)/pip install -q -c constraints.txt

.DEFAULT_GOAL := help
.PHONY: help test test-quick tools lint lock coverage bench instructions demo loadtest analysis contract clean

# the demo gateway's chat route has a deliberate slow tail and 1% errors
LOADTEST_ARGS ?= --load-profile smoke --p95-ms 250 --max-error-rate 0.05

$(BIN)/latency-sidecar: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(PIP_INSTALL) -e '.[speed,test,dev,loadtest,bench]'
	touch $@

## help: list the targets
help:
	@grep -E '^## ' $(MAKEFILE_LIST) | sed 's/^## /  make /'

## test: install what the suite needs (venv, system tools), run the whole suite
test: $(BIN)/latency-sidecar tools
	$(BIN)/pytest -q

## test-quick: the suite without the slow end-to-end tests (about a minute)
test-quick: $(BIN)/latency-sidecar tools
	$(BIN)/pytest -q -m "not slow"

## tools: install the system tools the tests drive (redis-server, prometheus, nginx, wrk, ...)
tools:
	@scripts/install-test-tools.sh

## lint: ruff and mypy (package strict, tests with check_untyped_defs)
lint: $(BIN)/latency-sidecar
	$(BIN)/ruff check sidecar tests bench loadtest
	$(BIN)/ruff format --check sidecar tests bench loadtest
	$(BIN)/mypy

## lock: re-pin every dependency into constraints.txt (after editing pyproject.toml)
lock: $(BIN)/latency-sidecar
	$(BIN)/uv pip compile pyproject.toml --all-extras --universal --python-version 3.11 \
	  -o constraints.txt --quiet --no-header
	sed -i '1i # Pinned versions of every dependency and extra: used by the Makefile, .ci/run (through make) and the Dockerfile.\n# Regenerate with `make lock` (uv pip compile; see README "Development").' constraints.txt

## coverage: the suite under coverage, subprocesses included; report in the terminal
coverage: $(BIN)/latency-sidecar tools
	rm -f .coverage .coverage.*
	COVERAGE_PROCESS_START=$(CURDIR)/pyproject.toml $(BIN)/coverage run -m pytest -q
	$(BIN)/coverage combine -q
	$(BIN)/coverage report

## demo: the embedded gateway + sidecar + traffic, live table
demo: $(BIN)/latency-sidecar
	$(BIN)/latency-sidecar demo

## loadtest: locust against the demo gateway behind the sidecar (report in loadtest/results)
loadtest: $(BIN)/latency-sidecar
	$(BIN)/python loadtest/run.py $(LOADTEST_ARGS)

## analysis: latency-sidecar analyze on the demo (report in analysis/<timestamp>/)
ANALYSIS_ARGS ?= --p95-ms 300
analysis: $(BIN)/latency-sidecar
	$(BIN)/latency-sidecar analyze $(ANALYSIS_ARGS)

## bench: the overhead benchmark (needs nginx and wrk: see bench/README.md)
bench: $(BIN)/latency-sidecar tools
	$(BIN)/python bench/overhead.py

## instructions: callgrind instructions per proxied request (deterministic; bench/README.md)
instructions: $(BIN)/latency-sidecar tools
	$(BIN)/python bench/instructions.py

## contract: refresh docs/contract.md from the steering copy of the SPEC, when present
contract:
	cp ../shared/SPEC.md docs/contract.md

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage .coverage.*
