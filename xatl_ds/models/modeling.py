"""`XatlForCausalLM`: source-family blocks with a swappable token mixer per layer."""
from __future__ import annotations

import importlib

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .base import Mixer, XatlCache
from .configuration import XatlConfig
from .layers import RotaryEmbedding, make_mlp, make_norm

# mixer name -> "module:Class"; imported on first use so a CPU machine never touches
# GPU-only code paths at import time.
MIXER_CLASSES = {
    "attention": "xatl_ds.models.attention:AttentionMixer",
    "retnet": "xatl_ds.models.retnet:RetNetMixer",
    "mamba": "xatl_ds.models.mamba:MambaMixer",
    "mamba2": "xatl_ds.models.mamba2:Mamba2Mixer",
}


def mixer_class(name: str) -> type[Mixer]:
    try:
        mod, cls = MIXER_CLASSES[name].split(":")
    except KeyError:
        raise ValueError(f"mixer={name!r} is unknown; choose one of {sorted(MIXER_CLASSES)}") from None
    return getattr(importlib.import_module(mod), cls)


class XatlBlock(nn.Module):
    def __init__(self, config: XatlConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.mixer_type = config.layer_mixers[layer_idx]
        self.parallel = config.use_parallel_residual
        self.input_norm = make_norm(config)
        self.mixer = mixer_class(self.mixer_type)(config, layer_idx)
        self.mlp_norm = make_norm(config)
        self.mlp = make_mlp(config)

    def forward(self, x, rope, state=None):
        if self.parallel:  # GPT-NeoX: x + mixer(ln1(x)) + mlp(ln2(x))
            m = self.mixer(self.input_norm(x), rope=rope, state=state)
            return self.mlp(self.mlp_norm(x)) + m + x
        x = x + self.mixer(self.input_norm(x), rope=rope, state=state)
        return x + self.mlp(self.mlp_norm(x))


class XatlPreTrainedModel(PreTrainedModel):
    config_class = XatlConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["XatlBlock"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif type(module).__name__ == "RMSNorm":
            module.weight.fill_(1.0)
        elif isinstance(module, Mixer):
            module.reset_mixer_parameters()


class XatlModel(XatlPreTrainedModel):
    def __init__(self, config: XatlConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(XatlBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config)
        self.rotary = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, inputs_embeds=None, cache: XatlCache | None = None, position_ids=None):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, L = x.shape[:2]
        start = cache.seen_tokens if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + L, device=x.device).unsqueeze(0).expand(B, L)
        rope = self.rotary(position_ids, x.dtype)
        for i, block in enumerate(self.layers):
            state = cache.layers[i] if cache is not None else None
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, state, use_reentrant=False)
            else:
                x = block(x, rope, state)
        if cache is not None:
            cache.seen_tokens += L
        return self.norm(x)


class XatlForCausalLM(XatlPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: XatlConfig):
        super().__init__(config)
        self.model = XatlModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: XatlCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_logits: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """``return_logits``: None (default) returns the logits unless the fused loss runs (with
        ``labels``, in training mode, gradients on, on the Triton path: then ``logits`` is None
        and the (tokens x vocab) logits never exist whole); True always returns them (and
        computes the loss from them); False never returns them and takes the fused loss
        whenever the Triton path is selected (eval included)."""
        _check_right_padding(attention_mask)
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        cache = cache if isinstance(cache, XatlCache) else None
        if cache is None and use_cache:
            cache = XatlCache(self.config.num_hidden_layers)
        h = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, cache=cache, position_ids=position_ids)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        self.last_loss_path = None
        if labels is not None and self._fused_loss_ok(h, logits_to_keep, return_logits):
            # the next-token shift as labels, the last position ignored: h stays contiguous,
            # and the count of counted tokens (the mean's denominator) is unchanged
            from .gpu.cross_entropy import fused_linear_cross_entropy

            shifted = nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
            loss = fused_linear_cross_entropy(h, self.lm_head.weight, shifted, ignore_index=-100)
            self.last_loss_path = "triton"
            return CausalLMOutputWithPast(loss=loss, logits=None, cache=cache)
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            self.last_loss_path = "torch"
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=None if return_logits is False else logits, cache=cache)

    def _fused_loss_ok(self, h: torch.Tensor, logits_to_keep: int, return_logits: bool | None) -> bool:
        """Whether the loss may skip the logits (see ``forward``'s ``return_logits``)."""
        if return_logits or logits_to_keep:
            return False
        if return_logits is None and not (self.training and torch.is_grad_enabled()):
            return False
        # ZeRO-3 gathers lm_head's partitioned weight only inside lm_head's own forward. fp16:
        # the gradients are made before the loss scale is applied and would underflow.
        if hasattr(self.lm_head.weight, "ds_id") or getattr(self.lm_head, "bias", None) is not None:
            return False
        if h.dtype == torch.float16:
            return False
        from .kernels import select_path

        return select_path(self.config.kernels, h, "the fused cross-entropy") == "triton"

    def prepare_inputs_for_generation(
        self, input_ids, cache=None, attention_mask=None, inputs_embeds=None, use_cache=True, **kwargs
    ):
        cache = cache if cache is not None else kwargs.get("past_key_values")
        cache = cache if isinstance(cache, XatlCache) else None
        if use_cache and cache is None:
            cache = XatlCache(self.config.num_hidden_layers)
        if cache is not None and cache.seen_tokens > 0:
            input_ids = input_ids[:, cache.seen_tokens :]
            inputs_embeds = None
        model_inputs = {"cache": cache, "use_cache": use_cache, "attention_mask": attention_mask}
        if inputs_embeds is not None and (cache is None or cache.seen_tokens == 0):
            model_inputs["inputs_embeds"] = inputs_embeds
        else:
            model_inputs["input_ids"] = input_ids
        return model_inputs

    def _reorder_cache(self, cache, beam_idx):
        cache.reorder_cache(beam_idx)
        return cache


def _check_right_padding(mask: torch.Tensor | None) -> None:
    """Recurrent mixers read tokens in order, so only right padding is sound."""
    if mask is None or mask.dim() != 2 or bool(mask.all()):
        return
    m = mask.bool()
    # right-padded <=> once a row hits padding it stays padding
    if bool((m[:, 1:] & ~m[:, :-1]).any()):
        raise ValueError(
            "XatlForCausalLM got a left-padded (or holed) attention_mask; recurrent mixers need "
            "right padding: set tokenizer.padding_side='right' or use batch size 1"
        )
