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

.PHONY: venv emulation-deps test quickstart bench clean

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

test: $(STAMP) $(EMU_STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

quickstart: $(STAMP)
	$(VENV)/bin/xatl-ds quickstart

bench: $(STAMP)
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) .cache runs
