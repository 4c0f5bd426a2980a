# pacsnode: two commands.
#   make run    set up a virtual environment and run the node on embedded defaults
#   make test   set up everything the tests need and run the whole suite
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export PACSNODE_DATA_DIR ?= $(CURDIR)/data
export PACSNODE_CONFIG ?= $(CURDIR)/pacsnode.example.yaml

.PHONY: run test install debian-packages services lint bench-ingest bench-dicomweb clean

$(BIN)/.installed: pyproject.toml constraints.txt
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || scripts/install-debian-packages python
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip 'setuptools>=77'
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,lab]'
	@touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/pacsnode serve

debian-packages:
	scripts/install-debian-packages tests

services:
	scripts/start-services

test: install debian-packages services
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench-ingest: install debian-packages
	$(BIN)/python bench/ingest

bench-dicomweb: install debian-packages
	$(BIN)/python bench/dicomweb

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
