# One venv in .venv; every target below uses it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test lint bench demo loadtest clean

# the demo gateway's chat route has a deliberate slow tail and 1% errors
LOADTEST_ARGS ?= --load-profile smoke --p95-ms 250 --max-error-rate 0.05

$(BIN)/latency-sidecar: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[speed,test,dev,loadtest,bench]'
	touch $@

## test: create the venv, install, run the whole suite
test: $(BIN)/latency-sidecar
	$(BIN)/pytest -q

## lint: ruff and mypy
lint: $(BIN)/latency-sidecar
	$(BIN)/ruff check sidecar tests bench loadtest
	$(BIN)/ruff format --check sidecar tests bench loadtest
	$(BIN)/mypy

## demo: the embedded gateway + sidecar + traffic, live table
demo: $(BIN)/latency-sidecar
	$(BIN)/latency-sidecar demo

## loadtest: locust against the demo gateway behind the sidecar (report in loadtest/results)
loadtest: $(BIN)/latency-sidecar
	$(BIN)/python loadtest/run.py $(LOADTEST_ARGS)

## bench: the overhead benchmark (needs nginx and wrk: see bench/README.md)
bench: $(BIN)/latency-sidecar
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
