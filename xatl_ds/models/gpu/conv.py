"""Causal depthwise conv over time + SiLU (channel-last), in Triton.

Same signature and semantics as :func:`xatl_ds.models.mamba2.causal_conv1d_silu` (the
oracle): ``out[b, t, c] = silu(bias[c] + sum_j w[c, j] * xp[b, t + j, c])`` where ``xp`` is
``x`` preceded by the last ``k - 1`` cached inputs (``prev``) or zeros. fp32 accumulation,
output in x's dtype. The backward recomputes the pre-activation instead of saving it (the
k taps are cache hits; saving would cost a full (b, l, C) fp32 tensor).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tap(x_ptr, prev_ptr, pid_b, s, offs_c, mask_c, sxb, sxt, sxc, spb, spc, spt, L, K: tl.constexpr,
         HAS_PREV: tl.constexpr):
    """xp[b, s, c] for a block of padded times s (BT,) and channels (BC,), in fp32:
    s < K - 1 reads the cache (or zeros), s >= K - 1 reads x[s - (K - 1)]."""
    t = s - (K - 1)
    in_x = (t >= 0) & (t < L)
    v = tl.load(x_ptr + pid_b * sxb + t[:, None] * sxt + offs_c[None, :] * sxc,
                mask=in_x[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
    if HAS_PREV:
        in_p = (s >= 0) & (s < K - 1)
        v += tl.load(prev_ptr + pid_b * spb + offs_c[None, :] * spc + s[:, None] * spt,
                     mask=in_p[:, None] & mask_c[None, :], other=0.0).to(x_ptr.dtype.element_ty).to(tl.float32)
    return v


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, prev_ptr, out_ptr,
                     L, C, sxb, sxt, sxc, swc, swk, spb, spc, spt,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PREV: tl.constexpr,
                     BT: tl.constexpr, BC: tl.constexpr):
    pid_b, pid_t, pid_c = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)  # b*L*C may pass 2^31
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_c = pid_c * BC + tl.arange(0, BC)
    mask_c = offs_c < C
    acc = tl.zeros((BT, BC), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(K):
        w = tl.load(w_ptr + offs_c * swc + j * swk, mask=mask_c, other=0.0).to(tl.float32)
        acc += w[None, :] * _tap(x_ptr, prev_ptr, pid_b, offs_t + j, offs_c, mask_c, sxb, sxt, sxc,
                                 spb, spc, spt, L, K, HAS_PREV)
    out = acc * tl.sigmoid(acc)
    mask = (offs_t < L)[:, None] & mask_c[None, :]
    # out is contiguous (b, L, C)
    tl.store(out_ptr + pid_b * L * C + offs_t[:, None] * C + offs_c[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, b_ptr, prev_ptr, dout_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
                     L, C, sxb, sxt, sxc, swc, swk, spb, spc, spt, sdb, sdt, sdc,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PREV: tl.constexpr,
                     NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NM: tl.constexpr,
                     BT: tl.constexpr, BC: tl.constexpr):
    """dx[t] = sum_m dpre[t + m] * w[K - 1 - m]; dpre at the K - 1 later times is recomputed
    here (from x), so one kernel does it all. dw / db: this program's partial sums, one row
    per (batch, time block), summed in torch (deterministic, no atomics). NM: the shifts m
    to visit, K with dx, else 1 (dw needs dpre at the block's own times only)."""
    pid_b, pid_t, pid_c = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)  # b*L*C may pass 2^31
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_c = pid_c * BC + tl.arange(0, BC)
    mask_c = offs_c < C
    bias = tl.zeros((BC,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    dx = tl.zeros((BT, BC), dtype=tl.float32)
    part = (pid_b * tl.num_programs(1) + pid_t) * C
    for m in tl.static_range(NM):
        tm = offs_t + m  # output time whose pre-activation this tap feeds
        valid = (tm < L)[:, None] & mask_c[None, :]
        pre = tl.zeros((BT, BC), dtype=tl.float32) + bias[None, :]
        for j in tl.static_range(K):
            w = tl.load(w_ptr + offs_c * swc + j * swk, mask=mask_c, other=0.0).to(tl.float32)
            pre += w[None, :] * _tap(x_ptr, prev_ptr, pid_b, tm + j, offs_c, mask_c, sxb, sxt, sxc,
                                     spb, spc, spt, L, K, HAS_PREV)
        do = tl.load(dout_ptr + pid_b * sdb + tm[:, None] * sdt + offs_c[None, :] * sdc,
                     mask=valid, other=0.0).to(tl.float32)
        sig = tl.sigmoid(pre)
        dpre = do * sig * (1.0 + pre * (1.0 - sig))
        if NEED_DX:
            wm = tl.load(w_ptr + offs_c * swc + (K - 1 - m) * swk, mask=mask_c, other=0.0).to(tl.float32)
            dx += dpre * wm[None, :]
        if m == 0:
            if NEED_DW:
                # dpre is zero past L (dout masked), so the sums need no extra mask
                for j in tl.static_range(K):
                    xj = _tap(x_ptr, prev_ptr, pid_b, offs_t + j, offs_c, mask_c, sxb, sxt, sxc,
                              spb, spc, spt, L, K, HAS_PREV)
                    tl.store(dw_part_ptr + (part + offs_c) * K + j, tl.sum(dpre * xj, axis=0), mask=mask_c)
                if HAS_BIAS:
                    tl.store(db_part_ptr + part + offs_c, tl.sum(dpre, axis=0), mask=mask_c)
    if NEED_DX:
        mask = (offs_t < L)[:, None] & mask_c[None, :]
        tl.store(dx_ptr + pid_b * L * C + offs_t[:, None] * C + offs_c[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=mask)


def _blocks(L: int, C: int, K: int) -> tuple[int, int, int]:
    """(BT, BC, num_warps): 64 times x 64 channels = 4096 fp32 per tile, 32 per thread at 4
    warps; the backward halves BT (it keeps more tiles live). Channels are contiguous in
    memory, so BC is the coalesced axis."""
    BC = min(64, triton.next_power_of_2(C))
    BT = min(64, max(16, triton.next_power_of_2(L)))
    return BT, BC, 4


def _prev_args(prev: torch.Tensor | None, x: torch.Tensor):
    if prev is None:
        return x, 0, 0, 0  # any pointer: never read
    return prev, prev.stride(0), prev.stride(1), prev.stride(2)


class _CausalConvSiLUTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, prev):
        b, L, C = x.shape
        K = weight.shape[-1]
        out = torch.empty(b, L, C, dtype=x.dtype, device=x.device)
        BT, BC, warps = _blocks(L, C, K)
        p, spb, spc, spt = _prev_args(prev, x)
        grid = (b, triton.cdiv(L, BT), triton.cdiv(C, BC))
        _conv_fwd_kernel[grid](
            x, weight, bias if bias is not None else weight, p, out,
            L, C, x.stride(0), x.stride(1), x.stride(2), weight.stride(0), weight.stride(1), spb, spc, spt,
            K=K, HAS_BIAS=bias is not None, HAS_PREV=prev is not None, BT=BT, BC=BC, num_warps=warps,
        )
        ctx.save_for_backward(x, weight, bias, prev)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias, prev = ctx.saved_tensors
        b, L, C = x.shape
        K = weight.shape[-1]
        need_dx = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
        if not (need_dx or need_dw):
            return None, None, None, None
        BT, BC, warps = _blocks(L, C, K)
        BT = min(BT, 32)  # the backward holds K pre-activation tiles in turn: smaller tiles
        nT = triton.cdiv(L, BT)
        dx = torch.empty(b, L, C, dtype=x.dtype, device=x.device) if need_dx else x
        dw_part = torch.empty(b * nT, C, K, dtype=torch.float32, device=x.device) if need_dw else x
        db_part = torch.empty(b * nT, C, dtype=torch.float32, device=x.device) if need_dw and bias is not None else x
        p, spb, spc, spt = _prev_args(prev, x)
        _conv_bwd_kernel[(b, nT, triton.cdiv(C, BC))](
            x, weight, bias if bias is not None else weight, p, dout, dx, dw_part, db_part,
            L, C, x.stride(0), x.stride(1), x.stride(2), weight.stride(0), weight.stride(1), spb, spc, spt,
            dout.stride(0), dout.stride(1), dout.stride(2),
            K=K, HAS_BIAS=bias is not None, HAS_PREV=prev is not None, NEED_DX=need_dx, NEED_DW=need_dw,
            NM=K if need_dx else 1, BT=BT, BC=BC, num_warps=warps,
        )
        dw = dw_part.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        db = db_part.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return (dx if need_dx else None), dw, db, None


def causal_conv1d_silu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, prev: torch.Tensor | None = None
) -> torch.Tensor:
    """Triton ``silu(causal depthwise conv)``; see :func:`xatl_ds.models.mamba2.causal_conv1d_silu`.

    Args:
        x: (batch, length, channels), any strides (e.g. a slice of in_proj's output).
        weight: (channels, d_conv). bias: (channels,) or None.
        prev: optional (batch, channels, >= d_conv - 1) earlier inputs; only the last
            ``d_conv - 1`` are used. No gradient flows to it (it is the inference cache).
    Returns (batch, length, channels) contiguous, in x's dtype.
    """
    K = weight.shape[-1]
    if prev is not None:
        prev = prev[..., prev.shape[-1] - (K - 1):] if K > 1 else None
    return _CausalConvSiLUTriton.apply(x, weight, bias, prev)
