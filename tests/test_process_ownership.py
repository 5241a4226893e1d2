"""A run is one process group that dies with whoever launched it, and one run directory is
never trained by two processes: kills (SIGTERM and SIGKILL) of ``xatl-ds train``, of a sweep
launcher and of an Optuna worker leave no trainer behind, and the rerun resumes exactly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, train_env

pytestmark = pytest.mark.slow
XATL = str(Path(sys.executable).parent / "xatl-ds")
STEPS = 300


def run_config(tmp_path: Path, data: Path, name: str = "victim", **extra) -> dict:
    cfg = {
        "name": name, "out_dir": str(tmp_path / name), "model": {"size": "micro", "mixer": "retnet"},
        "data": {"path": str(data), "seq_len": 32, "batch_size": 4}, "budget": {"steps": STEPS},
        "eval": {"every": 50, "batches": 1}, "checkpoint": {"every": 5, "keep": 1},
        "deepspeed": {"config": "zero0.json"}, "optim": {"warmup_steps": 2},
    }  # fmt: skip
    cfg.update(extra)
    return cfg


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def processes_with(marker: str) -> list[int]:
    """Live (non-zombie) processes whose command line mentions ``marker``."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            if marker in (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                if (p / "stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z":
                    pids.append(int(p.name))
        except OSError:
            continue
    return pids


def wait_for(cond, timeout: float, what: str, poll: float = 0.05) -> None:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


def steps_logged(run_dir: Path) -> list[int]:
    p = run_dir / "metrics.jsonl"
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            break
    return out


def assert_no_orphans(marker: str, timeout: float = 15.0) -> None:
    wait_for(lambda: not processes_with(marker), timeout, f"every process of {marker} to end")


def assert_resumes_exactly(cmd: list[str], run_dir: Path, logs: Path | None = None) -> None:
    """``cmd`` finishes the run in ``run_dir`` from where it was killed; on failure the message
    carries what the command and the run logs under ``logs`` said (CI keeps no tmp folders)."""
    before = steps_logged(run_dir)
    r = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600)
    said = r.stdout[-3000:] + r.stderr[-3000:]
    if logs is not None and logs.is_dir():
        said += "".join(f"\n== {p.name}\n{p.read_text()[-2500:]}" for p in sorted(logs.glob("*.log")))
    assert r.returncode == 0, said
    steps = steps_logged(run_dir)
    assert steps == list(range(1, STEPS + 1)), f"each step logged exactly once, in order; the command said:\n{said}"
    assert 0 < len(before) < STEPS, "the kill happened mid-run"
    assert (run_dir / "DONE").is_file()


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=train_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_train_killed_leaves_no_rank_and_resumes(tmp_path, tiny_dataset, sig):
    cfg = write(tmp_path / "run.yaml", run_config(tmp_path, tiny_dataset))
    run_dir = tmp_path / "victim"
    proc = start([XATL, "train", str(cfg)], tmp_path / "log1")
    wait_for(lambda: len(steps_logged(run_dir)) >= 6, 300, "training to start")
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert_no_orphans(str(cfg))
    assert not (run_dir / "DONE").exists()
    assert_resumes_exactly([XATL, "train", str(cfg)], run_dir)


def test_second_launch_of_a_live_run_is_refused(tmp_path, tiny_dataset):
    cfg = write(tmp_path / "run.yaml", run_config(tmp_path, tiny_dataset, budget={"steps": 100_000}))
    run_dir = tmp_path / "victim"
    first = start([XATL, "train", str(cfg)], tmp_path / "log1")
    try:
        wait_for(lambda: len(steps_logged(run_dir)) >= 2, 300, "training to start")
        r = subprocess.run([XATL, "train", str(cfg)], cwd=REPO, env=train_env(), capture_output=True, text=True,
                           timeout=120)  # fmt: skip
        assert r.returncode == 3 and "is being trained by pid" in r.stderr, r.stderr[-2000:]
        # the trainer itself refuses too (a launch that raced past the launcher's check)
        r = subprocess.run([sys.executable, "-m", "xatl_ds.train", "--config", str(cfg)], cwd=REPO, env=train_env(),
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        assert r.returncode == 3 and "is being trained by pid" in r.stderr, r.stderr[-2000:]
        assert first.poll() is None, "the live run was not disturbed"
        steps = steps_logged(run_dir)
        assert steps == list(range(1, len(steps) + 1)), "one writer"
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)
    assert_no_orphans(str(cfg))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_sweep_launcher_killed_leaves_no_orphan_and_no_double_training(tmp_path, tiny_dataset, sig):
    sweep = {"name": "k", "out_dir": str(tmp_path / "sw"), "base": run_config(tmp_path, tiny_dataset),
             "axes": {"seed": [0]}}  # fmt: skip
    del sweep["base"]["name"], sweep["base"]["out_dir"]
    f = write(tmp_path / "sweep.yaml", sweep)
    runs_root = tmp_path / "sw" / "runs"
    proc = start([XATL, "sweep", "run", str(f)], tmp_path / "log1")

    def run_dir() -> Path | None:
        found = list(runs_root.glob("s0-*")) if runs_root.is_dir() else []
        return found[0] if found else None

    wait_for(lambda: run_dir() is not None and len(steps_logged(run_dir())) >= 6, 300, "the sweep's run to train")
    proc.send_signal(sig)  # the sweep launcher stops or dies: its run must not keep training on its own
    proc.wait(timeout=60)
    assert_no_orphans(str(tmp_path / "sw" / "runs"))
    assert_resumes_exactly([XATL, "sweep", "run", str(f)], run_dir())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_tune_worker_killed_leaves_no_rank(tmp_path, tiny_dataset, sig):
    base = run_config(tmp_path, tiny_dataset)
    del base["name"], base["out_dir"]
    study = {"study_name": "k", "storage": f"sqlite:///{tmp_path / 'k.db'}", "out_dir": str(tmp_path / "study"),
             "n_trials": 1, "base": base, "pruner": {"type": "none"},
             "search_space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 2e-3}},
             "heartbeat": {"interval": 1, "grace_period": 3, "max_retry": 1}}  # fmt: skip
    f = write(tmp_path / "study.yaml", study)
    trial = tmp_path / "study" / "trials" / "0000"
    proc = start([XATL, "tune", str(f), "--worker-id", "victim"], tmp_path / "log1")
    wait_for(lambda: len(steps_logged(trial)) >= 6, 300, "the trial to train")
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert_no_orphans(str(tmp_path / "study" / "trials"))
    # a new worker fails the stale trial and retries it in the same folder, resuming it
    assert_resumes_exactly([XATL, "tune", str(f), "--worker-id", "second"], trial, logs=tmp_path / "study" / "logs")
