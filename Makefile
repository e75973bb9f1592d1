# Two entry points for a fresh machine; each creates .venv and installs nextword into it on first use.
#   make serve   start the server on the default model (fetched and imported on first use)
#   make test    run the test suite (lint included)
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

.PHONY: install serve generate test lint
install: $(VENV)/.installed

serve: $(VENV)/.installed
	$(VENV)/bin/nextword serve $(ARGS)

generate: $(VENV)/.installed
	$(VENV)/bin/nextword generate "$(or $(PROMPT),The capital of France is)" $(ARGS)

test: $(VENV)/.installed
	$(VENV)/bin/pytest $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
