"""The run config: one model trained under one setting. Typed, documented, validated.

A run config is a YAML file with the sections below. Every field carries a docstring
(it becomes the configuration reference in the README). ``load_run_config`` validates
everything before any work starts and names the offending field in its error.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from .docstrings import field_docs  # noqa: F401  (re-exported for the reference)
from .freeze import FreezeConfig
from .models.components import COMPONENTS
from .models.configuration import KERNEL_MODES, MIXERS, resolve_attention_layers
from .sizes import SIZES, get_size

DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"


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
    chunk_size: int = 64
    """Chunk length of the chunked SSD / chunkwise retention forms."""
    kernels: str = "auto"
    """``auto``: CUDA kernels (mamba-ssm, causal-conv1d) when on GPU and installed; ``torch``:
    never; ``cuda``: require them."""


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
    at the first step that reaches it. Compute-matched sweeps use this."""


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
    """A file in ds_configs/ (zero0.json ... zero3.json, zero3_offload.json) or a path."""
    precision: str = "auto"
    """``auto`` (fp32 on CPU, bf16 on CUDA), ``fp32``, ``bf16`` or ``fp16``."""


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
    log_every: int = 10
    """Terminal progress update interval in steps (metrics.jsonl gets every step)."""

    # -- (de)serialisation ---------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def content_hash(self) -> str:
        """Stable id of what the run computes (name and out_dir excluded)."""
        d = self.to_dict()
        d.pop("name"), d.pop("out_dir")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    # -- validation ------------------------------------------------------------------
    def validate(self) -> "RunConfig":
        m, i, o, d, b = self.model, self.init, self.optim, self.data, self.budget
        if m.size not in SIZES:
            raise ConfigError(f"model.size={m.size!r} is unknown; choose one of {sorted(SIZES)}")
        _choice("model.family", m.family, ("neox", "llama"))
        _choice("model.mixer", m.mixer, MIXERS)
        _choice("model.kernels", m.kernels, KERNEL_MODES)
        _choice("init.kind", i.kind, ("scratch", "xatl"))
        try:
            resolve_attention_layers(m.attention_layers, get_size(m.size).n_layers if i.kind == "scratch" else 64)
        except ValueError as e:
            raise ConfigError(f"model.attention_layers: {e}") from None
        for name in ("d_state", "d_conv", "expand", "mamba2_headdim", "chunk_size"):
            _positive(f"model.{name}", getattr(m, name))
        if m.vocab_size is not None:
            _positive("model.vocab_size", m.vocab_size)
        if i.kind == "xatl":
            if not i.source:
                raise ConfigError("init.source is required with init.kind: xatl (a hub name or a local model dir)")
            bad = [c for c in i.components if c not in COMPONENTS]
            if bad:
                raise ConfigError(f"init.components has unknown {bad}; valid: {list(COMPONENTS)}")
        elif i.source:
            raise ConfigError("init.source is set but init.kind is 'scratch'; set init.kind: xatl or drop source")
        try:
            self.freeze.validate()
        except ValueError as e:
            raise ConfigError(f"freeze: {e}") from None
        if o.lr is not None and not o.lr > 0:
            raise ConfigError(f"optim.lr={o.lr} must be > 0")
        if not 0 <= o.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
        if o.warmup_steps < 0 or o.weight_decay < 0 or o.grad_clip < 0:
            raise ConfigError("optim.warmup_steps, optim.weight_decay and optim.grad_clip must be >= 0")
        if len(o.betas) != 2 or not all(0 <= x < 1 for x in o.betas):
            raise ConfigError(f"optim.betas={o.betas} must be two numbers in [0, 1)")
        _positive("data.seq_len", d.seq_len)
        _positive("data.batch_size", d.batch_size)
        if d.micro_batch_size is not None:
            _positive("data.micro_batch_size", d.micro_batch_size)
        set_budgets = [k for k in ("steps", "tokens", "flops") if getattr(b, k) is not None]
        if len(set_budgets) != 1:
            raise ConfigError(
                f"budget: set exactly one of steps, tokens, flops (got {set_budgets or 'none'})"
            )
        _positive(f"budget.{set_budgets[0]}", getattr(b, set_budgets[0]))
        _positive("eval.every", self.eval.every)
        _positive("eval.batches", self.eval.batches)
        _positive("checkpoint.every", self.checkpoint.every)
        _positive("checkpoint.keep", self.checkpoint.keep)
        _positive("log_every", self.log_every)
        _choice("deepspeed.precision", self.deepspeed.precision, ("auto", "fp32", "bf16", "fp16"))
        ds_config_path(self.deepspeed.config)  # raises if missing
        return self

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


def ds_config_path(name: str) -> Path:
    p = Path(name)
    if not p.is_absolute() and not p.exists():
        p = DS_CONFIG_DIR / name
    if not p.is_file():
        avail = sorted(x.name for x in DS_CONFIG_DIR.glob("*.json"))
        raise ConfigError(f"deepspeed.config={name!r} not found; use a path or one of {avail}")
    return p


def _choice(name: str, value: Any, options) -> None:
    if value not in options:
        raise ConfigError(f"{name}={value!r} is unknown; choose one of {list(options)}")


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{name}={value!r} must be a number > 0")


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
            f"unknown field(s) {[f'{where}.{u}' if where else u for u in unknown]}; "
            f"valid fields of {where or 'the run config'}: {sorted(names)}"
        )
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        path = f"{where}.{f.name}" if where else f.name
        kwargs[f.name] = _coerce(hints[f.name], data[f.name], path)
    return cls(**kwargs)


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
    if tp in (int, float, str, bool):
        ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
        if tp is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if not ok:
            raise ConfigError(f"{path}={value!r} must be of type {tp.__name__}")
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


def read_yaml_source(source: str | Path | dict, what: str, error: type[Exception] = ConfigError):
    """A config given as a dict or as a YAML file (``yaml.safe_load``) -> ``(data, path)``;
    ``path`` is None for a dict. A missing file raises ``error`` naming ``what``. The data
    is the caller's own (a dict is deep-copied)."""
    if isinstance(source, dict):
        return copy.deepcopy(source), None
    path = Path(source)
    if not path.is_file():
        raise error(f"{what} {str(path)!r} does not exist")
    return yaml.safe_load(path.read_text()) or {}, path


def load_run_config(source: str | Path | dict, overrides: list[str] | None = None) -> RunConfig:
    """Read (``yaml.safe_load``), apply ``a.b=value`` overrides, build and validate."""
    data, _ = read_yaml_source(source, "run config")
    data = json.loads(json.dumps(data))  # plain types
    for ov in overrides or []:
        apply_override(data, ov)
    return from_dict(RunConfig, data).validate()


def apply_override(data: dict, override: str) -> None:
    """Apply ``section.field=value`` (value parsed as YAML) to a config dict in place."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.field=value")
    key, raw = override.split("=", 1)
    value = yaml.safe_load(raw)
    node = data
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {p} is not a section")
    node[parts[-1]] = value

