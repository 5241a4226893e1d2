"""Chunked linear attention with a scalar decay per (head, step), in Triton.

The recurrence shared by Mamba-2 (SSD) and RetNet, per batch and head::

    S_t = exp(g_t) * S_{t-1} + k_t^T v_t        S: (K, V), g_t <= 0
    o_t = scale * q_t S_t
    [RetNet only] r_t = scale * q_t . z_t,  z_t = exp(g_t) z_{t-1} + k_t   (the score row sum)

Chunks of ``BT`` steps: with ``gc`` the within-chunk running sum of ``g`` and ``S`` the state
entering the chunk, ``o_i = scale * (exp(gc_i) q_i S + sum_{j<=i} exp(gc_i - gc_j) (q_i.k_j) v_j)``.
Four kernels:

* ``_fwd_states``: one program per (batch*head, K block, V block) walks the chunks in order
  and stores every entering state (fp32), and the final one;
* ``_fwd_out``: one program per (chunk, V block, batch*head): intra-chunk masked ``q k^T``
  times ``v`` plus the entering state's contribution;
* ``_bwd_states``: the reverse walk, storing the gradient of every leaving state;
* ``_bwd_chunk``: one program per (chunk, batch*head): dq, dk, dv and ``dG = q.dq - k.dk``.

The log-decay gradient uses the identity for ``G`` the global running sum of ``g``: every
term carries ``exp(G_i)`` with ``q_i`` and ``exp(-G_j)`` with ``k_j``, so
``dL/dG_i = q_i.dq_i - k_i.dk_i`` (plus ``<dS_L, S_L>`` at the last step), and ``dg`` is its
reverse running sum.

Tuning knobs (read per call, so a benchmark can vary them in one process): environment
variables ``XATL_SCAN_CHUNK`` (default 64), ``XATL_SCAN_BK`` / ``XATL_SCAN_BV`` (block over
K / V, default 64), ``XATL_SCAN_WARPS`` (default 4), ``XATL_SCAN_STAGES`` (default 2, the
sequential state kernels), ``XATL_SCAN_TF32=1`` (fp32 inputs: TF32 dots instead of IEEE).
Seen on an H200 (Triton 3.6, bf16, 4 x 2048 tokens): the defaults run; ``XATL_SCAN_BV=32``
(any shape tried) and ``XATL_SCAN_CHUNK=128`` with K = 16 hit an illegal memory access there,
though both pass under the interpreter: unexplained, keep to the defaults until found.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["chunk_scan", "chunk_scan_ref", "config"]


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v else default


def config() -> dict:
    """The launch configuration in force (environment knobs, see the module docstring)."""
    return dict(
        chunk=_env_int("XATL_SCAN_CHUNK", 64),
        bk=_env_int("XATL_SCAN_BK", 64),
        bv=_env_int("XATL_SCAN_BV", 64),
        warps=_env_int("XATL_SCAN_WARPS", 4),
        stages=_env_int("XATL_SCAN_STAGES", 2),
        tf32=os.environ.get("XATL_SCAN_TF32") == "1",
    )


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------
@triton.jit
def _fwd_states(
    k, v, gc, h0, z0, states, zstates, ht, zt,
    s_kb, s_kl, s_kh, s_kk, s_vb, s_vl, s_vh, s_vv,
    L, NT, Lp,
    H: tl.constexpr, R: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_Z: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    DT = k.dtype.element_ty
    if DOT_F32:  # the interpreter's tl.dot mishandles bf16 operands
        DT = tl.float32
    ok = i_k * BK + tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    mk, mv = ok < K, ov < V
    mkv = mk[:, None] & mv[None, :]
    kv_off = ok[:, None] * V + ov[None, :]
    bh64 = i_bh.to(tl.int64)
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        S += tl.load(h0 + bh64 * K * V + kv_off, mask=mkv, other=0.0)
    if HAS_Z:
        z = tl.zeros([BK], dtype=tl.float32)
        if HAS_H0:
            z += tl.load(z0 + bh64 * K + ok, mask=mk, other=0.0)
    k_base = k + i_b.to(tl.int64) * s_kb + (i_h // R).to(tl.int64) * s_kh
    v_base = v + i_b.to(tl.int64) * s_vb + i_h.to(tl.int64) * s_vh
    g_base = gc + bh64 * Lp
    for t in range(NT):
        st = bh64 * NT + t
        tl.store(states + st * K * V + kv_off, S, mask=mkv)
        if HAS_Z:
            tl.store(zstates + st * K + ok, z, mask=mk & (i_v == 0))
        ot = t * BT + tl.arange(0, BT)
        mt = ot < L
        kb = tl.load(k_base + ot[:, None] * s_kl + ok[None, :] * s_kk, mask=mt[:, None] & mk[None, :], other=0.0)
        vb = tl.load(v_base + ot[:, None] * s_vl + ov[None, :] * s_vv, mask=mt[:, None] & mv[None, :], other=0.0)
        gcb = tl.load(g_base + ot)  # padded with zero decays past L: no mask needed
        glast = tl.load(g_base + t * BT + BT - 1)
        kw = kb.to(tl.float32) * tl.exp(glast - gcb)[:, None]  # each key decayed to the chunk end
        S = S * tl.exp(glast) + tl.dot(tl.trans(kw.to(DT)), vb.to(DT), input_precision=PREC)
        if HAS_Z:
            z = z * tl.exp(glast) + tl.sum(kw, axis=0)
    tl.store(ht + bh64 * K * V + kv_off, S, mask=mkv)
    if HAS_Z:
        tl.store(zt + bh64 * K + ok, z, mask=mk & (i_v == 0))


@triton.jit
def _fwd_out(
    q, k, v, gc, states, zstates, o, r, scale,
    s_qb, s_ql, s_qh, s_qk, s_kb, s_kl, s_kh, s_kk, s_vb, s_vl, s_vh, s_vv,
    L, NT, Lp,
    H: tl.constexpr, R: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr,
    HAS_Z: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    i_t, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    DT = q.dtype.element_ty
    if DOT_F32:  # the interpreter's tl.dot mishandles bf16 operands
        DT = tl.float32
    bh64 = i_bh.to(tl.int64)
    ot = i_t * BT + tl.arange(0, BT)
    mt = ot < L
    ov = i_v * BV + tl.arange(0, BV)
    mv = ov < V
    q_base = q + i_b.to(tl.int64) * s_qb + (i_h // R).to(tl.int64) * s_qh
    k_base = k + i_b.to(tl.int64) * s_kb + (i_h // R).to(tl.int64) * s_kh
    v_base = v + i_b.to(tl.int64) * s_vb + i_h.to(tl.int64) * s_vh
    st = bh64 * NT + i_t
    gcb = tl.load(gc + bh64 * Lp + ot)
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    A = tl.zeros([BT, BT], dtype=tl.float32)
    if HAS_Z:
        rs = tl.zeros([BT], dtype=tl.float32)
    for kk in tl.static_range(NK):
        ok = kk * BK + tl.arange(0, BK)
        mk = ok < K
        qb = tl.load(q_base + ot[:, None] * s_ql + ok[None, :] * s_qk, mask=mt[:, None] & mk[None, :], other=0.0)
        kb = tl.load(k_base + ot[:, None] * s_kl + ok[None, :] * s_kk, mask=mt[:, None] & mk[None, :], other=0.0)
        Sb = tl.load(states + st * K * V + ok[:, None] * V + ov[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        acc += tl.dot(qb.to(DT), Sb.to(DT), input_precision=PREC)
        A += tl.dot(qb.to(DT), tl.trans(kb.to(DT)), input_precision=PREC)
        if HAS_Z:
            zb = tl.load(zstates + st * K + ok, mask=mk, other=0.0)
            rs += tl.sum(qb.to(tl.float32) * zb[None, :], axis=1)
    wq = tl.exp(gcb)
    causal = ot[:, None] >= ot[None, :]
    # where() before use: exp of the (positive) upper-triangle differences may overflow
    A = tl.where(causal, A * tl.exp(gcb[:, None] - gcb[None, :]), 0.0)
    vb = tl.load(v_base + ot[:, None] * s_vl + ov[None, :] * s_vv, mask=mt[:, None] & mv[None, :], other=0.0)
    acc = acc * wq[:, None] + tl.dot(A.to(DT), vb.to(DT), input_precision=PREC)
    o_base = o + (i_b.to(tl.int64) * L * H + i_h) * V
    tl.store(o_base + ot[:, None] * (H * V) + ov[None, :], (acc * scale).to(o.dtype.element_ty),
             mask=mt[:, None] & mv[None, :])  # fmt: skip
    if HAS_Z:
        rs = (rs * wq + tl.sum(A, axis=1)) * scale
        tl.store(r + (i_b.to(tl.int64) * L + ot) * H + i_h, rs, mask=mt & (i_v == 0))


@triton.jit
def _bwd_states(
    q, do, dr, gc, dht, dzt, dstates, dzstates, scale,
    s_qb, s_ql, s_qh, s_qk, s_ob, s_ol, s_oh, s_ov,
    L, NT, Lp,
    H: tl.constexpr, R: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DHT: tl.constexpr, HAS_Z: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    DT = q.dtype.element_ty
    if DOT_F32:  # the interpreter's tl.dot mishandles bf16 operands
        DT = tl.float32
    ok = i_k * BK + tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    mk, mv = ok < K, ov < V
    mkv = mk[:, None] & mv[None, :]
    kv_off = ok[:, None] * V + ov[None, :]
    bh64 = i_bh.to(tl.int64)
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        dS += tl.load(dht + bh64 * K * V + kv_off, mask=mkv, other=0.0)
    if HAS_Z:
        dz = tl.zeros([BK], dtype=tl.float32)
        if HAS_DHT:
            dz += tl.load(dzt + bh64 * K + ok, mask=mk, other=0.0)
    q_base = q + i_b.to(tl.int64) * s_qb + (i_h // R).to(tl.int64) * s_qh
    o_base = do + i_b.to(tl.int64) * s_ob + i_h.to(tl.int64) * s_oh
    g_base = gc + bh64 * Lp
    for i in range(NT):
        t = NT - 1 - i
        st = bh64 * NT + t
        # the gradient of the state leaving chunk t
        tl.store(dstates + st * K * V + kv_off, dS, mask=mkv)
        if HAS_Z:
            tl.store(dzstates + st * K + ok, dz, mask=mk & (i_v == 0))
        ot = t * BT + tl.arange(0, BT)
        mt = ot < L
        qb = tl.load(q_base + ot[:, None] * s_ql + ok[None, :] * s_qk, mask=mt[:, None] & mk[None, :], other=0.0)
        dob = tl.load(o_base + ot[:, None] * s_ol + ov[None, :] * s_ov, mask=mt[:, None] & mv[None, :], other=0.0)
        gcb = tl.load(g_base + ot)
        glast = tl.load(g_base + t * BT + BT - 1)
        qw = qb.to(tl.float32) * (tl.exp(gcb) * scale)[:, None]
        dS = dS * tl.exp(glast) + tl.dot(tl.trans(qw.to(DT)), dob.to(DT), input_precision=PREC)
        if HAS_Z:
            drb = tl.load(dr + (i_b.to(tl.int64) * L + ot) * H + i_h, mask=mt, other=0.0)
            dz = dz * tl.exp(glast) + tl.sum(qw * drb[:, None], axis=0)


@triton.jit
def _bwd_chunk(
    q, k, v, do, dr, gc, states, zstates, dstates, dzstates, dq, dk, dv, dG, scale,
    s_qb, s_ql, s_qh, s_qk, s_kb, s_kl, s_kh, s_kk, s_vb, s_vl, s_vh, s_vv, s_ob, s_ol, s_oh, s_ov,
    L, NT, Lp,
    H: tl.constexpr, R: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr, NV: tl.constexpr,
    HAS_Z: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    DT = q.dtype.element_ty
    if DOT_F32:  # the interpreter's tl.dot mishandles bf16 operands
        DT = tl.float32
    bh64 = i_bh.to(tl.int64)
    ot = i_t * BT + tl.arange(0, BT)
    mt = ot < L
    q_base = q + i_b.to(tl.int64) * s_qb + (i_h // R).to(tl.int64) * s_qh
    k_base = k + i_b.to(tl.int64) * s_kb + (i_h // R).to(tl.int64) * s_kh
    v_base = v + i_b.to(tl.int64) * s_vb + i_h.to(tl.int64) * s_vh
    o_base = do + i_b.to(tl.int64) * s_ob + i_h.to(tl.int64) * s_oh
    st = bh64 * NT + i_t
    gcb = tl.load(gc + bh64 * Lp + ot)
    glast = tl.load(gc + bh64 * Lp + i_t * BT + BT - 1)
    # per-head gradients are written contiguous (b, L, h, .); grouped q/k are summed outside
    row = (i_b.to(tl.int64) * L + ot) * H + i_h

    A = tl.zeros([BT, BT], dtype=tl.float32)
    dA = tl.zeros([BT, BT], dtype=tl.float32)
    for kk in tl.static_range(NK):
        ok = kk * BK + tl.arange(0, BK)
        m = mt[:, None] & (ok < K)[None, :]
        qb = tl.load(q_base + ot[:, None] * s_ql + ok[None, :] * s_qk, mask=m, other=0.0)
        kb = tl.load(k_base + ot[:, None] * s_kl + ok[None, :] * s_kk, mask=m, other=0.0)
        A += tl.dot(qb.to(DT), tl.trans(kb.to(DT)), input_precision=PREC)
    for vv in tl.static_range(NV):
        ov = vv * BV + tl.arange(0, BV)
        m = mt[:, None] & (ov < V)[None, :]
        vb = tl.load(v_base + ot[:, None] * s_vl + ov[None, :] * s_vv, mask=m, other=0.0)
        dob = tl.load(o_base + ot[:, None] * s_ol + ov[None, :] * s_ov, mask=m, other=0.0)
        dA += tl.dot(dob.to(DT), tl.trans(vb.to(DT)), input_precision=PREC)
    if HAS_Z:  # r_i = sum_j A_ij: its gradient joins every score of row i
        drb = tl.load(dr + row, mask=mt, other=0.0)
        dA += drb[:, None]
    M = tl.where(ot[:, None] >= ot[None, :], tl.exp(gcb[:, None] - gcb[None, :]), 0.0) * scale
    A = A * M
    dA = dA * M
    wq = tl.exp(gcb)  # entering state -> position i
    wk = tl.exp(glast - gcb)  # key j -> chunk end

    for vv in tl.static_range(NV):
        ov = vv * BV + tl.arange(0, BV)
        mv = ov < V
        m = mt[:, None] & mv[None, :]
        dob = tl.load(o_base + ot[:, None] * s_ol + ov[None, :] * s_ov, mask=m, other=0.0)
        acc = tl.zeros([BT, BV], dtype=tl.float32)
        for kk in tl.static_range(NK):
            ok = kk * BK + tl.arange(0, BK)
            mk = ok < K
            kb = tl.load(k_base + ot[:, None] * s_kl + ok[None, :] * s_kk, mask=mt[:, None] & mk[None, :], other=0.0)
            dSb = tl.load(dstates + st * K * V + ok[:, None] * V + ov[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
            acc += tl.dot(kb.to(DT), dSb.to(DT), input_precision=PREC)
        dvb = acc * wk[:, None] + tl.dot(tl.trans(A).to(DT), dob.to(DT), input_precision=PREC)
        tl.store(dv + row[:, None] * V + ov[None, :], dvb.to(dv.dtype.element_ty), mask=m)

    dg_acc = tl.zeros([BT], dtype=tl.float32)
    for kk in tl.static_range(NK):
        ok = kk * BK + tl.arange(0, BK)
        mk = ok < K
        m = mt[:, None] & mk[None, :]
        qb = tl.load(q_base + ot[:, None] * s_ql + ok[None, :] * s_qk, mask=m, other=0.0)
        kb = tl.load(k_base + ot[:, None] * s_kl + ok[None, :] * s_kk, mask=m, other=0.0)
        accq = tl.zeros([BT, BK], dtype=tl.float32)
        acck = tl.zeros([BT, BK], dtype=tl.float32)
        for vv in tl.static_range(NV):
            ov = vv * BV + tl.arange(0, BV)
            mv = ov < V
            mtv = mt[:, None] & mv[None, :]
            mkv = mk[:, None] & mv[None, :]
            dob = tl.load(o_base + ot[:, None] * s_ol + ov[None, :] * s_ov, mask=mtv, other=0.0)
            vb = tl.load(v_base + ot[:, None] * s_vl + ov[None, :] * s_vv, mask=mtv, other=0.0)
            Sb = tl.load(states + st * K * V + ok[:, None] * V + ov[None, :], mask=mkv, other=0.0)
            dSb = tl.load(dstates + st * K * V + ok[:, None] * V + ov[None, :], mask=mkv, other=0.0)
            accq += tl.dot(dob.to(DT), tl.trans(Sb.to(DT)), input_precision=PREC)
            acck += tl.dot(vb.to(DT), tl.trans(dSb.to(DT)), input_precision=PREC)
        dqb = tl.dot(dA.to(DT), kb.to(DT), input_precision=PREC) + accq * (wq * scale)[:, None]
        dkb = tl.dot(tl.trans(dA).to(DT), qb.to(DT), input_precision=PREC) + acck * wk[:, None]
        if HAS_Z:
            zb = tl.load(zstates + st * K + ok, mask=mk, other=0.0)
            dzb = tl.load(dzstates + st * K + ok, mask=mk, other=0.0)
            dqb += (wq * scale * drb)[:, None] * zb[None, :]
            dkb += wk[:, None] * dzb[None, :]
        dg_acc += tl.sum(qb.to(tl.float32) * dqb - kb.to(tl.float32) * dkb, axis=1)
        tl.store(dq + row[:, None] * K + ok[None, :], dqb.to(dq.dtype.element_ty), mask=m)
        tl.store(dk + row[:, None] * K + ok[None, :], dkb.to(dk.dtype.element_ty), mask=m)
    tl.store(dG + bh64 * Lp + ot, dg_acc, mask=mt)


# --------------------------------------------------------------------------------------
# autograd wrapper
# --------------------------------------------------------------------------------------
def _pow2_block(n: int, cap: int) -> int:
    """A power-of-two block >= 16 (tl.dot's minimum) covering ``n`` up to ``cap``."""
    return max(16, min(cap, triton.next_power_of_2(n)))


def _launch_cfg(K: int, V: int, dtype: torch.dtype, chunk_size: int | None) -> dict:
    c = config()
    BT = c["chunk"] if chunk_size is None else chunk_size
    if BT < 16 or BT & (BT - 1):
        raise ValueError(f"chunk_scan: chunk_size must be a power of two >= 16, got {BT}")
    BK, BV = _pow2_block(K, c["bk"]), _pow2_block(V, c["bv"])
    prec = "tf32" if (dtype != torch.float32 or c["tf32"]) else "ieee"
    dot_f32 = os.environ.get("TRITON_INTERPRET") == "1"  # numpy has no bf16: dot in fp32 there
    return dict(BT=BT, BK=BK, BV=BV, NK=triton.cdiv(K, BK), NV=triton.cdiv(V, BV), PREC=prec, DOT_F32=dot_f32,
                warps=c["warps"], stages=c["stages"])  # fmt: skip


def _chunk_cumsum(g: torch.Tensor, BT: int) -> torch.Tensor:
    """Within-chunk running sums of g (b, L, h) as fp32 (b*h, NT*BT), zero decays past L."""
    b, L, h = g.shape
    NT = triton.cdiv(L, BT)
    gp = torch.zeros(b, h, NT * BT, device=g.device, dtype=torch.float32)
    gp[:, :, :L] = g.transpose(1, 2)
    return gp.view(b * h, NT, BT).cumsum(-1).view(b * h, NT * BT)


class _ChunkScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, scale, h0, z0, with_z, chunk_size):
        b, L, h, K = q.shape[0], q.shape[1], v.shape[2], q.shape[3]
        V = v.shape[3]
        R = h // q.shape[2]
        cfg = _launch_cfg(K, V, q.dtype, chunk_size)
        BT, BK, BV, NK, NV = cfg["BT"], cfg["BK"], cfg["BV"], cfg["NK"], cfg["NV"]
        NT = triton.cdiv(L, BT)
        dev = q.device
        gc = _chunk_cumsum(g, BT)
        f32 = dict(device=dev, dtype=torch.float32)
        states = torch.empty(b * h, NT, K, V, **f32)
        ht = torch.empty(b, h, K, V, **f32)
        zstates = torch.empty(b * h, NT, K, **f32) if with_z else states
        zt = torch.empty(b, h, K, **f32) if with_z else ht
        h0c = h0.to(torch.float32).contiguous() if h0 is not None else ht
        z0c = z0.to(torch.float32).contiguous() if (with_z and z0 is not None) else h0c
        sq, sk, sv = q.stride(), k.stride(), v.stride()
        _fwd_states[(NK, NV, b * h)](
            k, v, gc, h0c, z0c, states, zstates, ht, zt, *sk, *sv, L, NT, NT * BT,
            H=h, R=R, K=K, V=V, BT=BT, BK=BK, BV=BV, HAS_H0=h0 is not None, HAS_Z=with_z,
            PREC=cfg["PREC"], DOT_F32=cfg["DOT_F32"], num_warps=cfg["warps"], num_stages=cfg["stages"],
        )  # fmt: skip
        o = torch.empty(b, L, h, V, device=dev, dtype=v.dtype)
        r = torch.empty(b, L, h, **f32) if with_z else o
        _fwd_out[(NT, NV, b * h)](
            q, k, v, gc, states, zstates, o, r, scale, *sq, *sk, *sv, L, NT, NT * BT,
            H=h, R=R, K=K, V=V, BT=BT, BK=BK, BV=BV, NK=NK, HAS_Z=with_z, PREC=cfg["PREC"], DOT_F32=cfg["DOT_F32"],
            num_warps=cfg["warps"],
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, gc, states, zstates, ht, zt)
        ctx.meta = (scale, with_z, cfg, R, g.dtype)
        if not with_z:
            r = zt = None
        return o, r, ht, zt

    @staticmethod
    def backward(ctx, do, dr, dht, dzt):
        q, k, v, gc, states, zstates, ht, zt = ctx.saved_tensors
        scale, with_z, cfg, R, g_dtype = ctx.meta
        b, L, h, K = q.shape[0], q.shape[1], v.shape[2], q.shape[3]
        V = v.shape[3]
        BT, BK, BV, NK, NV = cfg["BT"], cfg["BK"], cfg["BV"], cfg["NK"], cfg["NV"]
        NT = triton.cdiv(L, BT)
        dev = q.device
        f32 = dict(device=dev, dtype=torch.float32)
        if do is None:
            do = torch.zeros(b, L, h, V, device=dev, dtype=v.dtype)
        has_dht = dht is not None or (with_z and dzt is not None)
        if has_dht:
            dht = torch.zeros_like(ht) if dht is None else dht.float().contiguous()
            if with_z:
                dzt = torch.zeros_like(zt) if dzt is None else dzt.float().contiguous()
        if with_z:
            dr = torch.zeros(b, L, h, **f32) if dr is None else dr.float().contiguous()
        dstates = torch.empty_like(states)
        dzstates = torch.empty(b * h, NT, K, **f32) if with_z else dstates
        so = do.stride()
        sq, sk, sv = q.stride(), k.stride(), v.stride()
        _bwd_states[(NK, NV, b * h)](
            q, do, dr if with_z else do, gc, dht if has_dht else ht, dzt if (has_dht and with_z) else ht,
            dstates, dzstates, scale, *sq, *so, L, NT, NT * BT,
            H=h, R=R, K=K, V=V, BT=BT, BK=BK, BV=BV, HAS_DHT=has_dht, HAS_Z=with_z, PREC=cfg["PREC"], DOT_F32=cfg["DOT_F32"],
            num_warps=cfg["warps"], num_stages=cfg["stages"],
        )  # fmt: skip
        dq = torch.empty(b, L, h, K, device=dev, dtype=q.dtype)
        dk = torch.empty(b, L, h, K, device=dev, dtype=k.dtype)
        dv = torch.empty(b, L, h, V, device=dev, dtype=v.dtype)
        dG = torch.zeros(b * h, NT * BT, **f32)
        _bwd_chunk[(NT, b * h)](
            q, k, v, do, dr if with_z else do, gc, states, zstates, dstates, dzstates, dq, dk, dv, dG, scale,
            *sq, *sk, *sv, *so, L, NT, NT * BT,
            H=h, R=R, K=K, V=V, BT=BT, BK=BK, BV=BV, NK=NK, NV=NV, HAS_Z=with_z, PREC=cfg["PREC"], DOT_F32=cfg["DOT_F32"],
            num_warps=cfg["warps"],
        )  # fmt: skip
        dg = None
        if ctx.needs_input_grad[3]:
            dg = _decay_grad(dG.view(b, h, NT * BT)[:, :, :L], dht, ht, dzt, zt, has_dht, with_z).to(g_dtype)
        if R > 1:  # q/k shared by groups of R heads: sum the per-head gradients
            dq = dq.view(b, L, h // R, R, K).sum(3)
            dk = dk.view(b, L, h // R, R, K).sum(3)
        return dq, dk, dv, dg, None, None, None, None, None


def _decay_grad(dG, dht, ht, dzt, zt, has_dht, with_z):
    """dg (b, L, h) from dG = q.dq - k.dk (b, h, L): add the final state's share at the last
    step, then sum from the end (g_t enters every G_s with s >= t)."""
    if has_dht:  # the final state carries exp(G_L) as a whole
        last = (dht * ht).sum((-1, -2))
        if with_z:
            last = last + (dzt * zt).sum(-1)
        dG[:, :, -1] += last
    return dG.flip(-1).cumsum(-1).flip(-1).transpose(1, 2)


def chunk_scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    chunk_size: int | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
):
    """``o_t = scale * q_t S_t`` with ``S_t = exp(g_t) S_{t-1} + k_t^T v_t``.

    Args:
        q, k: (b, L, h, K), or (b, L, h / R, K) shared by groups of R consecutive heads; any
            strides (a stride-0 head expansion is read in place, not copied).
        v: (b, L, h, V), same dtype as q and k (bf16 or fp32).
        g: (b, L, h) log decays (<= 0), fp32.
        chunk_size: a power of two >= 16; None: ``XATL_SCAN_CHUNK`` (64).
        initial_state: optional (b, h, K, V); it gets no gradient.

    Returns ``(o (b, L, h, V) in v's dtype, final state (b, h, K, V) fp32 or None)``.
    """
    o, _, ht, _ = _apply(q, k, v, g, scale, chunk_size, initial_state, None, with_z=False)
    return o, (ht if output_final_state else None)


def chunk_scan_rowsum(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    chunk_size: int | None = None,
    initial_state: torch.Tensor | None = None,
    initial_z: torch.Tensor | None = None,
):
    """:func:`chunk_scan` plus RetNet's score row sum ``r_t = scale * q_t . z_t`` with
    ``z_t = exp(g_t) z_{t-1} + k_t`` (the state S with an all-ones value column, kept as a
    separate vector so V stays a tile size). Returns ``(o, r (b, L, h) fp32, S_L, z_L)``,
    the final states fp32 (b, h, K, V) and (b, h, K)."""
    if (initial_state is None) != (initial_z is None):
        raise ValueError("chunk_scan_rowsum: give both initial_state and initial_z, or neither")
    return _apply(q, k, v, g, scale, chunk_size, initial_state, initial_z, with_z=True)


def _apply(q, k, v, g, scale, chunk_size, h0, z0, with_z):
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or q.shape[:2] != v.shape[:2]:
        raise ValueError(f"chunk_scan: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    h = v.shape[2]
    if h % q.shape[2]:
        raise ValueError(f"chunk_scan: q/k heads {q.shape[2]} must divide v heads {h}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"chunk_scan: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if g.shape != (v.shape[0], v.shape[1], h):
        raise ValueError(f"chunk_scan: g must be (b, L, h) = {tuple(v.shape[:3])}, got {tuple(g.shape)}")
    if v.shape[1] == 0:
        raise ValueError("chunk_scan: empty sequence")
    return _ChunkScanFn.apply(q, k, v, g, float(scale), h0, z0, with_z, chunk_size)


def chunk_scan_ref(q, k, v, g, scale, initial_state=None, initial_z=None):
    """Step-by-step fp32 oracle: ``(o, r, S_L, z_L)`` (q/k heads already expanded)."""
    b, L, h, K = q.shape
    V = v.shape[-1]
    qf, kf, vf, gf = q.float(), k.float(), v.float(), g.float()
    S = torch.zeros(b, h, K, V, device=q.device) if initial_state is None else initial_state.float()
    z = torch.zeros(b, h, K, device=q.device) if initial_z is None else initial_z.float()
    os_, rs = [], []
    for t in range(L):
        a = torch.exp(gf[:, t])[..., None]
        S = S * a[..., None] + kf[:, t, :, :, None] * vf[:, t, :, None, :]
        z = z * a + kf[:, t]
        os_.append(scale * torch.einsum("bhk,bhkv->bhv", qf[:, t], S))
        rs.append(scale * (qf[:, t] * z).sum(-1))
    return torch.stack(os_, 1), torch.stack(rs, 1), S, z
