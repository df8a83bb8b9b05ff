# Quick start:  make demo   (set up, then generate with the built-in demo model)
#               make test   (set up, then run the test suite)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch==2.13.0 is a local CPU wheel on our CPU machines; on a machine that already has a CUDA torch in the
# venv, set TORCH_SPEC="" to keep it.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ] && ! $(PY) -c "import torch" 2>/dev/null; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/nanoserve generate --prompt "The quick brown fox" --max-tokens 32

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check nanoserve tests benchmarks

bench: setup
	$(PY) benchmarks/compare.py

clean:
	rm -rf $(VENV) *.egg-info
