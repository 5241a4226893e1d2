"""init.mixer: random (bit-identical to no step), zero_out (the source without the replaced
mixers) and attention (Mamba-2 / RetNet from the replaced attention; the Mamba-2 map proven
equal to causal linear attention on an exact case)."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xatl_ds.models.components import COMPONENTS
from xatl_ds.transfer import MixerInitError, build_target, transfer

IDS = torch.tensor([[5, 17, 200, 3, 99, 310, 42, 7, 0, 256, 128, 64, 1]])
# Mamba-2 settings under which every attention head maps onto one SSD head (source: hidden 32,
# 4 heads of 8)
MAMBA2_FIT = dict(expand=1, mamba2_headdim=8, d_state=8, mamba2_ngroups=4)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _cli(argv):
    """Run the transfer subcommand as `xatl-ds` does."""
    from xatl_ds.cli import main

    return main(argv)


def _source_qkvo(src, layer):
    """The source attention's (Wq, bq), (Wk, bk), (Wv, bv), (Wo, bo), read from the source
    model directly (GPT-NeoX's fused QKV split by its documented (heads, 3, head_dim) row
    layout), independent of the transfer code."""
    c = src.config
    H, hd = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    if c.model_type == "gpt_neox":
        att = src.gpt_neox.layers[layer].attention
        w, b = att.query_key_value.weight, att.query_key_value.bias
        out = []
        for j in range(3):
            rows = [h * 3 * hd + j * hd + r for h in range(H) for r in range(hd)]
            out.append((w[rows], b[rows]))
        return (*out, (att.dense.weight, att.dense.bias))
    att = src.model.layers[layer].self_attn
    return tuple((p.weight, p.bias) for p in (att.q_proj, att.k_proj, att.v_proj, att.o_proj))


def _repeat_kv(t, kv_heads, heads):
    """Rows of KV head h // (heads // kv_heads) for each query head h, written out row by row."""
    hd = t.shape[0] // kv_heads
    rep = heads // kv_heads
    rows = [(h // rep) * hd + r for h in range(heads) for r in range(hd)]
    return t[rows]


class _PassThrough(nn.Module):
    """Stands in for the gated RMSNorm: returns the SSD output unchanged (test-side only)."""

    def forward(self, y, z):
        return y


# ----------------------------------------------------------------------------- random
def test_random_is_bit_identical_to_the_plain_transfer(make_source_model):
    src = make_source_model("neox")
    a = build_target(src, "mamba2", "paper", seed=5, expand=1, mamba2_headdim=8)
    b = build_target(src, "mamba2", "paper", seed=5, expand=1, mamba2_headdim=8)
    transfer(src, a)
    rep = transfer(src, b, mixer_init="random")
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    assert [(r.layer, r.mixer, r.mode, r.tensors) for r in rep.mixer_layers] == [
        (0, "mamba2", "random", []), (2, "mamba2", "random", []), (3, "mamba2", "random", [])
    ]
    d = rep.to_dict()["mixer_init"]
    assert d["mode"] == "random" and [x["layer"] for x in d["layers"]] == [0, 2, 3]
    assert "mixer init random: layers 0, 2, 3 keep their mixers' own initialisation" in rep.format()


# ----------------------------------------------------------------------------- zero_out
@pytest.mark.parametrize("family", ["neox", "llama"])
def test_zero_out_starts_as_the_source_without_the_replaced_mixers(make_source_model, family):
    src = make_source_model(family)
    tgt = build_target(src, "retnet", [1], seed=2).eval()
    report = transfer(src, tgt, mixer_init="zero_out")
    assert "zero_out takes precedence over attn_out" in report.skipped["attn_out"]
    assert "attn_out" not in report.copied and set(report.copied) == set(COMPONENTS) - {"attn_out"}
    for i in (0, 2, 3):
        o = tgt.model.layers[i].mixer.o_proj
        assert not o.weight.any() and (o.bias is None or not o.bias.any())
        assert [t.source for t in report.mixer_layers[[0, 2, 3].index(i)].tensors] == [None] * (2 if o.bias is not None else 1)
    # reference: the source itself with the attention output of layers 0, 2, 3 set to zero
    ref = copy.deepcopy(src)
    with torch.no_grad():
        for i in (0, 2, 3):
            dense = ref.gpt_neox.layers[i].attention.dense if family == "neox" else ref.model.layers[i].self_attn.o_proj
            dense.weight.zero_()
            if dense.bias is not None:
                dense.bias.zero_()
    assert (_logits(ref) - _logits(src)).abs().max() > 1e-2  # removing the mixers matters ...
    assert (_logits(tgt) - _logits(ref)).abs().max() < 1e-5  # ... and the target is exactly that
    assert "model.layers.0.mixer.o_proj.weight (32, 32) <- zeros" in report.format()


# ----------------------------------------------------------------------------- attention: Mamba-2
@pytest.mark.parametrize("family", ["llama", "neox"])
def test_mamba2_attention_init_copies_q_k_v_o_into_the_right_slices(make_source_model, family):
    extra = {"mamba_proj_bias": True} if family == "neox" else {}
    src = make_source_model(family)
    tgt = build_target(src, "mamba2", "none", seed=0, **MAMBA2_FIT, **extra)
    fresh = build_target(src, "mamba2", "none", seed=0, **MAMBA2_FIT, **extra)
    report = transfer(src, tgt, components=["mlp"], mixer_init="attention")
    H, kv = src.config.num_attention_heads, tgt.config.num_key_value_heads
    assert (family, kv) in (("llama", 2), ("neox", 4))  # GQA exercised on Llama
    for i in range(4):
        (wq, bq), (wk, bk), (wv, bv), (wo, bo) = _source_qkvo(src, i)
        m, f = tgt.model.layers[i].mixer, fresh.model.layers[i].mixer
        w = m.in_proj.weight
        assert torch.equal(w[32:64], _repeat_kv(wv, kv, H))  # x <- V
        assert torch.equal(w[64:96], _repeat_kv(wk, kv, H))  # B <- K
        assert torch.equal(w[96:128], wq)  # C <- Q
        assert torch.equal(w[:32], f.in_proj.weight[:32]) and torch.equal(w[128:], f.in_proj.weight[128:])  # z, dt
        assert torch.equal(m.out_proj.weight, wo)
        if family == "neox":
            assert torch.equal(m.in_proj.bias[32:128], torch.cat([bv, bk, bq]))
            assert torch.equal(m.out_proj.bias, bo)
        for name in ("conv1d.weight", "A_log", "D", "dt_bias", "norm.weight"):
            assert torch.equal(m.get_parameter(name), f.get_parameter(name)), name
    # the report names every mapped tensor, with its slice of in_proj
    layer0 = report.to_dict()["mixer_init"]["layers"][0]
    parts = [(t["target"], t["part"], t["rows"]) for t in layer0["tensors"] if t["target"].endswith("weight")]
    assert parts == [("model.layers.0.mixer.in_proj.weight", "x", [32, 64]), ("model.layers.0.mixer.in_proj.weight", "B", [64, 96]),
                     ("model.layers.0.mixer.in_proj.weight", "C", [96, 128]), ("model.layers.0.mixer.out_proj.weight", None, None)]
    srcs = [t["source"] for t in layer0["tensors"] if t["target"].endswith("weight")]
    if family == "llama":
        assert srcs == ["model.layers.0.self_attn.v_proj.weight (each of 2 kv heads repeated x2)",
                        "model.layers.0.self_attn.k_proj.weight (each of 2 kv heads repeated x2)",
                        "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"]
    else:
        assert srcs[0] == "gpt_neox.layers.0.attention.query_key_value.weight[v rows of (heads, 3, head_dim)]"
    # initialisation is not transfer: nothing of it counts as transferred (or gets frozen)
    assert set(report.copied) == {"mlp"}


@pytest.mark.parametrize("family", ["llama", "neox"])
def test_mamba2_from_attention_is_causal_linear_attention_on_the_exact_case(make_source_model, family):
    """With decay 1, an identity conv, D = 0 and the gated norm taken out, the Mamba-2 mixer
    initialised from attention computes, per head h,

        out_t = W_O . concat_h( dt_h * sum_{s<=t} (phi(q_t) . phi(k_s)) phi(v_s) )

    with the copied Q/K/V (K/V repeated per GQA group) and phi = SiLU: Mamba-2 always applies
    SiLU after its causal conv (fused in causal_conv1d), and no parameter setting removes it,
    so the reference applies it too. Everything is set through parameters only:

    * decay 1: A_log = -inf, so A = -exp(A_log) = 0 and exp(dt * A) = 1;
    * dt: its in_proj rows (and bias) zeroed, dt_bias = softplus^-1(1); the reference uses
      the dt the mixer computes (softplus(dt_bias), 1 up to rounding);
    * identity conv: every channel's kernel is a delta at the last (current) tap, bias 0;
    * D = 0 removes the skip connection;
    * the gated RMSNorm (a per-token nonlinearity) is replaced, in this test only, by a
      pass-through module; a second check keeps it and applies it to the reference too.

    fp64 and a chunk size (4) below the length (13) make the chunked SSD's inter-chunk state
    hand-off part of what is compared.
    """
    extra = {"mamba_proj_bias": True} if family == "neox" else {}
    src = make_source_model(family)
    tgt = build_target(src, "mamba2", "none", seed=0, **MAMBA2_FIT, **extra)
    transfer(src, tgt, components=[], mixer_init="attention")
    mixer = tgt.model.layers[2].mixer.double()
    H, hd, kv = 4, 8, tgt.config.num_key_value_heads
    with torch.no_grad():
        mixer.A_log.fill_(-math.inf)
        mixer.in_proj.weight[128:].zero_()
        if mixer.in_proj.bias is not None:
            mixer.in_proj.bias[128:].zero_()
        mixer.dt_bias.fill_(math.log(math.expm1(1.0)))
        mixer.conv1d.weight.zero_()
        mixer.conv1d.weight[:, 0, -1] = 1.0
        mixer.conv1d.bias.zero_()
        mixer.D.zero_()
    mixer.chunk_size = 4
    gated_norm = mixer.norm
    mixer.norm = _PassThrough()

    x = torch.randn(2, 13, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (wq, bq), (wk, bk), (wv, bv), (wo, bo) = (tuple(None if t is None else t.double() for t in p) for p in _source_qkvo(src, 2))

    def proj(w, b):
        return x @ w.T + (0 if b is None else b)

    q = F.silu(proj(wq, bq)).view(2, 13, H, hd)
    k = F.silu(proj(_repeat_kv(wk, kv, H), None if bk is None else _repeat_kv(bk[:, None], kv, H)[:, 0])).view(2, 13, H, hd)
    v = F.silu(proj(_repeat_kv(wv, kv, H), None if bv is None else _repeat_kv(bv[:, None], kv, H)[:, 0])).view(2, 13, H, hd)
    scores = torch.einsum("blhd,bshd->bhls", q, k) * torch.ones(13, 13, dtype=torch.float64).tril()
    dt = F.softplus(mixer.dt_bias.detach())  # (H,), 1.0 up to rounding
    y = torch.einsum("bhls,bshd->blhd", scores, v) * dt[:, None]

    def out_proj(h):
        return h @ wo.T + (0 if bo is None else bo)

    with torch.no_grad():
        got = mixer(x)
        assert (got - out_proj(y.reshape(2, 13, H * hd))).abs().max() < 1e-10
        # the gated norm kept: the same, with the norm applied to the reference's SSD output
        mixer.norm = gated_norm
        z = proj(mixer.in_proj.weight[:32], None if mixer.in_proj.bias is None else mixer.in_proj.bias[:32])
        assert (mixer(x) - out_proj(gated_norm(y.reshape(2, 13, H * hd), z))).abs().max() < 1e-10
        # the comparison can fail: swapping Q and K (B <-> C) breaks it
        w = mixer.in_proj.weight
        w[64:96], w[96:128] = w[96:128].clone(), w[64:96].clone()
        mixer.norm = _PassThrough()
        assert (mixer(x) - out_proj(y.reshape(2, 13, H * hd))).abs().max() > 1e-3


def test_mamba2_attention_init_names_every_dimension_that_does_not_fit(make_source_model):
    src = make_source_model("llama")
    tgt = build_target(src, "mamba2", "none", expand=2, mamba2_headdim=16, d_state=16, mamba2_ngroups=1)
    before = {n: p.clone() for n, p in tgt.named_parameters()}
    with pytest.raises(MixerInitError) as e:
        transfer(src, tgt, mixer_init="attention")
    msg = str(e.value)
    assert "d_inner = expand * hidden_size = 64 must equal num_attention_heads * head_dim = 32" in msg
    assert "mamba2_headdim = 16 must equal the attention head_dim = 8" in msg
    assert "d_state = 16 must equal the attention head_dim = 8" in msg
    assert "mamba2_ngroups = 1 must equal num_attention_heads = 4" in msg
    assert "zero_out or random" in msg
    for n, p in tgt.named_parameters():  # the error came before any write, components included
        assert torch.equal(p, before[n]), n


def test_mamba1_attention_init_is_a_named_error(make_source_model):
    src = make_source_model("neox")
    with pytest.raises(MixerInitError, match=r"no meaningful map into mamba.*zero_out or random.*mamba2, retnet"):
        transfer(src, build_target(src, "mamba", "none", expand=1), mixer_init="attention")
    with pytest.raises(MixerInitError, match=r"unknown mixer init 'zeros'"):
        transfer(src, build_target(src, "retnet", "none"), mixer_init="zeros")


# ----------------------------------------------------------------------------- attention: RetNet
def test_retnet_attention_init_copies_q_k_v_o(make_source_model):
    src = make_source_model("llama", num_hidden_layers=4)
    tgt = build_target(src, "retnet", [1], seed=0)
    fresh = build_target(src, "retnet", [1], seed=0)
    report = transfer(src, tgt, mixer_init="attention")
    for i in (0, 2, 3):
        (wq, _), (wk, _), (wv, _), (wo, _) = _source_qkvo(src, i)
        m = tgt.model.layers[i].mixer
        assert torch.equal(m.q_proj.weight, wq)
        assert torch.equal(m.k_proj.weight, _repeat_kv(wk, 2, 4)) and torch.equal(m.v_proj.weight, _repeat_kv(wv, 2, 4))
        assert torch.equal(m.o_proj.weight, wo)
        assert torch.equal(m.g_proj.weight, fresh.model.layers[i].mixer.g_proj.weight)
    notes = report.mixer_layers[0].notes
    assert any("also the attn_out component" in n for n in notes) and "attn_out" in report.copied
    with pytest.raises(MixerInitError, match=r"retnet_heads = 2 must equal num_attention_heads = 4"):
        transfer(src, build_target(src, "retnet", "none", retnet_heads=2), mixer_init="attention")


# ----------------------------------------------------------------------------- CLI
def test_cli_mamba2_attention_init_reports_every_mapped_tensor(make_source_dir, capsys):
    path = make_source_dir("llama")
    argv = ["transfer", "--source", str(path), "--mixer", "mamba2", "--mixer-init", "attention", "--expand", "1",
            "--mamba2-headdim", "8", "--d-state", "8", "--mamba2-ngroups", "4"]
    capsys.readouterr()  # drop what saving the source printed (library log lines)
    assert _cli(argv + ["--json"]) == 0
    layers = json.loads(capsys.readouterr().out)["mixer_init"]["layers"]
    assert [r["layer"] for r in layers] == [0, 1, 2, 3] and all(len(r["tensors"]) == 4 for r in layers)
    assert _cli(argv) == 0
    text = capsys.readouterr().out
    for i in range(4):
        p = f"model.layers.{i}.mixer"
        assert f"{p}.in_proj.weight[x rows 32:64] (32, 32) <- model.layers.{i}.self_attn.v_proj.weight (each of 2 kv heads repeated x2)" in text
        assert f"{p}.in_proj.weight[B rows 64:96] (32, 32) <- model.layers.{i}.self_attn.k_proj.weight (each of 2 kv heads repeated x2)" in text
        assert f"{p}.in_proj.weight[C rows 96:128] (32, 32) <- model.layers.{i}.self_attn.q_proj.weight" in text
        assert f"{p}.out_proj.weight (32, 32) <- model.layers.{i}.self_attn.o_proj.weight" in text
    assert "mixer init attention:" in text
    # a target the map does not fit is exit code 2 with the named dimensions
    assert _cli(["transfer", "--source", str(path), "--mixer", "mamba2", "--mixer-init", "attention"]) == 2
    assert "d_state = 16 must equal the attention head_dim = 8" in capsys.readouterr().err
