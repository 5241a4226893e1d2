"""The run config's shape: its sections as dataclasses, :class:`RunConfig` and what is derived
from it (``to_dict``, ``to_yaml``, ``content_hash``, ``total_steps``, ``batch_layout``).

A run config is a YAML file with the sections below. Every field carries a docstring
(it becomes the configuration reference in the README, ``xatl_ds/reference.py``).
:meth:`RunConfig.validate` runs the checks of ``rules.py``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..freeze import FreezeConfig
from ..models.components import COMPONENTS
from .errors import ConfigError
from .rules import check_run_config


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
        check_run_config(self, machine_checks)  # rules.py: every check, in order
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
