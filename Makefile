# Two entry points (see README "Quick start"): `make bench` and `make test`.
# Both create the virtual environment on first use: torch==2.13.0 FIRST (CPU wheel), then the package.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ocnopt-installed

.PHONY: bench test lint env

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[bench,data,ode,timeseries,peers,lightning,dev]"
	touch $(STAMP)

env: $(STAMP)

bench: $(STAMP)
	$(VENV)/bin/ocnopt bench

test: $(STAMP)
	$(VENV)/bin/ruff check src tests examples
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples
