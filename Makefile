# Set-up and entry points. Each target creates .venv when missing and installs what it needs.
# A GPU user picks another torch build, e.g.:
#   make test TORCH="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: quickstart test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" $(TORCH_INDEX)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/rlhf pipeline recipes/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf runs .pytest_cache
