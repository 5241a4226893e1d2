"""Lazy access to the optional CUDA kernels (mamba-ssm, causal-conv1d).

Nothing here imports a GPU-only package at module import time. ``use_kernels`` decides per
call whether the fast CUDA path applies; ``require`` gives an install hint when a user
explicitly asked for kernels (``kernels="cuda"``) and they are missing.
"""
from __future__ import annotations

import functools
import importlib

import torch

INSTALL_HINT = (
    "the CUDA kernels need a CUDA build of torch and the 'cuda' extra, built against it: "
    "pip install --no-build-isolation 'xatl-ds[cuda]' "
    "(i.e. mamba-ssm and causal-conv1d; they cannot be installed on a CPU-only machine)"
)


@functools.lru_cache(maxsize=None)
def _try_import(module: str):
    try:
        return importlib.import_module(module)
    except Exception:  # ImportError, or a broken CUDA build raising at import
        return None


def available(module: str) -> bool:
    return torch.cuda.is_available() and _try_import(module) is not None


def require(module: str, what: str):
    """Import ``module`` or raise an ImportError that says how to install it."""
    mod = _try_import(module) if torch.cuda.is_available() else None
    if mod is None:
        reason = "CUDA is not available" if not torch.cuda.is_available() else f"'{module}' is not installed"
        raise ImportError(f"{what} needs {module} ({reason}); {INSTALL_HINT}")
    return mod


def use_kernels(mode: str, x: torch.Tensor, module: str, what: str) -> bool:
    """Whether to run the CUDA kernel for tensor ``x`` under kernels mode ``mode``.

    ``torch``: never. ``auto``: when ``x`` is on CUDA and the package imports. ``cuda``: always
    for CUDA tensors, raising with an install hint when the package is missing.
    """
    if mode == "torch" or x.device.type != "cuda":
        if mode == "cuda" and x.device.type != "cuda":
            raise ValueError(f"kernels='cuda' but the input is on {x.device}; use kernels='auto' or 'torch' on CPU")
        return False
    if mode == "cuda":
        require(module, what)
        return True
    return _try_import(module) is not None
