"""The Triton Mamba-1 selective scan (xatl_ds.models.gpu.selective_scan) against the
sequential oracle ``selective_scan_ref``, and a Mamba model on its path against the torch
path. On CPU the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1),
whose scans step element by element in Python: shapes and tiles stay tiny. On a GPU machine
the same tests run on CUDA tensors."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from xatl_ds.models import XatlCache, XatlConfig, XatlForCausalLM  # noqa: E402
from xatl_ds.models.gpu import selective_scan as S  # noqa: E402
from xatl_ds.models.kernels import paths_used  # noqa: E402
from xatl_ds.models.mamba import selective_scan_ref  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.fixture
def tiles(monkeypatch):
    """Set (T, forward BLOCK_D, backward BLOCK_D) for one test."""

    def set_(t, bd_fwd, bd_bwd):
        monkeypatch.setattr(S, "CHUNK", t)
        monkeypatch.setattr(S, "FWD", (bd_fwd, 4))
        monkeypatch.setattr(S, "BWD", (bd_bwd, 4))

    return set_


def scan_inputs(b, length, d, n, *, z=True, D=True, bias=True, seed=0, dtype=torch.float32):
    """Leaf tensors on DEV. delta ~ N(0, 0.5) and A in [-2.1, -0.1]: after softplus, decays
    from strong to mild, so several chunks' carried states matter."""
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(DEV, dtype).requires_grad_()

    A = (-(torch.rand(d, n, generator=g) * 2 + 0.1)).to(DEV).requires_grad_()
    return dict(
        u=r(b, length, d), delta=r(b, length, d, scale=0.5), A=A, B=r(b, length, n), C=r(b, length, n),
        D=r(d) if D else None, z=r(b, length, d) if z else None, delta_bias=r(d, scale=0.3) if bias else None,
    )  # fmt: skip


def _leaves_like(inp: dict) -> dict:
    return {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in inp.items()}


def check_against_ref(inp: dict, softplus: bool, tol: float, kernel_inp: dict | None = None) -> None:
    """Output, final state and every input gradient of the kernel (fed ``kernel_inp``, views
    of the leaves allowed) against the oracle (fed fp64 copies of the leaves)."""
    ref = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in inp.items()}
    y_ref, h_ref = selective_scan_ref(**ref, delta_softplus=softplus, return_last_state=True)
    y, h = S.selective_scan_triton(**(kernel_inp or inp), delta_softplus=softplus, return_last_state=True)
    assert y.dtype == inp["u"].dtype and y.shape == y_ref.shape
    assert h.dtype == torch.float32 and h.shape == h_ref.shape
    assert rel_err(y, y_ref) < tol, rel_err(y, y_ref)
    assert rel_err(h, h_ref) < tol, rel_err(h, h_ref)
    w = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEV)
    (y_ref * w).sum().backward()
    (y.float() * w.float()).sum().backward()
    for k, v in ref.items():
        if v is not None:
            got = inp[k].grad
            assert got is not None and got.dtype == inp[k].dtype, k
            assert rel_err(got, v.grad) < tol, (k, rel_err(got, v.grad))


@pytest.mark.parametrize(
    "shape,tile,opts",
    [
        # 3 chunks of 8 (the last partial), d = 12 over blocks of 8 / 4, everything on
        ((2, 21, 12, 4), (8, 8, 4), dict(z=True, D=True, bias=True, softplus=True)),
        # 5 chunks of 4, odd d_state (padded to 4), raw delta, no extras
        ((1, 19, 6, 3), (4, 4, 8), dict(z=False, D=False, bias=False, softplus=False)),
        # bias without softplus, z without D, one partial chunk
        ((2, 6, 5, 2), (8, 4, 4), dict(z=True, D=False, bias=True, softplus=False)),
        # a single time step
        ((2, 1, 7, 4), (4, 4, 4), dict(z=True, D=True, bias=True, softplus=True)),
    ],
)
def test_kernel_matches_reference_fp32(tiles, shape, tile, opts):
    tiles(*tile)
    opts = dict(opts)
    softplus = opts.pop("softplus")
    check_against_ref(scan_inputs(*shape, **opts, seed=sum(shape)), softplus, tol=2e-5)


def test_kernel_takes_strided_inputs(tiles):
    """Column slices of wide tensors (as the mixer passes B and C), a transposed A, strided
    D / delta_bias, and a time-strided delta."""
    tiles(4, 4, 8)
    b, length, d, n = 2, 13, 6, 4
    inp = scan_inputs(b, length, d, n, seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        wide = torch.randn(b, length, 2 * d + 2 * n + 3, generator=g).to(DEV)
        wide[..., :d] = inp["u"]
        wide[..., d : 2 * d] = inp["z"]
        wide[..., 2 * d : 2 * d + n] = inp["B"]
        wide[..., 2 * d + n + 3 :] = inp["C"]
        dl2 = torch.zeros(b, 2 * length, d, device=DEV)
        dl2[:, ::2] = inp["delta"]
        At = inp["A"].t().contiguous()
        pair = torch.stack([inp["D"], inp["delta_bias"]], dim=1)  # (d, 2): stride 2 columns
    wide.requires_grad_()
    dl2.requires_grad_()
    At.requires_grad_()
    pair.requires_grad_()
    views = dict(
        u=wide[..., :d], z=wide[..., d : 2 * d], B=wide[..., 2 * d : 2 * d + n], C=wide[..., 2 * d + n + 3 :],
        delta=dl2[:, ::2], A=At.t(), D=pair[:, 0], delta_bias=pair[:, 1],
    )  # fmt: skip
    assert not any(v.is_contiguous() for v in views.values())
    ref = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in inp.items()}
    y_ref, h_ref = selective_scan_ref(**ref, delta_softplus=True, return_last_state=True)
    y, h = S.selective_scan_triton(**views, delta_softplus=True, return_last_state=True)
    assert rel_err(y, y_ref) < 2e-5 and rel_err(h, h_ref) < 2e-5
    w = torch.randn(y.shape, generator=g).to(DEV)
    (y_ref * w.double()).sum().backward()
    (y * w).sum().backward()
    got = dict(
        u=wide.grad[..., :d], z=wide.grad[..., d : 2 * d], B=wide.grad[..., 2 * d : 2 * d + n],
        C=wide.grad[..., 2 * d + n + 3 :], delta=dl2.grad[:, ::2], A=At.grad.t(), D=pair.grad[:, 0],
        delta_bias=pair.grad[:, 1],
    )  # fmt: skip
    for k, v in got.items():
        assert rel_err(v, ref[k].grad) < 2e-5, (k, rel_err(v, ref[k].grad))
    assert dl2.grad[:, 1::2].abs().max() == 0 and wide.grad[..., 2 * d + n : 2 * d + n + 3].abs().max() == 0


def test_kernel_bf16_inputs(tiles):
    """bf16 in, fp32 inside: out and gradients come back in bf16 close to the fp64 oracle fed
    the same (rounded) bf16 values."""
    tiles(8, 8, 8)
    inp = scan_inputs(2, 19, 10, 4, seed=9, dtype=torch.bfloat16)
    check_against_ref(inp, softplus=True, tol=2e-2)


def test_no_grad_forward_and_default_config():
    """Inference (no states saved) under the shape-chosen tiles; the config helper's limits."""
    inp = {k: (v.detach() if v is not None else None) for k, v in scan_inputs(1, 9, 5, 3, seed=5).items()}
    with torch.no_grad():
        y, h = S.selective_scan_triton(**inp, delta_softplus=True, return_last_state=True)
    y_ref, h_ref = selective_scan_ref(**inp, delta_softplus=True, return_last_state=True)
    assert rel_err(y, y_ref) < 2e-5 and rel_err(h, h_ref) < 2e-5
    t, (bd, warps), (bd2, _) = S.scan_config(1536, 16)
    assert t * bd * 16 <= 8192 and bd == bd2 and warps >= 1
    with pytest.raises(ValueError, match="B must have shape"):
        S.selective_scan_triton(**dict(inp, B=inp["B"][..., :2]))


# -- the model on the Triton path ----------------------------------------------------------
def _tiny(kernels: str) -> XatlConfig:
    return XatlConfig(
        family="neox", vocab_size=61, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
        mixer="mamba", d_state=4, d_conv=3, expand=2, initializer_range=0.2, kernels=kernels,
    )  # fmt: skip


def test_model_triton_path_matches_torch_path(tiles):
    tiles(4, 8, 8)  # d_inner 16: two channel blocks; 11 tokens: 3 chunks
    torch.manual_seed(0)
    mt = XatlForCausalLM(_tiny("triton")).to(DEV)
    mr = XatlForCausalLM(_tiny("torch")).to(DEV)
    mr.load_state_dict(mt.state_dict())
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(1)).to(DEV)
    lt, lr = mt(input_ids=ids).logits, mr(input_ids=ids).logits
    assert paths_used(mt) == {"MambaMixer": "triton"} and paths_used(mr) == {"MambaMixer": "torch"}
    assert rel_err(lt, lr) < 1e-5
    w = torch.randn(lt.shape, generator=torch.Generator().manual_seed(2)).to(DEV)
    (lt * w).sum().backward()
    (lr * w).sum().backward()
    for (name, pt), (_, pr) in zip(mt.named_parameters(), mr.named_parameters()):
        assert rel_err(pt.grad, pr.grad) < 1e-4, (name, rel_err(pt.grad, pr.grad))
    # cached generation: a Triton prefill hands its final state to the step path
    with torch.no_grad():
        full = mt(input_ids=ids).logits
        cache = XatlCache(mt.config.num_hidden_layers)
        out = [mt(input_ids=ids[:, :7], cache=cache).logits]
        out += [mt(input_ids=ids[:, t : t + 1], cache=cache).logits for t in range(7, 11)]
    assert rel_err(torch.cat(out, 1), full) < 1e-5
    assert paths_used(mt) == {"MambaMixer": "triton"}
