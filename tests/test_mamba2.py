"""Mamba-2 mixer: the chunked SSD and its pieces against sequential / autograd oracles,
init, save/load, cached generation, and (CUDA only) the mamba-ssm kernel path."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from xatl_ds.models import XatlConfig, XatlForCausalLM
from xatl_ds.models import mamba2 as M2
from xatl_ds.models.components import components_of
from xatl_ds.models.mamba2 import GatedRMSNorm, Mamba2Mixer, causal_conv1d_silu, ssd_chunked, ssd_ref


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error of ``a`` against the reference ``b``."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def tiny_config(**kw) -> XatlConfig:
    base = dict(
        family="neox", vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        mixer="mamba2", d_state=8, d_conv=4, expand=2, mamba2_headdim=16, chunk_size=8,
        kernels="torch", initializer_range=0.2,
    )  # fmt: skip
    base.update(kw)
    return XatlConfig(**base)


def ssd_inputs(b, length, h, p, g, n, *, seed=0, dtype=torch.float32):
    """Leaf tensors in the raw parameterisation (dt pre-softplus, A as log) plus a
    function mapping them to ssd arguments, so gradients reach every input."""
    gen = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=gen, dtype=torch.float64) * scale + shift).to(dtype).requires_grad_()

    leaves = dict(
        x=r(b, length, h, p), dt=r(b, length, h, scale=1.0, shift=-1.0),
        A_log=(torch.rand(h, generator=gen, dtype=torch.float64) * math.log(16)).to(dtype).requires_grad_(),
        B=r(b, length, g, n), C=r(b, length, g, n), D=r(h), s0=r(b, h, p, n, scale=0.5),
    )  # fmt: skip

    def args(lv):
        return (lv["x"], F.softplus(lv["dt"]), -torch.exp(lv["A_log"]), lv["B"], lv["C"])

    return leaves, args


def run_ssd(fn, leaves, args, *, with_state: bool):
    y, final = fn(*args(leaves), D=leaves["D"], initial_state=leaves["s0"] if with_state else None)
    gen = torch.Generator().manual_seed(1)
    wy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
    wf = torch.randn(final.shape, generator=gen, dtype=torch.float64).to(final.dtype)
    loss = (y * wy).sum() + (final * wf).sum()
    names = [k for k in leaves if with_state or k != "s0"]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    return y, final, dict(zip(names, grads))


# ------------------------------------------------------------------------------- SSD
@pytest.mark.parametrize(
    "length,chunk,groups,with_state",
    [(1, 16, 1, False), (5, 16, 1, True), (16, 16, 1, False), (37, 16, 2, True), (64, 16, 1, True), (50, 64, 2, False)],
)
def test_chunked_matches_sequential_fp32(length, chunk, groups, with_state):
    """Forward, final state and the gradient of every input, fp32, lengths below, at and not
    at multiples of the chunk."""
    leaves, args = ssd_inputs(2, length, 4, 8, groups, 6, seed=length)
    y_ref, f_ref, g_ref = run_ssd(ssd_ref, leaves, args, with_state=with_state)
    y, f, g = run_ssd(lambda *a, **k: ssd_chunked(*a, chunk, **k), leaves, args, with_state=with_state)
    assert y.dtype == torch.float32 and y.shape == y_ref.shape and f.shape == (2, 4, 8, 6)
    assert rel_err(y, y_ref) < 1e-4
    assert rel_err(f, f_ref) < 1e-4
    for k in g_ref:
        assert rel_err(g[k], g_ref[k]) < 1e-4, k


def test_chunked_exact_in_fp64_and_strong_decay():
    """fp64 agreement to ~1e-12, also with decays far past exp's underflow (cum < -1000)."""
    leaves, args = ssd_inputs(1, 40, 2, 4, 1, 3, seed=3, dtype=torch.float64)
    with torch.no_grad():
        leaves["dt"].add_(4.0)  # dt ~ 4, A up to -16: log-decays of ~ -60 per step
    y_ref, f_ref, g_ref = run_ssd(ssd_ref, leaves, args, with_state=True)
    y, f, g = run_ssd(lambda *a, **k: ssd_chunked(*a, 16, **k), leaves, args, with_state=True)
    assert rel_err(y, y_ref) < 1e-12 and rel_err(f, f_ref) < 1e-12
    for k in g_ref:
        assert torch.isfinite(g[k]).all() and rel_err(g[k], g_ref[k]) < 1e-10, k


def test_chunked_is_causal():
    leaves, args = ssd_inputs(1, 30, 2, 4, 1, 3, seed=4)
    y1, _ = ssd_chunked(*args(leaves), 8)
    with torch.no_grad():
        leaves["x"][:, 20:] += 5.0
        leaves["B"][:, 20:] -= 3.0
    y2, _ = ssd_chunked(*args(leaves), 8)
    assert torch.equal(y1[:, :20], y2[:, :20])
    assert not torch.allclose(y1[:, 20:], y2[:, 20:])


# ------------------------------------------------------------------------- conv, norm
def test_causal_conv_matches_conv1d_and_continues_from_state():
    g = torch.Generator().manual_seed(0)
    b, length, c, k = 2, 9, 6, 4
    x = torch.randn(b, length, c, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c, k, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(c, generator=g, dtype=torch.float64, requires_grad=True)
    ref = F.silu(F.conv1d(x.transpose(1, 2), w[:, None], bias, padding=k - 1, groups=c)[..., :length]).transpose(1, 2)
    out = causal_conv1d_silu(x, w, bias)
    assert rel_err(out, ref) < 1e-12
    gr = torch.autograd.grad((ref * ref.detach().cos()).sum(), (x, w, bias))
    go = torch.autograd.grad((out * ref.detach().cos()).sum(), (x, w, bias))
    assert all(rel_err(a, r) < 1e-12 for a, r in zip(go, gr))
    # continuing from the last k inputs (the cache layout) equals one pass over the whole
    prev = F.pad(x[:, :5].transpose(1, 2), (k - 5, 0)) if 5 < k else x[:, 5 - k : 5].transpose(1, 2)
    assert rel_err(causal_conv1d_silu(x[:, 5:], w, bias, prev), out[:, 5:]) < 1e-12
    x3, prev1 = (t.detach().clone().requires_grad_() for t in (x[:1, :3], prev[:1]))  # no shared storage
    assert torch.autograd.gradcheck(lambda a, p: causal_conv1d_silu(a, w.detach(), None, p), (x3, prev1))


def test_gated_rmsnorm_matches_autograd_expression():
    g = torch.Generator().manual_seed(0)
    norm = GatedRMSNorm(12, group_size=4).double()
    with torch.no_grad():
        norm.weight.normal_(generator=g)
    y = torch.randn(2, 3, 12, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, 3, 12, generator=g, dtype=torch.float64, requires_grad=True)

    def ref(y, z, w):
        h = (y * F.silu(z)).unflatten(-1, (3, 4))
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).flatten(-2) * w

    assert rel_err(norm(y, z), ref(y, z, norm.weight)) < 1e-12
    assert torch.autograd.gradcheck(lambda a, b, w: M2._GatedRMSNormFn.apply(a, b, w, 4, 1e-5), (y, z, norm.weight))


# ------------------------------------------------------------------------------ mixer
def test_mixer_parameters_follow_mamba_ssm():
    cfg = tiny_config(mamba2_ngroups=2, mamba_proj_bias=True)
    mix = Mamba2Mixer(cfg, 0)
    d, di, n, g, h, k = 32, 64, 8, 2, 4, 4
    shapes = {name: tuple(p.shape) for name, p in mix.named_parameters()}
    assert shapes == {
        "in_proj.weight": (2 * di + 2 * g * n + h, d), "in_proj.bias": (2 * di + 2 * g * n + h,),
        "conv1d.weight": (di + 2 * g * n, 1, k), "conv1d.bias": (di + 2 * g * n,),
        "dt_bias": (h,), "A_log": (h,), "D": (h,), "norm.weight": (di,),
        "out_proj.weight": (d, di), "out_proj.bias": (d,),
    }  # fmt: skip
    assert Mamba2Mixer.out_proj_name == "out_proj"
    comps = components_of(XatlForCausalLM(tiny_config()))
    assert comps["model.layers.0.mixer.out_proj.weight"] == "attn_out"
    assert comps["model.layers.0.mixer.A_log"] == comps["model.layers.1.mixer.in_proj.weight"] == "new"


def test_bad_config_errors():
    with pytest.raises(ValueError, match="mamba2_headdim=24"):
        Mamba2Mixer(tiny_config(mamba2_headdim=24), 0)
    with pytest.raises(ValueError, match="mamba2_ngroups=3"):
        Mamba2Mixer(tiny_config(mamba2_ngroups=3), 0)


def test_mixer_matches_sequential_reference_forward_and_backward(monkeypatch):
    """The whole mixer (conv, SSD, gate, norm) with the chunked scan equals it with the
    sequential oracle swapped in: outputs and every parameter gradient, fp32."""
    torch.manual_seed(0)
    mix = Mamba2Mixer(tiny_config(mamba2_ngroups=2), 0)
    x = torch.randn(2, 21, 32, requires_grad=True)

    def grads():
        out = mix(x)
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
        names = [n for n, _ in mix.named_parameters()]
        return out, dict(zip(names + ["x"], torch.autograd.grad(loss, [p for _, p in mix.named_parameters()] + [x])))

    out, g = grads()
    monkeypatch.setattr(M2, "ssd_chunked", lambda x_, dt, A, B, C, chunk, **kw: ssd_ref(x_, dt, A, B, C, **kw))
    out_ref, g_ref = grads()
    assert rel_err(out, out_ref) < 1e-4
    for k in g_ref:
        assert g[k].abs().sum() > 0 and rel_err(g[k], g_ref[k]) < 1e-4, k


def test_model_fwd_bwd_trains():
    torch.manual_seed(0)
    model = XatlForCausalLM(tiny_config(num_hidden_layers=2))
    ids = torch.randint(0, 97, (2, 19))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


# ------------------------------------------------------------------------ init, save/load
def test_init_survives_model_construction():
    model = XatlForCausalLM(tiny_config(num_hidden_layers=3, hidden_size=256, mamba2_headdim=8, initializer_range=0.02))
    for layer in model.model.layers:
        mix = layer.mixer
        dt = F.softplus(mix.dt_bias.detach())
        A = torch.exp(mix.A_log.detach())
        assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001 and dt.std() > 0
        assert A.min() >= 1.0 and A.max() <= 16.0 and A.std() > 0
        assert torch.equal(mix.D.detach(), torch.ones_like(mix.D)) and torch.equal(mix.norm.weight.detach(), torch.ones(512))
        assert abs(mix.in_proj.weight.std().item() - 0.02) < 0.002  # the generic Linear init ran
        assert mix.conv1d.weight.abs().max() > 0.05  # torch's conv init, not normal(0.02)
        assert getattr(mix.A_log, "_no_weight_decay", False)


# ------------------------------------------------------------------------------ cache
def test_prefill_and_steps_equal_full_forward():
    torch.manual_seed(0)
    mix = Mamba2Mixer(tiny_config(mamba2_ngroups=2), 0).eval()
    x = torch.randn(2, 23, 32)
    with torch.no_grad():
        full = mix(x)
        for split in ([2], [9, 10], [17]):  # prefill shorter than d_conv, multi-token continuations
            state: dict = {}
            outs, t = [], 0
            for s in split:
                outs.append(mix(x[:, t:s], state=state))
                t = s
            assert state["ssm"].shape == (2, 4, 16, 8) and state["conv"].shape == (2, 64 + 32, 4)
            for t in range(t, 23):
                outs.append(mix(x[:, t : t + 1], state=state))
            assert (torch.cat(outs, 1) - full).abs().max() < 1e-5, split


# ------------------------------------------------------------------------------- CUDA
def _kernels_present() -> bool:
    from xatl_ds.models.kernels import available

    return available("mamba_ssm") and available("causal_conv1d")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernels_match_torch_path():
    if not _kernels_present():
        pytest.skip("mamba-ssm / causal-conv1d not installed")
    torch.manual_seed(0)
    cfg = tiny_config(hidden_size=64, mamba2_headdim=32, d_state=16, chunk_size=16, mamba2_ngroups=2)
    ref = Mamba2Mixer(cfg, 0).cuda()
    cfg_k = tiny_config(hidden_size=64, mamba2_headdim=32, d_state=16, chunk_size=16, mamba2_ngroups=2, kernels="cuda")
    ker = Mamba2Mixer(cfg_k, 0).cuda()
    ker.load_state_dict(ref.state_dict())
    x = torch.randn(2, 45, 64, device="cuda", requires_grad=True)
    outs, grads = [], []
    for mix in (ref, ker):
        out = mix(x)
        loss = (out * torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)).sum()
        grads.append(torch.autograd.grad(loss, [x] + list(mix.parameters())))
        outs.append(out)
    assert rel_err(outs[1], outs[0]) < 2e-3
    for a, b in zip(grads[1], grads[0]):
        assert rel_err(a, b) < 5e-3
    with torch.no_grad():  # kernel prefill, then torch steps
        state: dict = {}
        steps = [ker(x[:, :30], state=state)] + [ker(x[:, t : t + 1], state=state) for t in range(30, 45)]
        assert rel_err(torch.cat(steps, 1), outs[0]) < 2e-3
