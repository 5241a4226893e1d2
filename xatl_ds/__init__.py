"""xatl-ds: Cross-Architecture Transfer Learning scaling sweeps on DeepSpeed."""
from __future__ import annotations

__version__ = "0.1.0"

from .models import XatlCache, XatlConfig, XatlForCausalLM  # noqa: E402  (registers the Auto classes)

__all__ = ["XatlConfig", "XatlForCausalLM", "XatlCache", "__version__"]
