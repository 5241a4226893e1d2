"""The trainer under the real `deepspeed` launcher: freezing at every ZeRO stage, metrics,
export, resume after kill -9, and configs that fail before any work."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, train_env
from xatl_ds.executor import free_port

pytestmark = pytest.mark.slow
PY = sys.executable
DEEPSPEED = str(Path(PY).parent / "deepspeed")


def write_cfg(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_deepspeed(cfg: Path, ranks: int = 2, timeout: int = 420) -> subprocess.CompletedProcess:
    port = str(free_port())  # not a fixed one: another checkout's tests may be launching beside us
    cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", port, "--module", "xatl_ds.train", "--config", str(cfg)]
    r = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not left, f"DeepSpeed's shm workspace outlived the run: {left}"  # ~67 MB of RAM per rank and launch
    return r


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory, tiny_dataset):
    from conftest import build_tiny_source

    path = tmp_path_factory.mktemp("src")
    build_tiny_source("neox").save_pretrained(path)
    return path


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_fixed_unfreeze_under_zero(stage, tmp_path, tiny_dataset, source_dir):
    """2 ranks through the launcher: transferred tensors bit-identical to the source while
    frozen, moving after the fixed unfreeze; new tensors move from step 1; metrics and export."""
    from transformers import AutoModelForCausalLM

    from xatl_ds.checkpoint import consolidated_state_dict
    from xatl_ds.config import load_run_config
    from xatl_ds.train import build_model

    out = tmp_path / "run"
    cfg_path = write_cfg(
        tmp_path / "run.yaml",
        name=f"z{stage}", out_dir=str(out), seed=3,
        model={"mixer": "retnet", "attention_layers": [1]},
        init={"kind": "xatl", "source": str(source_dir)},
        freeze={"policy": "fixed", "unfreeze_order": [["all"]], "steps": [3], "rewarmup_steps": 2},
        data={"path": str(tiny_dataset), "seq_len": 32, "batch_size": 4},
        budget={"steps": 6}, eval={"every": 3, "batches": 2}, checkpoint={"every": 3, "keep": 3},
        optim={"warmup_steps": 1, "lr": 3e-3}, deepspeed={"config": f"zero{stage}.json"},
    )  # fmt: skip
    run_deepspeed(cfg_path)
    cfg = load_run_config(cfg_path)
    init, report = build_model(cfg, vocab_size=320)
    init_sd = {k: v.float() for k, v in init.state_dict().items()}
    transferred = {t["target"] for c in report["components"].values() for t in c["tensors"]}
    assert len(transferred) > 20 and "model.layers.1.mixer.q_proj.weight" in transferred
    new = [k for k in init_sd if k not in transferred]
    assert new, "a retnet hybrid must have new mixer tensors"

    at3 = consolidated_state_dict(out / "checkpoints", "step00000003")
    at6 = consolidated_state_dict(out / "checkpoints", "step00000006")
    for k in transferred:  # frozen for steps 0-2: bit-identical to the transferred init
        assert torch.equal(at3[k], init_sd[k]), k
    moved_new = [k for k in new if not torch.equal(at3[k], init_sd[k])]
    assert len(moved_new) == len(new), set(new) - set(moved_new)
    moved_after = [k for k in transferred if not torch.equal(at6[k], at3[k])]
    assert len(moved_after) == len(transferred), set(transferred) - set(moved_after)

    r = rows(out)
    assert [x["step"] for x in r] == list(range(1, 7))
    ev = [x for x in r if "unfreeze" in x]
    assert len(ev) == 1 and ev[0]["step"] == 3 and ev[0]["unfreeze"][0]["step"] == 3
    assert ev[0]["unfreeze"][0]["rule"] == "fixed"
    assert r[2]["lr"]["0"] == 0.0 and r[3]["lr"]["0"] > 0.0  # group of stage 0 released at step index 3
    assert r[3]["trainable_params"] > r[2]["trainable_params"]
    d_flops = [b["flops"] - a["flops"] for a, b in zip([{"flops": 0.0}] + r, r)]
    assert d_flops[3] > d_flops[2], "frozen steps skip weight gradients, so they cost fewer FLOPs"
    assert all("val_loss" in r[i] for i in (2, 5))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["zero_stage"] == stage and meta["world_size"] == 2 and meta["steps"] == 6
    assert (out / "DONE").is_file()

    exported = AutoModelForCausalLM.from_pretrained(out / "hf")
    for k, v in exported.state_dict().items():
        assert torch.equal(v.float(), at6[k]), k


def _single(cfg: Path) -> list[str]:
    return [PY, "-m", "xatl_ds.train", "--config", str(cfg)]


def train_killed_and_resumed(tmp_path: Path, common: dict, kill_after: int, steps: int) -> tuple[list, list]:
    """Train ``common`` once uninterrupted ("full") and once killed with SIGKILL after
    ``kill_after`` metrics rows then rerun ("broken"); returns both runs' metrics rows, after
    checking the kill happened mid-run and the rerun logged every step exactly once."""
    full = write_cfg(tmp_path / "full.yaml", **{**common, "name": "full", "out_dir": str(tmp_path / "full")})
    broken = write_cfg(tmp_path / "broken.yaml", **{**common, "name": "broken", "out_dir": str(tmp_path / "broken")})
    env = train_env()
    subprocess.run(_single(full), cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    p = subprocess.Popen(_single(broken), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)  # fmt: skip
    metrics = tmp_path / "broken" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.02)
    assert p.poll() is None, "the run ended before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    killed_at = len(metrics.read_text().splitlines())
    assert kill_after <= killed_at < steps and not (tmp_path / "broken" / "DONE").exists()
    subprocess.run(_single(broken), cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    a, b = rows(tmp_path / "full"), rows(tmp_path / "broken")
    assert [x["step"] for x in b] == list(range(1, steps + 1)), "no step lost or repeated"
    return a, b


def test_resume_after_kill_matches_uninterrupted(tmp_path, tiny_dataset):
    common = dict(
        model={"size": "micro", "mixer": "mamba2", "mamba2_headdim": 32, "chunk_size": 16},
        data={"path": str(tiny_dataset), "seq_len": 32, "batch_size": 4},
        budget={"steps": 12}, eval={"every": 4, "batches": 2}, checkpoint={"every": 3},
        optim={"warmup_steps": 2}, deepspeed={"config": "zero2.json"}, seed=1,
    )  # fmt: skip
    a, b = train_killed_and_resumed(tmp_path, common, kill_after=7, steps=12)
    for x, y in zip(a, b):
        assert abs(x["train_loss"] - y["train_loss"]) < 1e-4, (x["step"], x["train_loss"], y["train_loss"])
        assert x["flops"] == y["flops"] and x["tokens"] == y["tokens"]
    assert abs(a[-1]["val_loss"] - b[-1]["val_loss"]) < 1e-4

    # a finished run is skipped: rerunning is a no-op that says so
    r = subprocess.run(_single(tmp_path / "broken.yaml"), cwd=REPO, env=train_env(), capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0 and "already finished" in r.stdout


@pytest.mark.parametrize(
    "patch, needle",
    [
        ({"model": {"mixer": "lstm"}}, "model.mixer='lstm' is unknown"),
        ({"budget": {"steps": 5, "tokens": 100}}, "exactly one of steps, tokens, flops"),
        ({"freeze": {"policy": "fixed", "steps": []}}, "freeze"),
        ({"init": {"kind": "xatl"}}, "init.source is required"),
        ({"optim": {"lr": -1}}, "optim.lr=-1"),
        ({"data": {"seq_lenn": 3}}, "data.seq_lenn"),
        ({"deepspeed": {"config": "zero9.json"}}, "deepspeed.config='zero9.json' not found"),
    ],
)
def test_bad_config_fails_before_any_work(tmp_path, capsys, patch, needle):
    from xatl_ds.train import main

    base = {"name": "bad", "out_dir": str(tmp_path / "out"), "data": {"path": str(tmp_path / "nodata")}}
    for k, v in patch.items():
        base.setdefault(k, {}).update(v)
    cfg = write_cfg(tmp_path / "bad.yaml", **base)
    assert main(["--config", str(cfg)]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists(), "a broken config must not half-start a run"
    assert not torch.distributed.is_initialized()


def test_flop_budget_ends_at_the_first_step_that_reaches_it(tmp_path, tiny_dataset):
    from xatl_ds.config import load_run_config
    from xatl_ds.flops import step_flops
    from xatl_ds.train import build_model

    cfg_d = dict(
        name="flops", out_dir=str(tmp_path / "run"), model={"size": "micro", "mixer": "retnet"},
        data={"path": str(tiny_dataset), "seq_len": 32, "batch_size": 4},
        eval={"every": 100, "batches": 1}, checkpoint={"every": 100}, deepspeed={"config": "zero0.json"},
    )  # fmt: skip
    model, _ = build_model(load_run_config(cfg_d), vocab_size=320)
    per_step = step_flops(model.config, 4, 32).total
    cfg_d["budget"] = {"flops": 4.5 * per_step}
    cfg = write_cfg(tmp_path / "run.yaml", **cfg_d)
    subprocess.run(_single(cfg), cwd=REPO, env=train_env(), check=True, capture_output=True, timeout=300)
    r = rows(tmp_path / "run")
    assert [x["step"] for x in r] == [1, 2, 3, 4, 5]
    assert r[-1]["flops"] == 5 * per_step and "val_loss" in r[-1]
