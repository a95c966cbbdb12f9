# Set-up is part of every target: a fresh clone needs only `make bench` and `make test`.
# On a machine without an NVIDIA driver the CPU wheel torch==2.13.0 is installed first,
# so nothing pulls a multi-GB CUDA build; GPU users install their own CUDA torch first
# (see README) and this keeps it.
VENV ?= .venv
PY := $(VENV)/bin/python
NPROC ?= 2
ARGS ?=

.PHONY: setup bench test lint report gate clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || \
	  { command -v nvidia-smi >/dev/null 2>&1 || $(PY) -m pip install -q torch==2.13.0; }
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

bench: setup
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) bench/run.py strategy=fsdp $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .

report: setup
	$(PY) -m reports results=results out=reports_out

gate: setup
	$(PY) -m bench.gate ab=true out=ab_out

clean:
	rm -rf $(VENV) .pytest_cache reports_out ab_out ci_out
