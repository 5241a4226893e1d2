"""Source families: what a GPT-NeoX or Llama checkpoint is to an XATL target, in one place.

A :class:`FamilyAdapter` holds everything xatl-ds knows about one transformers family:

* config, both ways: the source config -> :class:`~xatl_ds.models.XatlConfig` block fields
  (:meth:`FamilyAdapter.config_kwargs`) and an all-attention target -> the native config
  (:meth:`FamilyAdapter.native_config`);
* tensor names, both ways, from ONE table of :class:`Link` / :class:`FusedLink` entries:
  the transfer reads source tensors under target names (:meth:`FamilyAdapter.source_tensors`),
  the native export writes target tensors under source names
  (:meth:`FamilyAdapter.native_state_dict`).

Registering a new family is one adapter instance in :data:`ADAPTERS` (plus an identity test:
an all-attention target must reproduce the source's logits, and its native export the
target's). Target names are :class:`~xatl_ds.models.XatlForCausalLM`'s as an attention
layer spells them (``model.layers.{i}.mixer.q_proj``).

This module imports nothing from xatl_ds: ``models/configuration.py`` builds
``XatlConfig.from_source`` on it, and the transfer and export layers use it too.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import torch

__all__ = [
    "ADAPTERS",
    "DERIVED_FIELDS",
    "SUPPORTED_SOURCES",
    "FamilyAdapter",
    "FusedLink",
    "Link",
    "SourceTensor",
    "SourceTensors",
    "adapter_for_family",
    "adapter_for_source",
    "check_target_options",
    "source_config_kwargs",
    "source_family",
]

#: XatlConfig fields an adapter derives from the source; overriding them would break the
#: shape correspondence the transfer relies on.
DERIVED_FIELDS: tuple[str, ...] = (
    "family", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "intermediate_size", "hidden_act", "max_position_embeddings",
    "rotary_pct", "rope_theta", "norm_eps", "use_parallel_residual", "attention_bias",
    "mlp_bias", "tie_word_embeddings", "initializer_range", "bos_token_id", "eos_token_id",
    "pad_token_id",
)  # fmt: skip

PARAM_ATTRS = ("weight", "bias")


class SourceTensor(NamedTuple):
    """A source tensor and the name the report shows for it (with the slice, for fused ones)."""

    name: str
    tensor: torch.Tensor


@dataclass
class SourceTensors:
    """A source model's tensors under target names: ``globals`` keyed by full target names
    (``model.embed_tokens.weight``, ``lm_head.weight``, ``model.norm.*``), ``layers`` one dict
    per block keyed by block-relative names (``input_norm.weight``, ``mixer.q_proj.weight``)."""

    globals: dict[str, SourceTensor]
    layers: list[dict[str, SourceTensor]]


@dataclass(frozen=True)
class Link:
    """One module the two sides share (its ``weight`` and, where present, ``bias``).

    In :attr:`FamilyAdapter.layer_links` both paths are relative to the block:
    ``target`` under ``model.layers.{i}.``, ``source`` under ``{base_prefix}.layers.{i}.``.
    """

    target: str
    source: str


@dataclass(frozen=True)
class FusedLink:
    """Several target modules stored as one source module (GPT-NeoX's ``query_key_value``).

    ``split(tensor, heads)`` returns one tensor per entry of ``targets``; ``join`` is its
    exact inverse. ``part_name`` formats the report's name of a slice (``{part}`` is the
    target module's last name component, ``{attr}`` weight or bias).
    """

    targets: tuple[str, ...]
    source: str
    split: Callable[[torch.Tensor, int], list[torch.Tensor]]
    join: Callable[[list[torch.Tensor], int], torch.Tensor]
    part_name: str


# ----------------------------------------------------------------------------- helpers
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


def _split_neox_qkv(t: torch.Tensor, heads: int) -> list[torch.Tensor]:
    # query_key_value's output rows are laid out (heads, 3, head_dim): each head's q, k and v
    # rows are adjacent, so split per head, not in three contiguous thirds.
    per_head = t.view(heads, 3, t.shape[0] // (3 * heads), *t.shape[1:])
    return [per_head[:, j].reshape(t.shape[0] // 3, *t.shape[1:]) for j in range(3)]


def _join_neox_qkv(parts: list[torch.Tensor], heads: int) -> torch.Tensor:
    q = parts[0]
    fused = torch.stack([x.reshape(heads, x.shape[0] // heads, *x.shape[1:]) for x in parts], dim=1)
    return fused.reshape(3 * q.shape[0], *q.shape[1:])


# ----------------------------------------------------------------------------- adapters
class FamilyAdapter:
    """What one source family is to the target (see the module docstring).

    Subclasses set the class attributes and implement :meth:`family_kwargs` and
    :meth:`native_config`.
    """

    #: target block family (``XatlConfig.family``)
    name: str = ""
    #: transformers ``model_type`` values this adapter reads
    model_types: tuple[str, ...] = ()
    #: the causal LM's ``base_model_prefix``
    base_prefix: str = ""
    #: modules outside the blocks (target path, source path)
    global_links: tuple[Link, ...] = ()
    #: modules of every block, paths relative to the block
    layer_links: tuple[Link | FusedLink, ...] = ()

    # -- config ---------------------------------------------------------------------
    def config_kwargs(self, c: Any) -> dict[str, Any]:
        """The :class:`XatlConfig` block fields that reproduce source config ``c``'s blocks.

        ValueError for a source feature the target cannot express (RoPE scaling, a head_dim
        other than hidden/heads)."""
        theta, pct = _rope(c)
        kw: dict[str, Any] = dict(
            family=self.name,
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
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
        kw.update(self.family_kwargs(c))
        return kw

    def family_kwargs(self, c: Any) -> dict[str, Any]:
        """The family-specific block fields (KV heads, norm eps, residual layout, biases)."""
        raise NotImplementedError

    def native_config(self, config: Any) -> Any:
        """The transformers config of the native model holding an all-attention target with
        XatlConfig ``config``; ValueError when the family cannot express it."""
        raise NotImplementedError

    def native_model_class(self) -> type:
        """The transformers causal-LM class of :meth:`native_config`."""
        raise NotImplementedError

    @staticmethod
    def common_native_kwargs(c: Any) -> dict[str, Any]:
        """Native config fields every family spells the same way."""
        return dict(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
            hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings,
            initializer_range=c.initializer_range, tie_word_embeddings=c.tie_word_embeddings,
            bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
            attention_bias=c.attention_bias,
            rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta, "partial_rotary_factor": c.rotary_pct},
        )  # fmt: skip

    # -- tensors --------------------------------------------------------------------
    def _layer_source(self, i: int, rel: str) -> str:
        return f"{self.base_prefix}.layers.{i}.{rel}"

    def source_tensors(self, source_model: torch.nn.Module) -> SourceTensors:
        """The source's tensors under target names (see :class:`SourceTensors`). Fused source
        tensors come back as views of their slices; nothing is copied."""
        params = dict(source_model.named_parameters(remove_duplicate=False))
        heads = source_model.config.num_attention_heads
        seen: dict[int, str] = {}  # id(tensor) -> first name, to name tied tensors
        glob: dict[str, SourceTensor] = {}
        for link in self.global_links:
            for attr in PARAM_ATTRS:
                sname = f"{link.source}.{attr}"
                if sname not in params:
                    continue
                t = params[sname]
                shown = sname + (f" (tied to {seen[id(t)]})" if id(t) in seen else "")
                seen.setdefault(id(t), sname)
                glob[f"{link.target}.{attr}"] = SourceTensor(shown, t)
        layers: list[dict[str, SourceTensor]] = []
        for i in range(source_model.config.num_hidden_layers):
            d: dict[str, SourceTensor] = {}
            for link in self.layer_links:
                for attr in PARAM_ATTRS:
                    sname = f"{self._layer_source(i, link.source)}.{attr}"
                    if sname not in params:
                        continue
                    t = params[sname]
                    if isinstance(link, Link):
                        d[f"{link.target}.{attr}"] = SourceTensor(sname, t)
                        continue
                    for target, part in zip(link.targets, link.split(t, heads)):
                        shown = f"{sname}[{link.part_name.format(part=target.rsplit('.', 1)[-1], attr=attr)}]"
                        d[f"{target}.{attr}"] = SourceTensor(shown, part)
            layers.append(d)
        return SourceTensors(glob, layers)

    def native_state_dict(self, state: Mapping[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
        """An all-attention target's ``state`` (its ``state_dict()``) under the native
        model's names: the inverse of :meth:`source_tensors`, from the same table."""
        out: dict[str, torch.Tensor] = {}
        for link in self.global_links:
            for attr in PARAM_ATTRS:
                if f"{link.target}.{attr}" in state:
                    out[f"{link.source}.{attr}"] = state[f"{link.target}.{attr}"]
        for i in range(config.num_hidden_layers):
            pre = f"model.layers.{i}."
            for link in self.layer_links:
                for attr in PARAM_ATTRS:
                    sname = f"{self._layer_source(i, link.source)}.{attr}"
                    if isinstance(link, Link):
                        if f"{pre}{link.target}.{attr}" in state:
                            out[sname] = state[f"{pre}{link.target}.{attr}"]
                        continue
                    keys = [f"{pre}{t}.{attr}" for t in link.targets]
                    if all(k in state for k in keys):
                        out[sname] = link.join([state[k] for k in keys], config.num_attention_heads)
        return out


class NeoxAdapter(FamilyAdapter):
    """GPT-NeoX / Pythia: LayerNorms with bias, parallel residual, GELU MLP with biases,
    partial rotary, fused ``query_key_value`` (rows laid out (heads, 3, head_dim))."""

    name = "neox"
    model_types = ("gpt_neox",)
    base_prefix = "gpt_neox"
    global_links = (
        Link("model.embed_tokens", "gpt_neox.embed_in"),
        Link("lm_head", "lm_head"),  # transformers 5 renamed Pythia's embed_out
        Link("model.norm", "gpt_neox.final_layer_norm"),
    )
    layer_links = (
        Link("input_norm", "input_layernorm"),
        Link("mlp_norm", "post_attention_layernorm"),
        Link("mlp.up_proj", "mlp.dense_h_to_4h"),
        Link("mlp.down_proj", "mlp.dense_4h_to_h"),
        FusedLink(
            targets=("mixer.q_proj", "mixer.k_proj", "mixer.v_proj"),
            source="attention.query_key_value",
            split=_split_neox_qkv,
            join=_join_neox_qkv,
            part_name="{part[0]} rows of (heads, 3, head_dim)",
        ),
        Link("mixer.o_proj", "attention.dense"),
    )

    def family_kwargs(self, c: Any) -> dict[str, Any]:
        return dict(
            num_key_value_heads=c.num_attention_heads,
            norm_eps=c.layer_norm_eps,
            use_parallel_residual=bool(c.use_parallel_residual),
            attention_bias=bool(getattr(c, "attention_bias", True)),
            mlp_bias=True,  # GPT-NeoX's dense_h_to_4h / dense_4h_to_h always carry biases
        )

    def native_config(self, config: Any) -> Any:
        from transformers import GPTNeoXConfig

        c = config
        if not (c.mlp_bias and c.attention_bias and c.num_key_value_heads == c.num_attention_heads):
            raise ValueError("a GPT-NeoX export needs biases everywhere and no grouped-query attention")
        return GPTNeoXConfig(layer_norm_eps=c.norm_eps, use_parallel_residual=c.use_parallel_residual,
                             **self.common_native_kwargs(c))  # fmt: skip

    def native_model_class(self) -> type:
        from transformers import GPTNeoXForCausalLM

        return GPTNeoXForCausalLM


class LlamaAdapter(FamilyAdapter):
    """Llama / Mistral: RMSNorm, sequential residual, gated SiLU MLP, grouped-query
    attention with separate q/k/v/o projections."""

    name = "llama"
    model_types = ("llama", "mistral")
    base_prefix = "model"
    global_links = (
        Link("model.embed_tokens", "model.embed_tokens"),
        Link("lm_head", "lm_head"),
        Link("model.norm", "model.norm"),
    )
    layer_links = (
        Link("input_norm", "input_layernorm"),
        Link("mlp_norm", "post_attention_layernorm"),
        *(Link(f"mlp.{p}", f"mlp.{p}") for p in ("gate_proj", "up_proj", "down_proj")),
        *(Link(f"mixer.{p}", f"self_attn.{p}") for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
    )

    def family_kwargs(self, c: Any) -> dict[str, Any]:
        heads = c.num_attention_heads
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
                stacklevel=5,  # the caller of XatlConfig.from_source
            )
        return dict(
            num_key_value_heads=getattr(c, "num_key_value_heads", None) or heads,
            norm_eps=c.rms_norm_eps,
            use_parallel_residual=False,
            attention_bias=bool(getattr(c, "attention_bias", False)),
            mlp_bias=bool(getattr(c, "mlp_bias", False)),
        )

    def native_config(self, config: Any) -> Any:
        from transformers import LlamaConfig

        c = config
        if c.use_parallel_residual:
            raise ValueError("a Llama export needs the sequential residual (use_parallel_residual=False)")
        return LlamaConfig(rms_norm_eps=c.norm_eps, num_key_value_heads=c.num_key_value_heads, mlp_bias=c.mlp_bias,
                           head_dim=c.head_dim, **self.common_native_kwargs(c))  # fmt: skip

    def native_model_class(self) -> type:
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM


#: target family -> its adapter; registering a family is one entry here
ADAPTERS: dict[str, FamilyAdapter] = {a.name: a for a in (NeoxAdapter(), LlamaAdapter())}
#: source ``model_type`` -> target block family
SUPPORTED_SOURCES: dict[str, str] = {mt: a.name for a in ADAPTERS.values() for mt in a.model_types}


def _config_of(source: Any) -> Any:
    """A transformers config from a config or a model carrying one."""
    if hasattr(source, "config") and not hasattr(source, "model_type"):
        return source.config
    return source


def source_family(config: Any) -> str:
    """The target family (``neox``/``llama``) of a source config; ValueError if unsupported."""
    mt = getattr(_config_of(config), "model_type", None)
    if mt not in SUPPORTED_SOURCES:
        raise ValueError(
            f"source model_type={mt!r} is not supported for XATL transfer; supported: "
            f"{sorted(SUPPORTED_SOURCES)} (GPT-NeoX/Pythia and Llama-shaped models)"
        )
    return SUPPORTED_SOURCES[mt]


def adapter_for_source(source: Any) -> FamilyAdapter:
    """The adapter of a source config or model; ValueError if its family is unsupported."""
    return ADAPTERS[source_family(source)]


def adapter_for_family(family: str) -> FamilyAdapter:
    """The adapter of a target family name (``XatlConfig.family``)."""
    if family not in ADAPTERS:
        raise ValueError(f"family={family!r} has no adapter; registered: {sorted(ADAPTERS)}")
    return ADAPTERS[family]


def source_config_kwargs(source_config: Any) -> dict[str, Any]:
    """The :class:`XatlConfig` block fields that reproduce ``source_config``'s blocks (a
    config or a model carrying one); ValueError for an unsupported family or feature."""
    c = _config_of(source_config)
    return adapter_for_source(c).config_kwargs(c)


def check_target_options(options: Iterable[str], accepted: Iterable[str]) -> None:
    """Reject target options that the source fixes (:data:`DERIVED_FIELDS`) or that are not
    among ``accepted`` (the target config's own option names)."""
    allowed = set(accepted) - set(DERIVED_FIELDS)
    for k in options:
        if k in DERIVED_FIELDS:
            raise ValueError(f"{k} is derived from the source config and cannot be overridden in from_source; build an XatlConfig directly to change it")
        if k not in allowed:
            raise ValueError(f"unknown XatlConfig option {k!r} for from_source; allowed: {sorted(allowed)}")
