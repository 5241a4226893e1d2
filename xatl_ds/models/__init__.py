"""The XATL model family; importing it registers `xatl` with the transformers Auto classes."""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .base import Mixer, XatlCache
from .configuration import MIXERS, XatlConfig, resolve_attention_layers
from .modeling import XatlForCausalLM, XatlModel, mixer_class

AutoConfig.register(XatlConfig.model_type, XatlConfig, exist_ok=True)
AutoModel.register(XatlConfig, XatlModel, exist_ok=True)
AutoModelForCausalLM.register(XatlConfig, XatlForCausalLM, exist_ok=True)

__all__ = [
    "MIXERS",
    "Mixer",
    "XatlCache",
    "XatlConfig",
    "XatlForCausalLM",
    "XatlModel",
    "mixer_class",
    "resolve_attention_layers",
]
