# Set-up is part of every target: a fresh clone needs only `make bench` and `make test`.
# bench/launch/install_torch.py installs torch first: a torch that imports is kept (a GPU user's own
# CUDA build); with an NVIDIA driver the default index's CUDA build; without one only a CPU build (from
# pip's configured sources or PyTorch's CPU index), else it stops before installing anything.
VENV ?= .venv
PY := $(VENV)/bin/python
NPROC ?= 2
# test processes for make test (pytest-xdist, one test file per worker at a time: module fixtures run once)
TEST_WORKERS ?= 2
ARGS ?=

.PHONY: setup bench test test-fast test-dist test-e2e lint report gate clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || { echo "[setup] creating $(VENV) (python3 -m venv)"; python3 -m venv $(VENV); }
	@$(PY) -m bench.launch.install_torch
	@echo "[setup] installing n00bGPT and its dependencies into $(VENV) (pip install -e '.[dev,hf,log]')"
	@$(PY) -m pip install -q -e '.[dev,hf,log]'
	@touch $@
	@echo "[setup] done: commands run as $(VENV)/bin/python ... or after 'source $(VENV)/bin/activate'"

bench: setup
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) bench/run.py strategy=fsdp $(ARGS)

# every tier: unit, dist, e2e, browser (docs/testing.md: what each holds, how long it takes); the 15 slowest
# tests are listed at the end, so every CI log says where its time went
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 $(ARGS)

# the unit tier: what a developer runs before every commit
test-fast: setup
	$(PY) -m pytest -q --tier=unit $(ARGS)

test-dist: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --tier=dist $(ARGS)

test-e2e: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --tier=e2e,browser $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .

report: setup
	$(PY) -m reports results=results out=reports_out

gate: setup
	$(PY) -m bench.gate ab=true out=ab_out

clean:
	rm -rf $(VENV) .pytest_cache reports_out ab_out ci_out mutation_out
