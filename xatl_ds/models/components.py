"""Which transfer component each target parameter belongs to.

One source of truth for transfer (what to copy), freezing (what starts frozen) and FLOP
accounting. Names refer to :class:`XatlForCausalLM` parameters.
"""
from __future__ import annotations

import re

from .configuration import XatlConfig

#: transferable components, in the order they are reported
COMPONENTS = ("embed", "lm_head", "final_norm", "norms", "mlp", "attn_out", "attention")
#: parameters no source holds: the LCI mixers' own weights (Q/K/V, gates, SSM tensors)
NEW = "new"

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(\w+)\.(.+)$")


def component_of(name: str, config: XatlConfig) -> str:
    """The component of parameter ``name`` (one of COMPONENTS, or NEW)."""
    if name.startswith("model.embed_tokens."):
        return "embed"
    if name.startswith("lm_head."):
        return "lm_head"
    if name.startswith("model.norm."):
        return "final_norm"
    m = _LAYER.match(name)
    if not m:
        raise KeyError(f"parameter {name!r} is not part of an XatlForCausalLM")
    layer, part, rest = int(m.group(1)), m.group(2), m.group(3)
    if part in ("input_norm", "mlp_norm"):
        return "norms"
    if part == "mlp":
        return "mlp"
    if part == "mixer":
        kind = config.layer_mixers[layer]
        if kind == "attention":
            return "attention"
        from .modeling import mixer_class

        if rest.split(".")[0] == mixer_class(kind).out_proj_name:
            return "attn_out"
        return NEW
    raise KeyError(f"parameter {name!r} is not part of an XatlForCausalLM")


def components_of(model) -> dict[str, str]:
    """Map every named parameter of ``model`` to its component (tied weights once)."""
    return {n: component_of(n, model.config) for n, _ in model.named_parameters()}
