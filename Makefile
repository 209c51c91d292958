# stepworker: `make demo` runs the demo job, `make test` runs lint, types and the tests.
# Both bootstrap .venv themselves on a fresh machine.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
PYTEST_ARGS ?= -n 2

.PHONY: demo test lint typecheck unit bench redis-server clean lint-venv lint-deploy lock bump-base-image cfn

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

# Linters for deploy/ (cfn-lint, checkov, kubernetes-validate, hadolint, parliament) in a venv of their
# own: checkov's dependency pins must never meet the runtime's. tests/deploy/test_linters.py runs them.
LINT_VENV ?= .venv-lint
LINT_STAMP := $(LINT_VENV)/.installed-$(shell sha1sum deploy/ci/lint-requirements.txt | cut -c1-12)

$(LINT_STAMP): deploy/ci/lint-requirements.txt
	$(PYTHON) -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LINT_VENV)/bin/python -m pip install --quiet -r deploy/ci/lint-requirements.txt
	rm -f $(LINT_VENV)/.installed-*
	touch $@

lint-venv: $(LINT_STAMP)

lint-deploy: $(LINT_STAMP) $(STAMP)
	STEPWORKER_REQUIRE_LINTERS=1 $(BIN)/pytest -n 0 -q tests/deploy tests/worker/test_iam_scoping.py

# The generated IAM policies, and the CloudFormation template that embeds them.
cfn: $(STAMP)
	$(BIN)/python -m worker.iam
	$(BIN)/python deploy/cloudformation/build.py

# deploy/requirements.lock: every dependency of the image and the EC2 hosts, with hashes.
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet pip-tools==7.6.2
	.venv-lock/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url \
	  --no-emit-find-links --extra flower --extra api --output-file deploy/requirements.lock pyproject.toml
	echo "setuptools>=68" | .venv-lock/bin/pip-compile --quiet --generate-hashes --allow-unsafe --no-emit-index-url \
	  --no-emit-find-links --output-file deploy/build-requirements.lock -

# Prints the digest to put on deploy/Dockerfile's FROM line (needs Docker and registry access).
bump-base-image:
	docker buildx imagetools inspect python:3.11-slim-bookworm --format '{{json .Manifest.Digest}}'

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis build *.egg-info
