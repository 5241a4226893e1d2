"""TensorBoard / W&B mirrors of metrics.jsonl (xatl_ds/monitor.py): every metric of every row
is found again in the event files, read back with TensorBoard's own EventAccumulator."""
from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from conftest import REPO, build_tiny_source, train_env

pytest.importorskip("tensorboard")


def _events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}
    texts = {}
    for t in acc.Tags()["tensors"]:  # add_text is stored as a string tensor
        tag = t.removesuffix("/text_summary")
        texts[tag] = {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(t)}
    return scalars, texts


def _expected(rows: list[dict]) -> tuple[set[str], set[str]]:
    """Scalar and text tags a row set must produce (the mapping of the module docstring)."""
    scalars, texts = set(), set()
    for r in rows:
        for k, v in r.items():
            if k == "step":
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                scalars.add(k)
            elif isinstance(v, dict):
                scalars |= {f"{k}/{s}" for s, x in v.items() if isinstance(x, (int, float))}
                if not all(isinstance(x, (int, float)) for x in v.values()):
                    texts.add(k)
            elif isinstance(v, list):
                texts.add(k)
                scalars.add(f"{k}/stage")
            else:
                texts.add(k)
    return scalars, texts


ROWS = [
    {"step": 1, "tokens": 128, "train_loss": 6.5, "lr": {"0": 0.0, "1": 1e-3}, "trainable_params": 1000,
     "freeze_stage": 0, "flops": 1.5e9, "wall_time": 0.4, "tokens_per_s": 320.0, "teacher_val_loss": 5.9,
     "kernel_paths": {"retnet": "torch"}},
    {"step": 2, "tokens": 256, "train_loss": 6.1, "lr": {"0": 2e-4, "1": 1e-3}, "trainable_params": 5000,
     "freeze_stage": 1, "flops": 3.5e9, "wall_time": 0.8, "tokens_per_s": 330.0, "val_loss": 6.0,
     "unfreeze": [{"step": 2, "stage": 1, "components": ["mlp"], "rule": "fixed"}]},
    {"step": 3, "tokens": 384, "align_loss": 0.25, "lr": {"align": 1e-3}, "trainable_params": 5000,
     "freeze_stage": 1, "flops": 5.5e9, "wall_time": 1.2, "tokens_per_s": 331.0,
     "align_end": {"step": 3, "rule": "steps", "align_loss": 0.25}},
]  # fmt: skip


def test_every_metric_reaches_tensorboard(tmp_path):
    from xatl_ds.config import load_run_config
    from xatl_ds.monitor import TENSORBOARD_DIR, open_metrics
    from xatl_ds.rundir import RunDir

    rd = RunDir(tmp_path / "run")
    rd.start_metrics()
    cfg = load_run_config({"name": "m", "out_dir": str(rd.path)})
    f = open_metrics(rd, cfg)
    for r in ROWS:
        line = json.dumps(r) + "\n"
        f.write(line[:10])  # the trainer writes whole lines; a split one must still count once
        f.write(line[10:])
        f.flush()
    f.close()
    assert rd.read_metrics() == ROWS, "metrics.jsonl is written unchanged"
    scalars, texts = _events(rd.path / TENSORBOARD_DIR)
    want_s, want_t = _expected(ROWS)
    assert want_s <= set(scalars), sorted(want_s - set(scalars))
    assert want_t <= set(texts), sorted(want_t - set(texts))
    for r in ROWS:  # value by value, at the row's step
        for k in ("train_loss", "val_loss", "flops", "tokens", "freeze_stage"):
            if k in r:
                assert scalars[k][r["step"]] == pytest.approx(r[k], rel=1e-6), k
    assert scalars["lr/1"] == {1: pytest.approx(1e-3), 2: pytest.approx(1e-3)}
    assert scalars["unfreeze/stage"] == {2: 1.0}
    assert '"components": ["mlp"]' in texts["unfreeze"][2]


def test_resume_purges_the_steps_done_again(tmp_path):
    """A resumed run rewrites the steps after its checkpoint: TensorBoard shows each once."""
    from xatl_ds.monitor import TensorBoardMonitor

    first = TensorBoardMonitor(tmp_path, first_step=1)
    for s in (1, 2, 3, 4):
        first.log({"step": s, "train_loss": 10.0 + s})
    first.close()
    again = TensorBoardMonitor(tmp_path, first_step=3)  # checkpoint at step 2
    for s in (3, 4, 5):
        again.log({"step": s, "train_loss": 20.0 + s})
    again.close()
    scalars, _ = _events(tmp_path)
    assert scalars["train_loss"] == {1: 11.0, 2: 12.0, 3: 23.0, 4: 24.0, 5: 25.0}


def test_tensorboard_off_and_wandb_behind_a_field(tmp_path, monkeypatch):
    from xatl_ds.config import ConfigError, load_run_config
    from xatl_ds.monitor import MonitorError, open_monitors

    off = load_run_config({"log": {"tensorboard": False}})
    assert open_monitors(off, tmp_path) == []
    assert off.content_hash() == load_run_config({}).content_hash(), "logging is not part of a run's identity"
    with pytest.raises(ConfigError, match="log.wandb_mode='cloud' is unknown"):
        load_run_config({"log": {"wandb_project": "p", "wandb_mode": "cloud"}})

    cfg = load_run_config({"name": "wb", "log": {"tensorboard": False, "wandb_project": "xatl", "wandb_mode": "offline"}})
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(MonitorError, match="pip install wandb"):
        open_monitors(cfg, tmp_path)

    calls = []

    class Run:
        def log(self, d, step):
            calls.append((step, d))

        def finish(self):
            calls.append("finish")

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(kw) or Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    (m,) = open_monitors(cfg, tmp_path / "run")
    for r in ROWS:
        m.log(r)
    m.close()
    init = calls[0]
    assert init["project"] == "xatl" and init["mode"] == "offline" and init["name"] == "wb"
    assert init["resume"] == "allow" and init["config"]["log"]["wandb_project"] == "xatl"
    assert calls[2][0] == 2 and calls[2][1]["val_loss"] == 6.0 and calls[2][1]["lr/0"] == 2e-4
    assert calls[-1] == "finish"


def test_a_real_run_writes_its_metrics_to_tensorboard(tmp_path, tiny_dataset):
    """The trainer's hook: one XATL run with an unfreeze, through the trainer; every column of
    its metrics.jsonl is in its event files, and replay() rebuilds the same from the file."""
    from xatl_ds.monitor import TENSORBOARD_DIR, replay

    src = tmp_path / "src"
    build_tiny_source("neox").save_pretrained(src)
    out = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(dict(
        name="tb", out_dir=str(out), model={"mixer": "retnet"}, init={"kind": "xatl", "source": str(src)},
        freeze={"policy": "fixed", "unfreeze_order": [["all"]], "steps": [2]},
        data={"path": str(tiny_dataset), "seq_len": 32, "batch_size": 4}, budget={"steps": 4},
        eval={"every": 2, "batches": 1}, checkpoint={"every": 100}, deepspeed={"config": "zero0.json"},
    )))  # fmt: skip
    subprocess.run([sys.executable, "-m", "xatl_ds.train", "--config", str(cfg)], cwd=REPO, env=train_env(),
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("unfreeze" in r for r in rows) and any("val_loss" in r for r in rows)
    want_s, want_t = _expected(rows)
    for log_dir in (out / TENSORBOARD_DIR, replay(out, tmp_path / "replayed")):
        scalars, texts = _events(log_dir)
        assert want_s <= set(scalars), sorted(want_s - set(scalars))
        assert want_t <= set(texts), sorted(want_t - set(texts))
        assert {s: scalars["val_loss"][s] for s in scalars["val_loss"]} == {
            r["step"]: pytest.approx(r["val_loss"]) for r in rows if "val_loss" in r
        }
