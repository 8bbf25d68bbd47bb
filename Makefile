# Analogon: `make demo` runs every method on sample images with the embedded tiny model;
# `make test` runs the whole test suite (installing Krita 5 and Xvfb, and building a Krita 6
# root, first when run as root).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.analogon-installed
OUT ?= out/demo
APT_PACKAGES_TEST ?= krita xvfb x11-apps imagemagick
PYTEST_ARGS ?=

.PHONY: all venv demo test serve doctor bench krita-deps krita6-root clean

all: demo

# The virtual environment with the backend installed editable, plus the test extras.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { \
	  rm -rf $(VENV); \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; \
	  else echo "Python's venv module is missing: install python3-venv"; exit 1; fi; \
	  $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/analogon demo -o $(OUT)

# Krita, a virtual X server and screenshot tools (xwd, ImageMagick) for the tests that run
# inside real Krita (skipped without Krita).
krita-deps:
	@if ! command -v krita >/dev/null || ! command -v Xvfb >/dev/null || ! command -v xwd >/dev/null \
	    || ! convert -version >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES_TEST); \
	  else echo "note: krita/Xvfb not installed and not root: the Krita tests will be skipped"; fi; fi

# Krita 6 (Qt 6, PyQt6, Python 3.14) for the same in-Krita tests: a Debian sid root with
# Debian experimental's krita, built once (about 3 minutes, 1.8 GB) into a cache outside the
# checkout (tests/krita/krita6_root.py). Where it cannot be built (not root, no mounts, no
# Debian mirror) this says why and the Krita 6 tests are skipped with that reason.
krita6-root:
	$(PYTHON) tests/krita/krita6_root.py build

# pytest's exit code 5 ("no tests collected") fails this target like any other failure.
test: $(STAMP) krita-deps krita6-root
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

serve: $(STAMP)
	$(BIN)/analogon serve

doctor: $(STAMP)
	$(BIN)/analogon doctor

bench: $(STAMP)
	$(BIN)/analogon bench --json out/bench.json

clean:
	rm -rf out .pytest_cache
