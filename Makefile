# Every target that runs code depends on `setup`, so `make run` or `make test` alone sets up a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Quiet, offline-friendly defaults for the services the pipeline talks to.
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0
export PYTHONUNBUFFERED ?= 1

.PHONY: setup run test test-quick test-faults lint bench bench-serve clean

setup: $(STAMP)

# torch first, pinned exactly: the pair lies on local disk and a looser request resolves a multi-GB download.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

run: setup
	$(BIN)/ddpm pipeline $(ARGS)

# Two pytest-xdist workers, each module on one of them (its module fixtures, a cluster or a Ray, start once), the
# longest modules first (tests/conftest.py). TEST_WORKERS=0 runs the suite in this one process.
TEST_WORKERS ?= 2
test: setup browser
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder $(PYTEST_ARGS)

# The unit tier: no server, Ray cluster or pipeline (tests/conftest.py refuses to start one there); for every edit.
test-quick: setup
	$(BIN)/python -m pytest -m "not system and not gpu" $(PYTEST_ARGS)

# The service page's test (tests/test_serve.py) drives Debian's Chromium through Playwright, which never downloads a
# browser of its own. Installed once, as root, from Debian's packages; elsewhere install `chromium` yourself.
.PHONY: browser
browser:
	@command -v chromium >/dev/null || { apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; } || \
	    { echo "make: Debian's chromium is missing and could not be installed: apt-get install chromium" >&2; exit 1; }

# The fault tests alone (concurrent runs, a killed flow, MLflow lost mid-run, the soak); `make test` runs them too.
test-faults: setup
	$(BIN)/python -m pytest -m faults $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check ddpm flows tests bench infra

bench: setup
	$(BIN)/python bench/bench.py

# `ddpm serve` beside a plain FastAPI app (bench/plain_app.py) -> bench/serve.json (docs/performance.md). On a registry
# of its own unless ARGS="--url URL --tracking-uri URI" names a running service and its registry.
bench-serve: setup
	$(BIN)/python bench/serve.py $(ARGS)

clean:
	rm -rf runs .pytest_cache

# The local cluster (Ray head, Prefect, MLflow, the deployments' serve process, `ddpm serve`), all on 127.0.0.1,
# state in .cluster/. See infra/README.md.
.PHONY: cluster-up cluster-down cluster-status

cluster-up: setup
	infra/cluster.sh up

cluster-down: setup
	infra/cluster.sh down

cluster-status: setup
	infra/cluster.sh status
