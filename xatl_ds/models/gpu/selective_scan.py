"""Mamba-1 selective scan in Triton: forward, backward and the final state.

Same semantics and channel-last layout as :func:`xatl_ds.models.mamba.selective_scan_ref`
(the oracle): ``u, delta, z: (b, l, d)``, ``A: (d, n)``, ``B, C: (b, l, n)``, ``D,
delta_bias: (d,)``; ``h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t``, ``y_t = C_t h_t +
D u_t``, ``out = y * silu(z)``, ``delta = softplus(delta + delta_bias)`` when asked.

Design. One program per (batch row, block of ``BLOCK_D`` channels) walks time in chunks of
``T`` steps. Per chunk it builds the (T, BLOCK_D, n) decays ``exp(delta A)`` and inputs
``delta u B`` in registers, runs ``tl.associative_scan`` along time and adds the carried
state; nothing of size (b, l, d, n) ever reaches memory. The forward saves the state at
every chunk start (b, n_chunks, d, n) so the backward can walk the chunks in reverse,
recompute the states of one chunk and run the reverse scan for dL/dh, carried across
chunks. Reductions over channels (dB, dC) and over batch/time (dA, dD, d delta_bias) are
written as per-program partials and summed in torch (deterministic, no atomics).

Tuning knobs (no autotuning: it costs GPU minutes and fails under the interpreter):
``XATL_MAMBA_SCAN_T`` (chunk length, shared by forward and backward), ``XATL_MAMBA_SCAN_FWD`` and
``XATL_MAMBA_SCAN_BWD`` (``"BLOCK_D,num_warps"``), or the module constants of the same meaning
:data:`CHUNK`, :data:`FWD`, :data:`BWD` (None: chosen from the shape). Powers of two.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["selective_scan_triton", "scan_config"]

CHUNK: int | None = None  # time steps per chunk (power of two)
FWD: tuple[int, int] | None = None  # (BLOCK_D, num_warps) of the forward kernel
BWD: tuple[int, int] | None = None  # (BLOCK_D, num_warps) of the backward kernel
_MAX_TILE = 4096  # T * BLOCK_D * n_pow2 elements per (T, BLOCK_D, n) register tile


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _env_pair(name: str) -> tuple[int, int] | None:
    v = os.environ.get(name)
    if not v:
        return None
    bd, warps = (int(s) for s in v.split(","))
    return bd, warps


def scan_config(d: int, n: int) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """``(T, (BLOCK_D, warps) forward, (BLOCK_D, warps) backward)`` for ``d`` channels and
    state size ``n``: environment, then module constants, then a shape-based default that
    keeps each (T, BLOCK_D, n) tile at <= 4096 fp32 elements (32 registers a thread at 4
    warps; the backward keeps several such tiles alive)."""
    npow = _pow2(n)
    t = int(os.environ.get("XATL_MAMBA_SCAN_T") or CHUNK or 16)
    if t & (t - 1):
        raise ValueError(f"the scan chunk length must be a power of two, got {t}")

    def default() -> tuple[int, int]:
        bd = max(1, min(_pow2(d), _MAX_TILE // (t * npow), 64))
        return bd, 4

    fwd = _env_pair("XATL_MAMBA_SCAN_FWD") or FWD or default()
    bwd = _env_pair("XATL_MAMBA_SCAN_BWD") or BWD or default()
    for bd, _ in (fwd, bwd):
        if bd & (bd - 1):
            raise ValueError(f"BLOCK_D must be a power of two, got {bd}")
    return t, fwd, bwd


# ----------------------------------------------------------------------------------------
# kernels
@triton.jit
def _combine(a1, b1, a2, b2):
    # (a1, b1) is the earlier element: x -> a2 * (a1 * x + b1) + b2. Triton's reverse scan
    # flips, scans and flips back, so the same function serves g_t = a_t g_{t+1} + b_t.
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _softplus(x):
    # torch's threshold (20); exp(x) where log(1 + exp(x)) would round to 0
    return tl.where(x > 20.0, x, tl.where(x < -15.0, tl.exp(x), tl.log(1.0 + tl.exp(x))))


@triton.jit
def _delta(dl_ptr, bias, offs, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """The effective delta (masked lanes 0: decay 1 and input 0, so padded time steps pass
    the state through unchanged) and d(delta)/d(raw delta)."""
    pre = tl.load(dl_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        pre += bias[None, :]
    if SOFTPLUS:
        dl = _softplus(pre)
        dsp = tl.where(pre > 20.0, 1.0, tl.sigmoid(pre))
    else:
        dl = pre
        dsp = tl.full(pre.shape, 1.0, tl.float32)
    return tl.where(mask, dl, 0.0), dsp


@triton.jit
def _fwd_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, states_ptr, last_ptr,
    L, DM, N,
    s_ub, s_ut, s_ud, s_db, s_dt, s_dd, s_zb, s_zt, s_zd,
    s_Bb, s_Bt, s_Bn, s_Cb, s_Ct, s_Cn, s_Ad, s_An, s_D, s_bias,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    SAVE_STATES: tl.constexpr, T: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    offs_t = tl.arange(0, T)
    md, mn = offs_d < DM, offs_n < N
    mdn = md[:, None] & mn[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * s_Ad + offs_n[None, :] * s_An, mask=mdn, other=0.0).to(tl.float32)
    Dv = tl.zeros((BD,), dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d * s_D, mask=md, other=0.0).to(tl.float32)
    bias = tl.zeros((BD,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d * s_bias, mask=md, other=0.0).to(tl.float32)
    n_chunks = tl.cdiv(L, T)
    st_base = states_ptr + pid_b * n_chunks * DM * N + offs_d[:, None] * N + offs_n[None, :]
    h = tl.zeros((BD, BN), dtype=tl.float32)
    for c in range(0, n_chunks):
        t = c * T + offs_t
        mt = t < L
        m2 = mt[:, None] & md[None, :]
        mtn = mt[:, None] & mn[None, :]
        if SAVE_STATES:
            tl.store(st_base + c * DM * N, h, mask=mdn)
        u = tl.load(u_ptr + pid_b * s_ub + t[:, None] * s_ut + offs_d[None, :] * s_ud, mask=m2, other=0.0).to(tl.float32)
        dl, _dsp = _delta(dl_ptr + pid_b * s_db, bias, t[:, None] * s_dt + offs_d[None, :] * s_dd, m2, HAS_BIAS, SOFTPLUS)
        Bt = tl.load(B_ptr + pid_b * s_Bb + t[:, None] * s_Bt + offs_n[None, :] * s_Bn, mask=mtn, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + pid_b * s_Cb + t[:, None] * s_Ct + offs_n[None, :] * s_Cn, mask=mtn, other=0.0).to(tl.float32)
        dA = tl.exp(dl[:, :, None] * A[None, :, :])
        dBu = (dl * u)[:, :, None] * Bt[:, None, :]
        aa, bb = tl.associative_scan((dA, dBu), 0, _combine)
        hs = aa * h[None, :, :] + bb  # (T, BD, BN): the states h_t of this chunk
        y = tl.sum(hs * Ct[:, None, :], axis=2)
        if HAS_D:
            y += u * Dv[None, :]
        if HAS_Z:
            z = tl.load(z_ptr + pid_b * s_zb + t[:, None] * s_zt + offs_d[None, :] * s_zd, mask=m2, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(out_ptr + pid_b * L * DM + t[:, None] * DM + offs_d[None, :], y.to(out_ptr.dtype.element_ty), mask=m2)
        # padded steps carry the state through, so the last row is the chunk's end state
        h = tl.sum(tl.where((offs_t == T - 1)[:, None, None], hs, 0.0), axis=0)
    tl.store(last_ptr + pid_b * DM * N + offs_d[:, None] * N + offs_n[None, :], h, mask=mdn)


@triton.jit
def _bwd_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, states_ptr,
    du_ptr, ddl_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr,
    L, DM, N,
    s_ub, s_ut, s_ud, s_db, s_dt, s_dd, s_zb, s_zt, s_zd,
    s_Bb, s_Bt, s_Bn, s_Cb, s_Ct, s_Cn, s_Ad, s_An, s_D, s_bias, s_ob, s_ot, s_od,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    T: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    n_dblk = tl.num_programs(1)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    offs_t = tl.arange(0, T)
    md, mn = offs_d < DM, offs_n < N
    mdn = md[:, None] & mn[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * s_Ad + offs_n[None, :] * s_An, mask=mdn, other=0.0).to(tl.float32)
    Dv = tl.zeros((BD,), dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d * s_D, mask=md, other=0.0).to(tl.float32)
    bias = tl.zeros((BD,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d * s_bias, mask=md, other=0.0).to(tl.float32)
    n_chunks = tl.cdiv(L, T)
    st_base = states_ptr + pid_b * n_chunks * DM * N + offs_d[:, None] * N + offs_n[None, :]
    # (b, n_dblk, L, N) partials of dB and dC
    part_base = (pid_b * n_dblk + pid_d) * L * N
    g_next = tl.zeros((BD, BN), dtype=tl.float32)  # dL/dh at the first step of the later chunk
    dA_acc = tl.zeros((BD, BN), dtype=tl.float32)
    dD_acc = tl.zeros((BD,), dtype=tl.float32)
    dbias_acc = tl.zeros((BD,), dtype=tl.float32)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        t = c * T + offs_t
        mt = t < L
        m2 = mt[:, None] & md[None, :]
        mtn = mt[:, None] & mn[None, :]
        offs_td = t[:, None] * s_dt + offs_d[None, :] * s_dd
        u = tl.load(u_ptr + pid_b * s_ub + t[:, None] * s_ut + offs_d[None, :] * s_ud, mask=m2, other=0.0).to(tl.float32)
        dl, dsp = _delta(dl_ptr + pid_b * s_db, bias, offs_td, m2, HAS_BIAS, SOFTPLUS)
        # delta_{t+1}, for the decay that carries dL/dh_{t+1} back to h_t (a second, cached
        # load is cheaper than shifting a register tile by one step)
        m2n = ((t + 1) < L)[:, None] & md[None, :]
        dl1, _dsp1 = _delta(dl_ptr + pid_b * s_db, bias, offs_td + s_dt, m2n, HAS_BIAS, SOFTPLUS)
        Bt = tl.load(B_ptr + pid_b * s_Bb + t[:, None] * s_Bt + offs_n[None, :] * s_Bn, mask=mtn, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + pid_b * s_Cb + t[:, None] * s_Ct + offs_n[None, :] * s_Cn, mask=mtn, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + pid_b * s_ob + t[:, None] * s_ot + offs_d[None, :] * s_od, mask=m2, other=0.0).to(tl.float32)
        # recompute this chunk's states from its saved start state
        h0 = tl.load(st_base + c * DM * N, mask=mdn, other=0.0)
        dA = tl.exp(dl[:, :, None] * A[None, :, :])
        dBu = (dl * u)[:, :, None] * Bt[:, None, :]
        aa, bb = tl.associative_scan((dA, dBu), 0, _combine)
        hs = aa * h0[None, :, :] + bb
        if HAS_Z:
            z = tl.load(z_ptr + pid_b * s_zb + t[:, None] * s_zt + offs_d[None, :] * s_zd, mask=m2, other=0.0).to(tl.float32)
            y = tl.sum(hs * Ct[:, None, :], axis=2)
            if HAS_D:
                y += u * Dv[None, :]
            sz = tl.sigmoid(z)
            dz = dout * y * sz * (1.0 + z * (1.0 - sz))
            tl.store(dz_ptr + pid_b * L * DM + t[:, None] * DM + offs_d[None, :], dz.to(dz_ptr.dtype.element_ty), mask=m2)
            dy = dout * z * sz
        else:
            dy = dout
        dy = tl.where(m2, dy, 0.0)
        # dC_t = sum_d dy_t h_t
        dC = tl.sum(dy[:, :, None] * hs, axis=1)
        tl.store(dC_ptr + part_base + t[:, None] * N + offs_n[None, :], dC, mask=mtn)
        # g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}, a reverse scan plus the carried g
        dA1 = tl.exp(dl1[:, :, None] * A[None, :, :])
        ra, rb = tl.associative_scan((dA1, dy[:, :, None] * Ct[:, None, :]), 0, _combine, reverse=True)
        g = rb + ra * g_next[None, :, :]
        g_next = tl.sum(tl.where((offs_t == 0)[:, None, None], g, 0.0), axis=0)
        dB = tl.sum(g * (dl * u)[:, :, None], axis=1)
        tl.store(dB_ptr + part_base + t[:, None] * N + offs_n[None, :], dB, mask=mtn)
        gB = tl.sum(g * Bt[:, None, :], axis=2)
        du = gB * dl
        if HAS_D:
            du += dy * Dv[None, :]
            dD_acc += tl.sum(dy * u, axis=0)
        # g_t * dA_t * h_{t-1} (= g_t (h_t - delta_t u_t B_t)): the decay's share
        gdec = g * (hs - dBu)
        dA_acc += tl.sum(gdec * dl[:, :, None], axis=0)
        ddl = (gB * u + tl.sum(gdec * A[None, :, :], axis=2)) * dsp
        ddl = tl.where(m2, ddl, 0.0)
        if HAS_BIAS:
            dbias_acc += tl.sum(ddl, axis=0)
        off_out = pid_b * L * DM + t[:, None] * DM + offs_d[None, :]
        tl.store(du_ptr + off_out, du.to(du_ptr.dtype.element_ty), mask=m2)
        tl.store(ddl_ptr + off_out, ddl.to(ddl_ptr.dtype.element_ty), mask=m2)
    tl.store(dA_ptr + pid_b * DM * N + offs_d[:, None] * N + offs_n[None, :], dA_acc, mask=mdn)
    if HAS_D:
        tl.store(dD_ptr + pid_b * DM + offs_d, dD_acc, mask=md)
    if HAS_BIAS:
        tl.store(dbias_ptr + pid_b * DM + offs_d, dbias_acc, mask=md)


# ----------------------------------------------------------------------------------------
def _strides3(t: torch.Tensor | None) -> tuple[int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0)


def _common_args(u, delta, A, B, C, D, z, delta_bias):
    return (
        *u.stride(), *delta.stride(), *_strides3(z), *B.stride(), *C.stride(), *A.stride(),
        D.stride(0) if D is not None else 0, delta_bias.stride(0) if delta_bias is not None else 0,
    )  # fmt: skip


class _SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        b, length, d = u.shape
        n = A.shape[1]
        T, (bd, warps), bwd_cfg = scan_config(d, n)
        n_chunks = triton.cdiv(length, T)
        save = any(ctx.needs_input_grad)  # (grad mode is off inside forward itself)
        out = torch.empty(b, length, d, device=u.device, dtype=u.dtype)
        last = torch.zeros(b, d, n, device=u.device, dtype=torch.float32)
        # the state at every chunk start, for the backward (placeholder when not needed)
        states = torch.empty(b, n_chunks, d, n, device=u.device, dtype=torch.float32) if save else last
        if length > 0:
            _fwd_kernel[(b, triton.cdiv(d, bd))](
                u, delta, A, B, C, D, z, delta_bias, out, states, last, length, d, n,
                *_common_args(u, delta, A, B, C, D, z, delta_bias),
                HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                SOFTPLUS=bool(delta_softplus), SAVE_STATES=save, T=T, BD=bd, BN=_pow2(n), num_warps=warps,
            )  # fmt: skip
        ctx.mark_non_differentiable(last)
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
            ctx.cfg = (T, bwd_cfg)
            ctx.softplus = bool(delta_softplus)
        return out, last

    @staticmethod
    def backward(ctx, dout, _dlast):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        T, (bd, warps) = ctx.cfg
        b, length, d = u.shape
        n = A.shape[1]
        n_dblk = triton.cdiv(d, bd)
        dev, f32 = u.device, torch.float32
        du = torch.empty(b, length, d, device=dev, dtype=u.dtype)
        ddelta = torch.empty(b, length, d, device=dev, dtype=delta.dtype)
        dz = torch.empty(b, length, d, device=dev, dtype=z.dtype) if z is not None else None
        dA = torch.zeros(b, d, n, device=dev, dtype=f32)
        dD = torch.zeros(b, d, device=dev, dtype=f32) if D is not None else None
        dbias = torch.zeros(b, d, device=dev, dtype=f32) if delta_bias is not None else None
        dB = torch.zeros(b, n_dblk, length, n, device=dev, dtype=f32)
        dC = torch.zeros(b, n_dblk, length, n, device=dev, dtype=f32)
        if length > 0:
            _bwd_kernel[(b, n_dblk)](
                u, delta, A, B, C, D, z, delta_bias, dout, states,
                du, ddelta, dz, dA, dD, dbias, dB, dC, length, d, n,
                *_common_args(u, delta, A, B, C, D, z, delta_bias), *dout.stride(),
                HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                SOFTPLUS=ctx.softplus, T=T, BD=bd, BN=_pow2(n), num_warps=warps,
            )  # fmt: skip
        else:
            du.zero_(), ddelta.zero_()
            if dz is not None:
                dz.zero_()
        return (
            du, ddelta, dA.sum(0).to(A.dtype), dB.sum(1).to(B.dtype), dC.sum(1).to(C.dtype),
            dD.sum(0).to(D.dtype) if D is not None else None, dz,
            dbias.sum(0).to(delta_bias.dtype) if delta_bias is not None else None, None,
        )  # fmt: skip


def selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan in Triton; same arguments and result as
    :func:`xatl_ds.models.mamba.selective_scan_ref` (channel-last, any strides, bf16/fp16/fp32
    inputs computed in fp32, ``out`` in ``u``'s dtype, final state ``(b, d, n)`` in fp32)."""
    from ..scan_shapes import check_scan_shapes

    check_scan_shapes(u, delta, A, B, C, D, z, delta_bias)
    out, last = _SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, last) if return_last_state else out


# ----------------------------------------------------------------------------------------
def _bench(configs: list[str], b: int = 4, length: int = 2048, d: int = 1536, n: int = 16) -> None:
    """Forward and forward+backward milliseconds per config ``"T:BDf,Wf:BDb,Wb"`` at a
    pythia-160m-shaped layer (bf16 activations, fp32 A/D/bias), on CUDA."""
    global CHUNK, FWD, BWD
    dev, bf = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)

    def r(*s, dtype=bf, scale=1.0):
        return (torch.randn(*s, generator=g, device=dev) * scale).to(dtype).requires_grad_()

    u, z, delta = r(b, length, d), r(b, length, d), r(b, length, d, scale=0.5)
    x_dbl = r(b, length, 48 + 2 * n)  # B, C as column slices of x_proj's output, as in the mixer
    B, C = x_dbl[..., 48 : 48 + n], x_dbl[..., 48 + n :]
    A = (-torch.arange(1, n + 1, device=dev, dtype=torch.float32).repeat(d, 1)).requires_grad_()
    D, bias = r(d, dtype=torch.float32), r(d, dtype=torch.float32, scale=0.3)
    dout = torch.randn(b, length, d, device=dev, dtype=bf)

    def timed(fn, reps=10):
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(reps):
            fn()
        e.record()
        torch.cuda.synchronize()
        return s.elapsed_time(e) / reps

    def fwd():
        with torch.no_grad():
            selective_scan_triton(u, delta, A, B, C, D, z, bias, True)

    def fwd_bwd():
        selective_scan_triton(u, delta, A, B, C, D, z, bias, True).backward(dout)

    ref = None
    for cfg in configs:
        t, f, bw = cfg.split(":")
        CHUNK, FWD, BWD = int(t), tuple(int(v) for v in f.split(",")), tuple(int(v) for v in bw.split(","))
        try:
            out = selective_scan_triton(u, delta, A, B, C, D, z, bias, True)
            out.backward(dout)
            grads = [t.grad.float().clone() for t in (u, delta, A, x_dbl, D, bias, z)]
            if ref is None:
                ref = [out.float()] + grads
            err = max(((a - b_).norm() / b_.norm()).item() for a, b_ in zip([out.float()] + grads, ref))
            ms_f, ms_fb = timed(fwd), timed(fwd_bwd)
            print(f"T={CHUNK:3d} fwd(BD,warps)={FWD} bwd(BD,warps)={BWD}: fwd {ms_f:7.3f} ms  "
                  f"fwd+bwd {ms_fb:7.3f} ms  (max rel diff to the first config {err:.1e})", flush=True)
        except Exception as e:  # a config that does not compile (registers, shared memory)
            print(f"{cfg}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
        for t_ in (u, delta, A, x_dbl, D, bias, z):
            t_.grad = None


if __name__ == "__main__":
    import sys

    _bench(sys.argv[1:] or ["16:16,4:16,4"])
