# Two commands do everything on a fresh machine (CPU is enough):
#   make demo   - import a tiny HF model, evaluate, train SimPO (2 processes, TP2), evaluate
#   make test   - lint + the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch must be installed before anything that depends on it, or pip pulls a
# multi-GB CUDA build. On a GPU machine, use an existing CUDA torch (see README).
TORCH_SPEC ?= torch==2.13.0
NPROC ?= 2

.PHONY: install test demo lint format clean gpu-wheels

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

# Wheels that benchmarks/gpu_check.sh installs on a lent GPU machine (CUDA torch for Python 3.12,
# x86-64, no package index; it has pyarrow, pandas, xxhash, pyyaml, safetensors, psutil,
# tensorboard, pytest): megatron-core (its wheels are per Python version: cp312), datasets and
# the two it needs that the machine lacks. ~3.2 MB; carry benchmarks/wheels (git-ignored) with
# the call. Another image: add what `gpu_check.sh`'s setup stage names, e.g.
#   make gpu-wheels GPU_WHEELS_EXTRA="pyarrow==22.0.0"
GPU_PIP ?= python3 -m pip
GPU_PYTHON_VERSION ?= 3.12
GPU_WHEELS ?= megatron-core==0.19.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
GPU_WHEELS_EXTRA ?=
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
	manylinux2014_x86_64

gpu-wheels:
	rm -rf benchmarks/wheels
	$(GPU_PIP) download --no-deps --only-binary=:all: --implementation cp \
		--python-version $(GPU_PYTHON_VERSION) $(addprefix --platform ,$(GPU_PLATFORMS)) \
		-d benchmarks/wheels $(GPU_WHEELS) $(GPU_WHEELS_EXTRA)
	du -sh benchmarks/wheels
