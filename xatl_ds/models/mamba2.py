"""Mamba-2 (SSD) token mixer: a sequential reference, a chunked torch path, CUDA kernels.

Parameter names and shapes follow mamba_ssm's ``Mamba2`` module (``in_proj`` packs
``[z, x, B, C, dt]``; depthwise ``conv1d`` over ``[x, B, C]``; per-head ``dt_bias``, ``A_log``,
``D``; gated RMSNorm ``norm``; ``out_proj``), so a checkpoint trained on CPU loads into the
kernel path and back.

The selective state space, per head ``h`` (group ``g(h)``) and time ``t``::

    S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t (outer) B_t      S: (headdim, d_state)
    y_t = S_t @ C_t + D_h * x_t

``ssd_ref`` runs it step by step (the test oracle); ``ssd_chunked`` computes the same thing as
a quadratic form inside chunks plus a state hand-off between chunks (Mamba-2's SSD
algorithm), which turns almost all the work into batched matmuls.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Mixer
from .configuration import XatlConfig
from .kernels import available, select_path

__all__ = ["Mamba2Mixer", "GatedRMSNorm", "causal_conv1d_silu", "ssd_ref", "ssd_chunked"]


# --------------------------------------------------------------------------------------
# SSD: reference and chunked scan
# --------------------------------------------------------------------------------------
def _heads_to_groups(t: torch.Tensor, nheads: int) -> torch.Tensor:
    """Repeat a (..., ngroups, d_state) tensor so each head sees its group's B/C."""
    g = t.shape[-2]
    return t if g == nheads else t.repeat_interleave(nheads // g, dim=-2)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulate in fp32 at least (fp64 stays fp64, for gradient checks)."""
    return torch.promote_types(x.dtype, torch.float32)


def ssd_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential SSD recurrence in fp32 (the oracle every fast path is tested against).

    Args:
        x: (batch, length, nheads, headdim) inputs.
        dt: (batch, length, nheads) positive step sizes (softplus already applied).
        A: (nheads,) negative decay rates (``-exp(A_log)``).
        B, C: (batch, length, ngroups, d_state) input/output projections.
        D: optional (nheads,) skip connection.
        initial_state: optional (batch, nheads, headdim, d_state).

    Returns:
        ``(y, final_state)``: y (batch, length, nheads, headdim) in x's dtype and the fp32
        state (fp64 for fp64 inputs) after the last step (batch, nheads, headdim, d_state).
    """
    b, l, h, p = x.shape
    n = B.shape[-1]
    acc = _acc_dtype(x)
    xf, dtf, Af = x.to(acc), dt.to(acc), A.to(acc)
    Bh, Ch = _heads_to_groups(B.to(acc), h), _heads_to_groups(C.to(acc), h)  # (b, l, h, n)
    s = x.new_zeros(b, h, p, n, dtype=acc) if initial_state is None else initial_state.to(acc)
    ys = []
    for t in range(l):
        decay = torch.exp(dtf[:, t] * Af)  # (b, h)
        s = s * decay[:, :, None, None] + (dtf[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", s, Ch[:, t]))
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(b, 0, h, p)
    if D is not None:
        y = y + D.to(acc)[:, None] * xf
    return y.to(x.dtype), s


#: exp(-60) ~ 1e-26 is nothing next to the diagonal's exp(0) = 1, and clamping keeps exp off
#: its slow path: on x86 CPUs exp of arguments below ~ -87 (denormal or zero results) is 10-20x slower.
_MIN_LOG_DECAY = -60.0


class _IntraChunk(torch.autograd.Function):
    """``y = y_in + (CB o exp(cum_l - cum_s) o dt_s + diag(D)) @ x`` per (batch, head, chunk).

    ``CB`` (batch, ngroups, chunks, Q, Q) is lower triangular and shared by a group's heads.
    A hand-written backward: autograd of the same expression keeps and walks several more
    (Q x Q)-per-head temporaries (mask, segsum, exp, products), which is most of the chunked
    scan's CPU time. ``y_in`` is the inter-chunk term.
    """

    @staticmethod
    def forward(ctx, xc, dtc, cum, CB, D, y_in):
        b, h, c, Q, p = xc.shape
        g = CB.shape[1]
        # exp(segsum); the upper triangle is clamped to exp(0) = 1 and zeroed by CB's mask.
        E = (cum[..., :, None] - cum[..., None, :]).clamp_(_MIN_LOG_DECAY, 0.0).exp_()
        M = E * dtc[..., None, :]
        M.view(b, g, h // g, c, Q, Q).mul_(CB[:, :, None])
        if D is not None:  # the skip connection D x rides on the diagonal
            M.diagonal(dim1=-2, dim2=-1).add_(D.to(M.dtype)[:, None, None])
        ctx.save_for_backward(xc, dtc, CB, E, M)
        ctx.has_D = D is not None
        # bmm + add rather than baddbmm: FlopCounterMode (and the FLOP tests) count bmm only
        y = torch.bmm(M.view(-1, Q, Q), xc.view(-1, Q, p)).view(b, h, c, Q, p)
        return y.add_(y_in)

    @staticmethod
    def backward(ctx, dy):
        xc, dtc, CB, E, M = ctx.saved_tensors
        b, h, c, Q, p = xc.shape
        g = CB.shape[1]
        dy = dy.contiguous()
        dM = dy @ xc.transpose(-1, -2)
        dx = M.transpose(-1, -2) @ dy
        dD = dM.diagonal(dim1=-2, dim2=-1).sum((0, 2, 3)) if ctx.has_D else None
        # M's segsum factor depends on cum as +cum_l - cum_s (D's diagonal term cancels out)
        P = dM * M
        dcum = P.sum(-1) - P.sum(-2)
        F_ = dM.mul_(E)  # d loss / d (CB o dt_s), upper triangle masked below by CB and tril
        ddt = (F_.view(b, g, h // g, c, Q, Q) * CB[:, :, None]).sum(-2).view(b, h, c, Q)
        dCB = (F_ * dtc[..., None, :]).view(b, g, h // g, c, Q, Q).sum(2).tril_()
        return dx, ddt, dcum, dCB, dD, dy


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    *,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD (same arguments and results as :func:`ssd_ref`), fp32 inside.

    Inside a chunk of length Q, ``y_l = sum_{s<=l} (C_l . B_s) exp(cum_l - cum_s) dt_s x_s``
    with ``cum`` the running sum of ``dt * A`` (a Q x Q masked matmul per head); the states
    at chunk ends are passed on with one small (chunks+1)^2 decay matmul. Lengths that are
    not a multiple of ``chunk_size`` are zero-padded: ``dt = 0`` there means "no decay, no
    input", so the final state is exact.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    dtype = x.dtype
    acc = _acc_dtype(x)
    xf, dtf, Bf, Cf = x.to(acc), dt.to(acc), B.to(acc), C.to(acc)
    Q = min(chunk_size, max(l, 1))
    pad = (-l) % Q
    if pad:
        xf = F.pad(xf, (0, 0, 0, 0, 0, pad))
        dtf = F.pad(dtf, (0, 0, 0, pad))
        Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))
    c = (l + pad) // Q

    # Heads-major layouts: (b, h, c, Q, .) for x and the decays, (b, g, c, Q, n) for B/C.
    xc = xf.view(b, c, Q, h, p).permute(0, 3, 1, 2, 4)  # (b, h, c, Q, p)
    # (small) per-position tensors made contiguous: broadcasting a strided operand across the
    # (Q x Q) products runs unvectorised, several times slower
    dtc = dtf.view(b, c, Q, h).permute(0, 3, 1, 2).contiguous()  # (b, h, c, Q)
    Bc = Bf.view(b, c, Q, g, n).permute(0, 3, 1, 2, 4)  # (b, g, c, Q, n)
    Cc = Cf.view(b, c, Q, g, n).permute(0, 3, 1, 2, 4)
    cum = torch.cumsum(dtc * A.to(acc)[None, :, None, None], dim=-1)  # (b, h, c, Q), <= 0, decreasing

    # 1. each chunk's own end state, from its inputs decayed to the chunk end
    xc = xc.contiguous()
    w = torch.exp(cum[..., -1:] - cum) * dtc  # (b, h, c, Q)
    Bw = (Bc[:, :, None] * w.view(b, g, r, c, Q)[..., None]).view(b, h, c, Q, n)
    states = xc.transpose(-1, -2) @ Bw  # (b, h, c, p, n)

    # 2. hand states across chunks: S_in[z] = sum_{k<=z} exp(sum of chunk decays k..z-1) S[k]
    s0 = x.new_zeros(b, h, 1, p, n, dtype=acc) if initial_state is None else initial_state.to(acc)[:, :, None]
    states = torch.cat([s0, states], dim=2).flatten(-2)  # (b, h, c+1, p*n)
    ccum = F.pad(cum[..., -1], (1, 0)).cumsum(-1)  # (b, h, c+1)
    chunk_decay = torch.exp((ccum[..., :, None] - ccum[..., None, :]).clamp(max=0.0)).tril()
    states = (chunk_decay @ states).view(b, h, c + 1, p, n)  # entering chunk z; z = c: the final
    s_in, final = states[:, :, :-1], states[:, :, -1]

    # 3. what the entering state contributes: exp(cum_l) C_l . S_in
    Cw = (Cc[:, :, None] * torch.exp(cum).view(b, g, r, c, Q)[..., None]).view(b, h, c, Q, n)
    y_in = Cw @ s_in.transpose(-1, -2)  # (b, h, c, Q, p)

    # 4. within chunks: y_l += sum_{s<=l} (C_l . B_s) exp(cum_l - cum_s) dt_s x_s, plus D x_l
    CB = torch.tril(Cc @ Bc.transpose(-1, -2))  # (b, g, c, Q, Q)
    y = _IntraChunk.apply(xc, dtc, cum, CB, None if D is None else D.to(acc), y_in)

    y = y.permute(0, 2, 3, 1, 4).reshape(b, c * Q, h, p)[:, :l]
    return y.to(dtype), final


# --------------------------------------------------------------------------------------
# Causal depthwise conv + SiLU, channel-last
# --------------------------------------------------------------------------------------
class _CausalConvSiLU(torch.autograd.Function):
    """``silu(bias + sum_k w[:, k] * x[t - K + 1 + k])`` over (b, l, C) inputs.

    A few fused multiply-adds in the channel-last layout in_proj produces: on CPU this is
    several times cheaper (forward and backward) than ``nn.Conv1d``'s depthwise kernel on
    transposed, non-contiguous tensors, and the output stays contiguous for what follows.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, prev):
        b, l, c = x.shape
        k = weight.shape[-1]
        wt = weight.t().contiguous()  # (k, C): contiguous rows broadcast ~10x faster than columns
        head = prev.transpose(1, 2).to(x.dtype) if prev is not None else x.new_zeros(b, k - 1, c)
        xp = torch.cat([head, x], dim=1)  # (b, l + k - 1, c)
        if bias is not None:
            pre = torch.addcmul(bias, xp[:, k - 1 :], wt[k - 1])
        else:
            pre = xp[:, k - 1 :] * wt[k - 1]
        for j in range(k - 1):
            pre.addcmul_(xp[:, j : j + l], wt[j])
        ctx.save_for_backward(xp, wt, pre)
        ctx.has_bias, ctx.has_prev = bias is not None, prev is not None
        return F.silu(pre)

    @staticmethod
    def backward(ctx, dout):
        xp, wt, pre = ctx.saved_tensors
        k = wt.shape[0]
        l = pre.shape[1]
        dpre = torch.ops.aten.silu_backward(dout.contiguous(), pre)
        dx = dprev = dw = db = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[3]:
            dxp = torch.empty_like(xp)
            dxp[:, : k - 1].zero_()
            torch.mul(dpre, wt[k - 1], out=dxp[:, k - 1 :])
            for j in range(k - 1):
                dxp[:, j : j + l].addcmul_(dpre, wt[j])
            dx = dxp[:, k - 1 :]
            dprev = dxp[:, : k - 1].transpose(1, 2) if ctx.has_prev else None
        if ctx.needs_input_grad[1]:
            buf = torch.empty_like(dpre)  # one scratch tensor for the k products
            dw = torch.stack([torch.mul(dpre, xp[:, j : j + l], out=buf).sum((0, 1)) for j in range(k)], dim=-1)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dpre.sum((0, 1))
        return dx, dw, db, dprev


def causal_conv1d_silu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, prev: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal depthwise conv over time + SiLU, torch version of causal_conv1d_fn.

    Args:
        x: (batch, length, channels). weight: (channels, d_conv). bias: (channels,) or None.
        prev: optional (batch, channels, d_conv - 1 or more) earlier inputs (the cache); only
            the last ``d_conv - 1`` are used. Zeros when None.
    """
    k = weight.shape[-1]
    if prev is not None:
        prev = prev[..., prev.shape[-1] - (k - 1) :] if k > 1 else prev[..., :0]
    return _CausalConvSiLU.apply(x, weight, bias, prev)


# --------------------------------------------------------------------------------------
# The mixer
# --------------------------------------------------------------------------------------
class _GatedRMSNormFn(torch.autograd.Function):
    """``rmsnorm(y * silu(z)) * weight`` per group; fused forward and a hand-written backward
    (about half the full-size passes autograd makes over the same expression)."""

    @staticmethod
    def forward(ctx, y, z, weight, group_size: int, eps: float):
        g = F.silu(z)
        h = (y * g).unflatten(-1, (-1, group_size))
        rstd = torch.linalg.vector_norm(h, dim=-1, keepdim=True).square_().div_(group_size).add_(eps).rsqrt_()
        hat = h.mul_(rstd).flatten(-2)
        ctx.save_for_backward(y, z, g, hat, rstd, weight)
        ctx.group_size = group_size
        return hat * weight

    @staticmethod
    def backward(ctx, dout):
        y, z, g, hat, rstd, weight = ctx.saved_tensors
        gs = ctx.group_size
        dw = None
        if ctx.needs_input_grad[2]:
            dw = (dout * hat).flatten(0, -2).sum(0)
        dhat = (dout * weight).unflatten(-1, (-1, gs))
        hat_g = hat.unflatten(-1, (-1, gs))
        m = (dhat * hat_g).mean(-1, keepdim=True)
        dh = dhat.addcmul_(hat_g, m, value=-1.0).mul_(rstd).flatten(-2)  # d loss / d (y * silu(z))
        dy = dh * g
        dz = torch.ops.aten.silu_backward(dh.mul_(y), z)
        return dy, dz, dw, None, None


class GatedRMSNorm(nn.Module):
    """mamba_ssm's gated RMSNorm with ``norm_before_gate=False``: ``rmsnorm(y * silu(z))``,
    normalised per group of ``group_size`` channels, computed in fp32 (at least), weight only."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        if dim % group_size:
            raise ValueError(f"GatedRMSNorm: dim={dim} is not a multiple of group_size={group_size}")
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """``fused``: one Triton kernel each way (:mod:`xatl_ds.models.gpu.gated_norm`)."""
        if fused:
            from .gpu.gated_norm import gated_rms_norm

            return gated_rms_norm(y, z, self.weight, self.group_size, self.eps)
        dtype, acc = y.dtype, _acc_dtype(y)
        out = _GatedRMSNormFn.apply(y.to(acc), z.to(acc), self.weight.to(acc), self.group_size, self.eps)
        return out.to(dtype)


class Mamba2Mixer(Mixer):
    """Mamba-2 token mixer (selective SSM with scalar-per-head decay, SSD algorithm).

    ``forward(x, state=None)``: x (batch, length, hidden_size) -> same shape. With a
    ``state`` dict (cached generation) it starts from ``state["ssm"]`` (batch, nheads,
    headdim, d_state) and ``state["conv"]`` (batch, conv_dim, d_conv) when present and
    leaves the updated ones there; single tokens take an O(1) recurrent step.
    """

    out_proj_name = "out_proj"

    def __init__(self, config: XatlConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.d_model = config.hidden_size
        self.d_inner = config.d_inner
        self.d_state = config.d_state
        self.d_conv = config.d_conv
        self.headdim = config.mamba2_headdim
        self.ngroups = config.mamba2_ngroups
        self.chunk_size = config.chunk_size
        self.kernels = config.kernels
        if self.headdim < 1 or self.d_inner % self.headdim:
            raise ValueError(
                f"mamba2_headdim={self.headdim} must divide d_inner = expand * hidden_size = {self.d_inner}; "
                f"pick a divisor of {self.d_inner} (e.g. 64) or change expand/hidden_size"
            )
        self.nheads = self.d_inner // self.headdim
        if self.ngroups < 1 or self.nheads % self.ngroups:
            raise ValueError(
                f"mamba2_ngroups={self.ngroups} must divide the number of heads "
                f"d_inner / mamba2_headdim = {self.nheads}"
            )
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size={self.chunk_size} must be >= 1 (e.g. 64)")
        if self.d_conv < 1:
            raise ValueError(f"d_conv={self.d_conv} must be >= 1 (e.g. 4)")
        self.conv_dim = self.d_inner + 2 * self.ngroups * self.d_state
        # in_proj packs [z, x, B, C, dt], as in mamba_ssm
        self.in_proj = nn.Linear(self.d_model, self.d_inner + self.conv_dim + self.nheads, bias=config.mamba_proj_bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            kernel_size=self.d_conv,
            groups=self.conv_dim,
            padding=self.d_conv - 1,
            bias=config.mamba_conv_bias,
        )
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.ones(self.nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True  # read by optimizers that follow mamba_ssm's convention
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // self.ngroups, eps=1e-5)
        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=config.mamba_proj_bias)
        self.reset_mixer_parameters()

    @torch.no_grad()
    def reset_mixer_parameters(
        self, dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4, A_range=(1.0, 16.0)
    ) -> None:
        """mamba_ssm's Mamba2 init: ``dt_bias = softplus^-1(dt)`` with dt log-uniform in
        [dt_min, dt_max]; ``A_log = log(U(A_range))``; ``D = 1``; norm weight 1; conv1d torch's
        default. Parameters already loaded from a checkpoint (transformers marks them
        ``_is_hf_initialized``) are left alone."""

        def fresh(p: torch.Tensor) -> bool:
            return not getattr(p, "_is_hf_initialized", False)

        if fresh(self.dt_bias):
            dt = torch.exp(
                torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
            ).clamp(min=dt_init_floor)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        if fresh(self.A_log):
            self.A_log.copy_(torch.empty(self.nheads).uniform_(*A_range).log())
        if fresh(self.D):
            self.D.fill_(1.0)
        if fresh(self.norm.weight):
            self.norm.weight.fill_(1.0)
        conv_params = [self.conv1d.weight] + ([self.conv1d.bias] if self.conv1d.bias is not None else [])
        if all(fresh(p) for p in conv_params):
            self.conv1d.reset_parameters()

    # -- forward ----------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        state: dict | None = None,
    ) -> torch.Tensor:
        if state is not None and "ssm" in state and x.shape[1] == 1:
            return self._step(x, state)
        b, l, _ = x.shape
        z, xBC, dt = torch.split(self.in_proj(x), [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        prev_conv = state.get("conv") if state is not None else None
        prev_ssm = state.get("ssm") if state is not None else None
        if state is not None:
            state["conv"] = self._last_conv_inputs(xBC, prev_conv)

        path = select_path(self.kernels, x, "the Mamba-2 SSD scan", cuda_module="mamba_ssm")
        self.last_path = path
        if path == "cuda" and prev_conv is None and available("causal_conv1d"):
            xBC = self._conv_cuda(xBC)
        elif path == "triton":
            from .gpu.conv import causal_conv1d_silu as conv_triton

            xBC = conv_triton(xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias, prev_conv)
        else:
            xBC = causal_conv1d_silu(xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias, prev_conv)
        xs, Bm, Cm = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        xs = xs.reshape(b, l, self.nheads, self.headdim)  # views, except after a (b, C, l) kernel conv
        Bm = Bm.reshape(b, l, self.ngroups, self.d_state)
        Cm = Cm.reshape(b, l, self.ngroups, self.d_state)
        acc = _acc_dtype(x)
        A = -torch.exp(self.A_log.to(acc))
        if path == "cuda":
            y, final = self._scan_cuda(xs, dt, A, Bm, Cm, prev_ssm, want_final=state is not None)
        elif path == "triton":
            y, final = self._scan_triton(xs, dt, A, Bm, Cm, prev_ssm, want_final=state is not None)
        else:
            dt = F.softplus(dt.to(acc) + self.dt_bias.to(acc))
            y, final = ssd_chunked(xs, dt, A, Bm, Cm, self.chunk_size, D=self.D, initial_state=prev_ssm)
        if state is not None:
            state["ssm"] = final.to(acc)
        if path == "triton" and isinstance(self.norm, GatedRMSNorm):  # (tests may swap the norm out)
            y = self.norm(y.reshape(b, l, self.d_inner), z, fused=True)
        else:
            y = self.norm(y.reshape(b, l, self.d_inner), z)
        return self.out_proj(y)

    def _last_conv_inputs(self, xBC: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
        """The newest ``d_conv`` conv inputs (b, conv_dim, d_conv), zeros before the start."""
        xt = xBC.detach().transpose(1, 2)
        if prev is not None:
            xt = torch.cat([prev.to(xt.dtype), xt], dim=-1)
        k = self.d_conv
        return (F.pad(xt, (k - xt.shape[-1], 0)) if xt.shape[-1] < k else xt[..., -k:]).contiguous()

    @torch.no_grad()
    def _step(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        """One token (b, 1, d_model) through the recurrence, updating ``state``."""
        b = x.shape[0]
        z, xBC, dt = torch.split(self.in_proj(x[:, 0]), [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        conv = torch.cat([state["conv"][..., 1:], xBC[..., None].to(state["conv"].dtype)], dim=-1)
        state["conv"] = conv
        xBC = (conv * self.conv1d.weight[:, 0]).sum(-1)
        if self.conv1d.bias is not None:
            xBC = xBC + self.conv1d.bias
        xBC = F.silu(xBC).to(x.dtype)
        xs, Bm, Cm = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        acc = _acc_dtype(x)
        xs = xs.to(acc).view(b, self.nheads, self.headdim)
        Bh = _heads_to_groups(Bm.to(acc).view(b, self.ngroups, self.d_state), self.nheads)
        Ch = _heads_to_groups(Cm.to(acc).view(b, self.ngroups, self.d_state), self.nheads)
        dt = F.softplus(dt.to(acc) + self.dt_bias.to(acc))  # (b, h)
        A = -torch.exp(self.A_log.to(acc))
        s = state["ssm"].to(acc) * torch.exp(dt * A)[..., None, None] + (dt[..., None] * xs)[..., None] * Bh[:, :, None, :]
        state["ssm"] = s
        y = torch.einsum("bhpn,bhn->bhp", s, Ch) + self.D.to(acc)[:, None] * xs
        y = self.norm(y.reshape(b, 1, self.d_inner).to(x.dtype), z[:, None])
        return self.out_proj(y)

    # -- Triton kernel (xatl_ds.models.gpu), imported lazily ----------------------------
    def _scan_triton(
        self,
        xs: torch.Tensor,
        dt: torch.Tensor,
        A: torch.Tensor,
        Bm: torch.Tensor,
        Cm: torch.Tensor,
        initial_state: torch.Tensor | None,
        want_final: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """SSD as scalar-decay linear attention: q = C, k = B (a group's heads read its B/C
        in place), v = dt * x, log decay dt * A, scale 1; the D skip added here. dt raw
        (b, l, nheads); the rest and the results as for :func:`ssd_chunked`."""
        from .gpu.chunk_scan import chunk_scan

        acc = _acc_dtype(xs)
        dt = F.softplus(dt.to(acc) + self.dt_bias.to(acc))  # (b, l, h) fp32
        v = (dt[..., None] * xs).to(xs.dtype)  # the kernel takes q, k, v in one dtype
        # the state is (b, h, headdim, d_state) here and (b, h, K = d_state, V = headdim) there
        s0 = initial_state.transpose(-1, -2) if initial_state is not None else None
        y, final = chunk_scan(Cm, Bm, v, dt * A, 1.0, initial_state=s0, output_final_state=want_final)
        y = (y.to(acc) + self.D.to(acc)[:, None] * xs.to(acc)).to(xs.dtype)
        return y, (final.transpose(-1, -2) if final is not None else None)

    # -- CUDA kernels (mamba-ssm, causal-conv1d), imported lazily ------------------------
    def _conv_cuda(self, xBC: torch.Tensor) -> torch.Tensor:
        """causal_conv1d_fn with the SiLU fused; (b, l, conv_dim) in, same out."""
        from causal_conv1d import causal_conv1d_fn

        w = self.conv1d.weight.squeeze(1)  # (conv_dim, 1, d_conv) -> (conv_dim, d_conv)
        xt = xBC.transpose(1, 2)  # (b, C, l), channel-last in memory
        if xt.stride(0) % 8 or xt.stride(2) % 8:  # the channel-last kernel needs 8-aligned strides
            xt = xt.contiguous()
        return causal_conv1d_fn(xt, w, bias=self.conv1d.bias, activation="silu").transpose(1, 2)

    def _scan_cuda(
        self,
        xs: torch.Tensor,
        dt: torch.Tensor,
        A: torch.Tensor,
        Bm: torch.Tensor,
        Cm: torch.Tensor,
        initial_state: torch.Tensor | None,
        want_final: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """mamba_chunk_scan_combined with softplus(dt + dt_bias) and the D skip fused; dt raw
        (b, l, nheads), the rest as for :func:`ssd_chunked`."""
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        out = mamba_chunk_scan_combined(
            xs,
            dt,
            A,
            Bm,
            Cm,
            chunk_size=self.chunk_size,
            D=self.D,
            z=None,
            dt_bias=self.dt_bias,
            initial_states=initial_state,
            dt_softplus=True,
            return_final_states=want_final,
        )
        return out if want_final else (out, None)
