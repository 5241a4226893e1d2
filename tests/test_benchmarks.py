"""Smoke tests of the benchmark suite (benchmarks/): every section's functions run at tiny
shapes and return sane numbers; the report renders; gpu_check exits cleanly without CUDA."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

from benchmarks import interleaved, md_table
from benchmarks.throughput import Shape, hf_fallback, training_throughput

TINY = Shape(batch=2, seq=16, d_model=32, layers=4, heads=4, d_state=4, expand=2, vocab=128)


def test_interleaved_rotates_and_counts():
    calls = []

    def make(k):
        return lambda: calls.append(k) or float(len(calls))

    out = interleaved({"a": make("a"), "b": make("b"), "c": make("c")}, repeats=3, warmup=1)
    assert calls == list("abc" + "abc" + "bca" + "cab")  # warm-up, then rounds with a rotating start
    assert {k: len(v) for k, v in out.items()} == {"a": 3, "b": 3, "c": 3}
    assert out["a"] == [4.0, 9.0, 11.0]
    with pytest.raises(ValueError, match="repeats"):
        interleaved({"a": make("a")}, repeats=0)
    assert md_table(["x", "y"], [[1, 2]]).splitlines() == ["| x | y |", "|---|---|", "| 1 | 2 |"]


def test_training_throughput_tiny():
    from xatl_ds.flops import step_flops
    from benchmarks.throughput import xatl_config

    r = training_throughput(TINY, repeats=1, warmup=1, matmul_n=64)
    rows = {x["name"]: x for x in r["rows"]}
    assert set(rows) == {"attention", "retnet", "mamba", "mamba2"}
    assert rows["attention"]["ratio_vs_attention"] == pytest.approx(1.0)
    assert r["matmul_flops_per_s"] > 1e6
    for name, x in rows.items():
        assert x["tokens_per_s"] > 0 and math.isfinite(x["tokens_per_s"])
        assert x["step_flops"] == step_flops(xatl_config(name, TINY), TINY.batch, TINY.seq).total
        assert 0 < x["mfu"] < 10  # a ratio of rates, not a percentage off by 100x
        assert x["tokens_per_s"] == pytest.approx(TINY.tokens / x["seconds"][0])
    with pytest.raises(ValueError, match="attention"):
        training_throughput(TINY, mixers=("mamba",), repeats=1)


def test_hf_fallback_tiny():
    h = hf_fallback(TINY, seq=4, repeats=1)
    assert h["shape"]["seq"] == 4 and h["shape"]["batch"] == TINY.batch
    assert h["hf_tokens_per_s"] > 0 and h["mamba_tokens_per_s"] > 0
    assert h["ratio_mamba_vs_hf"] == pytest.approx(h["mamba_tokens_per_s"] / h["hf_tokens_per_s"])
    assert 0 < h["hf_params"] < h["mamba_params"]  # HF Mamba blocks have no MLP


def test_generation_tiny_caches_and_tokens():
    from benchmarks.generation import decode_step, generation_bench, prefill
    from benchmarks.throughput import build_xatl

    g = generation_bench(TINY, contexts=(8, 32), new_tokens=2, warmup_tokens=1)
    by = {(r["model"], r["context"]): r for r in g["rows"]}
    assert len(by) == 10
    kv = 2 * TINY.layers * TINY.d_model * 4  # K and V, fp32, per token
    assert by["attention", 32]["cache_bytes"] == 32 * kv
    assert by["attention", 32]["cache_bytes_end"] == (32 + 3) * kv  # grew by the decoded tokens
    assert by["hybrid", 32]["cache_bytes"] - by["hybrid", 8]["cache_bytes"] == 24 * kv // TINY.layers
    for m in ("mamba", "retnet", "mamba2"):
        assert by[m, 8]["cache_bytes"] == by[m, 32]["cache_bytes"] > 0  # a fixed-size state
    assert all(r["token_s"] > 0 for r in g["rows"])
    assert g["ratios_at_max"]["attention"] == 1.0 and set(g["ratios_at_max"]) == {m for m, _ in by}

    # what is timed is real cached greedy decoding: it matches recomputing the whole prefix
    ids = torch.randint(0, TINY.vocab, (1, 12), generator=torch.Generator().manual_seed(1))
    for mixer in ("attention", "mamba"):
        model = build_xatl(mixer, TINY).eval()
        cache, tok = prefill(model, ids)
        seq = torch.cat([ids, tok], 1)
        for _ in range(3):
            tok = decode_step(model, cache, tok)
            with torch.no_grad():
                ref = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            assert torch.equal(tok, ref), mixer
            seq = torch.cat([seq, tok], 1)
    with pytest.raises(ValueError, match="attention"):
        generation_bench(TINY, models=("mamba",), contexts=(8,))


def test_trainer_overhead_pieces(tmp_path, tiny_dataset):
    from xatl_ds.config import load_run_config
    from benchmarks.trainer_overhead import plain_loop, run_config, trainer_overhead, trainer_step_times

    cfg = run_config(tmp_path / "run", tiny_dataset, 3, mixer="mamba", size="micro", batch=2, seq=16, vocab=320)
    rc = load_run_config(cfg)  # a valid run config (raises ConfigError otherwise)
    assert rc.deepspeed.config == "zero0.json" and rc.deepspeed.precision == "fp32" and rc.budget.steps == 3
    path = tmp_path / "run.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    times = plain_loop(path, 2)
    assert len(times) == 2 and all(t > 0 for t in times)

    m = tmp_path / "metrics.jsonl"
    m.write_text("".join(json.dumps({"step": i + 1, "wall_time": w}) + "\n" for i, w in enumerate([0.5, 0.8, 1.5])))
    assert trainer_step_times(m) == pytest.approx([0.5, 0.3, 0.7])
    with pytest.raises(ValueError, match="skip"):
        trainer_overhead(tmp_path, steps=3, skip=3)


def _fake_results(load: float) -> dict:
    from benchmarks.run import parse_args

    args = vars(parse_args(["--quick"]))
    la = (load, load, load)
    return {
        "info": {"date": "d", "cpu": "CPU-X", "cores": 2, "cpu_capability": "AVX2", "python": "3", "torch": "t",
                 "transformers": "tf", "deepspeed": "ds", "xatl_ds": "x", "load_average": la,
                 "load_average_end": la},
        "args": args, "sections_s": {"trainer": 1.0}, "load": {"trainer": la}, "shape": vars(TINY),
        "trainer": {"mixer": "attention", "size": "micro", "batch": 2, "seq": 16, "steps": 4, "skip": 1, "rounds": 1,
                    "threads": 2, "trainer_step_s": 1.2, "plain_step_s": 1.0, "ratio_trainer_vs_plain": 1.2,
                    "trainer_step_min": 1.1, "plain_step_min": 1.0, "ratio_best": 1.1,
                    "trainer_process_s": [20.0], "plain_process_s": [9.0]},
    }  # fmt: skip


def test_render_marks_load_and_targets():
    from benchmarks.run import render

    busy = render(_fake_results(5.0))
    assert "NOT this machine's speed" in busy and "CPU-X" in busy and "deepspeed ds" in busy
    assert "| xatl_ds.train (deepspeed) | 1.200 | 1.200 | <= 1.1 **no** |" in busy
    assert "Reference: the plain loop" in busy
    assert "NOT this machine's speed" not in render(_fake_results(0.5))


def test_run_suite_quick_in_process(tmp_path):
    from benchmarks.run import main

    out = tmp_path / "R.md"
    assert main(["--quick", "--sections", "throughput,retnet,generation", "--out", str(out), "--json",
                 str(tmp_path / "r.json"), "--contexts", "8,16", "--gen-threads", "2"]) == 0  # fmt: skip
    md = out.read_text()
    assert "## 1. Training throughput" in md and "## 3. Cached greedy generation" in md and "| mamba |" in md
    assert "## 4. RetNet training: parallel vs chunkwise form" in md and "Quick mode" in md
    res = json.loads((tmp_path / "r.json").read_text())
    assert {r["name"] for r in res["throughput"]["rows"]} >= {"attention", "mamba"}
    assert [r["length"] for r in res["retnet"]["rows"]] == [32, 64, 128]
    assert all(r["parallel_s"] > 0 and r["chunkwise_s"] > 0 for r in res["retnet"]["rows"])
    assert torch.get_num_threads() == 2  # the generation section's thread count was restored


def test_gpu_check_harness_on_cpu():
    from benchmarks import gpu_check

    p = gpu_check.parity("mamba", "fp32", device="cpu", kernels_b="torch", layers=1, d_model=32, heads=4, vocab=64,
                         batch=1, seq=12, new_tokens=2)  # fmt: skip
    assert p["ok"] and p["path_ok"] and p["logits_err"] == p["mixer_err"] == p["grad_err_max"] == p["gen_err"] == 0.0
    assert p["loss_err"] == 0.0 and set(p["paths"].values()) == {"torch"}
    # a fast model that runs another path than the one asked for fails, whatever its numbers
    assert not gpu_check._ran({"MambaMixer": "torch", "loss": "triton"}, "triton")
    assert not gpu_check._ran({"loss": "triton"}, "triton")  # no mixer recorded a path
    assert gpu_check._ran({"MambaMixer": "triton", "loss": "torch"}, "triton")
    rows = gpu_check.throughput({"attention": ("attention", None), "mamba2": ("mamba2", None),
                                 "broken": ("mamba", [99])}, device="cpu", dtype="fp32", batch=1, seq=16,
                                peak_flops=1e11, repeats=1, warmup=1, layers=2, d_model=64, heads=4, vocab=64,
                                kernels="torch")  # fmt: skip
    by = {r["name"]: r for r in rows}
    assert by["attention"]["ratio_vs_attention"] == pytest.approx(1.0) and by["mamba2"]["tokens_per_s"] > 0
    assert 0 < by["mamba2"]["mfu"] < 1 and by["mamba2"]["paths"]["Mamba2Mixer"] == "torch"
    assert by["mamba2"]["peak_mem_bytes"] is None  # CPU: no allocator statistics
    assert "attention_layers" in by["broken"]["error"]  # reported, not raised
    late = gpu_check.throughput({"attention": ("attention", None)}, device="cpu", dtype="fp32", batch=1, seq=8,
                                repeats=1, layers=1, d_model=32, heads=4, vocab=64, time_budget=-1)  # fmt: skip
    assert late == [{"name": "attention", "compiled": False, "error": "skipped: the time budget (-1 s) was spent"}]

    info = {"gpu": "G", "torch": "t", "cuda": "c", "transformers": "tf", "xatl_ds": "x", "date": "d",
            "kernels": {"triton": "3.6", "mamba_ssm": None, "causal_conv1d": None}}  # fmt: skip
    bad = {"mixer": "mamba2", "dtype": "bf16", "kernels": "triton", "ok": False, "error": "ImportError: x"}
    res = {"parity": [p, bad], "cuda_parity": [], "throughput": rows,
           "settings": {"throughput": {"shape": "S", "dtype": "fp32", "batch": 1, "seq": 16, "repeats": 1,
                                       "peak_tflops": 100.0}}}  # fmt: skip
    md = gpu_check.render(info, res)
    assert "| mamba | fp32 | torch | 0.00e+00 | 0.00e+00 |" in md and "| mamba2 | bf16 | triton | error" in md
    assert "mamba_ssm missing" in md and "Not run: mamba-ssm does not import here" in md
    assert "| mamba2 | no |" in md and "| broken | no | ValueError" in md and "Mamba2Mixer: torch" in md
    assert "## Throughput" not in gpu_check.render(info, {"parity": [p]})  # a section not run is not shown


def test_gpu_check_append_keeps_earlier_sections(tmp_path, monkeypatch):
    """The session runs parity and throughput as two processes: the second adds to the first's JSON."""
    from benchmarks import gpu_check

    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check.torch.cuda, "get_device_name", lambda i=0: "FakeGPU")
    monkeypatch.setattr(gpu_check, "kernel_status", lambda: {"triton": None, "mamba_ssm": None, "causal_conv1d": None})
    (tmp_path / "gpu_check.json").write_text(json.dumps({"info": {}, "results": {"parity": [{"mixer": "m", "dtype": "fp32",
                                                                                       "ok": True, "error": "e"}]}}))
    monkeypatch.setattr(gpu_check, "throughput", lambda models, **kw: [{"name": n, "error": "x"} for n in models])
    assert gpu_check.main(["--out", str(tmp_path), "--append", "--skip-parity", "--models", "attention"]) == 0
    res = json.loads((tmp_path / "gpu_check.json").read_text())["results"]
    assert res["parity"][0]["mixer"] == "m" and res["throughput"] == [{"name": "attention", "error": "x"}]
    assert "FakeGPU" in (tmp_path / "gpu_check.md").read_text()


def test_gpu_trainer_pieces():
    from benchmarks import gpu_trainer as gt

    assert gt.pad_vocab(50277) == 50304 and gt.pad_vocab(512) == 512 and gt.pad_vocab(513) == 640
    rows = [{"step": i, "wall_time": w, "flops": 10.0 * i, "tokens": 8 * i} for i, w in
            enumerate([1.0, 1.5, 2.0, 2.5, 10.0, 10.5, 11.5], start=1)]  # fmt: skip
    st = gt.step_stats(rows, launch_starts=[0, 4], skip=1, peak_flops=100.0)
    # dropped: step 1 (the first of launch 1) and 5 (the first of launch 2: its start-up inside)
    assert st["steps_timed"] == 5 and st["step_s"] == pytest.approx(0.5) and st["tokens_per_s"] == pytest.approx(16)
    assert st["mfu"] == pytest.approx(10.0 / 0.5 / 100.0)
    assert gt.step_stats(rows[:1], [0], 1, 1.0) == {"steps_timed": 0}
    md = gt.render({"info": {"gpu": "G"}, "setting": gt.SETTINGS["gpu"], "peak_tflops": 989,
                    "errors": [{"stage": "xatl", "error": "RuntimeError: boom"}]})  # fmt: skip
    assert "12 layers x d 768" in md and "**Error** in xatl" in md


@pytest.mark.slow
def test_gpu_trainer_dry_run(tmp_path):
    """The device session's trainer section end to end on this CPU: XATL run killed at its
    checkpoint and resumed, LIT unfreezing inside it, a distillation run, the plain loop."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    r = subprocess.run([sys.executable, "benchmarks/gpu_trainer.py", "--dry-run", "--out", str(tmp_path / "o"),
                        "--work", str(tmp_path / "w")], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=400)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "o" / "gpu_trainer.json").read_text())
    x = res["runs"]["xatl"]
    assert x["resumed_from"] == "step00000006" and [l["what"] for l in x["launches"]] == ["first", "resume"]
    assert x["summary"]["done"] and x["summary"]["steps"] == 12 and x["summary"]["unfreeze_events"]
    assert len(x["summary"]["kernel_paths_per_launch"]) == 2
    assert res["runs"]["distill"]["summary"]["done"] and res["plain"]["step_s"] > 0
    assert set(res["ratios"]) == {"trainer / plain loop (step time)", "distilled / plain trainer step",
                                  "distilled trainer step / plain loop"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit")
def test_gpu_check_script_without_cuda(tmp_path):
    r = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path / "g")], cwd=REPO,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "CUDA is not available" in r.stderr
    assert not (tmp_path / "g").exists()  # nothing measured, nothing written
