"""The contract every token mixer follows, and the per-layer state it keeps while generating.

A mixer maps ``(batch, length, hidden)`` to the same shape. In training ``state`` is
``None``. During cached generation the model hands each layer its own ``dict`` (owned by
:class:`XatlCache`); the mixer reads what it left there last call and updates it in place,
so a prefill of ``L`` tokens followed by single-token steps gives the same outputs as one
call on the whole sequence.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


class Mixer(nn.Module):
    """Base class of token mixers (attention, retention, selective SSMs)."""

    #: attribute name of the ``nn.Linear`` that projects the mixer's output back to
    #: ``hidden_size``; the ``attn_out`` transfer component copies W_O into it.
    out_proj_name: ClassVar[str] = "out_proj"

    def forward(  # pragma: no cover - interface
        self,
        x: torch.Tensor,
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        state: dict | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def reset_mixer_parameters(self) -> None:
        """Initialise mixer-specific parameters (e.g. ``A_log``, ``dt`` bias). Called by the
        model's weight init after the generic Linear/Embedding init of the children."""


class XatlCache:
    """Generation state of all layers: KV tensors for attention layers, conv/SSM or
    retention state for LCI layers. Each layer's entry is a plain dict the mixer owns."""

    is_compileable = False

    def __init__(self, num_layers: int):
        self.layers: list[dict] = [{} for _ in range(num_layers)]
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def __len__(self) -> int:
        return len(self.layers)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder every batch-first state tensor (beam search)."""
        for st in self.layers:
            for k, v in st.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    st[k] = v.index_select(0, beam_idx.to(v.device))

    def memory_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for st in self.layers for v in st.values() if torch.is_tensor(v))
