# `make serve` and `make test` set up .venv on first use; later runs reuse it.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Every dependency, pinned with its hashes (make lock writes it from pyproject.toml).
LOCK := requirements.lock
# An independent OHTTP client (npm @hpke/core, bhttp-js) for the interop tests.
NODE_DIR := tests/interop/node
NODE_STAMP := $(NODE_DIR)/node_modules/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test unit check lint typecheck audit sbom lock bench bench-ohttp bench-serving bench-audit bench-cluster console-screenshots clean-venv sandbox-deps docker-deps prometheus-deps chromium-deps cluster-deps

# Only what the lock names, each file checked against its hash; then Bastion itself, in
# place, built with the locked setuptools (no unpinned build environment).
$(STAMP): pyproject.toml $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch is pinned to the CPU build that lies on this machine's disk.
	$(BIN)/python -m pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# Re-resolve the lock after changing a pin in pyproject.toml (needs the package index).
lock: $(STAMP)
	$(BIN)/pip-compile --quiet --extra dev --generate-hashes --allow-unsafe --strip-extras \
	  --output-file $(LOCK) pyproject.toml

# A CycloneDX SBOM of the locked dependencies (with their hashes), in build/.
sbom: $(STAMP)
	@mkdir -p build
	$(BIN)/cyclonedx-py requirements $(LOCK) --output-format JSON --output-file build/sbom.cdx.json
	@echo "wrote build/sbom.cdx.json"

# Known vulnerabilities of the locked dependencies (pip-audit); says plainly when no
# vulnerability service could be reached.
audit: $(STAMP)
	$(BIN)/python scripts/audit_lock.py

$(NODE_STAMP): $(NODE_DIR)/package-lock.json
	@command -v npm >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq nodejs npm; \
	  else echo "the interop tests need Node.js and npm: install them (Debian: nodejs npm)" >&2; exit 1; fi; }
	cd $(NODE_DIR) && npm ci --no-audit --no-fund --loglevel=error
	@touch $(NODE_STAMP)

# Workers run inside bubblewrap (and its seccomp filter needs libseccomp): installed here
# when we run as root, otherwise a clear message (or `bastion serve --unsafe-no-sandbox`).
sandbox-deps:
	@command -v bwrap >/dev/null && ldconfig -p | grep -q libseccomp.so.2 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq bubblewrap libseccomp2; \
	  else echo "workers run in a bubblewrap sandbox: install Debian's bubblewrap and libseccomp2 (or serve with --unsafe-no-sandbox, trusted models only)" >&2; exit 1; fi; }

# The Docker sandbox (BASTION_SANDBOX=docker, or a model's sandbox=docker option) needs a
# running Docker engine. As root: Debian's docker.io, and dockerd started in the background
# (no bridge, no iptables: workers have no network anyway) unless an engine answers
# already. Otherwise a clear message.
DOCKERD_LOG ?= /var/log/dockerd.log
docker-deps:
	@docker info >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "the docker sandbox (and its tests) need a running Docker engine: install Debian's docker.io and start dockerd, or run this as root" >&2; exit 1; fi; \
	  command -v dockerd >/dev/null || { apt-get update -qq && apt-get install -y -qq docker.io >/dev/null; }; \
	  echo "starting dockerd (log: $(DOCKERD_LOG))"; \
	  nohup dockerd --iptables=false --bridge=none >$(DOCKERD_LOG) 2>&1 & \
	  for i in $$(seq 1 60); do docker info >/dev/null 2>&1 && exit 0; sleep 1; done; \
	  echo "dockerd did not answer within 60 s; see $(DOCKERD_LOG)" >&2; exit 1; }

# promtool (from Debian's prometheus package) checks deploy/prometheus's rules and the
# dashboard's queries (tests/unit/deploy): only the promtool binary is taken from the
# package, so no Prometheus service is installed or started. As root, fetched here;
# otherwise a clear message.
prometheus-deps:
	@command -v promtool >/dev/null || test -x $(BIN)/promtool || { 	  if [ "$$(id -u)" != 0 ]; then 	    echo "the deploy tests need promtool: install Debian's prometheus package (or run this as root)" >&2; exit 1; fi; 	  tmp=$$(mktemp -d) && cd $$tmp && apt-get update -qq && apt-get download -qq prometheus >/dev/null && 	  dpkg-deb -x prometheus_*.deb root && install -m 0755 root/usr/bin/promtool $(CURDIR)/$(BIN)/promtool && 	  cd / && rm -rf $$tmp; }

# The admin console's browser tests (tests/e2e/test_console.py) drive Debian's chromium
# through Playwright (whose own browser downloads are not used). As root, installed here;
# otherwise a clear message.
CHROMIUM ?= /usr/bin/chromium
chromium-deps:
	@test -x $(CHROMIUM) || { \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "the console's browser tests need Debian's chromium at $(CHROMIUM): install the chromium package (or run this as root)" >&2; exit 1; fi; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

# The cluster tests (tests/cluster, and the PostgreSQL/Redis tests elsewhere) start their own
# private PostgreSQL and Redis servers from Debian's packages, and simulate hosts with
# network namespaces (iproute2): installed here when we run as root (no service is enabled
# or started), otherwise a clear message.
cluster-deps:
	@test -x /usr/lib/postgresql/15/bin/postgres && command -v redis-server >/dev/null && command -v ip >/dev/null || { \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "the cluster tests need Debian's postgresql, redis-server and iproute2: install them (or run this as root)" >&2; exit 1; fi; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql-15 redis-server iproute2 >/dev/null; }

serve: $(STAMP) sandbox-deps
	$(BIN)/bastion serve --host $(HOST) --port $(PORT)

# The 25 slowest tests are listed at the end, to keep the whole run within its 20 minutes.
test: $(STAMP) $(NODE_STAMP) sandbox-deps docker-deps prometheus-deps chromium-deps cluster-deps
	$(BIN)/python -m pytest -q --durations=25 tests

# The fast inner loop: unit tests and the layering rules, no server, no sandbox (~40 s).
unit: $(STAMP) prometheus-deps
	$(BIN)/python -m pytest -q tests/unit tests/test_layering.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck audit test

bench: $(STAMP)
	$(BIN)/python benchmarks/gateway.py $(BENCH_ARGS)

bench-ohttp: $(STAMP)
	$(BIN)/python benchmarks/ohttp.py $(BENCH_ARGS)

# Every model kind under load against the ceiling and LitServe, with the targets (~10 min).
bench-serving: $(STAMP)
	$(BIN)/python benchmarks/serving.py $(BENCH_ARGS)

# The audit log: append and checkpoint costs, verify 1M records, gateway with auditing
# on vs off (~3 min).
bench-audit: $(STAMP)
	$(BIN)/python benchmarks/audit.py $(BENCH_ARGS)

# Beyond one machine: the Redis limiter, one vs two gateways on PostgreSQL + Redis, the
# worker channel local vs on a Ray node (mutual TLS), replacing a killed worker (~4 min).
bench-cluster: $(STAMP) cluster-deps
	$(BIN)/python benchmarks/cluster.py $(BENCH_ARGS)

# Refresh the console screenshots docs/console.md shows (the test run saves them in build/).
console-screenshots: $(STAMP) chromium-deps
	BASTION_CONSOLE_SCREENSHOTS=docs/console $(BIN)/python -m pytest -q tests/e2e/test_console.py -k screenshots

clean-venv:
	rm -rf $(VENV)
