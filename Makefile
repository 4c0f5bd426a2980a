# pacsnode: two commands.
#   make run    set up a virtual environment, install the OHIF viewer when npm is
#               there (build/viewer/), and run the node on embedded defaults
#   make test   set up everything the tests need and run the whole suite
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export PACSNODE_DATA_DIR ?= $(CURDIR)/data
export PACSNODE_CONFIG ?= $(CURDIR)/pacsnode.example.yaml

.PHONY: run test install viewer debian-packages services lint bench-ingest bench-dicomweb clean

$(BIN)/.installed: pyproject.toml constraints.txt
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || scripts/install-debian-packages python
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip 'setuptools>=77'
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,lab]'
	@touch $@

install: $(BIN)/.installed

# Without npm the node still runs; it says the viewer is missing and how to install it.
viewer:
	@if ! command -v npm >/dev/null; then \
	  echo "npm not found: the node runs without the viewer (docs/viewer.md)"; \
	elif ! scripts/install-viewer; then \
	  echo "the viewer could not be installed: the node runs without it (docs/viewer.md)"; fi

run: install viewer
	$(BIN)/pacsnode serve

debian-packages:
	scripts/install-debian-packages tests

services:
	scripts/start-services

test: install debian-packages services
	scripts/install-viewer
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
