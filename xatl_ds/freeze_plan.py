"""Freeze settings (:class:`FreezeConfig`) and the plan they give a run: which transferred
components form each unfreeze stage (:func:`resolve_stages`) and which optimizer group, by
stage index, every parameter trains in (:func:`param_stage_map`). When each stage is released
is :class:`xatl_ds.freeze.FreezeController`'s decision; the policies are described there.
Pure logic: no DeepSpeed, no model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Iterable

from .models.components import COMPONENTS, NEW

__all__ = ["ALL", "NEVER", "POLICIES", "TRAINABLE", "FreezeConfig", "check_present", "format_unfreeze_order",
           "freeze_config_fields", "param_stage_map", "parse_unfreeze_order", "resolve_stages"]  # fmt: skip

POLICIES = ("none", "frozen", "fixed", "lit", "weight_norm")
#: stage index of parameters that train from step 0 (new mixer weights, untransferred
#: components, everything under policy ``none``)
TRAINABLE = -1
#: stage index of transferred parameters named in no stage: frozen for the whole run
NEVER = -2
ALL = "all"


def parse_unfreeze_order(spec: str) -> list[list[str]]:
    """Parse ``"norms,final_norm > mlp > embed,lm_head"`` into ``[["norms", "final_norm"],
    ["mlp"], ["embed", "lm_head"]]``: stages separated by ``>``, components by ``,`` (or
    ``+``). Handy on command lines and as an Optuna categorical."""
    stages = []
    for part in spec.split(">"):
        names = [n.strip() for n in part.replace("+", ",").split(",") if n.strip()]
        stages.append(names)
    return stages


def format_unfreeze_order(order: list[list[str]]) -> str:
    """Inverse of :func:`parse_unfreeze_order`."""
    return " > ".join(",".join(stage) for stage in order)


@dataclass
class FreezeConfig:
    """When the transferred weights start training (the policies: :mod:`xatl_ds.freeze`)."""

    policy: str = "lit"
    """How transferred weights are released: ``none`` (never frozen), ``frozen`` (never
    released), ``fixed`` (at ``steps``), ``lit`` (loss improvement threshold, the paper's
    rule) or ``weight_norm`` (when the new parameters' mean weight norm peaks)."""

    unfreeze_order: list[list[str]] = field(default_factory=lambda: [[ALL]])
    """Unfreeze stages, released one at a time in this order. Each stage lists components
    (``embed``, ``lm_head``, ``final_norm``, ``norms``, ``mlp``, ``attn_out``, ``attention``)
    or ``all`` (every transferred component named in no other stage). Transferred components
    in no stage stay frozen for the whole run; components not transferred train from step 0.
    The paper releases everything at once: ``[[all]]``. A string ``"norms > mlp >
    embed,lm_head"`` is accepted too."""

    threshold: float = 0.01
    """``lit``: a window whose relative loss improvement ``r_k`` is below this costs one unit of
    patience. Paper: 0.01 (patience 1) or 0.005 (patience 2)."""

    patience: int = 1
    """``lit``: windows below ``threshold`` (not necessarily consecutive) before the next stage
    unfreezes. ``weight_norm``: consecutive windows below the running maximum norm."""

    window: int = 50
    """Steps per averaging window (``lit`` losses, ``weight_norm`` norms). The paper used 5000
    steps of 2M tokens; scale it with the run length."""

    steps: list[int] = field(default_factory=list)
    """``fixed``: the step at which each stage unfreezes, one per stage of ``unfreeze_order``,
    strictly increasing, each >= 1."""

    rewarmup_steps: int = 20
    """A newly released stage's learning rate ramps linearly from 0 to the main schedule's rate
    over this many steps (0 = at once). The paper used 2000 (with 5000-step windows)."""

    weight_norm_smoothing: float = 0.0
    """``weight_norm``: exponential moving average factor in [0, 1) applied to the per-window
    mean norms before the peak test (0 = no smoothing)."""

    min_steps_between: int = 0
    """``lit`` / ``weight_norm``: after an unfreeze the rule ignores this many steps (e.g. the
    re-warmup's loss bump) before its windows restart."""

    def __post_init__(self) -> None:
        if isinstance(self.unfreeze_order, str):
            self.unfreeze_order = parse_unfreeze_order(self.unfreeze_order)
        elif isinstance(self.unfreeze_order, (list, tuple)):
            self.unfreeze_order = [list(s) if isinstance(s, (list, tuple)) else s for s in self.unfreeze_order]
        if isinstance(self.steps, tuple):
            self.steps = list(self.steps)

    def validate(self) -> "FreezeConfig":
        """Raise ``ValueError`` naming the bad field and the fix; return ``self`` if valid."""
        if self.policy not in POLICIES:
            raise ValueError(f"freeze.policy={self.policy!r} is unknown; choose one of {POLICIES}")
        _check_int("patience", self.patience, 1)
        _check_int("window", self.window, 1)
        _check_int("rewarmup_steps", self.rewarmup_steps, 0)
        _check_int("min_steps_between", self.min_steps_between, 0)
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not (
            math.isfinite(self.threshold) and self.threshold > 0
        ):
            raise ValueError(
                f"freeze.threshold={self.threshold!r} must be a finite number > 0 (a relative loss "
                "improvement such as 0.01)"
            )
        s = self.weight_norm_smoothing
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s < 1.0:
            raise ValueError(f"freeze.weight_norm_smoothing={s!r} must be in [0, 1) (0 = no smoothing)")
        order = self.unfreeze_order
        if not isinstance(order, list) or not order:
            raise ValueError(
                f"freeze.unfreeze_order={order!r} must be a non-empty list of stages, e.g. [[all]] "
                "or [[norms], [mlp], [embed, lm_head]]"
            )
        seen: dict[str, int] = {}
        for i, stage in enumerate(order):
            if not isinstance(stage, list):
                raise ValueError(
                    f"freeze.unfreeze_order[{i}]={stage!r} is not a list: write stages as lists, "
                    f"e.g. [[{stage!r}]] for one stage or [[a], [b]] for two"
                )
            if not stage:
                raise ValueError(f"freeze.unfreeze_order[{i}] is empty; remove it or name components")
            for name in stage:
                if name != ALL and name not in COMPONENTS:
                    raise ValueError(
                        f"freeze.unfreeze_order[{i}] names unknown component {name!r}; "
                        f"use 'all' or one of {COMPONENTS}"
                    )
                if name in seen:
                    raise ValueError(
                        f"freeze.unfreeze_order names {name!r} in stages {seen[name]} and {i}; "
                        "each component may appear in one stage only"
                    )
                seen[name] = i
        if self.policy == "fixed":
            st = self.steps
            if not isinstance(st, list) or not st:
                raise ValueError(
                    "freeze.policy='fixed' needs freeze.steps: the step at which each stage of "
                    f"unfreeze_order unfreezes ({len(order)} value(s), e.g. steps: [1000])"
                )
            if len(st) != len(order):
                raise ValueError(
                    f"freeze.steps has {len(st)} value(s) but unfreeze_order has {len(order)} stage(s); "
                    "give one step per stage"
                )
            for j, v in enumerate(st):
                _check_int(f"steps[{j}]", v, 1)
            if any(b <= a for a, b in zip(st, st[1:])):
                raise ValueError(f"freeze.steps={st} must be strictly increasing (one step per stage, in order)")
        return self


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"freeze.{name}={value!r} must be an integer >= {minimum}")


def check_present(present: Iterable[str]) -> frozenset[str]:
    """The transferred components named in ``present`` (new weights left out); ValueError for
    an unknown name."""
    out = frozenset(c for c in present if c != NEW)
    unknown = sorted(out - set(COMPONENTS))
    if unknown:
        raise ValueError(f"transferred components {unknown} are unknown; expected a subset of {COMPONENTS}")
    return out


def resolve_stages(cfg: FreezeConfig, present: Iterable[str]) -> list[tuple[int, tuple[str, ...]]]:
    """The stages that hold at least one transferred component, as
    ``(index in cfg.unfreeze_order, components)``; ``all`` expands to every present component
    named in no other stage. Empty stages (e.g. ``attn_out`` on a Mamba whose shapes do not
    match) are dropped. Under policy ``none`` there are no stages."""
    present = check_present(present)
    if cfg.policy == "none":
        return []
    named = {c for stage in cfg.unfreeze_order for c in stage if c != ALL}
    out = []
    for i, stage in enumerate(cfg.unfreeze_order):
        comps: set[str] = set()
        for c in stage:
            comps |= (present - named) if c == ALL else ({c} & present)
        if comps:
            out.append((i, tuple(c for c in COMPONENTS if c in comps)))
    return out


def param_stage_map(name_to_component: dict[str, str], cfg: FreezeConfig, present: Iterable[str]) -> dict[str, int]:
    """Stage index of every parameter: ``0..n-1`` for the unfreeze stages (in order),
    :data:`TRAINABLE` (-1) for parameters that train from step 0 (new mixer weights,
    components that were not transferred, everything under policy ``none``) and
    :data:`NEVER` (-2) for transferred parameters named in no stage.

    ``name_to_component`` comes from :func:`xatl_ds.models.components.components_of`;
    ``present`` is the set of transferred components (from the TransferReport).
    """
    present = check_present(present)
    comp_stage = {c: k for k, (_, comps) in enumerate(resolve_stages(cfg, present)) for c in comps}
    out = {}
    for name, comp in name_to_component.items():
        if cfg.policy == "none" or comp == NEW or comp not in present:
            out[name] = TRAINABLE
        else:
            out[name] = comp_stage.get(comp, NEVER)
    return out


def freeze_config_fields() -> dict[str, str]:
    """Field name -> its docstring (for CLI ``--help`` and the config reference)."""
    from .docstrings import field_docs

    docs = field_docs(FreezeConfig)
    return {f.name: docs.get(f.name, "") for f in fields(FreezeConfig)}
