"""Every check of a run config: what :meth:`RunConfig.validate` runs (:func:`check_run_config`).

The numeric ranges are data, one :class:`NumberRule` per field (:data:`NUMBER_RULES`); the
choices, the cross-field rules (budget, distillation and alignment, freeze steps, logging) and
what this machine cannot run are code below. Each raises :class:`ConfigError` naming the first
bad field and the fix.

The config dataclasses (``sections.py``) import this module to validate themselves, so it
cannot import them back: a config arrives here as ``Any`` and is read by attribute.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..models.components import COMPONENTS
from ..models.configuration import KERNEL_MODES, MIXERS, resolve_attention_layers
from ..sizes import SIZES, get_size
from ..transfer.mixer_init import MIXER_INITS
from .deepspeed import check_ds_config
from .errors import ConfigError


# -- numeric ranges, one row per field ---------------------------------------------------
@dataclass(frozen=True)
class NumberRule:
    """The valid values of one numeric run config field (a ``None`` bound is open)."""

    integer: bool
    """An int field; otherwise a float field (an int is accepted there too)."""
    low: float | None = None
    """Smallest valid value; excluded when ``low_open``."""
    high: float | None = None
    """Largest valid value; excluded when ``high_open``."""
    low_open: bool = False
    """``low`` itself is invalid (e.g. ``> 0``)."""
    high_open: bool = False
    """``high`` itself is invalid (e.g. ``< 1``)."""
    optional: bool = False
    """``None`` is valid (the default is taken from elsewhere, or the field is one of a choice)."""
    hint: str = ""
    """What the value means or a typical one; appended to the error."""

    def describe(self) -> str:
        """``an integer >= 1``, ``a finite number in [0, 1]``, ..."""
        what = "an integer" if self.integer else "a finite number"
        lo, hi = (None if x is None else f"{x:d}" if self.integer else f"{x:g}" for x in (self.low, self.high))
        if lo is not None and hi is not None:
            return f"{what} in {'(' if self.low_open else '['}{lo}, {hi}{')' if self.high_open else ']'}"
        if lo is not None:
            return f"{what} {'>' if self.low_open else '>='} {lo}"
        if hi is not None:
            return f"{what} {'<' if self.high_open else '<='} {hi}"
        return what

    def check(self, name: str, value: Any) -> None:
        if value is None and self.optional:
            return
        ok = _finite(value) and not (self.integer and not isinstance(value, int))
        if ok and self.low is not None:
            ok = value > self.low if self.low_open else value >= self.low
        if ok and self.high is not None:
            ok = value < self.high if self.high_open else value <= self.high
        if not ok:
            hint = f" ({self.hint})" if self.hint else ""
            raise ConfigError(f"{name}={value!r} must be {self.describe()}{hint}")


def _int(low: int, hint: str = "", optional: bool = False, high: int | None = None) -> NumberRule:
    return NumberRule(True, low=low, high=high, optional=optional, hint=hint)


#: every numeric field outside ``freeze`` (FreezeConfig.validate owns those); a test checks
#: that no numeric field of the config dataclasses is missing here
NUMBER_RULES: dict[str, NumberRule] = {
    "seed": _int(0, "any non-negative integer, e.g. 0", high=2**63 - 1),
    "log_every": _int(1, "progress update every N steps"),
    "model.vocab_size": _int(1, "omit it to take the dataset tokenizer's", optional=True),
    "model.d_state": _int(1, "SSM state size, e.g. 16"),
    "model.d_conv": _int(1, "causal conv width, e.g. 4"),
    "model.expand": _int(1, "inner width = expand * d_model, e.g. 2"),
    "model.mamba2_headdim": _int(1, "e.g. 64"),
    "model.mamba2_ngroups": _int(1, "e.g. 1, or the source's head count for init.mixer: attention"),
    "model.chunk_size": _int(1, "e.g. 64"),
    "optim.lr": NumberRule(False, low=0, low_open=True, optional=True,
                           hint="e.g. 3e-4; omit it to take the size table's"),
    "optim.min_lr_ratio": NumberRule(False, low=0, high=1, hint="the cosine floor as a fraction of lr, e.g. 0.1"),
    "optim.warmup_steps": _int(0, "0 = no warmup"),
    "optim.eps": NumberRule(False, low=0, low_open=True, hint="AdamW epsilon, e.g. 1e-8"),
    "optim.weight_decay": NumberRule(False, low=0, hint="0 = off, e.g. 0.1"),
    "optim.grad_clip": NumberRule(False, low=0, hint="0 = off, e.g. 1.0"),
    "data.seq_len": _int(1, "tokens per sequence, e.g. 256"),
    "data.batch_size": _int(1, "sequences per optimizer step, e.g. 16"),
    "data.micro_batch_size": _int(1, "omit it for batch_size / world size", optional=True),
    "budget.steps": _int(1, "set exactly one of steps, tokens, flops", optional=True),
    "budget.tokens": _int(1, "set exactly one of steps, tokens, flops", optional=True),
    "budget.flops": NumberRule(False, low=0, low_open=True, optional=True,
                               hint="e.g. 2.0e12; set exactly one of steps, tokens, flops"),
    "eval.every": _int(1, "evaluate every N steps"),
    "eval.batches": _int(1, "validation batches per evaluation"),
    "checkpoint.every": _int(1, "save every N steps"),
    "checkpoint.keep": _int(1, "checkpoints kept on disk"),
    "distill.kl_weight": NumberRule(False, low=0, hint="weight of KL(teacher || student), e.g. 1.0"),
    "distill.reverse_kl_weight": NumberRule(False, low=0, hint="weight of KL(student || teacher), 0 = off"),
    "distill.ce_weight": NumberRule(False, low=0, hint="weight of the data's cross-entropy, 0 = off"),
    "distill.temperature": NumberRule(False, low=0, low_open=True, hint="softmax temperature, e.g. 1.0 or 2.0"),
    "align.steps": _int(1, "steps of the alignment stage (its cap with until: lit)"),
    "align.window": _int(1, "steps per window of the alignment loss"),
    "align.threshold": NumberRule(False, low=0, low_open=True, hint="a relative improvement such as 0.01"),
    "align.patience": _int(1, "windows below threshold before the stage ends"),
    "align.lr": NumberRule(False, low=0, low_open=True, optional=True,
                           hint="e.g. 1e-3; omit it to take the run's peak lr"),
    "align.warmup_steps": _int(0, "0 = no warmup"),
}

#: string fields that must not be empty
_TEXTS = ("name", "out_dir", "data.path", "deepspeed.config")


# -- the whole config, in the order its errors are reported -----------------------------------
def check_run_config(cfg: Any, machine_checks: bool = True) -> None:
    """Check every field of the :class:`RunConfig` ``cfg``; raise :class:`ConfigError` naming the
    first bad one and the fix (``machine_checks``: see :meth:`RunConfig.validate`)."""
    m, i, o, d, b = cfg.model, cfg.init, cfg.optim, cfg.data, cfg.budget
    _check_texts(cfg)
    _check_numbers(cfg)
    if m.size not in SIZES:
        raise ConfigError(f"model.size={m.size!r} is unknown; choose one of {sorted(SIZES)}")
    _choice("model.family", m.family, ("neox", "llama"))
    _choice("model.mixer", m.mixer, MIXERS)
    _choice("model.kernels", m.kernels, KERNEL_MODES)
    _choice("init.kind", i.kind, ("scratch", "xatl"))
    _choice("init.mixer", i.mixer, MIXER_INITS)
    try:
        resolve_attention_layers(m.attention_layers, get_size(m.size).n_layers if i.kind == "scratch" else 64)
    except ValueError as e:
        raise ConfigError(f"model.attention_layers: {e}") from None
    if i.kind == "xatl":
        if not i.source:
            raise ConfigError("init.source is required with init.kind: xatl (a hub name or a local model dir)")
        bad = [c for c in i.components if c not in COMPONENTS]
        if bad:
            raise ConfigError(f"init.components has unknown {bad}; valid: {list(COMPONENTS)}")
        if not i.components:
            raise ConfigError(
                "init.components is empty: an xatl run transfers at least one component "
                f"(valid: {list(COMPONENTS)}); use init.kind: scratch to transfer nothing"
            )
        twice = sorted({c for c in i.components if i.components.count(c) > 1})
        if twice:
            raise ConfigError(f"init.components names {twice} more than once; list each component once")
    elif i.source:
        raise ConfigError("init.source is set but init.kind is 'scratch'; set init.kind: xatl or drop source")
    try:
        cfg.freeze.validate()
    except ValueError as e:
        raise ConfigError(f"freeze: {e}") from None
    betas = o.betas
    if not isinstance(betas, list) or len(betas) != 2 or not all(_finite(x) and 0 <= x < 1 for x in betas):
        raise ConfigError(f"optim.betas={betas!r} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    if d.micro_batch_size is not None and d.batch_size % d.micro_batch_size:
        raise ConfigError(
            f"data.micro_batch_size={d.micro_batch_size} does not divide data.batch_size={d.batch_size}; "
            "choose a divisor of batch_size / world size (or omit it: no accumulation)"
        )
    set_budgets = [k for k in ("steps", "tokens", "flops") if getattr(b, k) is not None]
    if len(set_budgets) != 1:
        raise ConfigError(
            f"budget: set exactly one of steps, tokens, flops (got {set_budgets or 'none'})"
        )
    _check_distill_align(cfg)
    _check_freeze_steps(cfg)
    _choice("deepspeed.precision", cfg.deepspeed.precision, ("auto", "fp32", "bf16", "fp16"))
    if not isinstance(cfg.train.compile, bool):
        raise ConfigError(f"train.compile={cfg.train.compile!r} must be true or false")
    _check_log(cfg.log)
    check_ds_config(cfg.deepspeed.config)
    if machine_checks:
        _check_machine(cfg)


# -- the checks it runs ------------------------------------------------------------------------
def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _check_numbers(cfg: Any) -> None:
    for name, rule in NUMBER_RULES.items():
        rule.check(name, _get(cfg, name))


def _check_texts(cfg: Any) -> None:
    for name in _TEXTS:
        v = _get(cfg, name)
        if not isinstance(v, str) or not v.strip():
            raise ConfigError(f"{name}={v!r} must be a non-empty string")


def _check_freeze_steps(cfg: Any) -> None:
    """A ``fixed`` unfreeze step at or past the run's end would silently never release its
    stage. Known only for step and token budgets (see ``budget.flops``). After an alignment
    stage of fixed length the freeze steps count from its end."""
    fr, total = cfg.freeze, cfg.total_steps()
    if cfg.init.kind != "xatl" or fr.policy != "fixed" or total is None:
        return
    budget = "budget.steps" if cfg.budget.steps is not None else "budget.tokens"
    after = ""
    if cfg.align.enabled and cfg.align.until == "steps":
        total -= cfg.align.steps
        after = f" after the {cfg.align.steps} align.steps"
    for j, s in enumerate(fr.steps):
        if s >= total:
            raise ConfigError(
                f"freeze.steps[{j}]={s} is not before the end of the run ({total} steps from {budget}{after}): "
                f"that stage would never unfreeze; choose steps below {total} or a longer budget"
            )


def _check_distill_align(cfg: Any) -> None:
    """The teacher must exist, distillation must weigh a teacher term, and the alignment
    stage needs an XATL student and must end before the run does."""
    d, a = cfg.distill, cfg.align
    if d.teacher is not None and (not isinstance(d.teacher, str) or not d.teacher.strip()):
        raise ConfigError(f"distill.teacher={d.teacher!r} must be a model directory or hub name (or omitted)")
    if d.teacher is not None and not (d.enabled or a.enabled):
        raise ConfigError(
            "distill.teacher is set but neither distill.enabled nor align.enabled is true: set one of them, "
            "or drop distill.teacher"
        )
    if (d.enabled or a.enabled) and not (d.teacher or cfg.init.source):
        what = "distill.enabled" if d.enabled else "align.enabled"
        raise ConfigError(
            f"{what} needs a teacher: set distill.teacher (a causal LM directory or hub name), or use "
            "init.kind: xatl, whose init.source is the default teacher"
        )
    if d.enabled and d.kl_weight == 0 and d.reverse_kl_weight == 0:
        raise ConfigError(
            "distill.enabled with distill.kl_weight and distill.reverse_kl_weight both 0 would train on "
            "cross-entropy alone: give a KL term a weight > 0 (e.g. kl_weight: 1.0), or set distill.enabled: false"
        )
    _choice("align.until", a.until, ("steps", "lit"))
    if not a.enabled:
        return
    if cfg.init.kind != "xatl":
        raise ConfigError(
            "align.enabled needs init.kind: xatl: the stage trains each new mixer to reproduce the "
            "source's attention in its layer, so there must be a source; turn align off for a scratch run"
        )
    total = cfg.total_steps()
    if a.until == "steps" and total is not None and a.steps >= total:
        budget = "budget.steps" if cfg.budget.steps is not None else "budget.tokens"
        raise ConfigError(
            f"align.steps={a.steps} leaves no step after the alignment stage ({total} steps from {budget}); "
            f"choose align.steps below {total} or a longer budget"
        )


def _check_log(log: Any) -> None:
    if not isinstance(log.tensorboard, bool):
        raise ConfigError(f"log.tensorboard={log.tensorboard!r} must be true or false")
    for name in ("wandb_project", "wandb_entity"):
        v = getattr(log, name)
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise ConfigError(f"log.{name}={v!r} must be a non-empty string (or omitted)")
    _choice("log.wandb_mode", log.wandb_mode, ("online", "offline"))


def _check_machine(cfg: Any) -> None:
    """What this machine cannot run (``model.kernels: cuda`` / ``triton`` without CUDA)."""
    if cfg.model.kernels in ("cuda", "triton"):
        import os

        import torch  # only here: everything else in this module runs without torch

        interp = cfg.model.kernels == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
        if not torch.cuda.is_available() and not interp:
            raise ConfigError(
                f"model.kernels='{cfg.model.kernels}' needs CUDA, but torch.cuda.is_available() is False on this "
                "machine; use kernels: auto (GPU kernels where available) or torch"
            )


def _choice(name: str, value: Any, options) -> None:
    if value not in options:
        raise ConfigError(f"{name}={value!r} is unknown; choose one of {list(options)}")
