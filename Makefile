# sockd: each target sets up .venv by itself.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
CONFIG ?= etc/sockd.ini
PYTEST_ARGS ?=

# The suite again against the oldest Twisted setup.cfg allows, in a venv of
# its own: the lower bound is a tested promise.
OLDEST   ?= .venv-oldest
TWISTED_OLDEST := $(shell sed -n 's/^ *Twisted\[tls\]>=\([0-9.]*\).*/\1/p' setup.cfg)

.PHONY: run test lint typecheck unit test-oldest bench soak dist clean

# The venv, with sockd installed in "compat" editable mode: twistd finds the
# plugin through a path entry (the default editable mode hides it).
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet --config-settings editable_mode=compat -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed setup.cfg
	$(BIN)/python -m pip install --quiet --config-settings editable_mode=compat -e '.[test,dev]'
	touch $@

run: $(VENV)/.installed
	$(BIN)/twistd --nodaemon --pidfile= sockd --config $(CONFIG)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check sockd tests twisted bench
	$(BIN)/ruff format --check sockd tests twisted bench

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

unit: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test: lint typecheck unit

$(OLDEST)/.installed: setup.cfg pyproject.toml
	@test -n "$(TWISTED_OLDEST)" || { echo "setup.cfg names no lower bound for Twisted[tls]" >&2; exit 1; }
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install --quiet --upgrade pip
	$(OLDEST)/bin/python -m pip install --quiet --config-settings editable_mode=compat \
	  -e '.[test]' 'Twisted[tls]==$(TWISTED_OLDEST)'
	touch $@

test-oldest: $(OLDEST)/.installed
	$(OLDEST)/bin/python -c 'import twisted; print("Twisted", twisted.__version__)'
	$(OLDEST)/bin/python -m pytest -q $(PYTEST_ARGS)

# uvloop, py-spy, matplotlib: the benchmark skips the uvloop references and
# the charts without them.
$(VENV)/.installed-bench: $(VENV)/.installed-test setup.cfg
	$(BIN)/python -m pip install --quiet --config-settings editable_mode=compat -e '.[test,dev,bench]' \
	  || echo "bench: the bench extra (uvloop, py-spy, matplotlib) did not install; uvloop references and charts will be skipped"
	touch $@

# BENCH_ARGS=--quick for a short run; --only echo,chat for some modules;
# --compare docs/performance.json against the recorded run.  Charts of the
# scaling rows go to docs/ (python -m bench --help says more).
bench: $(VENV)/.installed-bench
	$(BIN)/python -m bench --charts docs $(BENCH_ARGS)

# One echo daemon under repeated mixed load: descriptors and memory must stay
# flat.  SOAK_ARGS=--minutes 10 for longer.
soak: $(VENV)/.installed-test
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

# build, and what pyproject.toml's [build-system] requires, so that dist
# builds offline once they are installed.
$(VENV)/.installed-build: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet build 'setuptools>=68' wheel
	touch $@

# dist/sockd-VERSION.tar.gz and the wheel built from it, for
# `pip install dist/sockd-*.whl` (docs/deploy.md).
dist: $(VENV)/.installed-build
	rm -rf dist
	$(BIN)/python -m build --no-isolation --outdir dist .

clean:
	rm -rf $(VENV) $(OLDEST) build dist *.egg-info _trial_temp* .mypy_cache .ruff_cache
	find . -name dropin.cache -delete -o -name __pycache__ -prune -exec rm -rf {} +
