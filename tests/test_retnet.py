"""RetNet mixer: the three retention forms against a sequential float64 oracle and each other,
gradients, cached generation, save/load, and config errors."""
from __future__ import annotations

import pytest
import torch

from xatl_ds.models import XatlCache, XatlConfig, XatlForCausalLM
from xatl_ds.models.components import component_of
from xatl_ds.models.retnet import (
    RetNetMixer,
    retention_chunkwise,
    retention_log_decay,
    retention_parallel,
    retention_recurrent,
)

LENGTHS = [1, 7, 16, 37]  # chunk 8: single token, < chunk, exact multiple, ragged


def tiny_config(**kw) -> XatlConfig:
    base = dict(
        mixer="retnet", vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        chunk_size=8, max_position_embeddings=128,
    )
    base.update(kw)
    return XatlConfig(**base)


def oracle(q, k, v, log_gamma):
    """Token by token, in float64, straight from the definition in the module docstring."""
    B, H, L, _ = q.shape
    q, k, v, g = q.double(), k.double(), v.double(), log_gamma.double().exp()
    out = torch.zeros(B, H, L, v.shape[-1], dtype=torch.float64)
    for n in range(L):
        w = g[:, None] ** (n - torch.arange(n + 1, dtype=torch.float64))[None]  # (H, n+1)
        s = torch.einsum("bhd,bhmd->bhm", q[:, :, n], k[:, :, : n + 1]) * w / w.sum(-1).sqrt()[:, None]
        out[:, :, n] = torch.einsum("bhm,bhmd->bhd", s, v[:, :, : n + 1]) / s.sum(-1).abs().clamp(min=1)[..., None]
    return out


def qkv(L, B=2, H=3, dk=6, dv=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, d, generator=gen) for d in (dk, dk, dv)]


def test_decays_follow_the_paper():
    g = retention_log_decay(4).double().exp()
    assert torch.allclose(g, 1 - 2.0 ** (-5 - torch.arange(4.0, dtype=torch.float64)), rtol=0, atol=1e-7)


@pytest.mark.parametrize("L", LENGTHS + [64])
def test_three_forms_match_oracle(L):
    q, k, v = qkv(L)
    lg = retention_log_decay(q.shape[1])
    sc = 0.7  # the score scale is folded into the masks: check it against a scaled q
    ref = oracle(q * sc, k, v, lg)
    scale = ref.abs().max()
    par = retention_parallel(q, k, v, sc)
    chk, S, z = retention_chunkwise(q, k, v, 8, sc, return_state=True)
    S_r = z_r = None
    rec = []
    for n in range(L):
        t = slice(n, n + 1)
        o, S_r, z_r = retention_recurrent(q[:, :, t], k[:, :, t], v[:, :, t], n, S_r, z_r, sc)
        rec.append(o)
    rec = torch.cat(rec, 2)
    for got in (par, chk, rec):
        assert (got.double() - ref).abs().max() / scale < 2e-6
    # the chunkwise final state is the recurrent one
    assert torch.allclose(S, S_r, atol=1e-4, rtol=1e-5) and torch.allclose(z, z_r, atol=1e-5, rtol=1e-5)
    # a prefill split at a ragged point, continued from the state, gives the same outputs
    a = max(1, L // 3)
    o1, S1, z1 = retention_chunkwise(q[:, :, :a], k[:, :, :a], v[:, :, :a], 8, sc, 0, return_state=True)
    o2, _, _ = retention_chunkwise(q[:, :, a:], k[:, :, a:], v[:, :, a:], 8, sc, a, S1, z1, return_state=True)
    assert (torch.cat([o1, o2], 2).double() - ref).abs().max() / scale < 2e-6


def _mixer(seed=0, **kw) -> RetNetMixer:
    torch.manual_seed(seed)
    m = RetNetMixer(tiny_config(**kw), layer_idx=0)
    with torch.no_grad():  # a non-identity norm affine, so a form that skipped it would show
        m.norm.weight.uniform_(0.5, 1.5)
        m.norm.bias.normal_(0, 0.1)
    return m


@pytest.mark.parametrize("L", LENGTHS)
def test_mixer_forms_agree_forward(L):
    m = _mixer()
    x = torch.randn(2, L, 32, generator=torch.Generator().manual_seed(L))
    with torch.no_grad():
        par = m(x)
        m.parallel_max_len = 0  # force the chunkwise form in training mode
        chk = m(x)
        st: dict = {}
        rec = torch.cat([m(x[:, n : n + 1], state=st) for n in range(L)], 1)
    assert st["offset"] == L and st["S"].shape == (2, 4, 8, 8) and st["z"].shape == (2, 4, 8)
    assert (par - chk).abs().max() < 1e-5
    assert (par - rec).abs().max() < 1e-5
    assert par.abs().max() > 1e-2  # not trivially zero


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize("L", [7, 16, 37])
def test_mixer_gradients_parallel_vs_chunkwise(L):
    grads = []
    for force_chunk in (False, True):
        m = _mixer(seed=1)
        m.parallel_max_len = 0 if force_chunk else 10**9
        x = torch.randn(2, L, 32, generator=torch.Generator().manual_seed(7)).requires_grad_()
        w = torch.randn(2, L, 32, generator=torch.Generator().manual_seed(8))
        (m(x) * w).sum().backward()
        grads.append({"x": x.grad, **{n: p.grad for n, p in m.named_parameters()}})
    par, chk = grads
    assert set(par) == set(chk)
    for n in par:
        assert par[n] is not None and par[n].abs().max() > 0, n
        assert _rel(chk[n], par[n]) < 1e-4, n


def test_mixer_fwd_bwd_and_rope_ignored():
    m = _mixer()
    x = torch.randn(3, 53, 32, requires_grad=True)  # a length no other test builds masks for
    with torch.inference_mode():  # cached masks made here must still serve training below
        m(torch.randn(3, 53, 32))
    y = m(x)
    assert y.shape == x.shape
    cos = torch.randn(3, 53, 2)
    assert torch.equal(m(x, rope=(cos, cos)), y)  # its own positions, whatever the model passes
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() > 0
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, n


def test_long_sequences_switch_to_chunkwise():
    m = _mixer()
    x = torch.randn(1, 40, 32)
    with torch.no_grad():
        ref = m(x)
        m.parallel_max_len = 16  # 40 > 16: the chunkwise form runs
        assert (m(x) - ref).abs().max() < 1e-5


def test_transfer_shapes_and_components():
    cfg = tiny_config(retnet_heads=2, attention_bias=True)
    model = XatlForCausalLM(cfg)
    o = model.model.layers[0].mixer.o_proj
    assert o.weight.shape == (32, 32) and o.bias is not None  # same as the source's W_O + dense bias
    comps = {n: component_of(n, cfg) for n, _ in model.named_parameters() if ".mixer." in n}
    assert comps["model.layers.0.mixer.o_proj.weight"] == "attn_out"
    assert comps["model.layers.0.mixer.o_proj.bias"] == "attn_out"
    assert comps["model.layers.0.mixer.q_proj.weight"] == "new"
    assert comps["model.layers.0.mixer.norm.weight"] == "new"
    # reset_mixer_parameters ran after the generic init: the norm starts as the identity
    assert torch.equal(model.model.layers[0].mixer.norm.weight, torch.ones(32))


@pytest.mark.parametrize("attention_layers", [None, [1]])
def test_cache_prefill_and_steps_match_full_forward(attention_layers):
    torch.manual_seed(0)
    model = XatlForCausalLM(tiny_config(attention_layers=attention_layers)).eval()
    ids = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        cache = XatlCache(2)
        parts = [model(ids[:, :5], cache=cache).logits]  # prefill (chunkwise from empty)
        parts.append(model(ids[:, 5:15], cache=cache).logits)  # prefill continued from a state
        parts += [model(ids[:, n : n + 1], cache=cache).logits for n in range(15, 23)]
    assert cache.seen_tokens == 23
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-5


@pytest.mark.parametrize("heads, match", [(5, "retnet_heads=5"), (32, "even")])
def test_bad_retnet_heads_raise_clear_error(heads, match):
    with pytest.raises(ValueError, match=match) as err:
        XatlForCausalLM(tiny_config(retnet_heads=heads))
    assert "retnet_heads" in str(err.value)


def test_bad_chunk_size_raises():
    with pytest.raises(ValueError, match="chunk_size"):
        RetNetMixer(tiny_config(chunk_size=0), 0)
