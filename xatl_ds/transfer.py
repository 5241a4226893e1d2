"""Cross-architecture weight transfer: a pretrained Transformer -> an :class:`XatlForCausalLM`.

The target's blocks mirror the source family (``XatlConfig.from_source``), so every tensor
the two share has the same shape and meaning. :func:`transfer` copies them by *component*
(see :data:`COMPONENTS` and :func:`xatl_ds.models.components.component_of`):

``embed``       token embedding
``lm_head``     output projection (tied targets share it with ``embed``)
``final_norm``  the norm after the last block
``norms``       both per-layer norms (before the mixer and before the MLP)
``mlp``         every MLP weight and bias
``attn_out``    the source's attention output projection W_O (GPT-NeoX ``attention.dense``,
                Llama ``self_attn.o_proj``) into each LCI layer's mixer output projection
                (``getattr(mixer, mixer.out_proj_name)``), where the shapes match
``attention``   every attention weight (Q, K, V, O) of the target's attention layers
                (hybrids); GPT-NeoX's fused ``query_key_value`` is split per head

Strictness rule. A mismatch (shape, a layer or tensor one side lacks) in a requested
component raises ``ValueError`` naming the tensor and both shapes; with ``strict=False`` the
whole component is skipped instead and the reason reported. One exception keeps the
paper's default set usable for every mixer: when ``components`` is left at its default,
an ``attn_out`` whose shapes cannot match (Mamba/Mamba-2 with ``d_inner != d_model``) is
skipped with the reason; request ``attn_out`` explicitly to make that an error. A component
with nothing to copy into (``attn_out`` without LCI layers, ``attention`` without attention
layers) is always a skip with a reason, never an error. A source W_O bias whose target out
projection has no bias is not copied (a note in the report says so).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
from torch import nn

from .models import XatlConfig, XatlForCausalLM
from .models.components import COMPONENTS, components_of

__all__ = [
    "COMPONENTS",
    "DEFAULT_COMPONENTS",
    "SUPPORTED_SOURCES",
    "LoadedSource",
    "TensorCopy",
    "ComponentReport",
    "TransferReport",
    "add_cli",
    "build_target",
    "check_target_options",
    "load_source",
    "source_config_kwargs",
    "source_family",
    "transfer",
    "transferred_parameter_names",
]

#: what :func:`transfer` copies when ``components`` is not given (the paper's set)
DEFAULT_COMPONENTS: tuple[str, ...] = COMPONENTS
#: source ``model_type`` -> target block family
SUPPORTED_SOURCES: dict[str, str] = {"gpt_neox": "neox", "llama": "llama", "mistral": "llama"}
#: name of the report written beside a CLI-exported target
REPORT_FILE = "xatl_transfer.json"

# XatlConfig fields that from_source derives from the source; overriding them would break
# the shape correspondence the transfer relies on.
_DERIVED = (
    "family", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "intermediate_size", "hidden_act", "max_position_embeddings",
    "rotary_pct", "rope_theta", "norm_eps", "use_parallel_residual", "attention_bias",
    "mlp_bias", "tie_word_embeddings", "initializer_range", "bos_token_id", "eos_token_id",
    "pad_token_id",
)  # fmt: skip


# ----------------------------------------------------------------------------- config
def source_family(config: Any) -> str:
    """The target family (``neox``/``llama``) of a source config; ValueError if unsupported."""
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED_SOURCES:
        raise ValueError(
            f"source model_type={mt!r} is not supported for XATL transfer; supported: "
            f"{sorted(SUPPORTED_SOURCES)} (GPT-NeoX/Pythia and Llama-shaped models)"
        )
    return SUPPORTED_SOURCES[mt]


def _rope(config: Any) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) of a transformers 5 config (``rope_parameters``),
    falling back to the pre-5 attribute names."""
    rp = dict(getattr(config, "rope_parameters", None) or {})
    if any(isinstance(v, dict) for v in rp.values()):
        raise ValueError(f"source {config.model_type} has per-layer-type RoPE settings {rp}; only one global RoPE is supported")
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type != "default":
        raise ValueError(
            f"source rope_type={rope_type!r} (RoPE scaling) is not supported: the XATL target only "
            "implements default RoPE; use a source without rope scaling"
        )
    theta = rp.get("rope_theta", getattr(config, "rope_theta", getattr(config, "rotary_emb_base", 10000.0)))
    pct = rp.get("partial_rotary_factor", getattr(config, "rotary_pct", getattr(config, "partial_rotary_factor", 1.0)))
    return float(theta), float(pct)


def source_config_kwargs(source_config: Any) -> dict[str, Any]:
    """The :class:`XatlConfig` block fields that reproduce ``source_config``'s blocks.

    Used by ``XatlConfig.from_source``. Raises ValueError for an unsupported family or a
    source feature the target cannot express (RoPE scaling, a head_dim other than
    hidden/heads).
    """
    if hasattr(source_config, "config") and not hasattr(source_config, "model_type"):
        source_config = source_config.config  # a model was passed
    family = source_family(source_config)
    c = source_config
    heads = c.num_attention_heads
    theta, pct = _rope(c)
    kw: dict[str, Any] = dict(
        family=family,
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=heads,
        intermediate_size=c.intermediate_size,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        rotary_pct=pct,
        rope_theta=theta,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        initializer_range=getattr(c, "initializer_range", 0.02),
        bos_token_id=getattr(c, "bos_token_id", None),
        eos_token_id=getattr(c, "eos_token_id", None),
        pad_token_id=getattr(c, "pad_token_id", None),
    )
    if family == "neox":
        kw.update(
            num_key_value_heads=heads,
            norm_eps=c.layer_norm_eps,
            use_parallel_residual=bool(c.use_parallel_residual),
            attention_bias=bool(getattr(c, "attention_bias", True)),
            mlp_bias=True,  # GPT-NeoX's dense_h_to_4h / dense_4h_to_h always carry biases
        )
    else:
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        if head_dim * heads != c.hidden_size:
            raise ValueError(
                f"source head_dim={head_dim} with num_attention_heads={heads} does not equal "
                f"hidden_size={c.hidden_size}; the XATL target needs head_dim = hidden_size // heads"
            )
        if getattr(c, "sliding_window", None) is not None:
            warnings.warn(
                f"source sliding_window={c.sliding_window} is ignored: the target's attention is "
                "global, so outputs match the source only up to that many tokens",
                stacklevel=3,
            )
        kw.update(
            num_key_value_heads=getattr(c, "num_key_value_heads", None) or heads,
            norm_eps=c.rms_norm_eps,
            use_parallel_residual=False,
            attention_bias=bool(getattr(c, "attention_bias", False)),
            mlp_bias=bool(getattr(c, "mlp_bias", False)),
        )
    return kw


def check_target_options(options: dict[str, Any]) -> None:
    """Reject ``XatlConfig.from_source`` options that are derived from the source or unknown."""
    allowed = set(inspect.signature(XatlConfig.__init__).parameters) - set(_DERIVED) - {"self", "kwargs", "mixer", "attention_layers"}
    for k in options:
        if k in _DERIVED:
            raise ValueError(f"{k} is derived from the source config and cannot be overridden in from_source; build an XatlConfig directly to change it")
        if k not in allowed:
            raise ValueError(f"unknown XatlConfig option {k!r} for from_source; allowed: {sorted(allowed)}")


# ----------------------------------------------------------------------------- loading
class LoadedSource(NamedTuple):
    """A loaded source model and its tokenizer (``None`` when the source ships none)."""

    model: nn.Module
    tokenizer: Any


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _looks_local(src: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything path-like is meant as a local path."""
    return src.startswith((".", "/", "~")) or src.count("/") > 1 or os.sep != "/" and os.sep in src


def load_source(src: str | os.PathLike, dtype: torch.dtype = torch.float32) -> LoadedSource:
    """Load a source causal LM (hub name or local ``save_pretrained`` directory) and its tokenizer.

    ``trust_remote_code`` is off; safetensors are preferred when both formats exist.
    Raises FileNotFoundError for a missing directory or one without ``config.json``,
    ValueError for an unsupported family or a checkpoint that is not a causal LM (a base
    model or another head, whose LM head would be silently random).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    src = str(src)
    path = Path(src).expanduser()
    local = path.is_dir()
    if not local and (path.exists() or _looks_local(src)):
        what = "is a file, not a directory" if path.exists() else "does not exist"
        raise FileNotFoundError(f"source directory {str(path)!r} {what}; give a save_pretrained directory or a hub name like 'EleutherAI/pythia-410m'")
    if local and not (path / "config.json").is_file():
        raise FileNotFoundError(f"source directory {str(path)!r} has no config.json: it is not a model saved with save_pretrained")
    where = str(path) if local else src
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=False)
    except OSError as e:
        raise OSError(
            f"could not load source {src!r}: there is no local directory of that name, and as a hub "
            f"name it failed: {e}\n(a hub name needs network access or a local HF cache; "
            "HF_HUB_OFFLINE=1 allows only cached models)"
        ) from e
    except ValueError as e:  # unknown model_type / remote code
        raise ValueError(f"source {src!r}: {e}\nsupported source model types: {sorted(SUPPORTED_SOURCES)}") from e
    source_family(config)
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    archs = list(getattr(config, "architectures", None) or [])
    if archs and causal not in archs:
        raise ValueError(
            f"source {src!r} was saved as {archs}, which is not a causal LM (expected {causal}): its "
            f"LM head would be randomly initialised. Save the {causal} model instead"
        )
    model, info = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, trust_remote_code=False, output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(
            f"source {src!r} is not a complete causal LM checkpoint: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} missing (would be randomly initialised)"
        )
    model.eval()
    tokenizer = None
    if local:
        if any((path / f).is_file() for f in _TOKENIZER_FILES):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(where)
    else:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(where)
        except (OSError, ValueError):
            tokenizer = None
    return LoadedSource(model, tokenizer)


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


# ----------------------------------------------------------------------------- report
@dataclass
class TensorCopy:
    """One copied tensor: target parameter name <- source tensor (name, with a row slice for
    GPT-NeoX's fused QKV)."""

    target: str
    source: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class ComponentReport:
    """What one component copied, plus notes (e.g. a source bias with no target slot)."""

    name: str
    tensors: list[TensorCopy] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(t.numel for t in self.tensors)


_EMBED_COMPONENTS = ("embed", "lm_head")


@dataclass
class TransferReport:
    """Result of :func:`transfer`.

    ``copied`` holds the components that were transferred, ``skipped`` the requested ones
    that were not (component -> reason). Parameter totals count the target's distinct
    parameters (tied weights once); the ``*_no_embed`` numbers leave ``embed`` and
    ``lm_head`` out of numerator and denominator alike.
    """

    source: str
    source_model_type: str
    target_layer_mixers: list[str]
    requested: list[str]
    strict: bool
    copied: dict[str, ComponentReport]
    skipped: dict[str, str]
    target_params: int
    target_params_no_embed: int

    @property
    def transferred_params(self) -> int:
        return sum(c.params for c in self.copied.values())

    @property
    def transferred_params_no_embed(self) -> int:
        return sum(c.params for n, c in self.copied.items() if n not in _EMBED_COMPONENTS)

    @property
    def fraction(self) -> float:
        return self.transferred_params / self.target_params if self.target_params else 0.0

    @property
    def fraction_no_embed(self) -> float:
        d = self.target_params_no_embed
        return self.transferred_params_no_embed / d if d else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (the CLI's ``--json`` output and ``xatl_transfer.json``)."""
        return {
            "source": self.source,
            "source_model_type": self.source_model_type,
            "target_layer_mixers": list(self.target_layer_mixers),
            "requested": list(self.requested),
            "strict": self.strict,
            "components": {
                n: {
                    "params": c.params,
                    "tensors": [{"target": t.target, "source": t.source, "shape": list(t.shape)} for t in c.tensors],
                    "notes": list(c.notes),
                }
                for n, c in self.copied.items()
            },
            "skipped": dict(self.skipped),
            "transferred_params": self.transferred_params,
            "target_params": self.target_params,
            "fraction": self.fraction,
            "transferred_params_no_embed": self.transferred_params_no_embed,
            "target_params_no_embed": self.target_params_no_embed,
            "fraction_no_embed": self.fraction_no_embed,
        }

    def format(self) -> str:
        """A human-readable table."""
        mixers = self.target_layer_mixers
        lines = [
            f"transfer from {self.source} ({self.source_model_type}) into {len(mixers)} layers: "
            + ", ".join(f"{m} x{mixers.count(m)}" for m in dict.fromkeys(mixers)),
            f"{'component':<12}{'tensors':>8}{'params':>14}  status",
        ]
        for name in self.requested:
            if name in self.copied:
                c = self.copied[name]
                note = "copied" + (f" ({'; '.join(c.notes)})" if c.notes else "")
                lines.append(f"{name:<12}{len(c.tensors):>8}{c.params:>14,}  {note}")
            else:
                lines.append(f"{name:<12}{0:>8}{0:>14,}  skipped: {self.skipped.get(name, '')}")
        lines.append(
            f"transferred {self.transferred_params:,} of {self.target_params:,} target parameters "
            f"({100 * self.fraction:.1f}%); without embeddings {self.transferred_params_no_embed:,} of "
            f"{self.target_params_no_embed:,} ({100 * self.fraction_no_embed:.1f}%)"
        )
        return "\n".join(lines)


def transferred_parameter_names(report: TransferReport | dict) -> set[str]:
    """Target parameter names (as ``named_parameters()`` spells them) whose values came from
    the source; accepts a report or its ``to_dict()`` (e.g. read from ``xatl_transfer.json``)."""
    if isinstance(report, dict):
        return {t["target"] for c in report["components"].values() for t in c["tensors"]}
    return {t.target for c in report.copied.values() for t in c.tensors}


# ----------------------------------------------------------------------------- mapping
_Src = tuple[str, torch.Tensor]  # (source name, tensor)


def _params_of(module: nn.Module, prefix: str, rel: str, out: dict[str, _Src], into: str) -> None:
    """Record ``module.weight`` / ``.bias`` under ``into.weight`` / ``into.bias``."""
    for attr in ("weight", "bias"):
        p = getattr(module, attr, None)
        if p is not None:
            out[f"{into}.{attr}"] = (f"{prefix}{rel}.{attr}", p)


def _source_tensors(source: nn.Module, family: str) -> tuple[dict[str, _Src], list[dict[str, _Src]]]:
    """The source's tensors under the target's names: a global dict (``model.embed_tokens.weight``,
    ``lm_head.weight``, ``model.norm.*``) and one dict per layer with names relative to the
    block as an attention layer spells them (``input_norm.weight``, ``mixer.q_proj.weight``, ...)."""
    pre = source.base_model_prefix
    base = getattr(source, pre)
    module_names = {id(m): n for n, m in source.named_modules()}
    glob: dict[str, _Src] = {}
    emb = source.get_input_embeddings()
    out = source.get_output_embeddings()
    emb_name = module_names[id(emb)]
    glob["model.embed_tokens.weight"] = (f"{emb_name}.weight", emb.weight)
    tied = out.weight is emb.weight
    glob["lm_head.weight"] = (f"{module_names[id(out)]}.weight" + (f" (tied to {emb_name}.weight)" if tied else ""), out.weight)
    layers: list[dict[str, _Src]] = []
    if family == "neox":
        _params_of(base.final_layer_norm, f"{pre}.", "final_layer_norm", glob, "model.norm")
        for i, blk in enumerate(base.layers):
            p, d = f"{pre}.layers.{i}.", {}
            _params_of(blk.input_layernorm, p, "input_layernorm", d, "input_norm")
            _params_of(blk.post_attention_layernorm, p, "post_attention_layernorm", d, "mlp_norm")
            _params_of(blk.mlp.dense_h_to_4h, p, "mlp.dense_h_to_4h", d, "mlp.up_proj")
            _params_of(blk.mlp.dense_4h_to_h, p, "mlp.dense_4h_to_h", d, "mlp.down_proj")
            att = blk.attention
            heads = source.config.num_attention_heads
            head_dim = source.config.hidden_size // heads
            # query_key_value's output rows are laid out (heads, 3, head_dim): each head's
            # q, k and v rows are adjacent, so split per head, not in three contiguous thirds.
            for attr in ("weight", "bias"):
                t = getattr(att.query_key_value, attr, None)
                if t is None:
                    continue
                per_head = t.view(heads, 3, head_dim, *t.shape[1:])
                for j, q in enumerate("qkv"):
                    d[f"mixer.{q}_proj.{attr}"] = (
                        f"{p}attention.query_key_value.{attr}[{q} rows of (heads, 3, head_dim)]",
                        per_head[:, j].reshape(heads * head_dim, *t.shape[1:]),
                    )
            _params_of(att.dense, p, "attention.dense", d, "mixer.o_proj")
            layers.append(d)
    else:
        _params_of(base.norm, f"{pre}.", "norm", glob, "model.norm")
        for i, blk in enumerate(base.layers):
            p, d = f"{pre}.layers.{i}.", {}
            _params_of(blk.input_layernorm, p, "input_layernorm", d, "input_norm")
            _params_of(blk.post_attention_layernorm, p, "post_attention_layernorm", d, "mlp_norm")
            for proj in ("gate_proj", "up_proj", "down_proj"):
                _params_of(getattr(blk.mlp, proj), p, f"mlp.{proj}", d, f"mlp.{proj}")
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                _params_of(getattr(blk.self_attn, proj), p, f"self_attn.{proj}", d, f"mixer.{proj}")
            layers.append(d)
    return glob, layers


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


class _Plan:
    """Pairs (target name, target tensor, source name, source tensor) of one component, plus
    the mismatches found while pairing."""

    def __init__(self) -> None:
        self.pairs: list[tuple[str, torch.Tensor, str, torch.Tensor]] = []
        self.problems: list[str] = []
        self.notes: list[str] = []

    def add(self, tname: str, t: torch.Tensor, src: _Src | None) -> None:
        if src is None:
            self.problems.append(f"target tensor {tname} {_shape(t)} has no counterpart in the source")
            return
        sname, s = src
        if s.shape != t.shape:
            self.problems.append(f"shape mismatch: target {tname} has shape {_shape(t)} but source {sname} has shape {_shape(s)}")
            return
        self.pairs.append((tname, t, sname, s))


def transfer(
    source_model: nn.Module,
    target_model: XatlForCausalLM,
    components: Sequence[str] | str | None = None,
    strict: bool = True,
) -> TransferReport:
    """Copy the source's shared tensors into ``target_model`` in place, by component.

    ``components``: names from :data:`COMPONENTS` (a list or a comma string); ``None`` (the
    default) means :data:`DEFAULT_COMPONENTS`, where an impossible ``attn_out`` is skipped
    rather than raised (see the module docstring for the full rule). Copies are exact (bit
    equal when dtypes agree) and keep the target's dtype/device; ``requires_grad`` is left
    alone (freezing is the caller's business, see :func:`transferred_parameter_names`).
    """
    default = components is None
    if default:
        requested = list(DEFAULT_COMPONENTS)
    else:
        requested = [c.strip() for c in components.split(",") if c.strip()] if isinstance(components, str) else list(components)
        bad = [c for c in requested if c not in COMPONENTS]
        if bad:
            raise ValueError(f"unknown transfer component(s) {bad}; valid components: {list(COMPONENTS)}")
        requested = [c for c in COMPONENTS if c in requested]  # canonical order, no duplicates
    if not isinstance(target_model, XatlForCausalLM):
        raise TypeError(f"target_model must be an XatlForCausalLM, got {type(target_model).__name__}")
    src_family = source_family(getattr(source_model, "config", None))
    tcfg: XatlConfig = target_model.config
    if tcfg.family != src_family:
        raise ValueError(
            f"source family {src_family!r} ({source_model.config.model_type}) does not match the target's "
            f"family={tcfg.family!r}; build the target with XatlConfig.from_source(source.config, ...)"
        )

    glob, src_layers = _source_tensors(source_model, src_family)
    tparams = dict(target_model.named_parameters())  # tied weights once
    comp_of = components_of(target_model)
    t_tied = target_model.get_output_embeddings().weight is target_model.get_input_embeddings().weight
    mixers = tcfg.layer_mixers
    n_src = len(src_layers)

    layered = ("norms", "mlp", "attn_out", "attention")

    def plan_generic(comp: str) -> _Plan:
        """Every target parameter of ``comp`` paired with the source tensor of the same role,
        plus the source tensors of that role the target lacks (e.g. a bias)."""
        plan = _Plan()
        if comp in layered and n_src != tcfg.num_hidden_layers:
            plan.problems.append(f"the target has {tcfg.num_hidden_layers} layers but the source has {n_src}")
        layers_seen: set[int] = set()
        for name, c in comp_of.items():
            if c != comp:
                continue
            if name.startswith("model.layers."):
                i_str, rel = name[len("model.layers."):].split(".", 1)
                i = int(i_str)
                if i >= n_src:
                    continue  # reported above
                layers_seen.add(i)
                plan.add(name, tparams[name], src_layers[i].get(rel))
            else:
                plan.add(name, tparams[name], glob.get(name))
        for i in sorted(layers_seen):
            for rel, (sname, s) in src_layers[i].items():
                if _role(rel) == comp and f"model.layers.{i}.{rel}" not in tparams:
                    plan.problems.append(f"source tensor {sname} {_shape(s)} has no counterpart in the target")
        if comp == "final_norm":
            for key, (sname, s) in glob.items():
                if key.startswith("model.norm.") and key not in tparams:
                    plan.problems.append(f"source tensor {sname} {_shape(s)} has no counterpart in the target")
        return plan

    def plan_lm_head() -> _Plan | str:
        if not t_tied:
            plan = _Plan()
            plan.add("lm_head.weight", tparams["lm_head.weight"], glob["lm_head.weight"])
            return plan
        if "embed" in requested:
            return "the target ties lm_head to model.embed_tokens.weight, which embed transferred"
        plan = _Plan()  # tied target, lm_head alone: the source's output embedding fills the shared tensor
        plan.add("model.embed_tokens.weight", tparams["model.embed_tokens.weight"], glob["lm_head.weight"])
        plan.notes.append("the target ties lm_head to the embedding: the source's lm_head filled the shared tensor")
        return plan

    def plan_attn_out() -> _Plan | str:
        lci = [i for i, m in enumerate(mixers) if m != "attention"]
        if not lci:
            return "the target has no LCI layers (every layer is attention): no out projection to fill"
        plan = _Plan()
        if n_src != tcfg.num_hidden_layers:
            plan.problems.append(f"the target has {tcfg.num_hidden_layers} layers but the source has {n_src}")
        for i in (i for i in lci if i < n_src):
            mixer = target_model.model.layers[i].mixer
            oname = type(mixer).out_proj_name
            out = getattr(mixer, oname)
            prefix = f"model.layers.{i}.mixer.{oname}"
            plan.add(f"{prefix}.weight", out.weight, src_layers[i].get("mixer.o_proj.weight"))
            sb, tb = src_layers[i].get("mixer.o_proj.bias"), out.bias
            if sb is not None and tb is not None:
                plan.add(f"{prefix}.bias", tb, sb)
            elif sb is not None or tb is not None:
                note = (
                    f"source W_O bias not copied: the {mixers[i]} {oname} has no bias"
                    if sb is not None
                    else f"the {mixers[i]} {oname} bias keeps its initial value: the source W_O has no bias"
                )
                if note not in plan.notes:
                    plan.notes.append(note)
        return plan

    def plan_attention() -> _Plan | str:
        if "attention" not in mixers:
            return "the target has no attention layers: no attention weights to fill"
        return plan_generic("attention")

    copied: dict[str, ComponentReport] = {}
    skipped: dict[str, str] = {}
    plans: dict[str, _Plan] = {}
    for comp in requested:
        if comp == "lm_head":
            plan = plan_lm_head()
        elif comp == "attn_out":
            plan = plan_attn_out()
        elif comp == "attention":
            plan = plan_attention()
        else:
            plan = plan_generic(comp)
        if isinstance(plan, str):
            skipped[comp] = plan
            continue
        if plan.problems:
            lenient = not strict or (default and comp == "attn_out")
            if not lenient:
                more = f" (and {len(plan.problems) - 1} more)" if len(plan.problems) > 1 else ""
                raise ValueError(
                    f"cannot transfer component {comp!r}: {plan.problems[0]}{more}; drop {comp!r} from "
                    "components or pass strict=False (--no-strict) to skip it"
                )
            skipped[comp] = plan.problems[0] + (f" (and {len(plan.problems) - 1} more)" if len(plan.problems) > 1 else "")
            continue
        plans[comp] = plan
    # copy only after every requested component was checked, so a strict error leaves the
    # target untouched
    with torch.no_grad():
        for comp, plan in plans.items():
            rep = ComponentReport(comp, notes=list(plan.notes))
            for tname, t, sname, s in plan.pairs:
                t.copy_(s.detach().to(device=t.device, dtype=t.dtype))
                rep.tensors.append(TensorCopy(tname, sname, _shape(t)))
            copied[comp] = rep

    total = sum(p.numel() for p in tparams.values())
    no_embed = sum(p.numel() for n, p in tparams.items() if comp_of[n] not in _EMBED_COMPONENTS)
    return TransferReport(
        source=str(getattr(source_model.config, "_name_or_path", "") or type(source_model).__name__),
        source_model_type=source_model.config.model_type,
        target_layer_mixers=list(mixers),
        requested=requested,
        strict=strict,
        copied=copied,
        skipped=skipped,
        target_params=total,
        target_params_no_embed=no_embed,
    )


def _role(rel: str) -> str:
    """Component of a block-relative name as an attention layer spells it."""
    part = rel.split(".", 1)[0]
    if part in ("input_norm", "mlp_norm"):
        return "norms"
    if part == "mlp":
        return "mlp"
    return "attention"


# ----------------------------------------------------------------------------- CLI
def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``transfer`` subcommand on an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "transfer",
        help="build an XATL target from a pretrained Transformer and copy the shared weights",
        description=(
            "Load a source causal LM (hub name or local directory), build an XatlForCausalLM with the "
            "same blocks and the chosen mixer, transfer the shared components, print the report and "
            "(with --out) save the target, the source tokenizer and xatl_transfer.json."
        ),
    )
    p.add_argument("--source", required=True, help="hub name or save_pretrained directory of a GPT-NeoX / Llama causal LM")
    p.add_argument("--mixer", default="mamba", choices=["attention", "retnet", "mamba", "mamba2"], help="token mixer of the LCI layers (default: mamba)")
    p.add_argument("--attention-layers", default="none", help="layers keeping attention: none, paper ([1, n//2-1]), all, or indices like 1,5 (default: none)")
    p.add_argument("--components", default="all", help=f"comma list from {','.join(COMPONENTS)}; 'all' (default, the paper's set) or 'none' (scratch)")
    p.add_argument("--d-state", type=int, default=None, help="SSM state size (mamba/mamba2)")
    p.add_argument("--d-conv", type=int, default=None, help="SSM conv width (mamba/mamba2)")
    p.add_argument("--expand", type=int, default=None, help="SSM expansion: d_inner = expand * hidden (W_O transfers only at 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the new (mixer) weights (default: 0)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype to load and save in (default: float32)")
    p.add_argument("--no-strict", action="store_true", help="skip (and report) mismatching components instead of failing")
    p.add_argument("--out", default=None, help="directory to save the target into (safetensors); without it nothing is written")
    p.add_argument("--overwrite", action="store_true", help="allow --out to hold an existing model")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run_transfer_cli)
    return p


def run_transfer_cli(args: argparse.Namespace) -> int:
    """The ``transfer`` subcommand; returns the exit code (2 with a message on bad input)."""
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"xatl-ds transfer: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    comps_arg = args.components.strip().lower()
    components: list[str] | None
    if comps_arg in ("all", "default", ""):
        components = None
    elif comps_arg == "none":
        components = []
    else:
        components = [c.strip() for c in args.components.split(",") if c.strip()]
        bad = [c for c in components if c not in COMPONENTS]
        if bad:  # fail before loading anything
            raise ValueError(f"unknown transfer component(s) {bad} in --components; valid components: {list(COMPONENTS)}")
    out = Path(args.out) if args.out else None
    if out is not None and (out / "config.json").exists() and not args.overwrite:
        raise ValueError(f"--out {str(out)!r} already holds a model (config.json); pass --overwrite or choose another directory")
    options = {k: v for k, v in (("d_state", args.d_state), ("d_conv", args.d_conv), ("expand", args.expand)) if v is not None}
    dtype = getattr(torch, args.dtype)
    source, tokenizer = load_source(args.source, dtype=dtype)
    target = build_target(source, args.mixer, args.attention_layers, seed=args.seed, dtype=dtype, **options)
    report = transfer(source, target, components=components, strict=not args.no_strict)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        target.save_pretrained(out, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        (out / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(report.format())
        if out is not None:
            print(f"saved the target to {out}")
    return 0
