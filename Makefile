# stepworker: `make demo` runs the demo job, `make test` runs lint, types and the tests.
# Both bootstrap .venv themselves on a fresh machine.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
PYTEST_ARGS ?= -n 2

.PHONY: demo test lint typecheck unit bench redis-server clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $@

redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server; \
	  else echo "redis-server is missing: sudo apt-get install redis-server" >&2; exit 1; fi; }

demo: $(STAMP) redis-server
	$(BIN)/stepworker demo

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck redis-server
	$(BIN)/pytest $(PYTEST_ARGS)

unit: $(STAMP) redis-server
	$(BIN)/pytest $(PYTEST_ARGS) -m "not integration"

bench: $(STAMP) redis-server
	$(BIN)/python -m benchmarks.throughput
	$(BIN)/python -m benchmarks.waits
	$(BIN)/python -m benchmarks.queries

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis build *.egg-info
