"""Native export: an XatlForCausalLM as a transformers class that computes the same function.

* All-attention targets become their family's ``GPTNeoXForCausalLM`` / ``LlamaForCausalLM``.
  A scratch run with ``mixer: attention`` is how a source Transformer is made when none can
  be downloaded; exported natively it is a source like any Pythia or Llama checkpoint. The
  config and tensor maps are the family adapter's (:mod:`xatl_ds.families`), the same ones
  the transfer reads sources with.
* Llama-family targets whose layers are Mamba-2 (and attention) become ``BambaForCausalLM``:
  Bamba's block is Llama's (RMSNorm, sequential residual, SwiGLU MLP, RoPE attention with
  grouped-query heads) and its mixer is mamba_ssm's Mamba2 with the same parameter names,
  ``in_proj`` packing ``[z, xBC, dt]``, SiLU conv, ``softplus(dt + dt_bias)``,
  ``A = -exp(A_log)``, per-head ``D``, and the gated RMSNorm ``rmsnorm(y * silu(z))`` grouped
  by ``n_groups`` (norm before gate: no). Bamba takes three things from one config field
  each, so they must agree: the conv activation is ``hidden_act`` (ours is SiLU), the gated
  norm's eps is ``rms_norm_eps`` (ours is the mixer's own), and ``time_step_limit`` stays
  (0, inf) (ours does not clamp dt).

No other transformers class matches: Mamba/Mamba2ForCausalLM blocks have no MLP (ours keep
the source's), Jamba's Mamba mixer normalises dt, B and C with RMSNorms of its own (ours has
none), GPT-NeoX blocks (LayerNorm, parallel residual, GELU MLP) exist in no hybrid class, and
nothing in transformers implements RetNet retention. :class:`NoNativeExport` says so.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

from ..families import adapter_for_family
from ..models import XatlForCausalLM

__all__ = ["NoNativeExport", "is_plain_transformer", "native_class_name", "native_config", "to_native"]


class NoNativeExport(ValueError):
    """No transformers class computes this model's function; export with remote code."""


def is_plain_transformer(model: XatlForCausalLM) -> bool:
    """True when every layer is attention, so a native family model can hold it exactly."""
    return all(k == "attention" for k in model.config.layer_mixers)


def _refuse(config: Any, why: str) -> NoNativeExport:
    mixers = sorted(set(config.layer_mixers))
    return NoNativeExport(
        f"no transformers model class computes this model's function (family {config.family}, mixers "
        f"{'+'.join(mixers)}): {why}. Export it with --format remote-code (it loads with "
        "trust_remote_code=True, needing only torch and transformers)"
    )


def _gated_norm_eps(model: XatlForCausalLM | None, config: Any) -> float:
    """The Mamba-2 gated norm's eps (a property of the mixer, not of the config)."""
    if model is not None:
        for layer in model.model.layers:
            if layer.mixer_type == "mamba2":
                return float(layer.mixer.norm.eps)
    from ..models.mamba2 import GatedRMSNorm

    return float(GatedRMSNorm(1, 1).eps)


def _bamba_reasons(config: Any, model: XatlForCausalLM | None) -> list[str]:
    """Why BambaForCausalLM cannot hold this model ([] when it can)."""
    why = []
    kinds = set(config.layer_mixers)
    if not kinds <= {"attention", "mamba2"}:
        why.append(f"transformers has no class for {'/'.join(sorted(kinds - {'attention', 'mamba2'}))} layers")
        return why
    if config.family != "llama" or config.use_parallel_residual:
        why.append(
            f"the {config.family} block (LayerNorm, parallel residual, plain MLP) exists in no transformers "
            "Mamba-2 hybrid (Bamba's block is Llama's)"
        )
        return why
    if config.hidden_act != "silu":
        why.append(f"Bamba runs its conv with hidden_act; this model's MLP uses {config.hidden_act}, its conv SiLU")
    eps = _gated_norm_eps(model, config)
    if config.norm_eps != eps:
        why.append(f"Bamba's gated norm uses rms_norm_eps={config.norm_eps}, this model's uses eps={eps}")
    return why


def native_class_name(model_or_config: Any) -> str:
    """The transformers class ``to_native`` exports to; :class:`NoNativeExport` (naming the
    reason and the way out) where none computes the same function."""
    model = model_or_config if isinstance(model_or_config, XatlForCausalLM) else None
    config = model.config if model is not None else model_or_config
    if all(k == "attention" for k in config.layer_mixers):
        adapter = adapter_for_family(config.family)
        try:
            adapter.native_config(config)
        except ValueError as e:
            raise _refuse(config, str(e)) from None
        return adapter.native_model_class().__name__
    why = _bamba_reasons(config, model)
    if why:
        raise _refuse(config, "; ".join(why))
    return "BambaForCausalLM"


def native_config(model: XatlForCausalLM) -> Any:
    """The native transformers config of ``model``; :class:`NoNativeExport` when none holds it."""
    name = native_class_name(model)
    if name == "BambaForCausalLM":
        return _bamba_config(model.config)
    return adapter_for_family(model.config.family).native_config(model.config)


def to_native(model: XatlForCausalLM) -> PreTrainedModel:
    """The transformers model (GPTNeoX/Llama/BambaForCausalLM) with exactly ``model``'s
    weights and outputs; :class:`NoNativeExport` when no class computes its function."""
    name = native_class_name(model)
    c = model.config
    if name == "BambaForCausalLM":
        from transformers import BambaForCausalLM

        cfg, cls = _bamba_config(c), BambaForCausalLM
        sd = _bamba_state_dict(model.state_dict(), c)
    else:
        adapter = adapter_for_family(c.family)
        cfg, cls = adapter.native_config(c), adapter.native_model_class()
        sd = adapter.native_state_dict(model.state_dict(), c)
    native = cls(cfg).to(next(model.parameters()).dtype)
    missing, unexpected = native.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"native export mismatch: missing {missing}, unexpected {unexpected}")
    return native.eval()


# -- Bamba ------------------------------------------------------------------------------------
def _bamba_config(c: Any) -> Any:
    from transformers import BambaConfig

    nheads = c.d_inner // c.mamba2_headdim
    att = [i for i, k in enumerate(c.layer_mixers) if k == "attention"]
    return BambaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, hidden_act=c.hidden_act, initializer_range=c.initializer_range,
        rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tie_word_embeddings,
        pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        max_position_embeddings=c.max_position_embeddings, attn_layer_indices=att or None,
        mamba_n_heads=nheads, mamba_d_head=c.mamba2_headdim, mamba_n_groups=c.mamba2_ngroups,
        mamba_d_state=c.d_state, mamba_d_conv=c.d_conv, mamba_expand=c.expand, mamba_chunk_size=c.chunk_size,
        mamba_conv_bias=c.mamba_conv_bias, mamba_proj_bias=c.mamba_proj_bias, time_step_limit=(0.0, float("inf")),
        attention_bias=c.attention_bias, mlp_bias=c.mlp_bias,
        # explicit: BambaConfig would otherwise default partial_rotary_factor to 0.5
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta, "partial_rotary_factor": c.rotary_pct},
    )  # fmt: skip


#: XatlForCausalLM name prefix -> BambaForCausalLM's (per layer: ``{i}`` is the index)
_BAMBA_GLOBAL = {"model.norm.": "model.final_layernorm."}
_BAMBA_LAYER = {
    "input_norm.": "input_layernorm.",
    "mlp_norm.": "pre_ff_layernorm.",
    "mlp.": "feed_forward.",
}


def _bamba_state_dict(state: dict[str, torch.Tensor], c: Any) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        new = k
        for a, b in _BAMBA_GLOBAL.items():
            if k.startswith(a):
                new = b + k[len(a) :]
        if k.startswith("model.layers."):
            i, rest = k[len("model.layers.") :].split(".", 1)
            mixer = "self_attn." if c.layer_mixers[int(i)] == "attention" else "mamba."
            for a, b in {**_BAMBA_LAYER, "mixer.": mixer}.items():
                if rest.startswith(a):
                    rest = b + rest[len(a) :]
                    break
            new = f"model.layers.{i}.{rest}"
        out[new] = v
    return out
