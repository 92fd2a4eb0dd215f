# lsbd: `make demo` shows it off, `make test` runs the whole suite.
# Both install what they need: Debian packages through apt-get (when root)
# and Python packages into .venv.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

# Debian packages: FUSE (fusermount3), ext4 tools, the NBD clients and servers
# the tests and benchmarks talk to, the FUSE peers of the benchmark (s3backer,
# bindfs), and the tools that make TLS credentials for the NBD TLS tests
# (openssl, GnuTLS's psktool).
DEB_PACKAGES := fuse3 e2fsprogs libnbd-bin python3-libnbd \
                nbdkit qemu-utils fio s3backer bindfs util-linux openssl gnutls-bin

# s3rver, a second S3 implementation the store tests run against (npm, into
# a folder of the project; Node.js and npm come from Debian).
NODE_DIR := .node
S3RVER   := $(NODE_DIR)/node_modules/.bin/s3rver

.PHONY: all demo test test-unit test-slow lint bench bench-distant sysdeps nodedeps venv clean

all: venv

sysdeps:
	@missing=""; for p in $(DEB_PACKAGES); do \
	    dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" != 0 ]; then echo "please install:$$missing (as root)"; exit 1; fi; \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@if ! command -v npm >/dev/null 2>&1; then \
	    if [ "$$(id -u)" != 0 ]; then echo "please install: nodejs npm (as root)"; exit 1; fi; \
	    echo "installing Debian packages: nodejs npm"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; \
	fi

nodedeps: $(S3RVER)

$(S3RVER):
	npm install --prefix $(NODE_DIR) --no-save --no-audit --no-fund --loglevel=error s3rver@3

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[fuse,test]'
	touch $(STAMP)

demo: sysdeps venv
	$(VENV)/bin/python scripts/demo.py

# Static checks: ruff (likely bugs) on the product, its tests, benches and
# scripts; mypy (types) on the product.
lint: venv
	$(VENV)/bin/ruff check lsbd nbd fuse tests bench scripts
	$(VENV)/bin/mypy

# The whole suite; any non-zero pytest exit fails (including 5: no tests ran).
# --durations lists the slowest tests at the end of the log.
test: sysdeps venv nodedeps lint
	$(VENV)/bin/pytest -q -m "not slow" --timeout=600 --durations=25 tests

# The fast tier: pure code, no store, no mounts, no subprocesses (seconds).
test-unit: venv
	$(VENV)/bin/pytest -q --timeout=120 tests/unit

test-slow: sysdeps venv nodedeps
	$(VENV)/bin/pytest -q -m slow --timeout=3600 tests

# Speed against the peers on this machine, in one run (minutes; not a test).
bench: sysdeps venv
	$(PY) bench/nbd_bench.py --runtime 10 --size 1G
	$(PY) bench/fuse_bench.py --runtime 10

# lsbd and s3backer against a store 10 and 40 ms away (moto behind a delaying
# proxy): the workflow of #17, about 15 minutes.
bench-distant: sysdeps venv
	$(PY) bench/distant_bench.py --delays 10,40

clean:
	rm -rf $(VENV) $(NODE_DIR) build *.egg-info .pytest_cache .hypothesis
