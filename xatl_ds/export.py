"""Export an all-attention XatlForCausalLM in its source family's native transformers format.

A scratch run with ``mixer: attention`` is how a source Transformer is made when none can be
downloaded. Exporting it as a real ``GPTNeoXForCausalLM`` / ``LlamaForCausalLM`` makes it a
source like any Pythia or Llama checkpoint: the XATL transfer, lm-eval and every other tool
load it without xatl-ds, and its transfer follows the same code path as a hub model.
"""
from __future__ import annotations

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from .models import XatlForCausalLM


def is_plain_transformer(model: XatlForCausalLM) -> bool:
    """True when every layer is attention, so a native family model can hold it exactly."""
    return all(k == "attention" for k in model.config.layer_mixers)


def native_config(model: XatlForCausalLM):
    c = model.config
    common = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
        hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings,
        initializer_range=c.initializer_range, tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        attention_bias=c.attention_bias,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta, "partial_rotary_factor": c.rotary_pct},
    )  # fmt: skip
    if c.family == "neox":
        if not (c.mlp_bias and c.attention_bias and c.num_key_value_heads == c.num_attention_heads):
            raise ValueError("a GPT-NeoX export needs biases everywhere and no grouped-query attention")
        return GPTNeoXConfig(layer_norm_eps=c.norm_eps, use_parallel_residual=c.use_parallel_residual, **common)
    if c.use_parallel_residual:
        raise ValueError("a Llama export needs the sequential residual (use_parallel_residual=False)")
    return LlamaConfig(rms_norm_eps=c.norm_eps, num_key_value_heads=c.num_key_value_heads, mlp_bias=c.mlp_bias,
                       head_dim=c.head_dim, **common)  # fmt: skip


def _native_state_dict(model: XatlForCausalLM) -> dict[str, torch.Tensor]:
    c, sd = model.config, model.state_dict()
    out: dict[str, torch.Tensor] = {}
    if c.family == "neox":
        out["gpt_neox.embed_in.weight"] = sd["model.embed_tokens.weight"]
        out["lm_head.weight"] = sd["lm_head.weight"]  # transformers 5 renamed Pythia's embed_out
        for a in ("weight", "bias"):
            out[f"gpt_neox.final_layer_norm.{a}"] = sd[f"model.norm.{a}"]
        H, hd = c.num_attention_heads, c.head_dim
        for i in range(c.num_hidden_layers):
            s, t = f"model.layers.{i}.", f"gpt_neox.layers.{i}."
            for a in ("weight", "bias"):
                out[f"{t}input_layernorm.{a}"] = sd[f"{s}input_norm.{a}"]
                out[f"{t}post_attention_layernorm.{a}"] = sd[f"{s}mlp_norm.{a}"]
                out[f"{t}mlp.dense_h_to_4h.{a}"] = sd[f"{s}mlp.up_proj.{a}"]
                out[f"{t}mlp.dense_4h_to_h.{a}"] = sd[f"{s}mlp.down_proj.{a}"]
                out[f"{t}attention.dense.{a}"] = sd[f"{s}mixer.o_proj.{a}"]
                # GPT-NeoX fuses q, k, v with rows laid out (heads, 3, head_dim)
                q, k, v = (sd[f"{s}mixer.{p}_proj.{a}"] for p in "qkv")
                fused = torch.stack([x.reshape(H, hd, *x.shape[1:]) for x in (q, k, v)], dim=1)
                out[f"{t}attention.query_key_value.{a}"] = fused.reshape(3 * H * hd, *q.shape[1:])
    else:
        out["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"]
        out["lm_head.weight"] = sd["lm_head.weight"]
        out["model.norm.weight"] = sd["model.norm.weight"]
        for k, v in sd.items():
            if k.startswith("model.layers."):
                k = k.replace(".input_norm.", ".input_layernorm.").replace(".mlp_norm.", ".post_attention_layernorm.")
                out[k.replace(".mixer.", ".self_attn.")] = v
    return out


def to_native(model: XatlForCausalLM) -> PreTrainedModel:
    """A GPTNeoXForCausalLM / LlamaForCausalLM with exactly ``model``'s weights and outputs."""
    if not is_plain_transformer(model):
        raise ValueError(
            f"only all-attention models have a native export; this one has mixers {model.config.layer_mixers}"
        )
    cfg = native_config(model)
    cls = GPTNeoXForCausalLM if model.config.family == "neox" else LlamaForCausalLM
    native = cls(cfg).to(next(model.parameters()).dtype)
    sd = _native_state_dict(model)
    missing, unexpected = native.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"native export mismatch: missing {missing}, unexpected {unexpected}")
    return native.eval()
