# Quick start: `make serve` (the service; demo model unless BAGEL_CHECKPOINT is set) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test serve

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU machines here carry a local torch 2.13.0 wheel; elsewhere pip takes PyPI's build.
	$(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

serve: install
	$(VENV)/bin/bagel serve
