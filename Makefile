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

.PHONY: all demo test test-slow lint bench sysdeps venv clean

all: venv

sysdeps:
	@missing=""; for p in $(DEB_PACKAGES); do \
	    dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" != 0 ]; then echo "please install:$$missing (as root)"; exit 1; fi; \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[fuse,test]'
	touch $(STAMP)

demo: sysdeps venv
	$(VENV)/bin/python scripts/demo.py

# Static checks: ruff (likely bugs) on the product's code.
lint: venv
	$(VENV)/bin/ruff check lsbd nbd fuse

# The whole suite; any non-zero pytest exit fails (including 5: no tests ran).
test: sysdeps venv lint
	$(VENV)/bin/pytest -q -m "not slow" --timeout=600 tests

test-slow: sysdeps venv
	$(VENV)/bin/pytest -q -m slow --timeout=3600 tests

# Speed against the peers on this machine, in one run (minutes; not a test).
bench: sysdeps venv
	$(PY) bench/nbd_bench.py --runtime 10 --size 1G
	$(PY) bench/fuse_bench.py --runtime 10

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
