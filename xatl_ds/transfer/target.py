"""A freshly initialised XATL target whose blocks match a source."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..models import XatlConfig, XatlForCausalLM

__all__ = ["build_target"]


def build_target(
    source: nn.Module | Any,
    mixer: str = "mamba",
    attention_layers: Any = None,
    *,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    **options: Any,
) -> XatlForCausalLM:
    """A freshly initialised target whose blocks match ``source`` (a model or its config).

    ``seed`` makes the new (mixer) weights reproducible; ``dtype`` defaults to the source's.
    """
    config = XatlConfig.from_source(getattr(source, "config", source), mixer=mixer, attention_layers=attention_layers, **options)
    if dtype is None and isinstance(source, nn.Module):
        dtype = next(source.parameters()).dtype
    if seed is not None:
        torch.manual_seed(seed)
    model = XatlForCausalLM(config)
    return model.to(dtype) if dtype is not None else model
