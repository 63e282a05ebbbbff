# Set-up and entry points. Each target creates its venv when missing and installs what it needs.
# `make test` and `make quickstart` install the exact versions in constraints.txt (what the suite
# passed with); `make test-latest` installs the newest releases pyproject.toml allows into a
# separate venv, so a breaking upstream release shows the day it appears.
# A GPU user picks another torch build, e.g.:
#   make test TORCH="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
LATEST_VENV ?= .venv-latest
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: quickstart test test-latest install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" $(TORCH_INDEX)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/rlhf pipeline recipes/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q tests

# torch stays at $(TORCH): the newest torch on PyPI is a CUDA build of several GB.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install -q "$(TORCH)" $(TORCH_INDEX)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager "$(TORCH)" $(TORCH_INDEX) -e ".[dev]"
	$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable | grep -iE '^(transformers|peft|accelerate|datasets|tokenizers|safetensors|huggingface.hub)=='
	$(LATEST_VENV)/bin/python -m pytest -q tests

clean:
	rm -rf runs .pytest_cache
