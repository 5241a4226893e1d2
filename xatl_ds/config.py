"""The run config: one model trained under one setting. Typed, documented, validated.

A run config is a YAML file with the sections below. Every field carries a docstring
(it becomes the configuration reference in the README). ``load_run_config`` validates
everything before any work starts and names the offending field in its error.

Also here, because every config reader shares them: the strict YAML reader
(:func:`read_yaml_source`: duplicate keys and syntax errors named with file, line and
column), the one dotted-key setter (:func:`set_dotted`) and dict merge rule
(:func:`merge_dicts`), the DeepSpeed JSON check (:func:`check_ds_config`) and the lookups of
the folders shipped as package data (:func:`ds_config_path`, :func:`sweep_file_path`).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.resources
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from .docstrings import field_docs  # noqa: F401  (re-exported for the reference)
from .freeze import FreezeConfig
from .models.components import COMPONENTS
from .models.configuration import KERNEL_MODES, MIXERS, resolve_attention_layers
from .sizes import SIZES, get_size
from .transfer.mixer_init import MIXER_INITS



class ConfigError(ValueError):
    """A run config field is wrong; the message names the field and the fix."""


@dataclass
class ModelSection:
    """The target (or, with ``mixer: attention``, a plain Transformer) architecture."""

    size: str = "tiny"
    """Named size (layers, width, heads) from ``xatl_ds.sizes.SIZES``; ignored with
    ``init.kind: xatl``, where the source's dimensions are used."""
    family: str = "neox"
    """Block family of a scratch model: ``neox`` (Pythia) or ``llama``. XATL runs take the
    source's family."""
    mixer: str = "mamba"
    """Token mixer of every non-attention layer: ``attention``, ``retnet``, ``mamba`` or
    ``mamba2``."""
    attention_layers: Any = "none"
    """Layers that keep softmax attention: ``none``, ``paper`` (the 2nd and the middle layer),
    ``all`` or a list of indices."""
    vocab_size: int | None = None
    """Vocabulary size of a scratch model; default: the dataset tokenizer's."""
    d_state: int = 16
    """SSM state size (mamba, mamba2)."""
    d_conv: int = 4
    """Causal conv width (mamba, mamba2)."""
    expand: int = 2
    """SSM inner width = expand * d_model (mamba, mamba2)."""
    mamba2_headdim: int = 64
    """Mamba-2 head dimension."""
    mamba2_ngroups: int = 1
    """Mamba-2 B/C groups (``init.mixer: attention`` needs the source's attention head count)."""
    chunk_size: int = 64
    """Chunk length of the chunked SSD / chunkwise retention forms."""
    kernels: str = "auto"
    """``auto``: the Triton kernels on GPU (nothing to compile), the CPU paths on CPU;
    ``triton``: require the Triton kernels; ``cuda``: mamba-ssm / causal-conv1d's compiled CUDA
    extensions for the Mamba mixers (Triton elsewhere); ``torch``: the pure-torch paths."""


@dataclass
class InitSection:
    """Where the weights come from."""

    kind: str = "scratch"
    """``scratch`` (random init) or ``xatl`` (copy shared weights from ``source``)."""
    source: str | None = None
    """Source Transformer for ``xatl``: a hub name or a local directory (e.g. the ``hf``
    export of a source run)."""
    components: list[str] = field(default_factory=lambda: list(COMPONENTS))
    """Transferred components (``embed``, ``lm_head``, ``final_norm``, ``norms``, ``mlp``,
    ``attn_out``, ``attention``). Default: all, the paper's set."""
    strict: bool = True
    """Fail on a shape mismatch of a requested component instead of skipping it."""
    mixer: str = "random"
    """How the new (LCI) mixers start: ``random`` (their own init, the paper), ``zero_out``
    (output projections at 0, so the target starts as the source without those mixers; wins
    over ``attn_out``) or ``attention`` (from the replaced attention: Mamba-2 V/K/Q -> x/B/C,
    RetNet Q/K/V; W_O -> the output projection). See ``xatl_ds/transfer/mixer_init.py``."""


@dataclass
class OptimSection:
    """AdamW with linear warmup and cosine decay, gradient clipping."""

    lr: float | None = None
    """Peak learning rate; default: the size table's."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr`` (cosine floor)."""
    warmup_steps: int = 20
    """Linear warmup steps of the main schedule."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (not on biases, norms, SSM A/D/dt tensors)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 = off)."""


@dataclass
class DataSection:
    """The prepared dataset (``xatl-ds data prepare``) and the batch shape."""

    path: str = "runs/data/builtin"
    """Directory written by ``xatl-ds data prepare`` (train.bin, val.bin, meta.json)."""
    seq_len: int = 256
    """Tokens per sequence."""
    batch_size: int = 16
    """Global batch in sequences per optimizer step (all ranks, all micro-batches)."""
    micro_batch_size: int | None = None
    """Sequences per rank per forward pass; default: batch_size / world size (no
    accumulation)."""


@dataclass
class BudgetSection:
    """How long the run trains: exactly one of steps, tokens or flops."""

    steps: int | None = None
    """Optimizer steps."""
    tokens: int | None = None
    """Training tokens (steps = ceil(tokens / (batch_size * seq_len)))."""
    flops: float | None = None
    """Training FLOPs (analytic, xatl_ds.flops), accumulated as the run goes; the run stops
    at the first step that reaches it. Compute-matched sweeps use this. The step count is then
    known only as the run goes, so a ``freeze.steps`` entry beyond the run's end cannot be
    refused up front (with ``steps`` or ``tokens`` it is): that stage never unfreezes."""


@dataclass
class EvalSection:
    """Validation loss during training."""

    every: int = 50
    """Evaluate every N steps (and at the end)."""
    batches: int = 8
    """Validation batches per evaluation (fixed, identical every time)."""


@dataclass
class CheckpointSection:
    """DeepSpeed checkpoints for resume."""

    every: int = 100
    """Save every N steps (and at the end); rerunning the command resumes from the last."""
    keep: int = 2
    """Checkpoints kept on disk (older ones are deleted)."""


@dataclass
class DeepSpeedSection:
    """DeepSpeed engine settings; batch and precision fields of the JSON are filled in."""

    config: str = "zero2.json"
    """A file in ds_configs/ (zero0.json ... zero3.json, zero3_offload.json; shipped in the
    package) or a path to a DeepSpeed JSON. Checked up front: valid JSON, known top-level keys,
    ``zero_optimization.stage`` in 0..3."""
    precision: str = "auto"
    """``auto`` (fp32 on CPU, bf16 on CUDA), ``fp32``, ``bf16`` or ``fp16``."""


@dataclass
class DistillSection:
    """Distillation from a teacher (see ``xatl_ds/distill.py``): the loss becomes
    ``ce_weight * CE + kl_weight * T^2 * KL(teacher || student) + reverse_kl_weight * T^2 *
    KL(student || teacher)`` on the next-token distributions at temperature ``T``."""

    enabled: bool = False
    """Train against the teacher's next-token distributions (off: plain next-token CE)."""
    teacher: str | None = None
    """The teacher: a causal LM directory or hub name with the dataset's tokenizer and the
    student's vocabulary, loaded like an XATL source (safetensors only, no remote code).
    Default: ``init.source``."""
    kl_weight: float = 1.0
    """Weight of the forward KL(teacher || student) (MambaInLlama: 1 with ``ce_weight`` 0)."""
    reverse_kl_weight: float = 0.0
    """Weight of the reverse KL(student || teacher) (mode-seeking)."""
    ce_weight: float = 0.0
    """Weight of the next-token cross-entropy on the data."""
    temperature: float = 1.0
    """Softmax temperature ``T`` of both distributions; the KL terms are scaled by ``T^2`` so
    their gradients keep their size."""
    count_teacher_in_budget: bool = True
    """``budget.flops`` counts the teacher's forward FLOPs with the student's (metrics keep
    them apart: ``flops`` is the student's, ``teacher_flops`` the teacher's); false: the
    budget counts the student alone."""


@dataclass
class AlignSection:
    """An alignment stage before end-to-end training (MOHAWK stage 2, RADLADS step 1): each
    new mixer learns to reproduce the teacher's attention output in its layer, given the
    teacher's hidden state as input (per-layer MSE). Only those mixers train; then the run
    goes on with its loss, ``freeze`` policy and unfreeze order, counted from the stage's end."""

    enabled: bool = False
    """Run the stage (needs ``init.kind: xatl``; the teacher, ``distill.teacher`` or the
    source, must have the student's blocks)."""
    steps: int = 100
    """Steps of the stage (``until: steps``), or its cap (``until: lit``). They are part of
    the run's budget."""
    until: str = "steps"
    """``steps``: end after ``steps``; ``lit``: end when the alignment loss stops improving
    (the LIT rule of ``freeze``, with ``window``, ``threshold`` and ``patience`` below)."""
    window: int = 20
    """``lit``: steps per averaging window of the alignment loss."""
    threshold: float = 0.01
    """``lit``: relative improvement between windows below which one unit of patience goes."""
    patience: int = 1
    """``lit``: windows below ``threshold`` before the stage ends."""
    lr: float | None = None
    """Learning rate of the stage (constant after ``warmup_steps``); default: the run's peak
    ``optim.lr``. The main schedule (warmup, cosine) starts when the stage ends."""
    warmup_steps: int = 0
    """Linear warmup steps of the stage's learning rate."""


@dataclass
class TrainSection:
    """How the training step executes (not what it computes)."""

    compile: bool = False
    """Compile every block with ``torch.compile`` before the DeepSpeed engine is built
    (regional compilation: each block once, in place, so parameter names and ZeRO stay as they
    are; repeated blocks reuse one compiled graph, cheaper to compile than the whole model).
    The first steps pay the compilation (tens of seconds); kernels that dynamo cannot trace run
    uncompiled between graphs. Numerics may differ from eager in the last bits."""


@dataclass
class LogSection:
    """Where metrics go besides ``metrics.jsonl``, which stays the contract every reader uses:
    TensorBoard event files and, optionally, Weights & Biases, both fed with the same rows by
    rank 0 (``xatl_ds/monitor.py``). Not part of the run's identity (``content_hash``)."""

    tensorboard: bool = True
    """Event files of every ``metrics.jsonl`` column in ``OUT/tensorboard/`` (losses, learning
    rate per stage, FLOPs, tokens, freeze stage, unfreeze events as text);
    ``tensorboard --logdir runs/sweeps/NAME`` shows all runs of a sweep."""
    wandb_project: str | None = None
    """A Weights & Biases project to log to as well (off when unset; needs ``pip install
    wandb`` and ``wandb login`` or ``WANDB_API_KEY``)."""
    wandb_entity: str | None = None
    """W&B team or user; default: the logged-in user's."""
    wandb_mode: str = "online"
    """``online``, or ``offline`` (kept under ``OUT/wandb/``; upload later with ``wandb sync``)."""


@dataclass
class RunConfig:
    """One training run."""

    name: str = "run"
    """Readable run name (used in tables and figures)."""
    out_dir: str = "runs/run"
    """Output directory: checkpoints, metrics.jsonl, hf/ export, meta.json, DONE."""
    seed: int = 0
    """Seed of the model init and the data order."""
    model: ModelSection = field(default_factory=ModelSection)
    """Architecture."""
    init: InitSection = field(default_factory=InitSection)
    """Weight initialisation (scratch or XATL transfer)."""
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    """When transferred weights start training (LIT and friends)."""
    distill: DistillSection = field(default_factory=DistillSection)
    """Distillation from a teacher (KL and/or reverse KL mixed with CE)."""
    align: AlignSection = field(default_factory=AlignSection)
    """Optional alignment stage of the new mixers before end-to-end training."""
    optim: OptimSection = field(default_factory=OptimSection)
    """Optimizer and schedule."""
    data: DataSection = field(default_factory=DataSection)
    """Dataset and batch."""
    budget: BudgetSection = field(default_factory=lambda: BudgetSection(steps=200))
    """Training length."""
    eval: EvalSection = field(default_factory=EvalSection)
    """Validation."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    """Checkpointing."""
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    """DeepSpeed engine."""
    train: TrainSection = field(default_factory=TrainSection)
    """Execution of the training step (torch.compile)."""
    log: LogSection = field(default_factory=LogSection)
    """Metrics mirrors: TensorBoard, Weights & Biases."""
    log_every: int = 10
    """Terminal progress update interval in steps (metrics.jsonl gets every step)."""

    # -- (de)serialisation ---------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def content_hash(self) -> str:
        """Stable id of what the run computes (name, out_dir, where metrics are logged and how
        the step executes (``train``: torch.compile changes rounding, not the function) excluded)."""
        d = self.to_dict()
        d.pop("name"), d.pop("out_dir"), d.pop("log"), d.pop("train")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    # -- validation ------------------------------------------------------------------
    def validate(self, machine_checks: bool = True) -> "RunConfig":
        """Check every field; raise :class:`ConfigError` naming the first bad one and the fix.
        ``machine_checks`` also refuses what this machine cannot run (``model.kernels: cuda``
        without CUDA); turn it off to validate runs meant for another host."""
        m, i, o, d, b = self.model, self.init, self.optim, self.data, self.budget
        _check_texts(self)
        _check_numbers(self)
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
            self.freeze.validate()
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
        _check_distill_align(self)
        _check_freeze_steps(self)
        _choice("deepspeed.precision", self.deepspeed.precision, ("auto", "fp32", "bf16", "fp16"))
        if not isinstance(self.train.compile, bool):
            raise ConfigError(f"train.compile={self.train.compile!r} must be true or false")
        _check_log(self.log)
        check_ds_config(self.deepspeed.config)
        if machine_checks:
            _check_machine(self)
        return self

    def total_steps(self) -> int | None:
        """The run's optimizer steps when the budget fixes them (``steps`` or ``tokens``);
        None for a FLOP budget, whose step count is known only as the run goes."""
        b, d = self.budget, self.data
        if b.steps is not None:
            return b.steps
        if b.tokens is not None:
            return -(-b.tokens // (d.batch_size * d.seq_len))
        return None

    def batch_layout(self, world_size: int) -> tuple[int, int]:
        """(micro_batch_size, gradient_accumulation_steps) for ``world_size`` ranks."""
        d = self.data
        if d.batch_size % world_size:
            raise ConfigError(
                f"data.batch_size={d.batch_size} is not divisible by the {world_size} ranks; "
                "choose a multiple of the world size"
            )
        per_rank = d.batch_size // world_size
        micro = d.micro_batch_size or per_rank
        if per_rank % micro:
            raise ConfigError(
                f"data.micro_batch_size={micro} does not divide the per-rank batch {per_rank} "
                f"(batch_size {d.batch_size} / {world_size} ranks)"
            )
        return micro, per_rank // micro


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


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _check_numbers(cfg: "RunConfig") -> None:
    for name, rule in NUMBER_RULES.items():
        rule.check(name, _get(cfg, name))


def _check_texts(cfg: "RunConfig") -> None:
    for name in _TEXTS:
        v = _get(cfg, name)
        if not isinstance(v, str) or not v.strip():
            raise ConfigError(f"{name}={v!r} must be a non-empty string")


def _check_freeze_steps(cfg: "RunConfig") -> None:
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


def _check_distill_align(cfg: "RunConfig") -> None:
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


def _check_log(log: LogSection) -> None:
    if not isinstance(log.tensorboard, bool):
        raise ConfigError(f"log.tensorboard={log.tensorboard!r} must be true or false")
    for name in ("wandb_project", "wandb_entity"):
        v = getattr(log, name)
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise ConfigError(f"log.{name}={v!r} must be a non-empty string (or omitted)")
    _choice("log.wandb_mode", log.wandb_mode, ("online", "offline"))


def _check_machine(cfg: "RunConfig") -> None:
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


def _did_you_mean(unknown: list, valid) -> str:
    """`` (did you mean 'x'?)`` for the first unknown name close to a valid one, else ''."""
    import difflib

    for u in unknown:
        close = difflib.get_close_matches(str(u), sorted(valid), n=1)
        if close:
            return f" (did you mean {close[0]!r}?)"
    return ""


def _choice(name: str, value: Any, options) -> None:
    if value not in options:
        raise ConfigError(f"{name}={value!r} is unknown; choose one of {list(options)}")


# -- DeepSpeed JSON ------------------------------------------------------------------------
#: top-level keys DeepSpeed reads only once a process group exists (not while it validates a
#: config in a launcher); every other key is known by running DeepSpeed's own config reader
DS_KEYS_READ_WITH_A_GROUP = frozenset({"sequence_parallel_size"})
#: batch fields xatl-ds fills from the run (``data.batch_size`` and the world size); a config
#: is validated with a layout of one rank (the world size is checked by the preflight)
_DS_BATCH = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}


class _ReadKeys(dict):
    """A dict that records which keys are read (``get``, ``[]``, ``in``, ``keys()`` lookups):
    what DeepSpeed's config reader reads is what DeepSpeed knows."""

    def __init__(self, data: dict, seen: set):
        super().__init__(data)
        self.seen = seen

    def get(self, key, *default):
        self.seen.add(key)
        return super().get(key, *default)

    def __getitem__(self, key):
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.seen.add(key)
        return super().__contains__(key)

    def keys(self):
        return _ReadKeysView(self)

    def __copy__(self):
        return _ReadKeys(self, self.seen)


class _ReadKeysView:
    def __init__(self, owner: _ReadKeys):
        self.owner = owner

    def __contains__(self, key):
        return key in self.owner

    def __iter__(self):
        return iter(dict.keys(self.owner))

    def __len__(self):
        return len(self.owner)


def _deepspeed_reader():
    """DeepSpeed's config reader, imported with its accelerator notice on stderr (stdout is the
    command's output)."""
    import contextlib
    import sys

    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.runtime.config import DeepSpeedConfig
    return DeepSpeedConfig


def _read_with_deepspeed(ds: dict) -> set:
    """Run DeepSpeed's reader on ``ds`` (batch fields replaced by a one-rank layout); the
    top-level keys it read. Its own errors propagate."""
    import contextlib
    import logging
    import sys

    seen: set = set()
    reader = _deepspeed_reader()
    log = logging.getLogger("DeepSpeed")
    level = log.level
    log.setLevel(logging.ERROR)  # its per-config info and warning lines are not ours to print
    try:
        with contextlib.redirect_stdout(sys.stderr):
            reader(_ReadKeys({**ds, **_DS_BATCH}, seen))
    finally:
        log.setLevel(level)
    return seen


_KNOWN: set = set()


def deepspeed_keys() -> frozenset:
    """The top-level keys DeepSpeed reads (found by running its config reader on an empty
    config) and :data:`DS_KEYS_READ_WITH_A_GROUP`."""
    if not _KNOWN:
        _KNOWN.update(_read_with_deepspeed({}) | DS_KEYS_READ_WITH_A_GROUP)
    return frozenset(_KNOWN)


def _config_models() -> dict:
    """DeepSpeed's pydantic config models by class name (for the fields of an error)."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    out, todo = {}, [DeepSpeedConfigModel]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            out.setdefault(sub.__name__, sub)
            todo.append(sub)
    return out


def _describe_deepspeed_error(err: Exception, section: str) -> str:
    """``zero_optimization.overlap_com: Extra inputs are not permitted (did you mean
    'overlap_comm'?)`` from DeepSpeed's pydantic error, else its own message."""
    errors = getattr(err, "errors", None)
    if not callable(errors):
        return f"{section}: {err}"
    model = _config_models().get(getattr(err, "title", ""), None)
    names: set = set()
    if model is not None:
        for name, f in model.model_fields.items():
            names.add(f.alias or name)
    parts = []
    for e in errors():
        loc = ".".join(str(x) for x in (section, *e.get("loc", ())))
        hint = _did_you_mean([e["loc"][-1]], names) if e.get("type") == "extra_forbidden" and e.get("loc") else ""
        value = "" if e.get("type") == "extra_forbidden" else f"={e.get('input')!r}"
        parts.append(f"{loc}{value}: {e.get('msg')}{hint}")
    valid = f"; valid fields of {section}: {sorted(names)}" if names and any(
        e.get("type") == "extra_forbidden" for e in errors()) else ""  # fmt: skip
    return "; ".join(parts) + valid


def validate_with_deepspeed(ds: dict, where: str = "the DeepSpeed config") -> None:
    """Raise :class:`ConfigError` unless DeepSpeed's own config reader (its pydantic models:
    nested keys such as ``zero_optimization.overlap_comm`` included) accepts ``ds`` and reads
    every top-level key. Each section is read alone first, so an error names its section."""
    unknown = sorted(set(ds) - deepspeed_keys())
    if unknown:
        known = deepspeed_keys()
        raise ConfigError(
            f"{where} has unknown top-level key(s) {unknown}{_did_you_mean(unknown, known)} "
            "(not a DeepSpeed setting, or misspelt); "
            f"valid keys: {sorted(known)}"
        )
    for section in [k for k in ds if k not in _DS_BATCH] + [None]:
        part = ds if section is None else {section: ds[section]}
        try:
            _read_with_deepspeed(part)
        except ImportError as e:  # DeepSpeed is a dependency; a broken install is named, not hidden
            raise ConfigError(f"{where}: DeepSpeed cannot be imported to check it ({e}); reinstall deepspeed") from None
        except Exception as e:  # noqa: BLE001 (pydantic, assertions and ValueErrors of DeepSpeed's reader)
            what = _describe_deepspeed_error(e, section or "(whole config)")
            raise ConfigError(f"{where}: DeepSpeed refuses {what}; fix or remove that setting "
                              "(the DeepSpeed config reference lists the valid ones)") from None  # fmt: skip


def check_ds_config(path_or_dict: str | Path | dict) -> dict:
    """A DeepSpeed config checked and returned as a dict: ``path_or_dict`` is a dict, a path,
    or a name in the packaged ds_configs (see :func:`ds_config_path`). It must be a JSON object
    with ``zero_optimization`` an object whose ``stage`` is 0..3, and DeepSpeed's own config
    reader must accept it (:func:`validate_with_deepspeed`: unknown keys at any depth, wrong
    types). Raises :class:`ConfigError` naming the file, line and column or the key, and the fix."""
    if isinstance(path_or_dict, dict):
        ds, where = copy.deepcopy(path_or_dict), "the DeepSpeed config"
    else:
        path = ds_config_path(str(path_or_dict))
        where = f"deepspeed.config {str(path)!r}"
        try:
            ds = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"{where} is not UTF-8 text; a DeepSpeed config is a JSON file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"{where} is not valid JSON: line {e.lineno}, column {e.colno}: {e.msg}; fix the syntax "
                "there (DeepSpeed configs are JSON: double quotes, no trailing commas, no comments)"
            ) from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{where} must be a JSON object ({{\"zero_optimization\": {{\"stage\": 2}}, ...}}), "
                          f"got a {type(ds).__name__}")
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{where}: zero_optimization must be an object such as {{\"stage\": 2}}, got {zero!r}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: zero_optimization.stage={stage!r} must be 0, 1, 2 or 3")
    key = json.dumps(ds, sort_keys=True, default=str)
    if key not in _VALIDATED:
        validate_with_deepspeed(ds, where)
        _VALIDATED.add(key)
    return ds


#: DeepSpeed configs already accepted in this process (the reader runs once per content)
_VALIDATED: set = set()


# -- folders shipped as package data -------------------------------------------------------
def packaged_dir(folder: str):
    """The shipped folder ``ds_configs`` or ``sweeps`` (a directory Traversable): package data
    ``xatl_ds.<folder>`` of an installed wheel, else the checkout's top-level ``<folder>/``."""
    try:
        return importlib.resources.files(f"xatl_ds.{folder}")
    except ModuleNotFoundError:
        # A checkout on sys.path, or an editable install: setuptools' editable finder maps
        # xatl_ds.<folder> onto <checkout>/<folder> but cannot import a folder without an
        # __init__.py, so fall back to the checkout's folder itself.
        here = Path(__file__).resolve().parent.parent / folder
        if here.is_dir():
            return here
        raise ConfigError(
            f"the package data xatl_ds.{folder} is missing from this install; reinstall xatl-ds"
        ) from None


def _packaged_names(folder: str, suffix: str) -> list[str]:
    return sorted(x.name for x in packaged_dir(folder).iterdir() if x.name.endswith(suffix) and x.is_file())


def _packaged_file(folder: str, name: str) -> Path | None:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    p = packaged_dir(folder).joinpath(name)
    # pip installs package data as plain files: the Traversable is a pathlib.Path
    return Path(str(p)) if p.is_file() else None


def ds_config_path(name: str) -> Path:
    """``name`` as a path when that file exists, else a file of the packaged ds_configs
    (``zero2.json``; the ``.json`` may be left out). Raises listing what is shipped."""
    p = Path(name)
    if p.is_file():
        return p
    found = None
    if not p.is_absolute():
        found = _packaged_file("ds_configs", name) or _packaged_file("ds_configs", f"{name}.json")
    if found is None:
        avail = _packaged_names("ds_configs", ".json")
        raise ConfigError(f"deepspeed.config={name!r} not found; use a path to a JSON file or one of {avail}")
    return found


#: the shipped Optuna studies: a folder of their own below sweeps/, so a sweep name never
#: finds a study file (whose keys a sweep does not have) and the other way round
STUDIES_FOLDER = "studies"


def shipped_yaml_names(kind: str = "sweep") -> list[str]:
    """Names of the shipped sweeps (``kind="sweep"``) or Optuna studies (``"study"``)."""
    d = packaged_dir("sweeps")
    if kind == "study":
        d = d.joinpath(STUDIES_FOLDER)
        if not d.is_dir():
            return []
    return sorted(x.name.removesuffix(".yaml") for x in d.iterdir() if x.name.endswith(".yaml") and x.is_file())


def _shipped_yaml(name_or_path: str | Path, kind: str) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    parents = (Path("."), Path("sweeps")) if kind == "sweep" else (
        Path("."), Path(STUDIES_FOLDER), Path("sweeps") / STUDIES_FOLDER)
    name = p.name.removesuffix(".yaml")
    if not p.is_absolute() and p.parent in parents and name in shipped_yaml_names(kind):
        d = packaged_dir("sweeps")
        d = d.joinpath(STUDIES_FOLDER) if kind == "study" else d
        return Path(str(d.joinpath(f"{name}.yaml")))  # pip installs package data as plain files
    other = "study" if kind == "sweep" else "sweep"
    hint = ""
    if not p.is_absolute() and name in shipped_yaml_names(other):
        hint = f" ({name!r} is a shipped {other}: xatl-ds {'tune' if other == 'study' else 'sweep run'} {name})"
    raise ConfigError(f"{kind} file {str(name_or_path)!r} not found{hint}; use a path to a YAML file or one of "
                      f"{shipped_yaml_names(kind)} (xatl-ds sweep list)")


def sweep_file_path(name_or_path: str | Path) -> Path:
    """``name_or_path`` as a path when that file exists, else a shipped sweep named
    ``quickstart``, ``quickstart.yaml`` or ``sweeps/quickstart.yaml`` (so the README's
    commands work from any directory). Raises listing what is shipped."""
    return _shipped_yaml(name_or_path, "sweep")


def study_file_path(name_or_path: str | Path) -> Path:
    """``name_or_path`` as a path when that file exists, else a shipped Optuna study named
    ``lit_search``, ``lit_search.yaml`` or ``sweeps/studies/lit_search.yaml``."""
    return _shipped_yaml(name_or_path, "study")


# -- building dataclasses from plain dicts, with errors that name the field -------------
def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data`` (a dict from YAML), recursively, rejecting
    unknown keys and wrong types with the dotted field name."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown field(s) {[f'{where}.{u}' if where else u for u in unknown]}{_did_you_mean(unknown, names)}; "
            f"valid fields of {where or 'the run config'}: {sorted(names)}"
        )
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        path = f"{where}.{f.name}" if where else f.name
        kwargs[f.name] = _coerce(hints[f.name], data[f.name], path)
    return cls(**kwargs)


_TYPE_HINTS = {
    int: "a whole number such as 100",
    float: "a number such as 0.1 or 1e-4",
    str: "quote it if YAML reads it as something else",
    bool: "true or false",
}


def _coerce(tp: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin is not None and type(None) in args:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path) if len(inner) == 1 else value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e18 as a string
        except ValueError:
            pass
    if tp is int and isinstance(value, str):
        try:
            as_float = float(value)  # YAML reads 2e9 as a string too
        except ValueError:
            as_float = None
        if as_float is not None and as_float.is_integer():
            return int(as_float)
    if tp in (int, float, str, bool):
        ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
        if tp is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if not ok:
            raise ConfigError(f"{path}={value!r} must be of type {tp.__name__} ({_TYPE_HINTS[tp]})")
        return value
    if origin is list:
        if isinstance(value, str) and path.endswith("components"):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, str) and path.endswith("unfreeze_order"):
            return value  # FreezeConfig parses its own string form
        if not isinstance(value, list):
            raise ConfigError(f"{path}={value!r} must be a list")
        return [_coerce(args[0], v, f"{path}[{k}]") if args else v for k, v in enumerate(value)]
    return value


# -- YAML in: strict about duplicates, named errors ---------------------------------------
class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A YAML mapping names the same key twice (plain YAML keeps the last one silently)."""


class StrictSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (plain data only, no object construction) that refuses duplicate
    keys in a mapping. Merge keys (``<<: *anchor``) may still be overridden explicitly."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # the base class names an unhashable key itself
                if key in first:
                    raise DuplicateKeyError(
                        "while constructing a mapping", node.start_mark,
                        f"duplicate key {key!r} (first at line {first[key].line + 1})", key_node.start_mark,
                    )
                first[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_yaml_text(text: str) -> Any:
    """``yaml.safe_load`` semantics, refusing duplicate keys (:class:`StrictSafeLoader`)."""
    return yaml.load(text, Loader=StrictSafeLoader)  # noqa: S506 (a SafeLoader subclass)


def describe_yaml_error(e: yaml.YAMLError) -> str:
    """``line L, column C: problem`` (1-based) of a YAML error."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    ctx, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if ctx and cmark is not None and not isinstance(e, DuplicateKeyError) and (mark is None or cmark.line != mark.line):
        problem += f" ({ctx} at line {cmark.line + 1}, column {cmark.column + 1})"
    return (f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else "") + problem


_DUPLICATE_FIX = "keep one of them (YAML would silently use the last)"


def read_yaml_source(source: str | Path | dict, what: str, error: type[Exception] = ConfigError,
                     allow_empty: bool = False, needs: str = "at least one setting") -> tuple[dict, Path | None]:
    """A config given as a dict or as a YAML file -> ``(data, path)``; ``path`` is None for a
    dict, whose data is deep-copied. Every problem raises ``error`` naming ``what`` and the file:
    a missing file, one that is not UTF-8, a YAML syntax error or duplicate key (with line and
    column, :func:`load_yaml_text`), a top level that is not a mapping, and, unless
    ``allow_empty``, a file that is empty or only comments (the message says the file
    ``needs`` ...)."""
    if isinstance(source, dict):
        return copy.deepcopy(source), None
    path = Path(source)
    if not path.is_file():
        raise error(
            f"{what} {str(path)!r} does not exist" + (" (it is a directory)" if path.is_dir() else "")
            + "; check the path (a relative one starts at the working directory)"
        )
    try:
        data = load_yaml_text(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise error(f"{what} {str(path)!r} is not UTF-8 text; save it as UTF-8 YAML") from None
    except yaml.YAMLError as e:
        fix = _DUPLICATE_FIX if isinstance(e, DuplicateKeyError) else (
            "fix the YAML syntax there (indentation, a missing ':' or closing bracket, or quote the value)"
        )
        raise error(f"{what} {str(path)!r}, {describe_yaml_error(e)}; {fix}") from None
    if data is None:
        if not allow_empty:
            raise error(f"{what} {str(path)!r} is empty (or only comments); a {what} needs {needs}")
        data = {}
    if not isinstance(data, dict):
        raise error(
            f"{what} {str(path)!r} must be a mapping of 'key: value' lines at its top level, "
            f"got a {type(data).__name__}"
        )
    return data, path


def load_run_config(source: str | Path | dict, overrides: list[str] | None = None,
                    machine_checks: bool = True) -> RunConfig:
    """Read (:func:`read_yaml_source`), apply ``a.b=value`` overrides (:func:`apply_override`),
    build and validate (``machine_checks``: see :meth:`RunConfig.validate`)."""
    data, _ = read_yaml_source(
        source, "run config",
        needs="at least one field, e.g. 'model: {size: tiny}': write the fields that differ from the "
        "defaults (the README's run config reference lists them)",
    )
    for ov in overrides or []:
        apply_override(data, ov)
    data = json.loads(json.dumps(data, default=str))  # plain types (a YAML date becomes a string)
    return from_dict(RunConfig, data).validate(machine_checks=machine_checks)


# -- dotted keys -------------------------------------------------------------------------------
def merge_dicts(base: dict, over: dict) -> dict:
    """A new dict: ``base`` with ``over`` merged in; dicts merge recursively, any other value of
    ``over`` replaces ``base``'s. Nothing is shared with the inputs (deep copies)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def set_dotted(data: dict, key: str, value: Any, error: type[Exception] = ConfigError) -> None:
    """``data[a][b] = value`` for ``key = "a.b"``, in place: the one dotted setter of run
    configs, sweeps and studies. Missing (or empty) sections on the way are created; a dict
    ``value`` merges into a dict already there (:func:`merge_dicts`), anything else replaces it
    (deep-copied). A component holding a value that is not a section raises ``error`` naming
    the key."""
    parts = key.split(".") if isinstance(key, str) else []
    if not parts or any(not p.strip() for p in parts):
        raise error(f"key {key!r} must be dotted field names such as optim.lr or model")
    parts = [p.strip() for p in parts]
    node = data
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        elif not isinstance(nxt, dict):
            section = ".".join(parts[: i + 1])
            raise error(
                f"{key}: {section} is not a section (it holds {nxt!r}); "
                f"set {section} itself, or make it a mapping first"
            )
        node = nxt
    last = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        node[last] = merge_dicts(node[last], value)
    else:
        node[last] = copy.deepcopy(value)


def apply_override(data: dict, override: str) -> None:
    """Apply ``section.field=value`` (``-o`` on the command line; the value is parsed as YAML)
    to a config dict in place, through :func:`set_dotted` (a mapping value merges)."""
    if not isinstance(override, str) or "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.field=value, e.g. optim.lr=3e-4")
    key, raw = override.split("=", 1)
    try:
        value = load_yaml_text(raw)
    except yaml.YAMLError as e:
        fix = _DUPLICATE_FIX if isinstance(e, DuplicateKeyError) else (
            f"close its brackets, or quote a plain string: {key.strip()}='\"...\"'"
        )
        raise ConfigError(
            f"override {override!r}: the value is not valid YAML ({describe_yaml_error(e)}); {fix}"
        ) from None
    try:
        set_dotted(data, key.strip(), value)
    except ConfigError as e:
        raise ConfigError(f"override {override!r}: {e}") from None
