"""The optimizer side of a run: AdamW parameter groups per freeze stage, and the main
learning-rate schedule the trainer sets on them every step.

Every parameter enters the optimizer (DeepSpeed fixes its parameter set at ``initialize``), so
freezing is a group's lr (see :mod:`xatl_ds.train`): the groups split the parameters by what
sets that lr -- their unfreeze stage and, with an alignment stage, whether they train in it.
"""
from __future__ import annotations

import math

from torch import nn

from .config import RunConfig

__all__ = ["param_groups", "lr_at"]


def param_groups(model: nn.Module, stage_of: dict[str, int], weight_decay: float,
                 aligned: frozenset[str] = frozenset()) -> tuple[list[dict], list[int], list[bool]]:  # fmt: skip
    """One AdamW group per (stage, decay?, aligned?) triple; returns the groups, each group's
    stage and whether it holds parameters of the alignment stage (``aligned`` names: they
    train while everything else has lr 0, so they need groups of their own)."""
    buckets: dict[tuple[int, bool, bool], list] = {}
    for name, p in model.named_parameters():
        decay = p.dim() >= 2 and "embed_tokens" not in name and "A_log" not in name
        buckets.setdefault((stage_of[name], decay, name in aligned), []).append(p)
    groups, stages, align = [], [], []
    for (stage, decay, in_align), params in sorted(buckets.items()):
        groups.append({"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": 0.0})
        stages.append(stage)
        align.append(in_align)
    return groups, stages, align


def lr_at(cfg: RunConfig, peak: float, step: int, progress: float) -> float:
    """Main schedule: linear warmup over steps, then cosine over run progress to the floor."""
    o = cfg.optim
    if step < o.warmup_steps:
        return peak * (step + 1) / o.warmup_steps
    p = min(1.0, max(0.0, progress))
    floor = peak * o.min_lr_ratio
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * p))
