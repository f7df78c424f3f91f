# Everything a fresh machine needs: `make demo` and `make test` each create the virtual environment first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-long test bench lint

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev,export]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m launch.demo

demo-long: $(STAMP)
	$(PY) -m launch.demo --long

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadscope

bench: $(STAMP)
	$(PY) -m bench

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
