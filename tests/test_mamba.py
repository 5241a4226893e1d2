"""Mamba-1 mixer: every fast path against the sequential oracle, init, save/load, cache.

The C++ kernel is JIT-built on first use (a few seconds, cached in TORCH_EXTENSIONS_DIR).
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from xatl_ds.models import XatlCache, XatlConfig, XatlForCausalLM
from xatl_ds.models import mamba as M
from xatl_ds.models.mamba import MambaMixer, causal_conv1d_silu, selective_scan, selective_scan_ref

IMPLS = ["cpp", "torch"]


@pytest.fixture(scope="module", autouse=True)
def _cpp_built():
    # A machine without a compiler runs the torch fallback; the "cpp" cases then skip.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        M.cpp_available()


def _need(impl: str) -> None:
    if impl == "cpp" and not M.cpp_available():
        pytest.skip("C++ kernel could not be built here")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error of ``a`` against the reference ``b`` (absolute if b ~ 0)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-6)).item()


def tiny_config(**kw) -> XatlConfig:
    base = dict(
        family="neox", vocab_size=97, hidden_size=24, num_hidden_layers=3, num_attention_heads=4,
        mixer="mamba", d_state=8, d_conv=4, expand=2, initializer_range=0.2,
    )  # fmt: skip
    base.update(kw)
    return XatlConfig(**base)


def scan_inputs(b, length, d, n, *, z=True, D=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).requires_grad_()

    A = (-(torch.rand(d, n, generator=g, dtype=torch.float64) * 2 + 0.1)).requires_grad_()
    return dict(
        u=r(b, length, d), delta=r(b, length, d, scale=0.5), A=A, B=r(b, length, n), C=r(b, length, n),
        D=r(d) if D else None, z=r(b, length, d) if z else None, delta_bias=r(d, scale=0.3) if bias else None,
    )  # fmt: skip


# -- the scan ------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "shape,opts",
    [
        ((2, 7, 13, 16), dict(z=True, D=True, bias=True, softplus=True)),  # odd length and width
        ((3, 33, 16, 5), dict(z=False, D=False, bias=False, softplus=True)),  # odd d_state, no extras
        ((1, 1, 8, 16), dict(z=True, D=False, bias=True, softplus=True)),  # a single step
        ((2, 50, 21, 16), dict(z=False, D=True, bias=False, softplus=False)),  # raw delta
        ((1, 19, 3, 1), dict(z=True, D=True, bias=False, softplus=True)),  # width < one vector
    ],
)
def test_scan_matches_reference(impl, shape, opts):
    _need(impl)
    opts = dict(opts)
    softplus = opts.pop("softplus")
    ref_in = scan_inputs(*shape, **opts)
    fast_in = {k: (v.detach().float().requires_grad_() if v is not None else None) for k, v in ref_in.items()}
    y_ref, h_ref = selective_scan_ref(**ref_in, delta_softplus=softplus, return_last_state=True)
    y, h = selective_scan(**fast_in, delta_softplus=softplus, return_last_state=True, impl=impl)
    assert y.dtype == torch.float32 and y.shape == y_ref.shape and h.shape == h_ref.shape
    assert rel_err(y, y_ref) < 1e-4
    assert rel_err(h, h_ref) < 1e-4
    grad = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (y_ref * grad).sum().backward()
    (y * grad.float()).sum().backward()
    for k, v in ref_in.items():
        if v is not None:
            assert fast_in[k].grad is not None, k
            assert rel_err(fast_in[k].grad, v.grad) < 1e-4, (k, rel_err(fast_in[k].grad, v.grad))


def test_scan_handles_strided_inputs():
    """The mixer passes column slices (last dim contiguous, rows strided) straight in."""
    _need("cpp")
    g = torch.Generator().manual_seed(3)
    b, length, d, n = 2, 11, 10, 4
    wide = torch.randn(b, length, 2 * d + 2 * n, generator=g)
    u, z, B, C = wide[..., :d], wide[..., d : 2 * d], wide[..., 2 * d : 2 * d + n], wide[..., 2 * d + n :]
    delta = torch.rand(b, length, d, generator=g)
    A = -torch.rand(d, n, generator=g) - 0.5
    y = selective_scan(u, delta, A, B, C, None, z, impl="cpp")
    y_ref = selective_scan_ref(*(t.contiguous() for t in (u, delta, A, B, C)), None, z.contiguous())
    assert rel_err(y, y_ref) < 1e-5


def test_scan_does_not_depend_on_thread_count():
    _need("cpp")
    raw = scan_inputs(3, 40, 37, 16)
    inp = {k: (v.detach().float().requires_grad_() if v is not None else None) for k, v in raw.items()}
    grads = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for v in inp.values():
                if v is not None:
                    v.grad = None
            y = selective_scan(**inp, delta_softplus=True, impl="cpp")
            y.square().sum().backward()
            grads.append([y.detach()] + [v.grad.clone() for v in inp.values() if v is not None])
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_scan_rejects_bad_shapes():
    inp = {k: (v.detach().float() if v is not None else None) for k, v in scan_inputs(2, 5, 8, 4).items()}
    inp["B"] = inp["B"][:, :, :3]
    with pytest.raises(ValueError, match="B must have shape"):
        selective_scan(**inp)
    with pytest.raises(ValueError, match="impl="):
        selective_scan(**dict(inp, B=inp["C"]), impl="fast")


# -- the conv ------------------------------------------------------------------------------
@pytest.mark.parametrize("length,d,k,bias", [(9, 13, 4, True), (2, 8, 4, False), (17, 5, 3, True)])
def test_conv_matches_torch_conv1d(length, d, k, bias):
    _need("cpp")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, length, 2 * d, generator=g)[..., :d].requires_grad_()  # strided rows
    w = torch.randn(d, k, generator=g).requires_grad_()
    b = torch.randn(d, generator=g).requires_grad_() if bias else None
    conv = torch.nn.Conv1d(d, d, k, groups=d, padding=k - 1, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(w.unsqueeze(1))
        if bias:
            conv.bias.copy_(b)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = F.silu(conv(x_ref.transpose(1, 2))[..., :length]).transpose(1, 2)
    y = causal_conv1d_silu(x, w, b, impl="cpp")
    assert rel_err(y, y_ref) < 1e-5
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)
    y_ref.backward(gy)
    assert rel_err(x.grad, x_ref.grad) < 1e-5
    assert rel_err(w.grad, conv.weight.grad.squeeze(1)) < 1e-5
    if bias:
        assert rel_err(b.grad, conv.bias.grad) < 1e-5


# -- the mixer -----------------------------------------------------------------------------
def _mixer(seed=0, **kw) -> MambaMixer:
    torch.manual_seed(seed)
    m = MambaMixer(tiny_config(**kw), 0)
    with torch.no_grad():  # make every parameter matter (and differ from the init)
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("impl", IMPLS)
def test_mixer_forward_backward_matches_reference(impl):
    _need(impl)
    ref, fast = _mixer(mamba_conv_bias=True, mamba_proj_bias=True), _mixer(mamba_conv_bias=True, mamba_proj_bias=True)
    ref.cpu_impl, fast.cpu_impl = "ref", impl
    x = torch.randn(2, 19, 24, generator=torch.Generator().manual_seed(5))
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y = ref(xr), fast(xf)
    assert rel_err(y, y_ref) < 1e-5
    y_ref.square().sum().backward()
    y.square().sum().backward()
    assert rel_err(xf.grad, xr.grad) < 1e-4
    for (name, p_ref), (_, p) in zip(ref.named_parameters(), fast.named_parameters()):
        assert rel_err(p.grad, p_ref.grad) < 1e-4, name


def test_mixer_rejects_bad_config():
    with pytest.raises(ValueError, match="d_state"):
        MambaMixer(tiny_config(d_state=0), 0)


def test_mixer_parameter_names_follow_mamba_ssm():
    m = MambaMixer(tiny_config(mamba_conv_bias=True, mamba_proj_bias=False), 0)
    d_inner, dt_rank, n = 48, math.ceil(24 / 16), 8
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "in_proj.weight": (2 * d_inner, 24),
        "conv1d.weight": (d_inner, 1, 4),
        "conv1d.bias": (d_inner,),
        "x_proj.weight": (dt_rank + 2 * n, d_inner),
        "dt_proj.weight": (d_inner, dt_rank),
        "dt_proj.bias": (d_inner,),
        "A_log": (d_inner, n),
        "D": (d_inner,),
        "out_proj.weight": (24, d_inner),
    }


# -- the model: init, save/load ------------------------------------------------------------
def test_model_init_is_mamba_ssm_init():
    torch.manual_seed(0)
    cfg = tiny_config(hidden_size=64, num_attention_heads=4, initializer_range=0.02, d_state=16)
    model = XatlForCausalLM(cfg)
    dt_rank, d_inner = cfg.dt_rank_value, cfg.d_inner
    for layer in model.model.layers:
        mx = layer.mixer
        assert torch.equal(mx.A_log, torch.log(torch.arange(1, 17, dtype=torch.float32)).repeat(d_inner, 1))
        assert torch.equal(mx.D, torch.ones(d_inner))
        dt = F.softplus(mx.dt_proj.bias)
        assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001  # not the generic zero bias
        w = mx.dt_proj.weight
        bound = dt_rank**-0.5
        assert w.abs().max() <= bound
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.2 * bound  # uniform, not N(0, 0.02)
        assert abs(mx.in_proj.weight.std().item() - 0.02) < 0.004  # generic Linear init
        assert mx.conv1d.weight.abs().max() > 0


# -- recurrent generation ------------------------------------------------------------------
@pytest.mark.parametrize("prefill", [1, 2, 6])
def test_prefill_then_steps_equals_full_forward(prefill):
    m = _mixer().eval()
    x = torch.randn(3, 11, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = m(x)
        state: dict = {}
        parts = [m(x[:, :prefill], state=state)]
        assert state["conv"].shape == (3, 48, 4) and state["ssm"].shape == (3, 48, 8)
        parts.append(m(x[:, prefill : prefill + 2], state=state))  # a multi-token chunk after prefill
        parts += [m(x[:, t : t + 1], state=state) for t in range(prefill + 2, 11)]
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-5


def test_model_cache_logits_equal_full_forward():
    torch.manual_seed(0)
    model = XatlForCausalLM(tiny_config(attention_layers=[1])).eval()
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        cache = XatlCache(model.config.num_hidden_layers)
        out = [model(input_ids=ids[:, :5], cache=cache).logits]
        out += [model(input_ids=ids[:, t : t + 1], cache=cache).logits for t in range(5, 12)]
    assert (torch.cat(out, 1) - full).abs().max() < 1e-4


# -- fallbacks -----------------------------------------------------------------------------
def test_build_failure_warns_and_falls_back(monkeypatch):
    import torch.utils.cpp_extension as ext

    def broken(*a, **k):
        raise OSError("no compiler")

    monkeypatch.setattr(ext, "load", broken)
    with pytest.warns(RuntimeWarning, match="falling back"):
        assert M._load_lib.__wrapped__() is None
    monkeypatch.setattr(M, "_load_lib", lambda: None)
    inp = {k: (v.detach().float() if v is not None else None) for k, v in scan_inputs(2, 6, 8, 4).items()}
    y = selective_scan(**inp, delta_softplus=True)  # auto -> torch path
    y_ref = selective_scan_ref(**inp, delta_softplus=True)
    assert rel_err(y, y_ref) < 1e-5
    with pytest.raises(RuntimeError, match="could not be built"):
        selective_scan(**inp, impl="cpp")


def test_bf16_input_keeps_dtype():
    m = _mixer().to(torch.bfloat16)
    y = m(torch.randn(2, 5, 24, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernels_match_torch_path():
    pytest.importorskip("mamba_ssm", reason="needs the 'cuda' extra (mamba-ssm)")
    torch.manual_seed(0)
    cfg_k, cfg_t = tiny_config(kernels="cuda", hidden_size=64), tiny_config(kernels="torch", hidden_size=64)
    mk, mt = MambaMixer(cfg_k, 0).cuda(), MambaMixer(cfg_t, 0).cuda()
    mt.load_state_dict(mk.state_dict())
    x = torch.randn(2, 37, 64, device="cuda")
    xk, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    sk, st = {}, {}
    yk, yt = mk(xk, state=sk), mt(xt, state=st)
    assert rel_err(yk, yt) < 1e-3
    assert rel_err(sk["ssm"], st["ssm"]) < 1e-3 and torch.equal(sk["conv"], st["conv"])
    yk.square().sum().backward()
    yt.square().sum().backward()
    assert rel_err(xk.grad, xt.grad) < 1e-3
    for (name, pk), (_, pt) in zip(mk.named_parameters(), mt.named_parameters()):
        assert rel_err(pk.grad, pt.grad) < 1e-3, name
    with torch.no_grad():  # a kernel prefill continues correctly with the torch step
        yk2 = mk(x[:, :1] * 0.5, state=sk)
        yt2 = mt(x[:, :1] * 0.5, state=st)
    assert rel_err(yk2, yt2) < 1e-3
