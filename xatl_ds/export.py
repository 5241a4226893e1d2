"""Export an all-attention XatlForCausalLM in its source family's native transformers format.

A scratch run with ``mixer: attention`` is how a source Transformer is made when none can be
downloaded. Exporting it as a real ``GPTNeoXForCausalLM`` / ``LlamaForCausalLM`` makes it a
source like any Pythia or Llama checkpoint: the XATL transfer, lm-eval and every other tool
load it without xatl-ds, and its transfer follows the same code path as a hub model. The
config and tensor maps are the family adapter's (:mod:`xatl_ds.families`), the same ones
the transfer reads sources with.
"""
from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel

from .families import adapter_for_family
from .models import XatlForCausalLM

__all__ = ["is_plain_transformer", "native_config", "to_native"]


def is_plain_transformer(model: XatlForCausalLM) -> bool:
    """True when every layer is attention, so a native family model can hold it exactly."""
    return all(k == "attention" for k in model.config.layer_mixers)


def native_config(model: XatlForCausalLM) -> Any:
    """The native transformers config of ``model``'s family; ValueError when it cannot hold it."""
    return adapter_for_family(model.config.family).native_config(model.config)


def to_native(model: XatlForCausalLM) -> PreTrainedModel:
    """A GPTNeoXForCausalLM / LlamaForCausalLM with exactly ``model``'s weights and outputs."""
    if not is_plain_transformer(model):
        raise ValueError(
            f"only all-attention models have a native export; this one has mixers {model.config.layer_mixers}"
        )
    adapter = adapter_for_family(model.config.family)
    cfg = adapter.native_config(model.config)
    native = adapter.native_model_class()(cfg).to(next(model.parameters()).dtype)
    sd = adapter.native_state_dict(model.state_dict(), model.config)
    missing, unexpected = native.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"native export mismatch: missing {missing}, unexpected {unexpected}")
    return native.eval()
