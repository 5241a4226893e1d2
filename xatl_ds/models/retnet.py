"""Multi-scale retention (RetNet, Sun et al. 2023) as a drop-in token mixer.

One retention, three forms with the same math:

* parallel (training, moderate lengths): ``O = ((Q K^T) * D) V`` with the causal decay mask
  ``D_nm = gamma^(n-m)`` for ``m <= n``;
* chunkwise (long sequences, and prefill with a state): parallel inside chunks of
  ``config.chunk_size`` tokens, a recurrent state ``S = sum_m gamma^(n-m) k_m v_m^T``
  carried across chunks;
* recurrent (one token): ``S_n = gamma S_{n-1} + k_n v_n^T``, ``o_n = q_n S_n``.

Normalisation (the paper's, made exact in every form). Let ``s_nm`` be the decayed score
``(q_n . k_m) * head_dim^-0.5 * gamma^(n-m)``.

1. Decay normalisation: row ``n`` is divided by ``c_n = sqrt(sum_{m<=n} gamma^(n-m))``.
   It depends only on the absolute position ``n``, so it has a closed form,
   ``c_n^2 = (1 - gamma^(n+1)) / (1 - gamma)``, that every form evaluates the same way.
2. Score normalisation: the output row is divided by ``max(|sum_m s_nm / c_n|, 1)``. The
   row sum is ``q_n . z_n`` with ``z_n = sum_m gamma^(n-m) k_m``, a second (vector) state the
   chunkwise and recurrent forms carry beside ``S``; the parallel form sums the score rows.

Both are per-(head, token) scalars, which the GroupNorm that follows would almost cancel;
they exist to keep magnitudes bounded in half precision. Because each form computes exactly
the same quantity, generation with a cache matches training (tested).

Per head, the retention output goes through a GroupNorm (mean/variance over the head's
channels) with a per-channel affine (weight 1, bias 0 at init). The affine is kept because
the transferred W_O (``o_proj``) starts frozen: the norm's trainable scale lets the new mixer
match the input magnitude W_O was trained on. Then a swish gate ``silu(g_proj(x))`` and
``o_proj`` (d x d, bias = ``config.attention_bias``, so a GPT-NeoX dense weight and bias
transfer unchanged). q/k/v/g have no bias, as in the paper.

Positions: rotary (xPos without its scale) over the whole retention head, derived here
(0..L-1 in training, continuing from ``state["offset"]`` when generating); the model's
``rope`` argument is ignored since its head dim may differ.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .base import Mixer
from .configuration import XatlConfig
from .kernels import select_path
from .layers import apply_rotary

__all__ = [
    "RetNetMixer",
    "HeadGroupNorm",
    "retention_log_decay",
    "retention_parallel",
    "retention_chunkwise",
    "retention_recurrent",
]


def retention_log_decay(n_heads: int, device: torch.device | None = None) -> torch.Tensor:
    """``log(gamma_h)`` with ``gamma_h = 1 - 2^(-5 - h)`` for ``h = 0..n_heads-1`` (the paper's
    multi-scale decays), float32 of shape ``(n_heads,)``. Computed in float64 via ``log1p`` so
    the slowest decays (``gamma`` near 1) keep their precision."""
    h = torch.arange(n_heads, dtype=torch.float64)
    return torch.log1p(-torch.pow(2.0, -5.0 - h)).to(device=device, dtype=torch.float32)


def _inv_decay_norm(log_gamma: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``1 / c_n`` for absolute ``positions`` (L,): ``c_n^2 = (1 - gamma^(n+1)) / (1 - gamma)``.
    Returns float32 ``(H, L)``. Uses ``expm1`` so ``gamma`` near 1 stays accurate."""
    lg = log_gamma[:, None]
    c2 = torch.expm1((positions.float()[None, :] + 1.0) * lg) / torch.expm1(lg)
    return c2.rsqrt()


def _decay_mask(log_gamma: torch.Tensor, n: int) -> torch.Tensor:
    """Causal decay mask ``D[h, i, j] = gamma_h^(i-j)`` for ``j <= i`` else 0, float32 (H, n, n)."""
    i = torch.arange(n, device=log_gamma.device)
    diff = (i[:, None] - i[None, :]).float()
    expo = torch.where(diff >= 0, diff[None] * log_gamma[:, None, None], float("-inf"))
    return torch.exp(expo)


# The constants below are identical in every layer and every training step, so they are
# cached (small LRUs keyed by shape/device/dtype). They are built outside inference mode:
# a mask first made under torch.inference_mode() could otherwise not be saved for backward.
@functools.lru_cache(maxsize=16)
def _log_decay(n_heads: int, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):
        return retention_log_decay(n_heads, device)


@functools.lru_cache(maxsize=32)
def _inv_c_from_zero(n_heads: int, L: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """1/c_n for positions 0..L-1, (H, L) in ``dtype``."""
    with torch.inference_mode(False), torch.no_grad():
        return _inv_decay_norm(_log_decay(n_heads, device), torch.arange(L, device=device)).to(dtype)


_MASKS: dict[tuple, torch.Tensor] = {}


def _parallel_mask(n_heads: int, L: int, scale: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The decay mask times the score scale, (H, L, L) in ``dtype``. ``D_nm`` depends on
    ``n - m`` only, so the mask for ``L`` is the top-left block of any longer one: one mask per
    (heads, scale, device, dtype) is kept at the longest length seen (evaluation calls with
    many lengths then cost one mask, not one per length)."""
    key = (n_heads, scale, device, dtype)
    D = _MASKS.get(key)
    if D is None or D.shape[-1] < L:
        with torch.inference_mode(False), torch.no_grad():
            D = _MASKS[key] = (_decay_mask(_log_decay(n_heads, device), L) * scale).to(dtype)
    return D if D.shape[-1] == L else D[:, :L, :L]


@functools.lru_cache(maxsize=32)
def _chunk_consts(
    n_heads: int, C: int, scale: float, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per chunk length ``C``: the scaled intra-chunk mask (H, C, C); the key weights
    ``gamma^(C-1-j)`` that decay a key to the chunk's end (H, C); the query weights
    ``scale * gamma^(i+1)`` that decay the entering state to position ``i`` (H, C)."""
    with torch.inference_mode(False), torch.no_grad():
        lg = _log_decay(n_heads, device)
        i = torch.arange(C, device=device, dtype=torch.float32)
        D = (_decay_mask(lg, C) * scale).to(dtype)
        k_w = torch.exp((C - 1 - i)[None] * lg[:, None]).to(dtype)
        q_w = (torch.exp((i + 1)[None] * lg[:, None]) * scale).to(dtype)
        return D, k_w, q_w


@functools.lru_cache(maxsize=32)
def _rotary(
    head_dim: int, theta: float, offset: int, L: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of shape (1, L, head_dim) for positions offset..offset+L-1, in the
    ``rotate_half`` layout of :func:`apply_rotary`, over the whole head."""
    with torch.inference_mode(False), torch.no_grad():
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
        pos = torch.arange(offset, offset + L, device=device, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None]
        emb = torch.cat((freqs, freqs), dim=-1)[None]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _normalise(num: torch.Tensor, rowsum: torch.Tensor, inv_c: torch.Tensor) -> torch.Tensor:
    """Apply the decay and score normalisations: ``num * inv_c / max(|rowsum * inv_c|, 1)``.
    ``num`` (..., L, dv), ``rowsum`` (..., L), ``inv_c`` broadcastable to ``rowsum``."""
    rowsum = rowsum * inv_c
    scale = inv_c / rowsum.abs().clamp(min=1.0)
    return num * scale.unsqueeze(-1)


def retention_parallel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Parallel retention from position 0 with an empty state, decays set by the head count.

    ``q``, ``k`` (B, H, L, dk), ``v`` (B, H, L, dv) -> (B, H, L, dv); scores ``q.k * scale``
    (the scale is folded into the cached decay mask rather than applied to ``q``).
    """
    H, L = q.shape[1], q.shape[2]
    D = _parallel_mask(H, L, float(scale), q.device, q.dtype)
    inv_c = _inv_c_from_zero(H, L, q.device, q.dtype)
    s = torch.matmul(q, k.transpose(-1, -2)) * D
    return _normalise(torch.matmul(s, v), s.sum(-1), inv_c)


def retention_chunkwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int,
    scale: float = 1.0,
    offset: int = 0,
    S0: torch.Tensor | None = None,
    z0: torch.Tensor | None = None,
    return_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Chunkwise retention: parallel within chunks, recurrent state across them.

    ``q``, ``k`` (B, H, L, dk), ``v`` (B, H, L, dv), scores ``q.k * scale``. The sequence
    starts at absolute position ``offset`` after a state ``S0`` (B, H, dk, dv) and ``z0``
    (B, H, dk) (None = empty). Returns ``(out (B, H, L, dv), S_L, z_L)``; the states are None
    unless ``return_state``. The inter-chunk terms are computed at once with a
    (chunks x chunks) decay matrix: every exponent is <= 0 (no overflow), no loop over chunks.
    """
    B, H, L, dk = q.shape
    dv = v.shape[-1]
    C = max(1, min(chunk_size, L))
    N = -(-L // C)
    pad = N * C - L
    if pad:  # zero keys/values at the end change nothing before them (causality)
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    dt, dev = q.dtype, q.device
    lg = _log_decay(H, dev)
    D, k_w, q_w = _chunk_consts(H, C, float(scale), dev, dt)
    qc, kc, vc = q.view(B, H, N, C, dk), k.view(B, H, N, C, dk), v.view(B, H, N, C, dv)

    # intra-chunk: the parallel form on every chunk at once
    s = torch.matmul(qc, kc.transpose(-1, -2)) * D[:, None]
    num = torch.matmul(s, vc)  # (B, H, N, C, dv)
    rowsum = s.sum(-1)  # (B, H, N, C)

    # per-chunk summaries, each key decayed to its chunk's last position
    k_end = kc * k_w[:, None, :, None]
    kv = torch.matmul(k_end.transpose(-1, -2), vc)  # (B, H, N, dk, dv)
    ksum = k_end.sum(-2)  # (B, H, N, dk)

    # state entering chunk c: sum_{j<c} gamma^(C (c-1-j)) kv_j  (+ gamma^(C c) S0)
    c = torch.arange(N, device=dev)
    cd = (c[:, None] - c[None, :] - 1).float()
    W = torch.exp(torch.where(cd >= 0, cd[None] * (C * lg)[:, None, None], float("-inf"))).to(dt)  # (H, N, N)
    S_in = torch.matmul(W, kv.reshape(B, H, N, dk * dv)).view(B, H, N, dk, dv)
    z_in = torch.matmul(W, ksum)  # (B, H, N, dk)
    if S0 is not None:
        w0 = torch.exp(c.float()[None] * (C * lg)[:, None]).to(dt)  # (H, N)
        S_in = S_in + w0[None, :, :, None, None] * S0[:, :, None]
        z_in = z_in + w0[None, :, :, None] * z0[:, :, None]

    # inter-chunk: the query at in-chunk position i sees the entering state times gamma^(i+1)
    q_dec = qc * q_w[:, None, :, None]
    num = num + torch.matmul(q_dec, S_in)
    rowsum = rowsum + torch.matmul(q_dec, z_in.unsqueeze(-1)).squeeze(-1)

    if offset == 0:
        inv_c = _inv_c_from_zero(H, N * C, dev, dt)
    else:
        inv_c = _inv_decay_norm(lg, offset + torch.arange(N * C, device=dev)).to(dt)
    out = _normalise(num, rowsum, inv_c.view(H, N, C)).reshape(B, H, N * C, dv)[:, :, :L]

    if not return_state:
        return out, None, None
    k, v = k[:, :, :L], v[:, :, :L]
    w = torch.exp((L - 1 - torch.arange(L, device=dev, dtype=torch.float32))[None] * lg[:, None]).to(dt)
    kw = k * w[:, :, None]
    S = torch.matmul(kw.transpose(-1, -2), v)
    z = kw.sum(-2)
    if S0 is not None:
        wL = torch.exp(L * lg).to(dt)
        S = S + wL[:, None, None] * S0
        z = z + wL[:, None] * z0
    return out, S, z


def retention_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offset: int,
    S0: torch.Tensor | None = None,
    z0: torch.Tensor | None = None,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One recurrent step at absolute position ``offset``: ``q``, ``k`` (B, H, 1, dk),
    ``v`` (B, H, 1, dv), scores ``q.k * scale``; returns ``(out (B, H, 1, dv), S, z)``
    (new tensors, the given state untouched)."""
    dt, H = q.dtype, q.shape[1]
    lg = _log_decay(H, q.device)
    q = q * scale
    g = torch.exp(lg).to(dt)
    kv = torch.matmul(k.transpose(-1, -2), v)  # (B, H, dk, dv)
    kk = k[:, :, 0]
    S = kv if S0 is None else g[:, None, None] * S0 + kv
    z = kk if z0 is None else g[:, None] * z0 + kk
    num = torch.matmul(q, S)  # (B, H, 1, dv)
    rowsum = torch.matmul(q, z.unsqueeze(-1)).squeeze(-1)  # (B, H, 1)
    inv_c = _inv_decay_norm(lg, torch.tensor([offset], device=q.device)).to(dt)  # (H, 1)
    return _normalise(num, rowsum, inv_c), S, z


def _retention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    offset: int,
    S0: torch.Tensor | None,
    z0: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`retention_chunkwise` (with states) by the Triton chunked scan: the numerator
    ``q S`` and the row sum ``q . z`` come from one kernel pass (log decay ``log gamma`` per
    head), the two normalisations follow here. ``q``, ``k``, ``v`` (B, H, L, d), read in place
    through their strides; returns ``(out (B, H, L, dv), S, z)`` with the states in q's dtype."""
    from .gpu.chunk_scan import chunk_scan_rowsum

    B, H, L, _ = q.shape
    dt, dev = q.dtype, q.device
    lg = _log_decay(H, dev)
    g = lg.expand(B, L, H)  # constant: its gradient is skipped
    num, rowsum, S, z = chunk_scan_rowsum(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), g, scale, initial_state=S0, initial_z=z0
    )
    if offset == 0:
        inv_c = _inv_c_from_zero(H, L, dev, torch.float32)
    else:
        inv_c = _inv_decay_norm(lg, offset + torch.arange(L, device=dev))
    # _normalise's factor, in fp32 (the row sum is fp32), applied to the numerator in its dtype
    fac = inv_c / (rowsum.transpose(1, 2) * inv_c).abs().clamp(min=1.0)  # (B, H, L)
    out = num.transpose(1, 2) * fac.unsqueeze(-1).to(num.dtype)
    return out, S.to(dt), z.to(dt)


class HeadGroupNorm(nn.Module):
    """GroupNorm with one group per retention head, applied to ``(B, H, L, dh)`` directly
    (no transpose), with a per-channel affine over the ``H * dh`` channels. Returns (B, L, H*dh)."""

    def __init__(self, n_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.n_heads, self.head_dim, self.eps = n_heads, head_dim, eps
        self.weight = nn.Parameter(torch.ones(n_heads * head_dim))
        self.bias = nn.Parameter(torch.zeros(n_heads * head_dim))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        B, H, L, dh = y.shape
        y = F.layer_norm(y, (dh,), eps=self.eps)
        y = torch.addcmul(self.bias.view(H, 1, dh), y, self.weight.view(H, 1, dh))
        return y.transpose(1, 2).reshape(B, L, H * dh)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)


class RetNetMixer(Mixer):
    """Multi-scale retention with a swish gate (see the module docstring for the math).

    Training (``state is None``) uses the parallel form up to ``parallel_max_len`` tokens and
    the chunkwise form beyond. With a ``state`` dict (generation), one token runs the
    recurrent form and several tokens the chunkwise form; the state holds ``S``
    (B, heads, dk, dv), ``z`` (B, heads, dk) and ``offset`` (tokens seen). On the ``triton``
    path (:func:`~xatl_ds.models.kernels.select_path`) training and multi-token prefill run
    the chunked Triton scan instead (:func:`_retention_triton`); single tokens stay recurrent.
    """

    out_proj_name = "o_proj"
    #: longest training sequence run in the parallel form (O(L^2) time and memory per head).
    #: Measured on CPU (benchmarks/retnet_forms.py, d 256, 8 heads, 4096 tokens a step): the
    #: chunkwise form takes 0.67-0.93x the parallel form's time at 256 tokens (runs and chunks
    #: of 32-128 vary), about 0.5x at 512 and 0.25x at 1024; at 128 it is 2-17% slower.
    parallel_max_len: int = 128

    def __init__(self, config: XatlConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        d, H = config.hidden_size, config.retnet_heads
        if not isinstance(H, int) or H < 1 or d % H:
            raise ValueError(
                f"hidden_size={d} is not divisible by retnet_heads={H}; set retnet_heads to a "
                f"divisor of hidden_size (it defaults to num_attention_heads)"
            )
        if (d // H) % 2:
            raise ValueError(
                f"retnet_heads={H} gives a retention head dim of {d // H}, which must be even for the "
                f"rotary positions; choose retnet_heads so that hidden_size // retnet_heads is even"
            )
        if config.chunk_size < 1:
            raise ValueError(f"chunk_size={config.chunk_size} must be >= 1 (RetNet's chunkwise form)")
        self.n_heads, self.head_dim = H, d // H
        self.chunk_size = config.chunk_size
        self.kernels = config.kernels
        self.scaling = self.head_dim**-0.5
        self.rope_theta = config.rope_theta
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.g_proj = nn.Linear(d, d, bias=False)
        self.norm = HeadGroupNorm(H, self.head_dim, config.norm_eps)
        self.o_proj = nn.Linear(d, d, bias=config.attention_bias)

    def reset_mixer_parameters(self) -> None:
        """Reset the GroupNorm affine to the identity (the Linears keep the generic init)."""
        self.norm.reset_parameters()

    def forward(
        self,
        x: torch.Tensor,
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        state: dict | None = None,
    ) -> torch.Tensor:
        """``x`` (B, L, hidden) -> (B, L, hidden). ``rope`` is ignored (positions are derived
        here); ``state`` is this layer's generation dict, read and updated in place."""
        B, L, d = x.shape
        H, dh = self.n_heads, self.head_dim
        offset = int(state.get("offset", 0)) if state is not None else 0
        # decays, masks and rotary tables are derived from the config and cached per
        # shape/device (not buffers: from_pretrained builds modules on the meta device)
        cos_sin = _rotary(dh, float(self.rope_theta), offset, L, x.device, x.dtype)

        q = self.q_proj(x).view(B, L, H, dh).transpose(1, 2)
        k = self.k_proj(x).view(B, L, H, dh).transpose(1, 2)
        v = self.v_proj(x).view(B, L, H, dh).transpose(1, 2)
        q, k = apply_rotary(q, cos_sin), apply_rotary(k, cos_sin)
        sc = self.scaling
        path = select_path(self.kernels, x, "the RetNet retention")
        self.last_path = path

        if path == "triton" and (state is None or L > 1):
            S0, z0 = (state.get("S"), state.get("z")) if state is not None else (None, None)
            y, S, z = _retention_triton(q, k, v, sc, offset, S0, z0)
            if state is not None:
                state["S"], state["z"], state["offset"] = S, z, offset + L
        elif state is None:
            if L <= self.parallel_max_len:
                y = retention_parallel(q, k, v, sc)
            else:
                y = retention_chunkwise(q, k, v, self.chunk_size, sc)[0]
        else:
            S0, z0 = state.get("S"), state.get("z")
            if L == 1:
                y, S, z = retention_recurrent(q, k, v, offset, S0, z0, sc)
            else:
                y, S, z = retention_chunkwise(q, k, v, self.chunk_size, sc, offset, S0, z0, return_state=True)
            state["S"], state["z"], state["offset"] = S, z, offset + L

        y = self.norm(y) * F.silu(self.g_proj(x))
        return self.o_proj(y)
