"""Freeze policies and the LIT (Loss Improvement Threshold) unfreeze controller.

Pure logic: no DeepSpeed, no model. The trainer builds one optimizer parameter group per
unfreeze stage (:func:`param_stage_map`), asks :meth:`FreezeController.lr_scale` for each
group's multiplier of the main schedule's learning rate before every step, and feeds the
step's loss (and, for the ``weight_norm`` rule, the new parameters' mean weight norm) to
:meth:`FreezeController.update` after it. Frozen groups train at lr 0 (DeepSpeed fixes the
trainable set at ``initialize``, so freezing is done through the learning rate).

Step convention (0-based optimizer steps)::

    for step in range(n_steps):
        for group in groups: group.lr = schedule(step) * ctrl.lr_scale(group.stage, step)
        loss = train_step()
        events = ctrl.update(step, loss, new_param_norm)   # decides what trains from step+1

An :class:`UnfreezeEvent`'s ``step`` is the first step at which its stage trains.

Policies:

* ``none``: nothing is frozen; transferred weights train from step 0 like new ones.
* ``frozen``: transferred weights stay frozen for the whole run.
* ``fixed``: stage ``i`` of ``unfreeze_order`` unfreezes at step ``steps[i]``.
* ``lit``: the paper's rule. Consecutive windows of ``window`` steps give mean losses
  ``L_k``; ``r_k = (L_{k-1} - L_k) / L_{k-1}``. Each window with ``r_k < threshold`` takes one
  from the patience (windows with ``r_k >= threshold`` do not restore it, as in the paper);
  when it reaches 0 the next stage unfreezes, the patience resets and the windows restart
  (the first window after an unfreeze has no predecessor to compare with).
* ``weight_norm``: unfreeze when the mean weight norm of the new (non-transferred)
  parameters has peaked: per window, the mean of the fed norms, optionally smoothed by an
  exponential moving average, is compared with its running maximum; ``patience``
  consecutive windows below the maximum unfreeze the next stage (a new maximum resets the
  count). The running maximum restarts after each unfreeze.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable

from .models.components import COMPONENTS, NEW

POLICIES = ("none", "frozen", "fixed", "lit", "weight_norm")
#: stage index of parameters that train from step 0 (new mixer weights, untransferred
#: components, everything under policy ``none``)
TRAINABLE = -1
#: stage index of transferred parameters named in no stage: frozen for the whole run
NEVER = -2
ALL = "all"

_STATE_VERSION = 1


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
    """When the transferred weights start training (see the module docstring)."""

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


def _check_present(present: Iterable[str]) -> frozenset[str]:
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
    present = _check_present(present)
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
    present = _check_present(present)
    comp_stage = {c: k for k, (_, comps) in enumerate(resolve_stages(cfg, present)) for c in comps}
    out = {}
    for name, comp in name_to_component.items():
        if cfg.policy == "none" or comp == NEW or comp not in present:
            out[name] = TRAINABLE
        else:
            out[name] = comp_stage.get(comp, NEVER)
    return out


@dataclass(frozen=True)
class UnfreezeEvent:
    """One stage released. ``step`` is the first optimizer step at which it trains."""

    step: int
    stage: int
    components: tuple[str, ...]
    rule: str
    #: the step whose ``update`` decided it (``step - 1`` when fed every step)
    trigger_step: int
    #: mean loss of each window since the previous unfreeze (or the start), oldest first
    window_losses: tuple[float, ...] = ()
    #: ``weight_norm``: the (smoothed) mean norm of each window since the previous unfreeze
    window_norms: tuple[float, ...] = ()
    #: ``lit``: the last relative improvement r_k; ``weight_norm``: relative drop below the max
    r: float | None = None
    threshold: float | None = None
    patience_left: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("components", "window_losses", "window_norms"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UnfreezeEvent":
        d = dict(d)
        for k in ("components", "window_losses", "window_norms"):
            d[k] = tuple(d.get(k, ()))
        return cls(**d)


# rule state saved by state_dict; everything the decision depends on
_RULE_FIELDS = (
    "win_start", "win_sum", "win_n", "norm_sum", "norm_n", "prev_loss", "patience_left",
    "stage_losses", "stage_norms", "smoothed", "norm_max", "below", "pause_until", "last_step",
    "nonfinite",
)


class FreezeController:
    """Decides, step by step, which unfreeze stages train and at what lr multiplier.

    Args:
        cfg: the freeze settings (validated here).
        present: transferred components actually copied (TransferReport); an empty set
            (``init: scratch``) means nothing is frozen.
    """

    def __init__(self, cfg: FreezeConfig, present: Iterable[str]):
        self.cfg = cfg.validate()
        self.present = _check_present(present)
        resolved = resolve_stages(cfg, self.present)
        self.stages: list[tuple[str, ...]] = [comps for _, comps in resolved]
        self._fixed_steps = [cfg.steps[i] for i, _ in resolved] if cfg.policy == "fixed" else []
        self.events: list[UnfreezeEvent] = []
        #: one record per closed window: step, stage, loss, r / norm numbers, patience_left
        self.history: list[dict] = []
        self._reset_rule(win_start=None)
        self.pause_until = 0
        self.last_step: int | None = None
        self.nonfinite = 0

    # -- queries ------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def stage(self) -> int:
        """How many stages have been released so far."""
        return len(self.events)

    @property
    def done(self) -> bool:
        """True once the rule has nothing left to decide: every stage released, or policy
        ``none`` / ``frozen`` (which never release anything)."""
        return self.cfg.policy in ("none", "frozen") or self.stage >= self.num_stages

    def frozen_components(self) -> set[str]:
        """Transferred components not yet training."""
        if self.cfg.policy == "none":
            return set()
        released = {c for ev in self.events for c in ev.components}
        return set(self.present) - released

    def unfreeze_step(self, stage_idx: int) -> int | None:
        """First step at which stage ``stage_idx`` trains, or None while frozen."""
        self._check_group(stage_idx)
        return self.events[stage_idx].step if 0 <= stage_idx < len(self.events) else None

    def group_ids(self) -> list[int]:
        """Every stage index a parameter can carry: TRAINABLE, NEVER, 0..num_stages-1."""
        return [TRAINABLE, NEVER, *range(self.num_stages)]

    def lr_scale(self, stage_idx: int, step: int) -> float:
        """Multiplier in [0, 1] of the main schedule's lr for the group of stage ``stage_idx``
        at ``step``: 0 while frozen; ``(step - u + 1) / rewarmup_steps`` for the first
        ``rewarmup_steps`` steps after the stage's unfreeze step ``u``; then 1.
        :data:`TRAINABLE` is always 1 and :data:`NEVER` always 0."""
        self._check_group(stage_idx)
        if stage_idx == TRAINABLE:
            return 1.0
        if stage_idx == NEVER:
            return 0.0
        u = self.unfreeze_step(stage_idx)
        if u is None or step < u:
            return 0.0
        r = self.cfg.rewarmup_steps
        return 1.0 if r == 0 else min(1.0, (step - u + 1) / r)

    def lr_scales(self, step: int) -> dict[int, float]:
        """:meth:`lr_scale` of every group id at ``step``."""
        return {g: self.lr_scale(g, step) for g in self.group_ids()}

    def _check_group(self, stage_idx: int) -> None:
        if stage_idx not in (TRAINABLE, NEVER) and not 0 <= stage_idx < self.num_stages:
            raise ValueError(
                f"stage index {stage_idx} is out of range: this run has {self.num_stages} unfreeze "
                f"stage(s) (indices 0..{self.num_stages - 1}), plus {TRAINABLE} (trainable) and {NEVER} (never)"
            )

    # -- the rules ---------------------------------------------------------------------
    def update(self, step: int, loss: float, new_param_norm: float | None = None) -> list[UnfreezeEvent]:
        """Feed the loss of optimizer step ``step`` (and, for ``weight_norm``, the current mean
        weight norm of the new parameters; it may be given every step or only some). Returns
        the stages released by this call (usually none); they train from ``step + 1``.
        Non-finite losses/norms are skipped (counted in ``nonfinite``)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"update(step={step!r}): step must be an int >= 0")
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(
                f"update(step={step}) after step {self.last_step}: call it once per optimizer step, "
                "with increasing steps"
            )
        self.last_step = step
        policy = self.cfg.policy
        if self.done:
            return []
        if policy == "fixed":
            fired = []
            while self.stage < self.num_stages and step + 1 >= self._fixed_steps[self.stage]:
                fired.append(self._release(self._fixed_steps[self.stage], step))
            return fired
        if step < self.pause_until:
            return []
        if self.win_start is None:
            self.win_start = step
        if loss is not None and math.isfinite(loss):
            self.win_sum += float(loss)
            self.win_n += 1
        elif loss is not None:
            self.nonfinite += 1
        if new_param_norm is not None:
            if math.isfinite(new_param_norm):
                self.norm_sum += float(new_param_norm)
                self.norm_n += 1
            else:
                self.nonfinite += 1
        if step < self.win_start + self.cfg.window - 1:
            return []
        return self._close_window(step)

    def _close_window(self, step: int) -> list[UnfreezeEvent]:
        cfg = self.cfg
        loss = self.win_sum / self.win_n if self.win_n else None
        norm = self.norm_sum / self.norm_n if self.norm_n else None
        self.win_start, self.win_sum, self.win_n, self.norm_sum, self.norm_n = step + 1, 0.0, 0, 0.0, 0
        rec: dict[str, Any] = {"step": step, "stage": self.stage, "loss": loss}
        if loss is not None:
            self.stage_losses.append(loss)
        fire = False
        if cfg.policy == "lit":
            r = None
            if loss is not None and self.prev_loss is not None:
                r = (self.prev_loss - loss) / abs(self.prev_loss) if self.prev_loss != 0 else 0.0
                if r < cfg.threshold:
                    self.patience_left -= 1
                    fire = self.patience_left <= 0
            if loss is not None:
                self.prev_loss = loss
            rec.update(r=r, patience_left=self.patience_left)
            self.r = r
        else:  # weight_norm
            rec.update(norm=norm)
            if norm is not None:
                b = cfg.weight_norm_smoothing
                self.smoothed = norm if self.smoothed is None else b * self.smoothed + (1 - b) * norm
                self.stage_norms.append(self.smoothed)
                if self.norm_max is None or self.smoothed >= self.norm_max:
                    self.norm_max, self.below = self.smoothed, 0
                else:
                    self.below += 1
                    fire = self.below >= cfg.patience
                self.r = (self.norm_max - self.smoothed) / abs(self.norm_max) if self.norm_max else 0.0
                rec.update(smoothed=self.smoothed, max=self.norm_max, below=self.below, r=self.r)
        self.history.append(rec)
        if not fire:
            return []
        return [self._release(step + 1, step)]

    def _release(self, at: int, trigger: int) -> UnfreezeEvent:
        k = self.stage
        rule = self.cfg.policy
        ev = UnfreezeEvent(
            step=at,
            stage=k,
            components=self.stages[k],
            rule=rule,
            trigger_step=trigger,
            window_losses=tuple(self.stage_losses) if rule != "fixed" else (),
            window_norms=tuple(self.stage_norms) if rule == "weight_norm" else (),
            r=self.r if rule != "fixed" else None,
            threshold=self.cfg.threshold if rule == "lit" else None,
            patience_left=self.patience_left if rule == "lit" else (
                self.cfg.patience - self.below if rule == "weight_norm" else None
            ),
        )
        self.events.append(ev)
        self._reset_rule(win_start=None)
        self.pause_until = at + self.cfg.min_steps_between
        return ev

    def _reset_rule(self, win_start: int | None) -> None:
        """Restart the windows and the patience (at the start and after every unfreeze)."""
        self.win_start = win_start
        self.win_sum, self.win_n, self.norm_sum, self.norm_n = 0.0, 0, 0.0, 0
        self.prev_loss: float | None = None
        self.patience_left = self.cfg.patience
        self.stage_losses: list[float] = []
        self.stage_norms: list[float] = []
        self.smoothed: float | None = None
        self.norm_max: float | None = None
        self.below = 0
        self.r: float | None = None

    # -- checkpointing -----------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-serialisable state; :meth:`load_state_dict` continues the rule exactly
        (mid-window sums, patience, history and events included)."""
        rule = {k: getattr(self, k) for k in _RULE_FIELDS}
        rule["stage_losses"] = list(self.stage_losses)
        rule["stage_norms"] = list(self.stage_norms)
        rule["r"] = self.r
        return {
            "version": _STATE_VERSION,
            "policy": self.cfg.policy,
            "stages": [list(s) for s in self.stages],
            "events": [e.to_dict() for e in self.events],
            "history": [dict(h) for h in self.history],
            "rule": rule,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output. The policy and resolved stages must match the
        ones this controller was built with (a changed threshold or patience is allowed and
        applies from now on)."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"freeze state version {state.get('version')!r} is not supported (expected {_STATE_VERSION})")
        if state["policy"] != self.cfg.policy:
            raise ValueError(
                f"freeze state was saved with policy={state['policy']!r} but this run has "
                f"policy={self.cfg.policy!r}; resume with the same freeze.policy"
            )
        stages = [tuple(s) for s in state["stages"]]
        if stages != self.stages:
            raise ValueError(
                f"freeze state has unfreeze stages {stages} but this run resolves to {self.stages}; "
                "resume with the same freeze.unfreeze_order and transferred components"
            )
        self.events = [UnfreezeEvent.from_dict(e) for e in state["events"]]
        self.history = [dict(h) for h in state["history"]]
        rule = state["rule"]
        for k in _RULE_FIELDS:
            setattr(self, k, rule[k])
        self.stage_losses = list(rule["stage_losses"])
        self.stage_norms = list(rule["stage_norms"])
        self.r = rule.get("r")


def freeze_config_fields() -> dict[str, str]:
    """Field name -> its docstring (for CLI ``--help`` and the config reference)."""
    from .docstrings import field_docs

    docs = field_docs(FreezeConfig)
    return {f.name: docs.get(f.name, "") for f in fields(FreezeConfig)}
