"""Gated RMSNorm (``rmsnorm(y * silu(z)) * weight`` per group of channels), in Triton.

The math of :class:`xatl_ds.models.mamba2.GatedRMSNorm` (the oracle): computed in fp32,
returned in y's dtype. One program normalises a block of rows of one group; the backward
recomputes ``y * silu(z)`` from the inputs and the saved per-(row, group) rstd, and writes
the weight gradient as per-row-block partial sums (summed in torch: deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gated_norm_fwd_kernel(y_ptr, z_ptr, w_ptr, out_ptr, rstd_ptr, N, D, G, sy, sz, eps,
                           GS: tl.constexpr, BG: tl.constexpr, BR: tl.constexpr):
    pid_r, pid_g = tl.program_id(0), tl.program_id(1)
    rows = (pid_r * BR + tl.arange(0, BR)).to(tl.int64)  # rows * D may pass 2^31
    cols = tl.arange(0, BG)
    ch = pid_g * GS + cols
    mask = (rows < N)[:, None] & (cols < GS)[None, :]
    y = tl.load(y_ptr + rows[:, None] * sy + ch[None, :], mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + rows[:, None] * sz + ch[None, :], mask=mask, other=0.0).to(tl.float32)
    h = y * z * tl.sigmoid(z)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=1) / GS + eps)
    w = tl.load(w_ptr + ch, mask=cols < GS, other=0.0).to(tl.float32)
    out = h * rstd[:, None] * w[None, :]
    tl.store(out_ptr + rows[:, None] * D + ch[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows * G + pid_g, rstd, mask=rows < N)


@triton.jit
def _gated_norm_bwd_kernel(y_ptr, z_ptr, w_ptr, rstd_ptr, dout_ptr, dy_ptr, dz_ptr, dw_part_ptr,
                           N, D, G, sy, sz, sd,
                           GS: tl.constexpr, BG: tl.constexpr, BR: tl.constexpr, NEED_DW: tl.constexpr):
    pid_r, pid_g = tl.program_id(0), tl.program_id(1)
    rows = (pid_r * BR + tl.arange(0, BR)).to(tl.int64)  # rows * D may pass 2^31
    cols = tl.arange(0, BG)
    ch = pid_g * GS + cols
    mask = (rows < N)[:, None] & (cols < GS)[None, :]
    y = tl.load(y_ptr + rows[:, None] * sy + ch[None, :], mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + rows[:, None] * sz + ch[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(dout_ptr + rows[:, None] * sd + ch[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + rows * G + pid_g, mask=rows < N, other=0.0)
    w = tl.load(w_ptr + ch, mask=cols < GS, other=0.0).to(tl.float32)
    sig = tl.sigmoid(z)
    g = z * sig
    hat = y * g * rstd[:, None]  # masked entries are 0
    if NEED_DW:
        tl.store(dw_part_ptr + pid_r * D + ch, tl.sum(do * hat, axis=0), mask=cols < GS)
    dhat = do * w[None, :]
    m = tl.sum(dhat * hat, axis=1) / GS
    dh = (dhat - hat * m[:, None]) * rstd[:, None]  # d loss / d (y * silu(z))
    dy = dh * g
    dz = dh * y * sig * (1.0 + z * (1.0 - sig))
    tl.store(dy_ptr + rows[:, None] * D + ch[None, :], dy.to(dy_ptr.dtype.element_ty), mask=mask)
    tl.store(dz_ptr + rows[:, None] * D + ch[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)


def _config(N: int, group_size: int) -> tuple[int, int, int]:
    """(BG, BR, num_warps): a whole group per row in one tile (BG = next power of two), rows
    stacked until the tile holds ~4096 values (Mamba-2's groups are 1-8 per d_inner, i.e.
    group sizes 256..8192: 1-16 rows per program)."""
    BG = triton.next_power_of_2(group_size)
    BR = max(1, min(4096 // BG, triton.next_power_of_2(N)))
    warps = 4 if BG * BR <= 4096 else 8 if BG * BR <= 8192 else 16
    return BG, BR, warps


def _rows(t: torch.Tensor, D: int) -> torch.Tensor:
    t = t.reshape(-1, D)
    return t if t.stride(-1) == 1 else t.contiguous()


class _GatedRMSNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, z, weight, group_size: int, eps: float):
        shape, D = y.shape, y.shape[-1]
        y2, z2 = _rows(y, D), _rows(z, D)
        N, G = y2.shape[0], D // group_size
        out = torch.empty(N, D, dtype=y.dtype, device=y.device)
        rstd = torch.empty(N, G, dtype=torch.float32, device=y.device)
        BG, BR, warps = _config(N, group_size)
        _gated_norm_fwd_kernel[(triton.cdiv(N, BR), G)](
            y2, z2, weight, out, rstd, N, D, G, y2.stride(0), z2.stride(0), eps,
            GS=group_size, BG=BG, BR=BR, num_warps=warps,
        )
        ctx.save_for_backward(y2, z2, weight, rstd)
        ctx.group_size, ctx.shape = group_size, shape
        return out.view(shape)

    @staticmethod
    def backward(ctx, dout):
        y2, z2, weight, rstd = ctx.saved_tensors
        gs, shape = ctx.group_size, ctx.shape
        N, D = y2.shape
        G = D // gs
        d2 = _rows(dout, D)
        BG, BR, warps = _config(N, gs)
        nR = triton.cdiv(N, BR)
        need_dw = ctx.needs_input_grad[2]
        dy = torch.empty(N, D, dtype=y2.dtype, device=y2.device)
        dz = torch.empty(N, D, dtype=z2.dtype, device=z2.device)
        dw_part = torch.empty(nR, D, dtype=torch.float32, device=y2.device) if need_dw else dy
        _gated_norm_bwd_kernel[(nR, G)](
            y2, z2, weight, rstd, d2, dy, dz, dw_part, N, D, G, y2.stride(0), z2.stride(0), d2.stride(0),
            GS=gs, BG=BG, BR=BR, NEED_DW=need_dw, num_warps=warps,
        )
        dw = dw_part.sum(0).to(weight.dtype) if need_dw else None
        return dy.view(shape), dz.view(shape), dw, None, None


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int,
                   eps: float = 1e-5) -> torch.Tensor:
    """``rmsnorm(y * silu(z)) * weight``, normalised per group of ``group_size`` channels of
    the last dimension; fp32 inside, returned in y's dtype. y, z: (..., D); weight: (D,)."""
    D = y.shape[-1]
    if z.shape != y.shape or weight.shape != (D,) or D % group_size:
        raise ValueError(f"gated_rms_norm: y {tuple(y.shape)}, z {tuple(z.shape)}, weight {tuple(weight.shape)}, "
                         f"group_size {group_size}: z must match y, weight be (D,), D a multiple of group_size")
    if group_size > 65536:
        raise ValueError(f"gated_rms_norm: group_size={group_size} is over the one-tile limit (65536)")
    return _GatedRMSNormTriton.apply(y, z, weight, group_size, float(eps))
