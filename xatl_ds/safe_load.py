"""Reading pickled torch files (DeepSpeed checkpoints) without executing code.

A ``.pt`` file is a pickle: loaded with ``torch.load(weights_only=False)`` (what DeepSpeed's
own loaders do) it can call any function, e.g. a ``__reduce__`` payload running ``os.system``.
Everything the trainer reads back goes through :func:`safe_load` instead:
``torch.load(weights_only=True)``, which rebuilds only tensors, plain containers and the
globals on :func:`allowed_globals`, and refuses anything else *before* building it. A refusal
is a :class:`CheckpointError` that names the file and the offending global.

Hooks into DeepSpeed (no global patch of ``torch.load``):

- :func:`safe_engine_loads` swaps the engine's checkpoint engine (through which
  ``engine.load_checkpoint`` reads the model states and every ZeRO optimizer shard) for one
  whose ``load`` is :func:`safe_load`, for the duration of a ``with`` block;
- :func:`safe_torch_loads_in` does the same for a module that calls ``torch.load`` itself
  (``deepspeed.utils.zero_to_fp32``), by replacing that module's ``torch`` name only.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import types
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

__all__ = [
    "CheckpointError",
    "delete_hint",
    "allowed_globals",
    "safe_load",
    "verify_files",
    "SafeLoadingCheckpointEngine",
    "safe_engine_loads",
    "safe_torch_loads_in",
]


class CheckpointError(RuntimeError):
    """A checkpoint file that must not or cannot be loaded (the message names it and the fix)."""


def delete_hint(folder: str | Path) -> str:
    """The fix for a checkpoint that cannot be loaded (see ``checkpoint.resume_tag``)."""
    return f"Delete the checkpoint folder {folder} (the run restarts from the previous one) or the run directory."


def allowed_globals() -> list:
    """The non-plain objects DeepSpeed 0.19 pickles into the trainer's checkpoints.

    Found by loading real checkpoints with ``weights_only=True`` (fp32 and bf16, ZeRO 0-3,
    CPU): ZeRO optimizer shards hold the stage as ``ZeroStageEnum``, a ``LossScaler`` and,
    at ZeRO 1-2, ``fragment_address`` records (parameter slice mappings). Model-state files
    need nothing beyond torch's defaults (OrderedDict, torch.Size, dtypes). fp16 at ZeRO 1-3
    stores a ``DynamicLossScaler`` instead (from DeepSpeed's source: fp16 does not run on CPU).
    Each is a plain data holder: rebuilding it sets attributes and calls nothing else.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _refused_global(err: Exception) -> str | None:
    """The global named by torch's weights-only refusal, e.g. ``posix.system``."""
    m = re.search(r"GLOBAL ([\w.]+)", str(err))
    return m.group(1) if m else None


_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1)", "(2)")


def _detail(err: Exception) -> str:
    """The informative part of torch's (long, advice-laden) error text, without its advice
    to retry with ``weights_only=False``."""
    for line in str(err).splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line and not line.startswith(_BOILERPLATE):
            return line.split(". ")[0].rstrip(".")
    return type(err).__name__


def safe_load(path: str | Path, map_location: Any = "cpu", *, mmap: bool | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` with the :func:`allowed_globals` allow-list.

    Raises :class:`CheckpointError` (nothing is built from the file) when it holds a pickled
    object outside the allow-list, or when it is not a readable torch file.
    """
    folder = Path(path).parent if isinstance(path, (str, os.PathLike)) else "holding it"
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        what = _refused_global(e)
        if what is not None:
            msg = f"{path} contains a pickled object outside the allow-list ({what}); it may execute code. "
        else:
            msg = f"{path} contains pickled data the safe loader refuses ({_detail(e)}); it may execute code. "
        raise CheckpointError(msg + delete_hint(folder)) from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(
            f"{path} could not be read as a torch checkpoint ({_detail(e)}). If it is truncated or corrupt: "
            + delete_hint(folder)
        ) from e


def verify_files(paths: Iterable[str | Path]) -> None:
    """Safe-load each file and drop the result: raises :class:`CheckpointError` on the first
    one that fails. Zip-format files are memory-mapped, so the tensors' bytes are not read."""
    for p in paths:
        safe_load(p, "cpu", mmap=zipfile.is_zipfile(p) or None)


class SafeLoadingCheckpointEngine:
    """A DeepSpeed checkpoint engine whose ``load`` is :func:`safe_load`; every other method
    (save, commit, ...) is the wrapped engine's."""

    def __init__(self, inner):
        self.inner = inner

    def load(self, path: str, map_location=None):
        return safe_load(path, map_location)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


@contextlib.contextmanager
def safe_engine_loads(engine) -> Iterator[None]:
    """Within the block, ``engine.load_checkpoint`` reads every file through :func:`safe_load`."""
    original = engine.checkpoint_engine
    engine.checkpoint_engine = SafeLoadingCheckpointEngine(original)
    try:
        yield
    finally:
        engine.checkpoint_engine = original


class _TorchWithSafeLoad(types.ModuleType):
    """``torch`` as one module sees it: the real module, except that ``load`` is safe."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **kwargs):
        # the caller's weights_only=False is the very thing being overridden
        return safe_load(f, map_location, mmap=mmap)


@contextlib.contextmanager
def safe_torch_loads_in(module: types.ModuleType) -> Iterator[None]:
    """Within the block, ``module``'s own ``torch.load(...)`` calls are :func:`safe_load`."""
    if isinstance(getattr(module, "torch", None), _TorchWithSafeLoad):  # nested: already routed
        yield
        return
    if getattr(module, "torch", None) is not torch:
        raise TypeError(f"{module.__name__} does not refer to torch as `torch`; cannot route its loads")
    module.torch = _TorchWithSafeLoad()
    try:
        yield
    finally:
        module.torch = torch
