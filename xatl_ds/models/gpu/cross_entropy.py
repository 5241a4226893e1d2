"""Linear layer + cross-entropy without the (tokens x vocab) logits in memory at once.

``fused_linear_cross_entropy(hidden, weight, labels)`` == ``F.cross_entropy((hidden @
weight.T).float(), labels, ignore_index=...)`` (mean over non-ignored labels), computed
chunk by chunk of tokens: the chunk's logits come from a torch matmul in the input dtype
(bf16 in training), then a Triton kernel, one program per row, runs an online softmax over
the vocabulary in blocks (fp32 registers), writes the row's loss and overwrites the logits
in place with ``(softmax - onehot) / n_valid``; two more matmuls turn that into the chunk's
gradients w.r.t. hidden and weight. So the gradients are computed in the forward (the
logits buffer is reused and dropped) and the backward only scales them by grad_output.
Peak extra memory: one chunk's logits (in the input dtype) plus the gradients themselves.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _ce_rows_kernel(logits_ptr, labels_ptr, loss_ptr, n_valid_ptr, V, s_row, ignore_index,
                    WRITE_GRAD: tl.constexpr, BV: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * s_row
    label = tl.load(labels_ptr + row).to(tl.int32)
    valid = label != ignore_index
    offs = tl.arange(0, BV)
    # pass 1: running max and rescaled sum of exponentials, block by block
    m = tl.full((BV,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BV,), dtype=tl.float32)
    for start in range(0, V, BV):
        x = tl.load(base + start + offs, mask=start + offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        # lanes that have seen only -inf (padding) shift by 0, not -inf: s stays 0, no inf - inf
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.exp(x - m_safe)
        m = m_new
    row_max = tl.max(m, axis=0)
    total = tl.sum(s * tl.exp(m - row_max), axis=0)  # padding lanes: 0 * 0
    lse = row_max + tl.log(total)
    target = tl.load(base + tl.where(valid, label, 0)).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))
    if WRITE_GRAD:
        # pass 2: d mean-loss / d logits, in place (ignored rows: zeros)
        scale = tl.where(valid, 1.0 / tl.load(n_valid_ptr).to(tl.float32), 0.0)
        for start in range(0, V, BV):
            cols = start + offs
            x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = (tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)) * scale
            tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=cols < V)


def _row_block(V: int, elem: int) -> tuple[int, int]:
    """(BV, num_warps): 16 KB of logits per block (8192 bf16 / 4096 fp32), 8 warps: one
    pass reads a row of a 50k vocabulary in ~7 blocks, 32 values per thread."""
    BV = min(triton.next_power_of_2(V), 16384 // elem)
    return BV, 8 if BV >= 4096 else 4


def default_chunk_size(n_tokens: int, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """Tokens per chunk: a chunk's logits stay under 256 MB on a GPU (e.g. 2048 tokens of a
    50k vocabulary in bf16), 8 MB on a CPU; a power of two (matmul-friendly), at least 16."""
    budget = (256 if device.type == "cuda" else 8) * 2**20
    per_row = vocab * torch.finfo(dtype).bits // 8
    rows = max(16, budget // max(per_row, 1))
    return min(1 << (rows.bit_length() - 1), max(n_tokens, 1))


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index: int, chunk_size: int | None):
        d = hidden.shape[-1]
        h = hidden.reshape(-1, d)
        y = labels.reshape(-1)
        if h.shape[0] != y.shape[0]:
            raise ValueError(f"fused_linear_cross_entropy: {h.shape[0]} hidden rows but {y.shape[0]} labels")
        N, V = h.shape[0], weight.shape[0]
        w = weight if weight.dtype == h.dtype else weight.to(h.dtype)  # logits in hidden's dtype
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        write_grad = need_dh or need_dw
        chunk = chunk_size or default_chunk_size(N, V, h.dtype, h.device)
        n_valid = (y != ignore_index).sum()  # stays on the device: no host sync
        loss_rows = torch.empty(N, dtype=torch.float32, device=h.device)
        dh = torch.empty(N, d, dtype=h.dtype, device=h.device) if need_dh else None
        # several chunks add into dW: accumulate in fp32 unless the weight already is fp32
        dw = None
        if need_dw:
            dw = torch.zeros(V, d, dtype=torch.float32 if N > chunk else w.dtype, device=h.device)
        BV, warps = _row_block(V, h.element_size())
        for start in range(0, N, chunk):
            hc, yc = h[start : start + chunk], y[start : start + chunk]
            logits = hc @ w.t()  # (rows, V), the input dtype
            _ce_rows_kernel[(hc.shape[0],)](
                logits, yc, loss_rows[start:], n_valid, V, logits.stride(0), ignore_index,
                WRITE_GRAD=write_grad, BV=BV, num_warps=warps,
            )
            if need_dh:
                torch.mm(logits, w, out=dh[start : start + chunk])
            if need_dw:
                if dw.dtype == logits.dtype:
                    dw.addmm_(logits.t(), hc)
                else:
                    dw += (logits.t() @ hc).float()
            del logits
        loss = loss_rows.sum() / n_valid
        ctx.save_for_backward(dh.view_as(hidden) if need_dh else None,
                              dw.to(weight.dtype) if need_dw else None)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        dh, dw = ctx.saved_tensors
        # the gradients of the mean loss were made in the forward: scale by d(out)/d(loss)
        if dh is not None:
            dh = dh * grad_out.to(dh.dtype)
        if dw is not None:
            dw = dw * grad_out.to(dw.dtype)
        return dh, dw, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               ignore_index: int = -100, chunk_size: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``labels`` (ignored: ``ignore_index``),
    without materialising the logits of every token at once.

    Args:
        hidden: (..., d) in the compute dtype (bf16 / fp32); weight: (vocab, d), may be frozen
            (no dW is then computed); labels: (...) integer class ids matching hidden's rows.
        chunk_size: tokens per chunk (default: :func:`default_chunk_size`).
    Returns a 0-dim fp32 tensor (NaN when every label is ignored, as torch's mean).
    Labels outside ``[0, vocab)`` other than ``ignore_index`` are not checked (undefined).
    Not for fp16 under loss scaling: the gradients are made in the forward, before the scale,
    and ``softmax / n_valid`` underflows fp16 (bf16 and fp32 have the range).
    """
    return _FusedLinearCE.apply(hidden, weight, labels, int(ignore_index), chunk_size)
