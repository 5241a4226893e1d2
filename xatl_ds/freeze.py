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

The settings and the stage plan (:class:`FreezeConfig`, :func:`resolve_stages`,
:func:`param_stage_map`) live in :mod:`xatl_ds.freeze_plan`; their names import from here too.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from .freeze_plan import (
    ALL, NEVER, POLICIES, TRAINABLE, FreezeConfig, check_present, format_unfreeze_order, freeze_config_fields,
    param_stage_map, parse_unfreeze_order, resolve_stages,
)  # fmt: skip

__all__ = ["ALL", "NEVER", "POLICIES", "TRAINABLE", "FreezeConfig", "FreezeController", "UnfreezeEvent",
           "format_unfreeze_order", "freeze_config_fields", "param_stage_map", "parse_unfreeze_order",
           "resolve_stages"]  # fmt: skip

_STATE_VERSION = 1


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
        self.present = check_present(present)
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
