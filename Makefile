# `make demo` and `make test` each set up everything they need on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Every distribution in the repository: the core, the built-in plugins, the kernels, the examples.
DISTS := . $(patsubst %/pyproject.toml,%,$(wildcard cuda_ext/pyproject.toml plugins/*/pyproject.toml examples/*/pyproject.toml))
STAMP := $(VENV)/.installed
export WANDB_MODE := offline
export DS_ACCELERATOR := cpu
export PYTHONHASHSEED := 0

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml $(wildcard cuda_ext/pyproject.toml plugins/*/pyproject.toml examples/*/pyproject.toml)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first and pinned: the CPU build; an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet $(foreach d,$(DISTS),-e $(d)) -e '.[test]' ninja
	# Test-only parity baseline for moe_balance (HF's load_balancing_loss_func); it does not pull torch.
	$(PIP) install --quiet transformers
	# Test-only parity baselines; --no-deps because their torchvision requirement would replace torch.
	$(PIP) install --quiet --no-deps timm torch-optimizer pytorch-ranger
	touch $(STAMP)

demo: install
	$(VENV)/bin/batchkit fit --config examples/mnist_demo.yaml

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/host_overhead.py

clean:
	rm -rf $(VENV) lightning_logs runs
