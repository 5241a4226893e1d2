"""Analytic FLOPs: hand counts per mixer, frozen-weight accounting, 6N and FlopCounterMode."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from xatl_ds.flops import flops_per_token_6N, matmul_params, step_flops
from xatl_ds.models import XatlConfig, XatlForCausalLM
from xatl_ds.models.components import component_of

B, L = 2, 4
T = B * L
D_MODEL, VOCAB, FFN = 8, 16, 32
TRANSFERRED = {"embed", "lm_head", "final_norm", "norms", "mlp", "attn_out"}


def tiny(mixer: str, **kw) -> XatlConfig:
    base = dict(family="neox", mixer=mixer, hidden_size=D_MODEL, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=VOCAB, intermediate_size=FFN, mamba2_headdim=4, chunk_size=4)
    if mixer == "attention":
        base["attention_layers"] = "all"
    base.update(kw)
    return XatlConfig(**base)


def lin(n_in: int, n_out: int, tokens: int = T) -> int:
    return 2 * tokens * n_in * n_out


MLP = lin(D_MODEL, FFN) + lin(FFN, D_MODEL)
HEAD = lin(D_MODEL, VOCAB)


# --------------------------------------------------------------------------- hand counts
def test_hand_count_attention():
    fc = step_flops(tiny("attention"), B, L)
    linear = 4 * lin(8, 8) + MLP + HEAD
    assert linear == 14336
    scores = 2 * B * 2 * L * L * 4  # 2 B heads L^2 head_dim, for QK^T and again for AV
    assert fc.forward == linear + 2 * scores == 15360
    assert fc.backward == linear + 2 * 2 * scores
    assert fc.weight_grads == linear
    assert fc.total == fc.forward + fc.backward + fc.weight_grads
    assert fc.by_kind() == {"linear": 3 * linear, "attention": 6 * scores}
    assert fc.breakdown()["model.layers.0.mixer.scores"] == {
        "forward": scores, "backward": 2 * scores, "weight_grads": 0, "total": 3 * scores}


def test_hand_count_retnet_parallel():
    fc = step_flops(tiny("retnet"), B, L)
    linear = 5 * lin(8, 8) + MLP + HEAD  # q, k, v, g, o
    qk = 2 * B * L * L * D_MODEL  # summed over the 2 heads of dim 4
    decay = B * 2 * L * L
    assert fc.forward == linear + 2 * qk + decay == 16448
    assert fc.backward == linear + 4 * qk + decay
    assert fc.weight_grads == linear
    assert fc.by_component()["attn_out"] == 3 * lin(8, 8)  # o_proj is where W_O goes


def test_hand_count_retnet_chunkwise(monkeypatch):
    from xatl_ds.models.retnet import RetNetMixer

    monkeypatch.setattr(RetNetMixer, "parallel_max_len", 4)
    Lc = 10  # chunks of 4: 3 chunks, the last padded
    fc = step_flops(tiny("retnet"), B, Lc)
    bh, C, dh = B * 2 * 3, 4, 4
    parts = {k.split(".")[-1]: v["forward"] for k, v in fc.breakdown().items() if ".mixer." in k}
    assert parts["scores"] == parts["attn_v"] == 2 * bh * C * C * dh
    assert parts["decay"] == bh * C * C
    assert parts["chunk_states"] == parts["state_out"] == 2 * bh * C * dh * dh
    assert parts["state_passing"] == 2 * bh * dh * dh


def test_hand_count_mamba():
    fc = step_flops(tiny("mamba"), B, L)
    Din, N, R, k = 16, 16, 1, 4  # expand 2, d_state 16, dt_rank ceil(8/16), d_conv 4
    linear = lin(8, 2 * Din) + lin(Din, R + 2 * N) + lin(R, Din) + lin(Din, 8) + MLP + HEAD
    conv = 2 * T * Din * k
    scan = 7 * T * Din * N
    assert fc.forward == linear + conv + scan == 40448
    assert fc.backward == linear + conv + 2 * scan
    assert fc.weight_grads == linear + conv
    assert fc.by_kind() == {"linear": 3 * linear, "conv": 3 * conv, "scan": 3 * scan}
    assert fc.by_component()["attn_out"] == 3 * lin(Din, 8)


def test_hand_count_mamba2_multi_chunk():
    Ls = 6  # chunk 4 -> 2 chunks, the last padded
    fc = step_flops(tiny("mamba2"), B, Ls)
    Tt = B * Ls
    Din, N, P, G, k = 16, 16, 4, 1, 4
    H, Q, c = Din // P, 4, 2
    linear = lin(8, 2 * Din + 2 * G * N + H, Tt) + lin(Din, 8, Tt) + lin(8, FFN, Tt) + lin(FFN, 8, Tt) + lin(8, VOCAB, Tt)
    conv = 2 * Tt * (Din + 2 * G * N) * k
    ssd = (
        2 * B * G * c * Q * Q * N  # C B^T per group
        + 3 * B * H * c * Q * Q  # decay mask
        + 2 * B * H * c * Q * Q * P  # M x
        + 2 * B * H * c * Q * P * N  # chunk end states
        + 2 * B * H * c * P * N  # state hand-off
        + 2 * B * H * c * Q * N * P  # state -> output
    )
    assert fc.forward == linear + conv + ssd
    assert fc.backward == linear + conv + 2 * ssd
    assert fc.weight_grads == linear + conv
    assert fc.by_kind()["ssd"] == 3 * ssd


def test_tied_head_and_llama_mlp():
    fc = step_flops(tiny("attention", family="llama", tie_word_embeddings=True), B, L)
    linear = 4 * lin(8, 8) + 3 * lin(8, FFN) + HEAD  # gate, up, down
    assert fc.weight_grads == linear
    frozen = step_flops(tiny("attention", family="llama", tie_word_embeddings=True), B, L, {"embed"}, False)
    assert fc.weight_grads - frozen.weight_grads == HEAD  # the tied head is the embedding


# --------------------------------------------------------------------------- frozen weights
@pytest.mark.parametrize("mixer", ["attention", "retnet", "mamba", "mamba2"])
def test_frozen_weight_grads_dropped_only_when_not_computed(mixer):
    cfg = tiny(mixer)
    full = step_flops(cfg, B, L)
    frozen = TRANSFERRED | ({"attention"} if mixer == "attention" else set())
    lr0 = step_flops(cfg, B, L, frozen, frozen_weight_grads=True)
    assert (lr0.forward, lr0.backward, lr0.weight_grads) == (full.forward, full.backward, full.weight_grads)
    rg = step_flops(cfg, B, L, frozen, frozen_weight_grads=False)
    assert rg.forward == full.forward
    dropped = sum(p.forward for p in full.parts if p.kind == "linear" and p.component in frozen)
    assert rg.weight_grads == full.weight_grads - dropped
    assert rg.backward <= full.backward


def test_frozen_input_grads_follow_autograd_mamba():
    """Frozen embedding and norms: the first mixer's in_proj input-gradient is not needed;
    with the parallel residual the frozen MLP branch of that layer needs no backward at all."""
    frozen = TRANSFERRED
    for family, mlp_bwd_dropped in (("neox", True), ("llama", False)):
        cfg = tiny("mamba", family=family)
        full = step_flops(cfg, B, L)
        rg = step_flops(cfg, B, L, frozen, frozen_weight_grads=False)
        mlp = lin(8, FFN) * (3 if family == "llama" else 2)
        expected = lin(8, 32) + (mlp if mlp_bwd_dropped else 0)
        assert full.backward - rg.backward == expected, family
        assert full.weight_grads - rg.weight_grads == mlp + HEAD + lin(16, 8)  # + out_proj (attn_out)


def test_frozen_names_and_components_agree():
    cfg = tiny("retnet", num_hidden_layers=2)
    by_comp = step_flops(cfg, B, L, {"mlp", "attn_out"}, False)
    names = {f"model.layers.{i}.{p}.weight" for i in range(2)
             for p in ("mlp.up_proj", "mlp.down_proj", "mixer.o_proj")}
    by_name = step_flops(cfg, B, L, names, False)
    assert by_comp.to_dict() == by_name.to_dict()


# --------------------------------------------------------------------------- 6N and parameters
@pytest.mark.parametrize("family", ["neox", "llama"])
def test_linear_total_is_6N(family):
    cfg = XatlConfig(family=family, mixer="attention", attention_layers="all", hidden_size=768,
                     num_hidden_layers=12, num_attention_heads=12, vocab_size=50304)
    fc = step_flops(cfg, 8, 2048)
    n = sum(matmul_params(cfg).values())
    assert fc.by_kind()["linear"] == 6 * n * fc.tokens == flops_per_token_6N(cfg) * fc.tokens
    # Pythia-160m: 12 layers of 4 d^2 (attention) + 8 d^2 (MLP), plus the 38.6M head
    assert matmul_params(cfg) == {"attention": 12 * 4 * 768**2, "mlp": 12 * 8 * 768**2 if family == "neox"
                                  else 12 * 3 * 768 * cfg.intermediate_size, "lm_head": 768 * 50304}
    assert fc.total > fc.by_kind()["linear"]  # plus the attention scores


@pytest.mark.parametrize("mixer", ["attention", "retnet", "mamba", "mamba2"])
def test_matmul_params_match_the_real_model(mixer):
    cfg = tiny(mixer, num_hidden_layers=2)
    try:
        model = XatlForCausalLM(cfg)
    except (ImportError, AttributeError) as e:  # mixer not written yet
        pytest.skip(f"{mixer} mixer unavailable: {e}")
    real: dict[str, int] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            comp = component_of(f"{name}.weight", cfg) if name != "lm_head" else "lm_head"
            real[comp] = real.get(comp, 0) + mod.weight.numel()
    assert real == matmul_params(cfg)


# --------------------------------------------------------------------------- FlopCounterMode oracle
def measured_matmul_flops(model, ids, ops=("aten.mm", "aten.addmm", "aten.bmm")) -> int:
    fcm = FlopCounterMode(display=False)
    with sdpa_kernel([SDPBackend.MATH]), fcm:  # the math path's bmm is visible to the counter
        model(input_ids=ids, labels=ids).loss.backward()
    counts = fcm.get_flop_counts()["Global"]
    return sum(v for k, v in counts.items() if str(k) in ops)


def freeze_(model, frozen: set[str]) -> None:
    for name, p in model.named_parameters():
        if name in frozen or component_of(name, model.config) in frozen:
            p.requires_grad_(False)


ORACLE_CASES = {
    "neox-attention-gqa": dict(family="neox", mixer="attention", attention_layers="all", num_attention_heads=4,
                               num_key_value_heads=2),
    "llama-attention": dict(family="llama", mixer="attention", attention_layers="all"),
    "neox-attention-tied": dict(family="neox", mixer="attention", attention_layers="all", tie_word_embeddings=True),
    "neox-retnet-hybrid": dict(family="neox", mixer="retnet", attention_layers=[1]),
    "llama-retnet": dict(family="llama", mixer="retnet"),
    "neox-mamba": dict(family="neox", mixer="mamba", kernels="torch"),
    "llama-mamba2": dict(family="llama", mixer="mamba2", kernels="torch", mamba2_headdim=8, mamba2_ngroups=2),
    "neox-mamba2-hybrid": dict(family="neox", mixer="mamba2", kernels="torch", mamba2_headdim=8, attention_layers=[0]),
}
FROZEN_CASES = {
    "all": set(),
    # transferred parts and layer 0's attention weights (not its biases) frozen
    "frozen": {"embed", "norms", "final_norm", "mlp", "lm_head", "attn_out"}
    | {f"model.layers.0.mixer.{p}_proj.weight" for p in "qkvo"},
}


def torch_ssd_extra(cfg: XatlConfig, batch: int, seq_len: int) -> int:
    """The torch SSD hands states on with one (chunks+1)^2 matmul (forward, and a gradient
    for each operand) where the analytic count has a sequential elementwise hand-off."""
    H, P, N = cfg.d_inner // cfg.mamba2_headdim, cfg.mamba2_headdim, cfg.d_state
    c = -(-seq_len // min(cfg.chunk_size, seq_len))
    return cfg.layer_mixers.count("mamba2") * 3 * 2 * batch * H * (c + 1) ** 2 * P * N


@pytest.mark.parametrize("case", list(ORACLE_CASES))
@pytest.mark.parametrize("frozen", list(FROZEN_CASES))
def test_matches_flop_counter_mode(case, frozen, monkeypatch):
    """Every product autograd runs (FlopCounterMode: mm, addmm, bmm), with frozen tensors
    ``requires_grad=False``, equals the analytic matmul count."""
    monkeypatch.setenv("XATL_MAMBA_CPU_IMPL", "torch")  # no C++ build: the scan has no matmuls
    cfg = XatlConfig(hidden_size=16, num_hidden_layers=2, vocab_size=32, intermediate_size=48, chunk_size=4,
                     **{"num_attention_heads": 2, **ORACLE_CASES[case]})
    try:
        model = XatlForCausalLM(cfg)
    except (ImportError, AttributeError) as e:  # mixer not written yet
        pytest.skip(f"{cfg.mixer} mixer unavailable: {e}")
    torch.manual_seed(0)
    freeze_(model, FROZEN_CASES[frozen])
    ids = torch.randint(0, 32, (2, 10))
    fc = step_flops(cfg, 2, 10, FROZEN_CASES[frozen], frozen_weight_grads=False)
    if cfg.mixer == "mamba":  # the torch scan's own einsums (bmm) are not a matmul of the count
        linear = sum(p.total for p in fc.parts if p.kind == "linear")
        assert measured_matmul_flops(model, ids, ("aten.mm", "aten.addmm")) == linear
    else:
        assert measured_matmul_flops(model, ids) == fc.matmul_total() + torch_ssd_extra(cfg, 2, 10)


def test_retnet_chunkwise_against_flop_counter(monkeypatch):
    """The chunkwise path hands states on with (chunks x chunks) matmuls and carries a row-sum
    state; the analytic count uses a sequential hand-off and skips row sums: the difference
    is exactly those terms."""
    from xatl_ds.models.retnet import RetNetMixer

    monkeypatch.setattr(RetNetMixer, "parallel_max_len", 4)
    cfg = XatlConfig(mixer="retnet", hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     vocab_size=32, chunk_size=4)
    torch.manual_seed(0)
    model = XatlForCausalLM(cfg)
    Bc, Lc, H, dk = 2, 10, 2, 8
    n, C = 3, 4
    fc = step_flops(cfg, Bc, Lc)
    bh = Bc * H
    per_layer = bh * (2 * 2 * n * n * dk * dk + 2 * 2 * n * n * dk + 3 * 2 * n * C * dk)
    measured = measured_matmul_flops(model, torch.randint(0, 32, (Bc, Lc)))
    assert measured == fc.matmul_total() + 2 * per_layer


# --------------------------------------------------------------------------- errors
def test_bad_input_errors():
    cfg = tiny("attention")
    with pytest.raises(ValueError, match="frozen_params entry 'mlp.up_proj'"):
        step_flops(cfg, B, L, {"mlp.up_proj"})
    with pytest.raises(ValueError, match="frozen_params entry"):
        step_flops(cfg, B, L, {"model.layers.3.mlp.up_proj.weight"})
    with pytest.raises(ValueError, match="seq_len"):
        step_flops(cfg, B, 0)
    with pytest.raises(ValueError, match="mamba2_headdim"):
        step_flops(tiny("mamba2", mamba2_headdim=5), B, L)
