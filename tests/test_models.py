"""The model family across all mixers: forward/backward, save/load, component map, hybrid
placement, cached generation, padding rules, the kernel switch on CPU."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from xatl_ds import XatlCache, XatlConfig, XatlForCausalLM
from xatl_ds.models import resolve_attention_layers
from xatl_ds.models.components import COMPONENTS, NEW, component_of, components_of

MIXERS = ["attention", "retnet", "mamba", "mamba2"]
OUT_PROJ = {"attention": "o_proj", "retnet": "o_proj", "mamba": "out_proj", "mamba2": "out_proj"}


def tiny(mixer: str, family: str = "neox", **kw) -> XatlForCausalLM:
    torch.manual_seed(0)
    cfg = XatlConfig(family=family, mixer=mixer, vocab_size=97, hidden_size=32, num_hidden_layers=4,
                     num_attention_heads=4, mamba2_headdim=16, chunk_size=8, kernels="torch", **kw)  # fmt: skip
    return XatlForCausalLM(cfg)


@pytest.mark.parametrize("family", ["neox", "llama"])
@pytest.mark.parametrize("mixer", MIXERS)
def test_forward_backward_every_param_gets_grad(mixer, family):
    m = tiny(mixer, family, attention_layers=[1] if mixer != "attention" else None)
    x = torch.randint(0, 97, (2, 13))
    out = m(x, labels=x)
    assert out.logits.shape == (2, 13, 97) and torch.isfinite(out.loss)
    out.loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


@pytest.mark.parametrize("mixer", MIXERS)
def test_save_load_round_trip_bit_exact(mixer, tmp_path):
    m = tiny(mixer, attention_layers="paper").eval()
    with torch.no_grad():  # values no init produces (norm weights, A_log, D, ...): a re-init on load would show
        g = torch.Generator().manual_seed(1)
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    m.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "xatl"
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(m2, XatlForCausalLM)
    for (n, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n
    x = torch.randint(0, 97, (1, 9))
    assert torch.equal(m(x).logits, m2(x).logits)


@pytest.mark.parametrize("mixer", ["retnet", "mamba", "mamba2"])
def test_component_map(mixer):
    m = tiny(mixer, attention_layers="paper")
    comp = components_of(m)
    assert set(comp.values()) <= set(COMPONENTS) | {NEW}
    att = set(m.config.attention_layers)
    assert att == {1}  # 4 layers: [1, 4 // 2 - 1] = {1}
    for n, c in comp.items():
        if ".mixer." not in n:
            assert c != NEW and c not in ("attn_out", "attention"), n
            continue
        layer = int(n.split(".")[2])
        if layer in att:
            assert c == "attention", n
        elif n.split(".mixer.")[1].startswith(OUT_PROJ[mixer] + "."):
            assert c == "attn_out", n
        else:
            assert c == NEW, n
    assert sum(c == NEW for c in comp.values()) > 0
    with pytest.raises(KeyError, match="not part of an XatlForCausalLM"):
        component_of("model.layers.0.bogus.weight", m.config)


@pytest.mark.parametrize("n_layers, expected", [(24, [1, 11]), (16, [1, 7]), (12, [1, 5]), (4, [1])])
def test_paper_hybrid_placement(n_layers, expected):
    assert resolve_attention_layers("paper", n_layers) == expected
    cfg = XatlConfig(mixer="mamba", hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4,
                     attention_layers="paper")  # fmt: skip
    assert [i for i, k in enumerate(cfg.layer_mixers) if k == "attention"] == expected
    assert all(k == "mamba" for i, k in enumerate(cfg.layer_mixers) if i not in expected)


def test_attention_layer_spec_errors():
    assert resolve_attention_layers([-1, 0], 6) == [0, 5]
    with pytest.raises(ValueError, match="out of range"):
        resolve_attention_layers([7], 6)
    with pytest.raises(ValueError, match="not understood"):
        resolve_attention_layers("middle", 6)
    with pytest.raises(ValueError, match="mixer='lstm' is unknown"):
        XatlConfig(mixer="lstm")
    with pytest.raises(ValueError, match="family='gpt2' is unknown"):
        XatlConfig(family="gpt2")


@pytest.mark.parametrize(
    "mixer, attention_layers",
    [("attention", None)] + [(m, a) for m in MIXERS[1:] for a in (None, [1])],
)
def test_cached_generation_equals_recompute(mixer, attention_layers):
    m = tiny(mixer, attention_layers=attention_layers).eval()
    x = torch.randint(0, 97, (2, 7))
    a = m.generate(x, max_new_tokens=8, do_sample=False, use_cache=True, output_logits=True, return_dict_in_generate=True)
    b = m.generate(x, max_new_tokens=8, do_sample=False, use_cache=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(a.sequences, b.sequences)
    assert len(set(a.sequences[0, 7:].tolist())) > 1, "a constant continuation would prove little"
    cache = XatlCache(m.config.num_hidden_layers)
    with torch.no_grad():
        m(x, cache=cache)
    assert all(cache.layers) and cache.memory_bytes() > 0 and cache.seen_tokens == 7
    diff = max((p - q).abs().max().item() for p, q in zip(a.logits, b.logits))
    assert diff < 1e-4, diff


def test_left_padding_is_refused_right_padding_accepted():
    m = tiny("mamba").eval()
    x = torch.randint(0, 97, (2, 5))
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    m(x, attention_mask=right)
    with pytest.raises(ValueError, match="padding_side='right'"):
        m(x, attention_mask=torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))


def test_cuda_kernels_on_cpu_fail_clearly():
    torch.manual_seed(0)
    cfg = XatlConfig(mixer="mamba", vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     kernels="cuda")  # fmt: skip
    m = XatlForCausalLM(cfg)
    with pytest.raises((ValueError, ImportError), match="kernels='cuda'|cuda"):
        m(torch.randint(0, 97, (1, 4)))
