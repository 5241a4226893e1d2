"""Block pieces shared with the source families: norms, MLPs, rotary embeddings."""
from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from .configuration import XatlConfig


class RMSNorm(nn.Module):
    """Llama's RMSNorm (computed in fp32, weight applied in the input dtype)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def make_norm(config: XatlConfig) -> nn.Module:
    if config.family == "neox":
        return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
    return RMSNorm(config.hidden_size, eps=config.norm_eps)


class NeoxMLP(nn.Module):
    """GPT-NeoX MLP: up (h -> 4h), activation, down."""

    def __init__(self, config: XatlConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class GatedMLP(nn.Module):
    """Llama SwiGLU MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, config: XatlConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def make_mlp(config: XatlConfig) -> nn.Module:
    return NeoxMLP(config) if config.family == "neox" else GatedMLP(config)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over the first ``rotary_pct`` of each head (GPT-NeoX style
    partial rotary; Llama uses the whole head). Returns (cos, sin) of shape (B, L, rot_dim)."""

    def __init__(self, config: XatlConfig):
        super().__init__()
        self.rot_dim = int(config.head_dim * config.rotary_pct)
        self.base = config.rope_theta
        # Not a buffer: from_pretrained builds modules on the meta device and would leave a
        # non-persistent buffer uninitialised. It is derived from the config, so recompute.
        self._cache: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._cache:
            idx = torch.arange(0, self.rot_dim, 2, dtype=torch.int64, device=device).float()
            self._cache[device] = 1.0 / (self.base ** (idx / self.rot_dim))
        return self._cache[device]

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq(position_ids.device)  # (B, L, rot/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate the first ``rot_dim`` channels of ``x`` (B, heads, L, head_dim)."""
    cos, sin = rope
    rot = cos.shape[-1]
    if rot == 0:
        return x
    cos, sin = cos[:, None], sin[:, None]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x_rot = x_rot * cos + _rotate_half(x_rot) * sin
    return torch.cat((x_rot, x_pass), dim=-1) if x_pass.shape[-1] else x_rot
