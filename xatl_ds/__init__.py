"""xatl-ds: Cross-Architecture Transfer Learning scaling sweeps on DeepSpeed.

Importing the package is cheap (the CLI answers ``--help`` without torch). The model classes
load on first use (``xatl_ds.XatlForCausalLM``, ``import xatl_ds.models``), and they register
``XatlConfig`` / ``XatlForCausalLM`` with transformers' Auto classes as soon as transformers is
imported, so ``import xatl_ds`` followed by ``AutoModelForCausalLM.from_pretrained(run/hf)``
works as it always did.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

__all__ = ["XatlConfig", "XatlForCausalLM", "XatlCache", "__version__"]
_MODEL_NAMES = ("XatlConfig", "XatlForCausalLM", "XatlCache")


def __getattr__(name: str):
    if name in _MODEL_NAMES:
        return getattr(importlib.import_module(".models", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _RegisterWithTransformers(importlib.abc.MetaPathFinder):
    """Imports ``xatl_ds.models`` (which registers the Auto classes) right after transformers
    itself is imported, wherever that happens."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader_exec = spec.loader.exec_module

        def exec_module(module):
            loader_exec(module)
            try:
                importlib.import_module("xatl_ds.models")
            except ImportError as e:  # transformers itself must still import
                import warnings

                warnings.warn(f"xatl_ds models not registered with transformers: {e}", stacklevel=2)

        spec.loader.exec_module = exec_module
        return spec


if "transformers" in sys.modules:
    importlib.import_module(".models", __name__)
elif not any(isinstance(f, _RegisterWithTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithTransformers())
