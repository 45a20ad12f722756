VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test test-cluster lint fmt bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: install
	$(VENV)/bin/modelbridge serve

lint: install
	$(VENV)/bin/ruff check gateway policies tests bench
	$(VENV)/bin/ruff format --check gateway policies tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

fmt: install
	$(VENV)/bin/ruff format gateway policies tests bench
	$(VENV)/bin/ruff check --fix gateway policies tests bench

test: lint
	$(VENV)/bin/pytest

# The tests marked `cluster` again, on a Redis Cluster of 3 masters + 3 replicas (tests/redis_cluster.py).
test-cluster: install
	$(VENV)/bin/pytest --redis-cluster -m cluster

chaos: install
	MODELBRIDGE_CHAOS=1 $(VENV)/bin/pytest tests/test_chaos.py -p no:randomly -s -q

bench: install
	$(PY) -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .modelbridge .pytest_cache .mypy_cache .ruff_cache
