"""The one scheduler (xatl_ds.scheduler): a new kind of experiment is a planner that places
RunSpecs and hands them over; it writes no launch code. The runs here are a tiny fake trainer
(a script that writes metrics rows and DONE like the real one), so the tests exercise the
scheduling itself: dependencies, skip-if-done, failures, watching, lock waits, states."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from xatl_ds.rundir import RunDir
from xatl_ds.runspec import SOURCE_REF, place, source_spec
from xatl_ds.scheduler import STATES, Scheduler, SchedulerError, dir_state

FAKE_TRAINER = r'''
import json, os, sys, time, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
out = cfg["out_dir"]
os.makedirs(out, exist_ok=True)
with open(os.path.join(os.path.dirname(out), "order.txt"), "a") as f:
    f.write(cfg["name"] + "\n")
if cfg["seed"] == 13:
    sys.exit(3)  # a run that fails
steps = cfg["budget"]["steps"]
with open(os.path.join(out, "metrics.jsonl"), "a") as m:
    for step in range(1, steps + 1):
        time.sleep(0.02)
        m.write(json.dumps({"step": step, "val_loss": 5.0 - 0.1 * step}) + "\n"); m.flush()
open(os.path.join(out, "DONE"), "w").write("ok\n")
'''


def fake_command(tmp_path: Path):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    return lambda spec, config_path, opts: [sys.executable, str(script), str(config_path)]


def seed_planner(root: Path, seeds: list[int], steps: int = 4) -> list:
    """A whole new kind of experiment: one XATL run per seed from one source. It only plans."""
    base = {"model": {"size": "micro", "mixer": "mamba"}, "init": {"kind": "xatl", "source": SOURCE_REF},
            "data": {"path": "d", "seq_len": 8, "batch_size": 2}, "budget": {"steps": steps}}  # fmt: skip
    src = source_spec(root, base, {"model": {"size": "micro"}, "budget": {"steps": 2}})
    runs = [place(root, {**base, "seed": s}, f"seed{s}", sources={SOURCE_REF: src}) for s in seeds]
    return [src, *runs]


def test_a_new_planner_needs_no_launch_code(tmp_path):
    specs = seed_planner(tmp_path / "exp", [0, 1, 2])
    assert all(r.config.out_dir == str(r.out_dir) for r in specs), "placed runs carry a typed config"
    out = io.StringIO()
    res = Scheduler(command=fake_command(tmp_path), out=out, poll=0.02, max_parallel=2).run(specs)
    assert res.code == 0 and set(res.states.values()) == {"done"}
    order = (tmp_path / "exp" / "runs" / "order.txt").read_text().split()
    assert order[0] == "source", "the dependency ran before the runs that need it"
    for r in specs:
        assert RunDir(r.out_dir).is_done() and r.config_path == r.out_dir / "config.yaml"
        assert (tmp_path / "exp" / "logs" / f"{r.key}.log").is_file()
    # rerun: everything is skipped, nothing is launched
    res = Scheduler(command=fake_command(tmp_path), out=out, poll=0.02).run(specs)
    assert res.code == 0 and res.returncodes == {}
    assert (tmp_path / "exp" / "runs" / "order.txt").read_text().split() == order


def test_a_failed_dependency_skips_its_dependents(tmp_path):
    root = tmp_path / "exp"
    base = {"model": {"size": "micro"}, "data": {"path": "d", "seq_len": 8, "batch_size": 2}, "budget": {"steps": 2}}
    bad_src = place(root, {**base, "seed": 13}, "bad-source", role="source")
    child = place(root, {**base, "init": {"kind": "xatl", "source": SOURCE_REF}}, "child",
                  sources={SOURCE_REF: bad_src})  # fmt: skip
    other = place(root, {**base, "seed": 1}, "other")
    res = Scheduler(command=fake_command(tmp_path), out=io.StringIO(), poll=0.02).run([bad_src, child, other])
    assert res.code == 1 and sorted(res.failed) == ["bad-source", "child"]
    assert res.states == {bad_src.key: "failed", child.key: "failed", other.key: "done"}
    assert res.returncodes[bad_src.key] == 3 and child.key not in res.returncodes, "the child never started"
    assert set(res.states.values()) <= set(STATES)


def test_a_watch_stops_a_run_and_its_state_is_the_folders(tmp_path):
    (run,) = seed_planner(tmp_path / "exp", [0], steps=400)[1:]
    src = seed_planner(tmp_path / "exp", [0])[0]
    seen = []

    def watch(spec, row):
        seen.append(row["step"])
        return row["step"] >= 3

    sched = Scheduler(command=fake_command(tmp_path), out=io.StringIO(), poll=0.02, stop_grace=5)
    assert sched.run([src]).code == 0
    res = sched.run([run], deps={src.key: src}, watch=watch)
    assert res.stopped == [run.key] and res.code == 0
    assert res.states[run.key] == "partial" == dir_state(run), "stopped with metrics and no DONE"
    assert seen[:3] == [1, 2, 3] and not RunDir(run.out_dir).is_done()
    with pytest.raises(SchedulerError, match="needs .* which no planner gave"):
        sched.run([run])


def test_a_locked_run_is_not_started(tmp_path):
    (src,) = seed_planner(tmp_path / "exp", [])
    lock = RunDir(src.out_dir).acquire_lock()  # a live trainer (this process) holds the run
    try:
        res = Scheduler(command=fake_command(tmp_path), out=(out := io.StringIO()), lock_wait=0.2).run([src])
    finally:
        lock.release()
    assert res.code == 1 and res.states[src.key] == "failed" and "not started" in out.getvalue()
    assert not RunDir(src.out_dir).metrics.exists()


def test_a_slot_layout_the_node_cannot_hold_is_refused_up_front():
    from xatl_ds.executor import LaunchOptions

    with pytest.raises(SchedulerError, match="needs 6 devices"):
        Scheduler(LaunchOptions(num_gpus=2), max_parallel=3, n_devices=4)
    with pytest.raises(SchedulerError, match="max-parallel must be >= 1"):
        Scheduler(max_parallel=0)
