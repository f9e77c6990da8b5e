# One entry point for everything: each target creates .venv when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast test-unit test-integration test-e2e check proto docs demo bench bench-quick clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# One pytest process per core. The in-process tests are bound by one GIL
# each; the end-to-end tests, which load every core, run one at a time in
# one of them (tests/conftest.py puts them in one xdist group).
PARALLEL := -n auto --dist loadgroup

## The whole suite: unit, integration (in-process cluster) and end-to-end tests.
test: $(STAMP)
	$(PY) -m pytest $(PARALLEL)

## Everything but the end-to-end tests that start processes.
test-fast: $(STAMP)
	$(PY) -m pytest $(PARALLEL) -m "not e2e"

## One level of the suite: units, the in-process cluster, real processes.
test-unit: $(STAMP)
	$(PY) -m pytest $(PARALLEL) tests/unit

test-integration: $(STAMP)
	$(PY) -m pytest $(PARALLEL) tests/integration

test-e2e: $(STAMP)
	$(PY) -m pytest tests/e2e

## Lint, format, types, and generated stubs in sync with proto/.
check: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) scripts/gen_proto.py --check
	$(PY) scripts/gen_config_docs.py --check

## Regenerate docs/configuration.md from the config dataclasses.
docs: $(STAMP)
	$(PY) scripts/gen_config_docs.py

## Regenerate ps_common/proto/ from proto/*.proto.
proto: $(STAMP)
	$(PY) scripts/gen_proto.py

## 2 servers, 4 workers, the digits job, live progress and a summary.
demo: $(STAMP)
	$(VENV)/bin/ps-train --servers 2 --workers 4

## Side-by-side benchmarks (ratios against baselines measured in the same run).
bench: $(STAMP)
	$(PY) -m benchmarks

bench-quick: $(STAMP)
	$(PY) -m benchmarks --quick --out bench.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
