# Every target sets itself up on a fresh machine: a .venv with the package
# installed (editable) against constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

# CPU emulation of the CUDA-kernel call sites (benchmarks/kernel_emulation.py): triton for its
# interpreter, and mamba-ssm / causal-conv1d as Python sources only (their CUDA extensions
# cannot be built here; --no-deps keeps their GPU-only requirements out).
EMU_STAMP := $(VENV)/.kernel-emulation
EMU_PINS := triton==3.8.0 einops==0.8.2
EMU_SOURCES := mamba-ssm==2.3.2.post1 causal-conv1d==1.7.0

# What a lent GPU machine (no network, its own torch/triton) lacks, for benchmarks/gpu_session.sh:
# the kernel sources, built there for its GPU alone, and wheels for its Python (3.12).
GPU_DIR := .gpu
GPU_WHEELS := transformers==5.24.0 regex==2026.11.19
GPU_PLATFORMS := --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64

.PHONY: venv emulation-deps gpu-bundle test quickstart bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,postgres]"
	touch $(STAMP)

venv: $(STAMP)

$(EMU_STAMP): $(STAMP) Makefile
	$(PY) -m pip install -q -c constraints.txt $(EMU_PINS) setuptools wheel packaging
	MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
	CAUSAL_CONV1D_FORCE_BUILD=TRUE $(PY) -m pip install -q --no-build-isolation --no-deps $(EMU_SOURCES)
	touch $(EMU_STAMP)

emulation-deps: $(EMU_STAMP)

gpu-bundle: $(STAMP)
	rm -rf $(GPU_DIR) && mkdir -p $(GPU_DIR)/wheels $(GPU_DIR)/sdists
	$(PY) -m pip download -q --no-deps --only-binary=:all: $(GPU_PLATFORMS) -d $(GPU_DIR)/wheels $(GPU_WHEELS)
	MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE $(PY) -m pip download -q --no-deps \
	  --no-binary=:all: --no-build-isolation -d $(GPU_DIR)/sdists $(EMU_SOURCES)
	du -sh $(GPU_DIR)

test: $(STAMP) $(EMU_STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

quickstart: $(STAMP)
	$(VENV)/bin/xatl-ds quickstart

bench: $(STAMP)
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) .cache runs
