"""Which implementation a mixer runs: pure torch, the project's Triton kernels, or the
optional mamba-ssm / causal-conv1d CUDA extensions.

Nothing here imports a GPU-only package at module import time.

``model.kernels`` (``XatlConfig.kernels``):

* ``auto`` (default): on CUDA tensors the Triton kernels of :mod:`xatl_ds.models.gpu`
  (Triton ships with every CUDA build of torch: nothing to compile at install time); on CPU
  the torch / C++ CPU paths.
* ``triton``: insist on the Triton kernels. On a CPU they run only under Triton's
  interpreter (``TRITON_INTERPRET=1``), which is how the tests check them without a GPU.
* ``cuda``: mamba-ssm / causal-conv1d's CUDA extensions where a mixer has them (Mamba,
  Mamba-2; they must be compiled at install time, see the README), Triton elsewhere.
* ``torch``: never a kernel; the reference paths.

:func:`select_path` answers per call; mixers record the answer in ``last_path`` so a
benchmark or the trainer can report which path ran (:func:`paths_used`).
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

INSTALL_HINT = (
    "the CUDA kernels need a CUDA build of torch and the 'cuda' extra, built against it: "
    "pip install --no-build-isolation 'xatl-ds[cuda]' "
    "(i.e. mamba-ssm and causal-conv1d; they cannot be installed on a CPU-only machine)"
)
TRITON_HINT = (
    "the Triton kernels need the 'triton' package (it comes with every CUDA build of torch: "
    "pip install torch from the CUDA index, or pip install triton)"
)
PATHS = ("torch", "triton", "cuda")


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


def interpreting() -> bool:
    """Whether Triton kernels run under Triton's CPU interpreter in this process."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_usable(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on ``x``: a CUDA tensor with triton importable, or
    a CPU tensor under the interpreter."""
    if x.device.type == "cuda":
        return _try_import("triton") is not None
    return x.device.type == "cpu" and interpreting() and _try_import("triton") is not None


def select_path(mode: str, x: torch.Tensor, what: str, cuda_module: str | None = None) -> str:
    """The path (``"torch"``, ``"triton"`` or ``"cuda"``) for input ``x`` under kernels mode
    ``mode``. ``cuda_module``: the CUDA-extension package this mixer can use under ``cuda``
    (None: it has none, and ``cuda`` means Triton). Raises with an install hint when the
    asked-for path cannot run."""
    if mode == "torch":
        return "torch"
    if mode == "cuda":
        if x.device.type != "cuda":
            raise ValueError(f"kernels='cuda' but the input is on {x.device}; use kernels='auto' or 'torch' on CPU")
        if cuda_module is not None:
            require(cuda_module, what)
            return "cuda"
        mode = "triton"
    if mode == "triton":
        if not triton_usable(x):
            if x.device.type != "cuda" and not interpreting():
                raise ValueError(
                    f"kernels='triton' for {what} needs a CUDA tensor (got {x.device}); on a CPU the kernels run "
                    "only under Triton's interpreter (TRITON_INTERPRET=1, for tests); use kernels='auto' or 'torch'"
                )
            raise ImportError(f"{what} needs triton; {TRITON_HINT}")
        return "triton"
    if mode != "auto":
        raise ValueError(f"kernels={mode!r} is unknown; choose one of auto, triton, cuda, torch")
    return "triton" if x.device.type == "cuda" and _try_import("triton") is not None else "torch"


def use_kernels(mode: str, x: torch.Tensor, module: str, what: str) -> bool:
    """Whether to run ``module``'s CUDA extension kernel for ``x`` (only under ``cuda``)."""
    return select_path(mode, x, what, cuda_module=module) == "cuda" if mode == "cuda" else False


def paths_used(model: torch.nn.Module) -> dict[str, str]:
    """``{mixer class name: path}`` for every mixer that has run (``last_path`` set), joined
    with '+' where layers of one class ran different paths."""
    seen: dict[str, set] = {}
    for m in model.modules():
        p = getattr(m, "last_path", None)
        if p is not None:
            seen.setdefault(type(m).__name__, set()).add(p)
    return {k: "+".join(sorted(v)) for k, v in sorted(seen.items())}
