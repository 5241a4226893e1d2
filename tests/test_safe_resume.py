"""Resuming never executes code from a checkpoint: every file is read with
torch.load(weights_only=True) and an allow-list; a tampered one is a named error, and the
payload does not run. An untampered resume stays exact."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, train_env

PY = sys.executable


class Payload:
    """Unpickling this runs a shell command that creates ``marker``: the attack of issue 11."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def tamper(path: Path, marker: Path) -> None:
    """Rewrite a checkpoint file with one extra key holding the payload (plain torch.save)."""
    from xatl_ds.safe_load import safe_load

    state = safe_load(path)
    state["evil"] = Payload(marker)
    torch.save(state, path)


# -- the loader ---------------------------------------------------------------------------
def test_payload_is_live_but_safe_load_refuses_it(tmp_path):
    from xatl_ds.safe_load import CheckpointError, SafeLoadingCheckpointEngine, safe_load

    live, guarded = tmp_path / "ran_unsafe", tmp_path / "ran_safe"
    torch.save({"w": torch.ones(2), "evil": Payload(live)}, tmp_path / "a.pt")
    torch.load(tmp_path / "a.pt", weights_only=False)  # what DeepSpeed's loaders do
    assert live.exists(), "the payload must be live, or the test below proves nothing"

    f = tmp_path / "ckpt" / "b.pt"
    f.parent.mkdir()
    torch.save({"w": torch.ones(2), "evil": Payload(guarded)}, f)
    for load in (safe_load, SafeLoadingCheckpointEngine(None).load):
        with pytest.raises(CheckpointError) as e:
            load(str(f))
        msg = str(e.value)
        assert str(f) in msg and "outside the allow-list" in msg and "system" in msg
        assert f"Delete the checkpoint folder {f.parent}" in msg and "weights_only=False" not in msg
    assert not guarded.exists()


def test_corrupt_file_is_a_named_error(tmp_path):
    from xatl_ds.safe_load import CheckpointError, safe_load

    f = tmp_path / "x.pt"
    torch.save({"w": torch.ones(100)}, f)
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="x.pt could not be read as a torch checkpoint .*zip archive.*Delete the checkpoint folder"):
        safe_load(f)


def test_allow_list_covers_deepspeed_objects_and_is_needed(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from xatl_ds.safe_load import safe_load

    state = {"zero_stage": ZeroStageEnum.gradients, "loss_scaler": LossScaler(1.0),
             "fp16_scaler": DynamicLossScaler(2.0**16, 1000, 1.0, 2, False),
             "param_slice_mappings": [{"w": fragment_address(numel=4, start=8)}]}  # fmt: skip
    torch.save(state, tmp_path / "s.pt")
    with pytest.raises(Exception, match="ZeroStageEnum"):  # not allowed by torch's defaults
        torch.load(tmp_path / "s.pt", weights_only=True)
    back = safe_load(tmp_path / "s.pt")
    assert back["zero_stage"] is ZeroStageEnum.gradients and back["loss_scaler"].cur_scale == 1.0
    assert back["fp16_scaler"].cur_scale == 2.0**16 and back["fp16_scaler"].dtype == torch.half
    assert back["param_slice_mappings"][0]["w"] == fragment_address(numel=4, start=8)


def test_module_loads_are_routed_and_restored(tmp_path):
    from xatl_ds.safe_load import CheckpointError, safe_torch_loads_in

    mod = types.ModuleType("fake_ds_module")
    mod.torch = torch
    exec("def read(p):\n    return torch.load(p, map_location='cpu', weights_only=False)", mod.__dict__)
    torch.save({"evil": Payload(tmp_path / "ran")}, tmp_path / "e.pt")
    torch.save({"w": torch.arange(3)}, tmp_path / "ok.pt")
    with safe_torch_loads_in(mod):
        assert mod.torch.float32 is torch.float32  # everything but load is the real torch
        assert torch.equal(mod.read(tmp_path / "ok.pt")["w"], torch.arange(3))
        with pytest.raises(CheckpointError, match="e.pt contains a pickled object"):
            mod.read(tmp_path / "e.pt")
    assert mod.torch is torch and not (tmp_path / "ran").exists()


def test_resume_tag_skips_a_deleted_checkpoint(tmp_path):
    from xatl_ds.checkpoint import resume_tag

    ck = tmp_path / "checkpoints"
    assert resume_tag(ck) is None
    for tag in ("step00000002", "step00000004", "step00000008"):
        (ck / tag).mkdir(parents=True)
        (ck / tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    (ck / "latest").write_text("step00000004")
    assert resume_tag(ck) == "step00000004"
    (ck / "latest").write_text("step00000006")  # deleted as the error message advises
    assert resume_tag(ck) == "step00000004", "the previous one, never the unfinished step00000008"
    (ck / "latest").write_text("step00000001")
    assert resume_tag(ck) is None
    (ck / "latest").write_text("")  # a save cut while writing latest: not the checkpoints folder itself
    assert resume_tag(ck) == "step00000004", "the newest folder but one: the newest may be the cut save"
    for tag in ("step00000002", "step00000004"):
        shutil.rmtree(ck / tag)
    assert resume_tag(ck) is None


# -- a real run, tampered and resumed -------------------------------------------------------
SPY = """
import json, os, runpy, sys, torch
_load, _log = torch.load, open(os.environ["LOAD_LOG"], "a")
def _spy(f, *a, **k):
    _log.write(json.dumps({"file": str(f), "weights_only": k.get("weights_only"), "mmap": k.get("mmap")}) + "\\n")
    _log.flush()
    return _load(f, *a, **k)
torch.load = _spy
sys.argv[0] = "xatl_ds.train"
runpy.run_module("xatl_ds.train", run_name="__main__")
"""


def _train(cfg: Path, spy_log: Path | None = None) -> subprocess.CompletedProcess:
    env = train_env()
    if spy_log is None:
        cmd = [PY, "-m", "xatl_ds.train", "--config", str(cfg)]
    else:
        cmd = [PY, "-c", SPY, "--config", str(cfg)]
        env["LOAD_LOG"] = str(spy_log)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("stage, victim", [(0, "mp_rank_00_model_states.pt"),
                                           (2, "zero_pp_rank_0_mp_rank_00_optim_states.pt")])  # fmt: skip
def test_tampered_checkpoint_is_refused_and_resume_stays_exact(stage, victim, tmp_path, tiny_dataset):
    from xatl_ds.checkpoint import CheckpointError, consolidated_state_dict

    out = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(dict(
        name=f"safe{stage}", out_dir=str(out), seed=2, model={"size": "micro", "mixer": "retnet"},
        data={"path": str(tiny_dataset), "seq_len": 32, "batch_size": 4}, budget={"steps": 6},
        eval={"every": 3, "batches": 1}, checkpoint={"every": 2, "keep": 3}, optim={"warmup_steps": 1},
        deepspeed={"config": f"zero{stage}.json"},
    )))  # fmt: skip
    r = _train(cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    uninterrupted = _rows(out)
    ck = out / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step00000006"

    # tamper with the checkpoint a resume reads, and make the run resumable
    marker = tmp_path / "PAYLOAD_RAN"
    bad = ck / "step00000006" / victim
    tamper(bad, marker)
    (out / "DONE").unlink()
    r = _train(cfg)
    assert not marker.exists(), "the payload ran"
    assert r.returncode != 0
    assert f"{bad} contains a pickled object outside the allow-list" in r.stderr, r.stderr[-3000:]
    assert _rows(out) == uninterrupted, "a refused resume must not touch the run"
    with pytest.raises(CheckpointError, match=re.escape(str(bad))):
        consolidated_state_dict(ck, "step00000006")
    assert not marker.exists()

    # the advised fix: delete the folder; the run resumes from step 4 and ends where it did
    shutil.rmtree(ck / "step00000006")
    log = tmp_path / "loads.jsonl"
    r = _train(cfg, spy_log=log)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = _rows(out)
    assert [x["step"] for x in resumed] == list(range(1, 7))
    for a, b in zip(uninterrupted, resumed):
        assert a["train_loss"] == b["train_loss"] and a.get("val_loss") == b.get("val_loss"), (a, b)
    assert (out / "DONE").is_file() and not marker.exists()

    loads = [json.loads(x) for x in log.read_text().splitlines()]
    assert loads and all(x["weights_only"] is True for x in loads), loads
    step4 = {Path(x["file"]).name for x in loads if "step00000004" in x["file"] and not x["mmap"]}
    expected = {"mp_rank_00_model_states.pt"} | ({victim} if stage else set())
    assert expected <= step4, f"DeepSpeed's own reads of step 4 must go through the safe loader: {step4}"

    calls = []
    real_load = torch.load

    def spy(*a, **k):
        calls.append(k.get("weights_only"))
        return real_load(*a, **k)

    torch.load = spy
    try:
        sd = consolidated_state_dict(ck)
    finally:
        torch.load = real_load
    assert calls and all(c is True for c in calls), calls
    from safetensors.torch import load_file

    exported = load_file(out / "hf" / "model.safetensors")
    assert set(sd) >= set(exported) and all(torch.equal(sd[k], exported[k].float()) for k in exported)
