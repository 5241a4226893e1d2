"""Distillation, the alignment stage and teacher recovery (xatl_ds/distill.py and the trainer).

An identity-transferred student has KL 0 to its teacher; the loss matches a direct
computation; the alignment stage changes only the aligned mixers (every other tensor
bit-identical, ZeRO 0-3, 2 ranks through the launcher); a killed distillation run resumes
exactly; teacher FLOPs, the stage's end and the teacher's validation loss reach the metrics
and meta.json."""
from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch

from conftest import REPO, TINY_VOCAB, train_env
from test_train import _single, rows, run_deepspeed, train_killed_and_resumed, write_cfg


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory, tiny_dataset):
    from conftest import build_tiny_source

    path = tmp_path_factory.mktemp("teacher_src")
    build_tiny_source("neox").save_pretrained(path)
    return path


def _run_cfg(out, data, source, **over) -> dict:
    """A tiny XATL run: RetNet hybrid of the 4-layer source (attention kept in layer 1)."""
    cfg = dict(
        name="d", out_dir=str(out), seed=3,
        model={"mixer": "retnet", "attention_layers": [1]},
        init={"kind": "xatl", "source": str(source)},
        data={"path": str(data), "seq_len": 32, "batch_size": 4},
        budget={"steps": 4}, eval={"every": 100, "batches": 2}, checkpoint={"every": 100, "keep": 3},
        optim={"warmup_steps": 1, "lr": 3e-3}, deepspeed={"config": "zero0.json"},
    )  # fmt: skip
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


# -- losses ---------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_identity_student_has_zero_kl_to_its_teacher(temperature, tiny_dataset, source_dir):
    from transformers import AutoModelForCausalLM

    from xatl_ds.config import load_run_config
    from xatl_ds.distill import distill_loss, load_teacher
    from xatl_ds.train import build_model

    cfg = load_run_config(_run_cfg("unused", tiny_dataset, source_dir, model={"mixer": "attention"}))
    student, _ = build_model(cfg, vocab_size=TINY_VOCAB)
    teacher = load_teacher(str(source_dir), str(tiny_dataset), student.config.vocab_size).model
    native = AutoModelForCausalLM.from_pretrained(source_dir).eval()  # the source as transformers runs it
    x = torch.randint(0, TINY_VOCAB, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        s = student.eval()(input_ids=x).logits
        for t in (teacher(input_ids=x).logits, native(input_ids=x).logits):
            d = distill_loss(s, t, x, kl_weight=1.0, reverse_kl_weight=1.0, temperature=temperature)
            assert abs(d.kl) < 1e-6 and abs(d.reverse_kl) < 1e-6, (d.kl, d.reverse_kl)
            assert float(d.total) == pytest.approx(0.0, abs=1e-5)
        # a student that differs is not at 0: the test can fail
        d = distill_loss(s + 0.5 * torch.randn_like(s), t, x, kl_weight=1.0, temperature=temperature)
        assert d.kl > 1e-3


def test_loss_formula_against_a_direct_computation():
    from xatl_ds.distill import distill_loss

    g = torch.Generator().manual_seed(1)
    B, L, V = 2, 7, 11
    s, t = torch.randn(B, L, V, generator=g) * 2, torch.randn(B, L, V, generator=g) * 2
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, 3] = labels[1, 6] = -100  # masked like the CE
    w = dict(kl_weight=0.7, reverse_kl_weight=0.4, ce_weight=0.3, temperature=1.7)
    got = distill_loss(s, t, labels, **w)

    T, kl, rkl, ce, n = w["temperature"], 0.0, 0.0, 0.0, 0
    for b in range(B):
        for i in range(L - 1):  # position i predicts label i+1
            y = int(labels[b, i + 1])
            if y == -100:
                continue
            ps = [math.exp(v / T) for v in s[b, i].double().tolist()]
            pt = [math.exp(v / T) for v in t[b, i].double().tolist()]
            ps, pt = [p / sum(ps) for p in ps], [p / sum(pt) for p in pt]
            kl += sum(a * math.log(a / c) for a, c in zip(pt, ps))
            rkl += sum(c * math.log(c / a) for a, c in zip(pt, ps))
            ce -= float(s[b, i].double().log_softmax(-1)[y])
            n += 1
    kl, rkl, ce = kl / n, rkl / n, ce / n
    assert n == B * (L - 1) - 2
    assert got.kl == pytest.approx(kl, rel=1e-5) and got.reverse_kl == pytest.approx(rkl, rel=1e-5)
    assert got.ce == pytest.approx(ce, rel=1e-5)
    want = w["ce_weight"] * ce + T * T * (w["kl_weight"] * kl + w["reverse_kl_weight"] * rkl)
    assert float(got.total) == pytest.approx(want, rel=1e-5)
    # gradients reach the student only
    s.requires_grad_(True)
    distill_loss(s, t, labels, **w).total.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_teacher_forward_is_a_third_of_a_training_step():
    from xatl_ds.flops import alignment_step_flops, forward_flops, step_flops
    from xatl_ds.models import XatlConfig

    c = XatlConfig(family="llama", vocab_size=320, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                   mixer="attention")  # fmt: skip
    assert 3 * forward_flops(c, 4, 32) == step_flops(c, 4, 32).total  # exact for attention
    head = 2 * 4 * 32 * 320
    assert forward_flops(c, 4, 32) - forward_flops(c, 4, 32, head_positions=1) == head * 32 - head
    assert alignment_step_flops(c, 4, 32) == forward_flops(c, 4, 32, head_positions=1)  # nothing to align
    h = XatlConfig(family="llama", vocab_size=320, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                   mixer="retnet", attention_layers=[1])  # fmt: skip
    extra = alignment_step_flops(h, 4, 32) - forward_flops(h, 4, 32, head_positions=1)
    # three mixers' backward: more than their weight gradients, less than a whole step's backward
    assert 0 < extra < step_flops(h, 4, 32).total - step_flops(h, 4, 32).forward


# -- the stage controller --------------------------------------------------------------------
def test_align_then_freeze_counts_freeze_steps_from_the_stage_end():
    from xatl_ds.config import AlignSection
    from xatl_ds.distill import AlignThenFreeze
    from xatl_ds.freeze import FreezeConfig, FreezeController

    def make():
        fr = FreezeController(FreezeConfig(policy="fixed", unfreeze_order=[["mlp"]], steps=[2], rewarmup_steps=0),
                              {"mlp"})  # fmt: skip
        return AlignThenFreeze(AlignSection(enabled=True, until="lit", steps=50, window=2, threshold=0.05), fr)

    c = make()
    losses = [1.0, 1.0, 0.5, 0.5, 0.49, 0.49]  # windows 1.0, 0.5, 0.49: the third improves < 5%
    for step, loss in enumerate(losses[:3]):
        assert c.aligning(step) and c.update_align(step, loss, 10.0 * (step + 1)) is None
    assert c.lr_scale(0, 3) == 0.0
    saved = json.loads(json.dumps(c.state_dict()))  # plain types, as the checkpoint keeps it
    end = None
    for step in (3, 4, 5):
        end = c.update_align(step, losses[step], 10.0 * (step + 1))
    assert end is not None and end.step == 6 and end.rule == "lit" and end.window_losses == [1.0, 0.5, 0.49]
    assert not c.aligning(6) and c.main_start() == (6, 60.0)
    assert c.update(6, 3.0) == [] and c.lr_scale(0, 7) == 0.0
    ev = c.update(7, 3.0)  # the freeze controller's step 1: fixed step 2 releases at run step 8
    assert [e.step for e in ev] == [8] and c.events[0].step == 8 and c.lr_scale(0, 8) == 1.0

    d = make()  # resumed from the state saved at step 2 continues identically
    d.load_state_dict(saved)
    for step in (3, 4, 5):
        again = d.update_align(step, losses[step], 10.0 * (step + 1))
    assert again == end
    with pytest.raises(ValueError, match="align.enabled"):
        make().load_state_dict(make().freeze.state_dict())


@pytest.mark.parametrize(
    "patch, needle",
    [
        ({"init": {"kind": "scratch", "source": None}, "distill": {"enabled": True}},
         "distill.enabled needs a teacher"),
        ({"distill": {"enabled": True, "kl_weight": 0.0}}, "kl_weight and distill.reverse_kl_weight both 0"),
        ({"distill": {"temperature": 0}}, "distill.temperature=0"),
        ({"distill": {"teacher": "x"}}, "neither distill.enabled nor align.enabled"),
        ({"init": {"kind": "scratch", "source": None}, "distill": {"enabled": True, "teacher": "t"},
          "align": {"enabled": True}}, "align.enabled needs init.kind: xatl"),
        ({"align": {"enabled": True, "steps": 4}}, "align.steps=4 leaves no step"),
        ({"align": {"until": "never"}}, "align.until='never' is unknown"),
        ({"align": {"enabled": True, "steps": 2}, "freeze": {"policy": "fixed", "steps": [2]}},
         "after the 2 align.steps"),
    ],
)
def test_bad_distill_and_align_configs_are_refused(patch, needle, tmp_path):
    from xatl_ds.config import ConfigError, load_run_config

    cfg = _run_cfg(tmp_path / "o", tmp_path / "data", tmp_path / "src")
    for k, v in patch.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    with pytest.raises(ConfigError) as e:
        load_run_config(cfg)
    assert needle in str(e.value), str(e.value)


# -- through the trainer ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_alignment_stage_changes_only_mixers(stage, tmp_path, tiny_dataset, source_dir):
    """2 ranks through the launcher, a distilling teacher beside the engine: after the stage
    every tensor outside the aligned mixers is bit-identical to the transferred init, every
    aligned mixer tensor moved; then end-to-end distillation; metrics and meta.json."""
    from xatl_ds.checkpoint import consolidated_state_dict
    from xatl_ds.config import load_run_config
    from xatl_ds.distill import alignment_param_names
    from xatl_ds.train import build_model

    out = tmp_path / "run"
    cfg_d = _run_cfg(out, tiny_dataset, source_dir, name=f"a{stage}", align={"enabled": True, "steps": 2},
                     distill={"enabled": True, "ce_weight": 0.5}, budget={"steps": 3},
                     checkpoint={"every": 2}, deepspeed={"config": f"zero{stage}.json"})  # fmt: skip
    run_deepspeed(write_cfg(tmp_path / "run.yaml", **cfg_d))

    init, _ = build_model(load_run_config(cfg_d), vocab_size=TINY_VOCAB)
    init_sd = {k: v.float() for k, v in init.state_dict().items()}
    aligned = alignment_param_names(init_sd, init.config)
    assert aligned and all(".mixer." in n and not n.startswith("model.layers.1.") for n in aligned)
    after = consolidated_state_dict(out / "checkpoints", "step00000002")
    assert set(after) == set(init_sd)
    unchanged = [k for k in init_sd if k not in aligned]
    assert len(unchanged) > 20
    for k in unchanged:
        assert torch.equal(after[k], init_sd[k]), k
    for k in aligned:
        assert not torch.equal(after[k], init_sd[k]), k

    r = rows(out)
    assert [x["step"] for x in r] == [1, 2, 3]
    assert all("align_loss" in x and "train_loss" not in x for x in r[:2])
    assert r[1]["align_end"]["step"] == 2 and r[1]["align_end"]["rule"] == "steps"
    assert "train_loss" in r[2] and "kl" in r[2] and "ce_loss" in r[2] and "align_loss" not in r[2]
    assert r[0]["teacher_flops_step"] < r[2]["teacher_flops_step"]  # aligning: no teacher LM head
    assert r[2]["teacher_flops"] == r[1]["teacher_flops"] + r[2]["teacher_flops_step"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["zero_stage"] == stage and meta["world_size"] == 2
    # ZeRO-3 partitions the teacher like the student; below it every rank holds all of it
    if stage == 3:
        assert meta["teacher_params_per_rank"] < 0.6 * meta["teacher_params"]
    else:
        assert meta["teacher_params_per_rank"] == meta["teacher_params"]
    assert meta["align_end"]["step"] == 2 and meta["teacher_flops"] == r[-1]["teacher_flops"]
    assert meta["teacher_val_loss"] == r[0]["teacher_val_loss"] and math.isfinite(meta["teacher_val_loss"])
    assert meta["budget_flops"] == r[-1]["flops"] + r[-1]["teacher_flops"]


@pytest.mark.slow
def test_teacher_recovery_of_a_plain_xatl_run(tmp_path, tiny_dataset, source_dir):
    """No distillation: the teacher (the source) is only evaluated, on the run's own
    validation batches, and counts no FLOPs."""
    from xatl_ds.data import PackedTokens
    from xatl_ds.distill import load_teacher

    out = tmp_path / "run"
    cfg = write_cfg(tmp_path / "run.yaml", **_run_cfg(out, tiny_dataset, source_dir, budget={"steps": 2}))
    subprocess.run(_single(cfg), cwd=REPO, env=train_env(), check=True, capture_output=True, timeout=300)
    r, meta = rows(out), json.loads((out / "meta.json").read_text())
    assert "teacher_flops" not in r[0] and meta["teacher_flops"] == 0.0 and meta["budget_flops"] == meta["flops"]

    teacher = load_teacher(str(source_dir), str(tiny_dataset)).model
    total, count = 0.0, 0
    with torch.no_grad():
        for x in PackedTokens(tiny_dataset, "val").iter_eval_batches(4, 32, 2):
            k = x.shape[0] * (x.shape[1] - 1)
            total, count = total + float(teacher(input_ids=x, labels=x).loss) * k, count + k
    assert meta["teacher_val_loss"] == pytest.approx(total / count, rel=1e-6)
    assert r[0]["teacher_val_loss"] == meta["teacher_val_loss"]


@pytest.mark.slow
def test_killed_distillation_run_resumes_exactly(tmp_path, tiny_dataset, source_dir):
    """kill -9 mid-run (alignment stage until LIT, then KL + reverse KL at T=2), rerun: every
    row and the final validation loss equal an uninterrupted run's."""
    common = _run_cfg(None, tiny_dataset, source_dir, seed=1,
                      align={"enabled": True, "until": "lit", "steps": 6, "window": 2, "threshold": 1e-9},
                      distill={"enabled": True, "reverse_kl_weight": 0.5, "temperature": 2.0},
                      budget={"steps": 10}, eval={"every": 4, "batches": 2}, checkpoint={"every": 2},
                      deepspeed={"config": "zero2.json"})  # fmt: skip
    a, b = train_killed_and_resumed(tmp_path, common, kill_after=3, steps=10)
    ends = [x["step"] for x in a if "align_end" in x]
    assert len(ends) == 1 and 2 <= ends[0] <= 6
    for x, y in zip(a, b):
        for k in ("train_loss", "align_loss", "kl", "reverse_kl", "ce_loss"):
            assert (k in x) == (k in y) and abs(x.get(k, 0.0) - y.get(k, 0.0)) < 1e-4, (x["step"], k)
        assert x["flops"] == y["flops"] and x["teacher_flops"] == y["teacher_flops"] and x["lr"] == y["lr"]
        assert x.get("align_end", {}).get("step") == y.get("align_end", {}).get("step")
    assert abs(a[-1]["val_loss"] - b[-1]["val_loss"]) < 1e-4
    ma, mb = (json.loads((tmp_path / n / "meta.json").read_text()) for n in ("full", "broken"))
    assert ma["align_end"]["step"] == mb["align_end"]["step"] and ma["teacher_flops"] == mb["teacher_flops"]


@pytest.mark.slow
def test_distill_overhead_benchmark_runs(tmp_path):
    """benchmarks/distill_overhead.py at a tiny shape: both variants timed, the FLOP ratio 4/3."""
    import sys

    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "benchmarks.distill_overhead", "--size", "micro", "--batch", "2", "--seq", "16",
           "--steps", "1", "--work", str(tmp_path), "--json", str(out)]  # fmt: skip
    subprocess.run(cmd, cwd=REPO, env=train_env(), check=True, capture_output=True, timeout=300)
    r = json.loads(out.read_text())
    assert len(r["samples"]["plain"]) == len(r["samples"]["distill"]) == 1 and r["ratio"] > 0
    assert r["flop_ratio"] == pytest.approx(4 / 3) and r["teacher_params"] == r["student_params"]
