"""The source's softmax attention (torch SDPA), with grouped-query heads and a KV cache."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Mixer
from .configuration import XatlConfig
from .layers import apply_rotary


# SDPA's enable_gqa (torch >= 2.5)
_SDPA_GQA = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def _repeat_kv(k: torch.Tensor, v: torch.Tensor, rep: int) -> tuple[torch.Tensor, torch.Tensor]:
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


class AttentionMixer(Mixer):
    out_proj_name = "o_proj"

    def __init__(self, config: XatlConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        d, b = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=b)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=b)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=b)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=b)

    def forward(self, x, *, rope=None, state=None):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        past = 0
        if state is not None:
            if "k" in state:
                past = state["k"].shape[2]
                k = torch.cat([state["k"], k], dim=2)
                v = torch.cat([state["v"], v], dim=2)
            state["k"], state["v"] = k, v
        gqa = self.n_kv != self.n_heads
        # SDPA's flash kernel (CUDA, half precision, no mask) reads grouped KV heads as they
        # are (enable_gqa): no repeated K/V copies, nor saved for backward. Elsewhere the
        # backend SDPA would pick (mem-efficient) rejects enable_gqa and the math one would run:
        # repeat the heads there.
        native_gqa = (gqa and _SDPA_GQA and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
                      and (past == 0 or L == 1))  # fmt: skip
        if gqa and not native_gqa:
            k, v = _repeat_kv(k, v, self.n_heads // self.n_kv)
        extra = {"enable_gqa": True} if native_gqa else {}
        if past == 0 or L == 1:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=past == 0 and L > 1, **extra)
        else:  # a chunk after a non-empty cache: causal with an offset
            S = k.shape[2]
            mask = torch.ones(L, S, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim)
        return self.o_proj(y)
