"""The Triton chunked scalar-decay scan (xatl_ds.models.gpu.chunk_scan) against a step-by-step
torch loop, and the Mamba-2 / RetNet models on its path against their torch paths. On CPU the
kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1); on a GPU machine
the same tests run on CUDA tensors."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from xatl_ds.models import XatlCache, XatlConfig, XatlForCausalLM  # noqa: E402
from xatl_ds.models.gpu.chunk_scan import chunk_scan, chunk_scan_ref, chunk_scan_rowsum  # noqa: E402
from xatl_ds.models.kernels import paths_used  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def scan_case(b, L, h, hq, K, V, *, seed, dtype=torch.float32, expand=False):
    """Leaves q, k (b, L, hq, K), v, g; and the q/k the kernel sees (a stride-0 expansion of
    head 0 when ``expand``) next to the per-head ones the oracle sees."""
    gen = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=gen) * scale).to(DEV, dtype).requires_grad_()

    q, k, v = r(b, L, hq, K, scale=0.5), r(b, L, hq, K, scale=0.5), r(b, L, h, V)
    # decays from strong to near 1, so several chunks' states matter
    g = (-torch.rand(b, L, h, generator=gen) * torch.linspace(0.02, 1.5, h)).to(DEV).requires_grad_()
    if expand:
        qk = q[:, :, :1].expand(b, L, h, K), k[:, :, :1].expand(b, L, h, K)
        ref = qk
    else:
        qk = q, k
        ref = q.repeat_interleave(h // hq, dim=2), k.repeat_interleave(h // hq, dim=2)
    return (q, k, v, g), qk, ref


@pytest.mark.parametrize(
    "L,h,hq,K,V,rowsum,state,expand,blocks",
    [
        (37, 3, 3, 16, 32, False, True, False, None),  # 3 chunks of 16, the last partial
        (37, 3, 3, 16, 32, True, True, False, None),  # RetNet's row sum and z state
        (5, 2, 2, 24, 16, False, False, False, None),  # one partial chunk, no states
        (40, 4, 2, 16, 16, False, True, False, None),  # q/k shared by pairs of heads (groups)
        (29, 4, 4, 40, 24, True, True, True, 16),  # stride-0 heads; K, V over several blocks
    ],
)
def test_kernel_matches_sequential_fp32(monkeypatch, L, h, hq, K, V, rowsum, state, expand, blocks):
    if blocks:
        monkeypatch.setenv("XATL_SCAN_BK", str(blocks))
        monkeypatch.setenv("XATL_SCAN_BV", str(blocks))
    b, scale = 2, 0.7
    (q, k, v, g), (qk, kk), (qr, kr) = scan_case(b, L, h, hq, K, V, seed=L + K, expand=expand)
    gen = torch.Generator().manual_seed(7)
    S0 = (torch.randn(b, h, K, V, generator=gen) * 0.5).to(DEV) if state else None
    z0 = (torch.randn(b, h, K, generator=gen) * 0.5).to(DEV) if (state and rowsum) else None
    if rowsum:
        o, r, S, z = chunk_scan_rowsum(qk, kk, v, g, scale, 16, S0, z0)
    else:
        o, S = chunk_scan(qk, kk, v, g, scale, 16, S0, output_final_state=state)
        r = z = None
        assert (S is None) == (not state)
    o_r, r_r, S_r, z_r = chunk_scan_ref(qr, kr, v, g, scale, S0, z0)
    assert o.shape == (b, L, h, V) and o.dtype == torch.float32
    assert rel_err(o, o_r) < 1e-5
    outs, refs = [o], [o_r]
    if S is not None:
        assert S.shape == (b, h, K, V) and rel_err(S, S_r) < 1e-5
        outs.append(S), refs.append(S_r)
    if rowsum:
        assert rel_err(r, r_r) < 1e-5 and rel_err(z, z_r) < 1e-5
        outs += [r, z]
        refs += [r_r, z_r]
    ws = [torch.randn(t.shape, generator=gen).to(DEV) for t in refs]
    leaves = (q, k, v, g)
    got = torch.autograd.grad(sum((t * w).sum() for t, w in zip(outs, ws)), leaves)
    want = torch.autograd.grad(sum((t * w).sum() for t, w in zip(refs, ws)), leaves)
    for name, a, e in zip("qkvg", got, want):
        assert a.shape == e.shape and rel_err(a, e) < 2e-5, name


def test_kernel_bf16():
    """bf16 inputs: fp32 accumulation, output in bf16, gradients close to the fp32 oracle's."""
    b, L, h, K, V = 2, 45, 2, 32, 32
    (q, k, v, g), (qk, kk), _ = scan_case(b, L, h, h, K, V, seed=3, dtype=torch.bfloat16)
    o, S = chunk_scan(qk, kk, v, g, 0.25, 16, output_final_state=True)
    o_r, _, S_r, _ = chunk_scan_ref(q, k, v, g, 0.25)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    assert rel_err(o, o_r) < 2e-2 and rel_err(S, S_r) < 2e-2
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(DEV)
    got = torch.autograd.grad((o.float() * w).sum(), (q, k, v, g))
    want = torch.autograd.grad((o_r * w).sum(), (q, k, v, g))
    for name, a, e in zip("qkvg", got, want):
        assert rel_err(a, e) < 3e-2, name


# ------------------------------------------------------------------------------ models
def mamba2_config(kernels: str) -> XatlConfig:
    return XatlConfig(
        family="neox", vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        mixer="mamba2", d_state=8, d_conv=4, expand=2, mamba2_headdim=16, mamba2_ngroups=2,
        chunk_size=8, kernels=kernels, initializer_range=0.2,
    )  # fmt: skip


def retnet_config(kernels: str) -> XatlConfig:
    return XatlConfig(
        mixer="retnet", vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        chunk_size=8, max_position_embeddings=128, kernels=kernels,
    )  # fmt: skip


@pytest.mark.parametrize("make_config", [mamba2_config, retnet_config], ids=["mamba2", "retnet"])
def test_model_triton_matches_torch(monkeypatch, make_config):
    """Same weights, kernels='triton' vs 'torch': logits and every parameter gradient; then
    cached generation (a prefill in two pieces, single-token steps) against the full forward.
    Kernel chunks of 16: 41 tokens are three chunks, the last partial."""
    monkeypatch.setenv("XATL_SCAN_CHUNK", "16")
    torch.manual_seed(0)
    ref = XatlForCausalLM(make_config("torch")).to(DEV)
    tri = XatlForCausalLM(make_config("triton")).to(DEV)
    tri.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 97, (2, 41), generator=torch.Generator().manual_seed(1)).to(DEV)
    out_r, out_t = ref(ids, labels=ids, return_logits=True), tri(ids, labels=ids, return_logits=True)
    assert set(paths_used(tri).values()) == {"triton"} and set(paths_used(ref).values()) == {"torch"}
    assert rel_err(out_t.logits, out_r.logits) < 1e-5
    out_r.loss.backward()
    out_t.loss.backward()
    for (name, p_r), p_t in zip(ref.named_parameters(), tri.parameters()):
        if p_r.grad is not None:
            assert rel_err(p_t.grad, p_r.grad) < 1e-4, name

    tri.eval()
    n = 23
    with torch.no_grad():
        full = ref.eval()(ids[:, :n]).logits
        cache = XatlCache(2)
        parts = [tri(ids[:, :5], cache=cache).logits, tri(ids[:, 5:19], cache=cache).logits]
        parts += [tri(ids[:, t : t + 1], cache=cache).logits for t in range(19, n)]
    assert cache.seen_tokens == n
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-4
