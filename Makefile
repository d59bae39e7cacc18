# Two commands do everything on a fresh machine (CPU is enough):
#   make demo   - import a tiny HF model, evaluate, train SimPO (2 processes, TP2), evaluate
#   make test   - lint + the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch must be installed before anything that depends on it, or pip pulls a
# multi-GB CUDA build. On a GPU machine, use an existing CUDA torch (see README).
TORCH_SPEC ?= torch==2.13.0
NPROC ?= 2

.PHONY: install test demo lint format clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(PY) -m ruff check megatron_simpo tests tools benchmarks
	$(PY) -m ruff format --check megatron_simpo tests tools benchmarks

format: install
	$(PY) -m ruff format megatron_simpo tests tools benchmarks
	$(PY) -m ruff check --fix megatron_simpo tests tools benchmarks

test: lint
	$(PY) -m pytest -q

demo: install
	$(PY) tools/demo.py --nproc $(NPROC)

clean:
	rm -rf runs .pytest_cache
