# Two commands do everything on a fresh machine (CPU is enough):
#   make demo   - import a tiny HF model, evaluate, train SimPO (2 processes, TP2), evaluate
#   make test   - lint + the whole test suite (megatron-core 0.16.1), then `pip install .`
#                 without extras (test-install), then the correctness tests on megatron-core
#                 0.19.2 (test-mcore019). This is what CI runs.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch must be installed before anything that depends on it, or pip pulls a
# multi-GB CUDA build. On a GPU machine, use an existing CUDA torch (see README).
TORCH_SPEC ?= torch==2.13.0
NPROC ?= 2

# Second venv: torch, then `pip install .` with no extras, as a GPU cluster would (README).
# test-install uses it as installed (megatron-core 0.16.1); test-mcore019 runs the correctness
# tests in it with megatron-core 0.19.2 put first on PYTHONPATH. 0.17+ declare Python >=3.12 and
# ship cp312 wheels only, but their sources run on 3.11 (only the dataset helper .so, unused
# here, does not load): the wheel is fetched with `pip download` and unzipped, not installed.
BARE ?= .venv-mcore019
BARE_PY := $(BARE)/bin/python
MCORE019 ?= 0.19.2
MCORE019_DIR := $(abspath $(BARE))/megatron-core-$(MCORE019)
# Layouts, resume, conversion, packing, export, generate, and the cheap numerics around them.
MCORE019_TESTS ?= tests/test_cpu_platform.py tests/test_compat.py tests/test_loss.py \
	tests/test_logprobs.py tests/test_layouts.py tests/test_resume.py tests/test_convert.py \
	tests/test_packing.py tests/test_export.py tests/test_generate.py tests/test_hf_parity.py \
	tests/test_moe.py
# Of those files, checks that never reach Megatron-Core (one-line CLI errors raised before any
# model or checkpoint is read; the SIGTERM stop flag, whose checkpoint path the lane's other
# resume tests save and load) are made in the main suite only: ~35 s of the lane.
MCORE019_DESELECT ?= tests/test_convert.py::test_convert_cli_errors \
	tests/test_export.py::test_export_errors \
	tests/test_resume.py::test_sigterm_checkpoints_and_exits_cleanly
SOURCES := $(shell find megatron_simpo -name '*.py')

.PHONY: install test test-suite test-install test-mcore019 demo lint format clean gpu-wheels

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

test: test-suite test-install test-mcore019

test-suite: lint
	$(PY) -m pytest -q

$(BARE)/.installed: pyproject.toml $(SOURCES)
	test -x $(BARE_PY) || python3 -m venv $(BARE)
	$(BARE_PY) -m pip install -q --upgrade pip
	$(BARE_PY) -m pip install -q "$(TORCH_SPEC)"
	$(BARE_PY) -m pip install -q .
	touch $@

test-install: install $(BARE)/.installed
	MEGATRON_SIMPO_BARE_VENV=$(abspath $(BARE)) $(PY) -m pytest -q tests/test_install.py

$(MCORE019_DIR)/.unpacked: | $(BARE)/.installed
	rm -rf $(MCORE019_DIR) && mkdir -p $(MCORE019_DIR)
	$(BARE_PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		-d $(MCORE019_DIR) "megatron-core==$(MCORE019)"
	cd $(MCORE019_DIR) && $(abspath $(BARE_PY)) -m zipfile -e megatron_core-*.whl . && rm megatron_core-*.whl
	touch $@

# pytest only (not the [test] extra's ruff): the venv stays what `pip install .` made.
test-mcore019: $(BARE)/.installed $(MCORE019_DIR)/.unpacked
	$(BARE_PY) -m pip install -q "pytest>=8"
	PYTHONPATH=$(CURDIR):$(MCORE019_DIR) $(BARE_PY) -W ignore -c \
		"import megatron_simpo, importlib.metadata as m, megatron.core as c; \
		assert m.version('megatron-core') == '$(MCORE019)' and '$(MCORE019_DIR)' in c.__file__, c.__file__"
	PYTHONPATH=$(CURDIR):$(MCORE019_DIR) $(BARE_PY) -m pytest -q $(MCORE019_TESTS) \
		$(addprefix --deselect ,$(MCORE019_DESELECT))

demo: install
	$(PY) tools/demo.py --nproc $(NPROC)

clean:
	rm -rf runs .pytest_cache $(BARE)

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
