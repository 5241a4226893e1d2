"""The shared Triton ops of xatl_ds.models.gpu against their torch oracles: causal conv + SiLU,
gated RMSNorm, fused linear + cross-entropy (values and every gradient), and the fused loss
inside XatlForCausalLM. On CUDA tensors when there is a GPU, else on CPU under Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from xatl_ds import XatlConfig, XatlForCausalLM  # noqa: E402
from xatl_ds.models.mamba2 import GatedRMSNorm  # noqa: E402
from xatl_ds.models.mamba2 import causal_conv1d_silu as conv_ref  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: ops reordered, nothing rounded -> a few ulps; bf16: one rounding of the output
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


def _grads(out, inputs, g):
    return torch.autograd.grad(out, [t for t in inputs if t is not None], g)


def _close(a, b, dtype, what):
    torch.testing.assert_close(a.float(), b.float(), **TOL[dtype], msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------------------
# causal conv + SiLU
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [4, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("prev", [True, False])
def test_conv_matches_torch(k, bias, prev):
    from xatl_ds.models.gpu.conv import causal_conv1d_silu

    g = torch.Generator().manual_seed(k * 4 + 2 * bias + prev)
    B, L, C = 2, 37, 70  # L, C over one block and not multiples of it
    # x a non-contiguous channel slice of a wider projection, as Mamba-2's xBC is
    big = torch.randn(B, L, C + 30, generator=g).to(DEV).requires_grad_()
    w = torch.randn(C, k, generator=g).to(DEV).requires_grad_()
    b = torch.randn(C, generator=g).to(DEV).requires_grad_() if bias else None
    p = torch.randn(B, C, k + 1, generator=g).to(DEV) if prev else None  # longer than k - 1: last k - 1 used
    x = big[:, :, 10 : 10 + C]
    assert not x.is_contiguous()
    ref = conv_ref(x, w, b, p)
    dout = torch.randn(ref.shape, generator=g).to(DEV)
    gref = _grads(ref, [big, w, b], dout)
    out = causal_conv1d_silu(x, w, b, p)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    _close(out, ref, torch.float32, "out")
    for name, a, r in zip(["dx", "dw", "db"], _grads(out, [big, w, b], dout), gref):
        _close(a, r, torch.float32, name)


def test_conv_bf16_and_weight_only_grad():
    from xatl_ds.models.gpu.conv import causal_conv1d_silu

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 70, 40, generator=g).to(DEV, torch.bfloat16).requires_grad_()
    w = torch.randn(40, 4, generator=g).to(DEV, torch.bfloat16).requires_grad_()
    b = torch.randn(40, generator=g).to(DEV, torch.bfloat16).requires_grad_()
    ref = conv_ref(x, w, b)
    dout = torch.randn(ref.shape, generator=g).to(DEV, torch.bfloat16)
    out = causal_conv1d_silu(x, w, b)
    assert out.dtype == torch.bfloat16
    _close(out, ref, torch.bfloat16, "out")
    for name, a, r in zip(["dx", "dw", "db"], _grads(out, [x, w, b], dout), _grads(ref, [x, w, b], dout)):
        # dw / db sum 70 bf16 products: relative to their size
        torch.testing.assert_close(a.float(), r.float(), atol=0.05 * r.float().abs().max().item(), rtol=0.02,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # the input frozen (a cache prefix): only the weight gradient is asked for
    (dw,) = torch.autograd.grad(causal_conv1d_silu(x.detach(), w), [w], dout)
    (dw_ref,) = torch.autograd.grad(conv_ref(x.detach(), w), [w], dout)
    torch.testing.assert_close(dw.float(), dw_ref.float(), atol=0.05 * dw_ref.float().abs().max().item(), rtol=0.02)


# ---------------------------------------------------------------------------------------
# gated RMSNorm
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size,groups", [(24, 4), (64, 1)])
def test_gated_norm_matches_torch(dtype, group_size, groups):
    from xatl_ds.models.gpu.gated_norm import gated_rms_norm

    g = torch.Generator().manual_seed(group_size + groups)
    D = group_size * groups
    ref_mod = GatedRMSNorm(D, group_size).to(DEV)
    with torch.no_grad():
        ref_mod.weight.copy_(1 + 0.3 * torch.randn(D, generator=g))
    y = torch.randn(2, 9, D, generator=g).to(DEV, dtype).requires_grad_()
    z = torch.randn(2, 9, D, generator=g).to(DEV, dtype).requires_grad_()
    ref = ref_mod(y, z)
    dout = torch.randn(ref.shape, generator=g).to(DEV, dtype)
    gref = _grads(ref, [y, z, ref_mod.weight], dout)
    w = ref_mod.weight.detach().clone().requires_grad_()
    out = gated_rms_norm(y, z, w, group_size, 1e-5)
    assert out.dtype == dtype and out.shape == y.shape
    _close(out, ref, dtype, "out")
    for name, a, r in zip(["dy", "dz", "dweight"], _grads(out, [y, z, w], dout), gref):
        _close(a, r, dtype if name != "dweight" else torch.float32, name)


# ---------------------------------------------------------------------------------------
# fused linear + cross-entropy
# ---------------------------------------------------------------------------------------
def _ce_case(dtype, seed=0, N=40, d=24, V=301):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g).to(DEV, dtype).requires_grad_()
    w = (0.5 * torch.randn(V, d, generator=g)).to(DEV, dtype).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = -100
    return h, w, y.to(DEV)


@pytest.mark.parametrize("chunk", [None, 7])  # one chunk; six, the last a partial one
def test_fused_ce_matches_torch(chunk):
    from xatl_ds.models.gpu.cross_entropy import fused_linear_cross_entropy

    h, w, y = _ce_case(torch.float32)
    ref = F.cross_entropy(h @ w.t(), y, ignore_index=-100)
    # a grad_output other than 1 (a loss scale): the stored gradients must be scaled by it
    gref = _grads(ref * 3.0, [h, w], None)
    loss = fused_linear_cross_entropy(h, w, y, chunk_size=chunk)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-6)
    for name, a, r in zip(["dhidden", "dweight"], _grads(loss * 3.0, [h, w], None), gref):
        _close(a, r, torch.float32, name)


def test_fused_ce_frozen_weight_and_block_loop():
    """A frozen head (LIT): no weight gradient; a vocabulary several blocks long (and not a
    multiple of the block): the online softmax across blocks; hidden (B, L, d)."""
    from xatl_ds.models.gpu import cross_entropy as ce

    h, w, y = _ce_case(torch.float32, seed=3, N=24, V=5000)  # fp32 block: 4096 -> two blocks
    w = w.detach()
    h3, y3 = h.view(2, 12, -1), y.view(2, 12)
    ref = F.cross_entropy(h @ w.t(), y)
    (gref,) = _grads(ref, [h], None)
    loss = ce.fused_linear_cross_entropy(h3, w, y3, chunk_size=16)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-6)
    (gh,) = _grads(loss, [h], None)
    _close(gh.view_as(h), gref, torch.float32, "dhidden")
    # no gradient asked for at all: loss only
    with torch.no_grad():
        torch.testing.assert_close(ce.fused_linear_cross_entropy(h, w, y), ref, atol=1e-5, rtol=1e-6)


def test_fused_ce_bf16():
    from xatl_ds.models.gpu.cross_entropy import fused_linear_cross_entropy

    h, w, y = _ce_case(torch.bfloat16, seed=1)
    ref = F.cross_entropy((h @ w.t()).float(), y)  # the model's unfused path: bf16 logits upcast
    gref = _grads(ref, [h, w], None)
    loss = fused_linear_cross_entropy(h, w, y, chunk_size=16)  # several chunks: fp32 dW accumulator
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-5)  # same bf16 logits, fp32 softmax
    for name, a, r in zip(["dhidden", "dweight"], _grads(loss, [h, w], None), gref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), r.float(), atol=0.02 * r.float().abs().max().item(), rtol=0.02,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_default_chunk_size():
    from xatl_ds.models.gpu.cross_entropy import default_chunk_size

    gpu = torch.device("cuda")
    c = default_chunk_size(10**6, 50304, torch.bfloat16, gpu)
    assert c == 2048 and c * 50304 * 2 <= 256 * 2**20
    assert default_chunk_size(100, 50304, torch.bfloat16, gpu) == 100  # never more than the tokens
    assert default_chunk_size(10**6, 256000, torch.float32, torch.device("cpu")) == 16  # the floor


# ---------------------------------------------------------------------------------------
# the fused loss inside the model
# ---------------------------------------------------------------------------------------
def _tiny_lm(family: str, tie: bool) -> XatlForCausalLM:
    torch.manual_seed(0)
    cfg = XatlConfig(family=family, mixer="attention", vocab_size=97, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, kernels="triton", tie_word_embeddings=tie)  # fmt: skip
    return XatlForCausalLM(cfg).to(DEV).train()


@pytest.mark.parametrize("family,tie", [("llama", False), ("neox", True)])
def test_model_fused_loss_matches_unfused(family, tie):
    m = _tiny_lm(family, tie)
    x = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(5)).to(DEV)
    labels = x.clone()
    labels[0, 9:] = -100  # right padding masked out

    def run(**kw):
        m.zero_grad(set_to_none=True)
        out = m(input_ids=x, labels=labels, **kw)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in m.named_parameters()}

    ref, gref = run(return_logits=True)
    assert m.last_loss_path == "torch" and ref.logits.shape == (2, 13, 97)
    out, grads = run()  # the default in training: fused, no logits
    assert m.last_loss_path == "triton" and out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-6)
    assert grads.keys() == gref.keys()
    for n in gref:
        torch.testing.assert_close(grads[n], gref[n], atol=2e-6, rtol=1e-4, msg=lambda msg, n=n: f"{n}: {msg}")
    # eval (the trainer's validation) and forwards without labels keep the logits
    m.eval()
    with torch.no_grad():
        assert m(input_ids=x, labels=labels).logits is not None and m.last_loss_path == "torch"
        assert m(input_ids=x).logits is not None
        # asked not to return logits: the fused loss in eval too (loss only, no gradients made)
        out = m(input_ids=x, labels=labels, return_logits=False)
        assert out.logits is None and m.last_loss_path == "triton"
        torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-6)


def test_model_fused_loss_frozen_head():
    """LIT freezes the transferred head: the fused loss must still train the rest."""
    m = _tiny_lm("llama", False)
    m.lm_head.weight.requires_grad_(False)
    x = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(6)).to(DEV)
    grads = []
    for kw in ({"return_logits": True}, {}):
        m.zero_grad(set_to_none=True)
        m(input_ids=x, labels=x, **kw).loss.backward()
        assert m.lm_head.weight.grad is None
        grads.append(m.model.layers[0].mixer.q_proj.weight.grad.clone())
    assert m.last_loss_path == "triton"
    torch.testing.assert_close(grads[1], grads[0], atol=2e-6, rtol=1e-4)
