"""Optuna studies: parallel workers on one storage, pruning through metrics.jsonl, a worker
killed mid-trial (heartbeat -> FAIL -> retry), against sqlite and a real PostgreSQL server;
one real trial through the deepspeed launcher.

The plumbing tests replace the launcher by a tiny fake trial (``trial_command``): a script that
writes metrics rows like the trainer. Workers are forked processes (the package is already
imported here, so a worker costs no import time)."""
from __future__ import annotations

import glob
import json
import multiprocessing as mp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml

from conftest import REPO, train_env
from xatl_ds.config import load_run_config
from xatl_ds.tune import StudyError, Worker, load_study, open_study

FAKE_TRIAL = r'''
import json, os, sys, time, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
out = cfg["out_dir"]
os.makedirs(out, exist_ok=True)
with open(os.path.join(os.path.dirname(out), "invocations.txt"), "a") as f:
    f.write(f"{out} {os.getpid()}\n")
th, n, delay = cfg["freeze"]["threshold"], int(sys.argv[2]), float(sys.argv[3])
with open(os.path.join(out, "metrics.jsonl"), "w") as m:
    for step in range(1, n + 1):
        time.sleep(delay)
        row = {"step": step, "flops": 1e9 * step, "train_loss": 1.0}
        if step % 2 == 0:
            row["val_loss"] = 1.0 + 100 * th + 1.0 / step
        m.write(json.dumps(row) + "\n"); m.flush()
open(os.path.join(out, "DONE"), "w").write("ok\n")
'''


def study_dict(tmp_path: Path, storage: str, *, rows: int = 6, delay: float = 0.02, **extra) -> dict:
    script = tmp_path / "fake_trial.py"
    script.write_text(FAKE_TRIAL)
    d = {
        "study_name": "s", "storage": storage, "out_dir": str(tmp_path / "study"), "n_trials": 4,
        "base": {"model": {"size": "micro", "mixer": "retnet"}, "data": {"path": "d", "seq_len": 8, "batch_size": 2},
                 "budget": {"steps": rows}, "freeze": {"policy": "lit"}},
        "search_space": {
            "freeze.threshold": {"type": "float", "low": 0.001, "high": 0.05, "log": True},
            "freeze.patience": {"type": "int", "low": 1, "high": 3},
            "freeze.unfreeze_order": {"type": "categorical", "choices": {"all": "all", "staged": "norms > mlp > embed,lm_head"}},
            "init.components": {"type": "categorical", "choices": {"paper": ["embed", "lm_head", "mlp"], "embed": ["embed"]}},
        },
        "pruner": {"type": "none"}, "sampler": {"type": "tpe", "seed": 0},
        "heartbeat": {"interval": 1, "grace_period": 3, "max_retry": 1},
        "trial_command": ["{python}", str(script), "{config}", str(rows), str(delay)], "stop_grace": 5,
    }  # fmt: skip
    d.update(extra)
    return d


def _work(spec_dict: dict, n_trials: int | None, wid: str) -> None:
    Worker(load_study(spec_dict), worker_id=wid, poll=0.05, log=open(os.devnull, "w")).run(n_trials)


def fork_worker(spec_dict: dict, wid: str, n_trials: int | None = None) -> mp.Process:
    p = mp.get_context("fork").Process(target=_work, args=(spec_dict, n_trials, wid))
    p.start()
    return p


def trials(spec_dict: dict) -> list[optuna.trial.FrozenTrial]:
    return open_study(load_study(spec_dict)).get_trials()


# -- storages: sqlite and a throwaway PostgreSQL server ---------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server in a temp dir on a free loopback port; yields its base URL.
    initdb refuses root, so as root the server runs as the ``postgres`` user (or ``nobody``)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or ([shutil.which("initdb")] if shutil.which("initdb") else [])
    if not found:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    bindir = Path(found[-1]).parent
    base = Path(tempfile.mkdtemp(prefix="xatl-pg-"))
    preexec = None
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            user = pwd.getpwnam("nobody")
        os.chown(base, user.pw_uid, user.pw_gid)

        def preexec() -> None:
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)

    def run(*cmd: str) -> None:
        r = subprocess.run(cmd, cwd=base, preexec_fn=preexec, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{cmd}: {r.stdout[-2000:]}{r.stderr[-2000:]}"

    data, port = base / "data", _free_port()
    run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "-t", "60",
        "-o", f"-p {port} -h 127.0.0.1 -k {base} -c fsync=off", "start")  # fmt: skip
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgres"])
def storage(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    import psycopg2

    url = request.getfixturevalue("postgres_server")
    name = f"t{os.getpid()}_{time.time_ns() % 10**9}"
    conn = psycopg2.connect(url + "/postgres")
    conn.autocommit = True
    conn.cursor().execute(f"CREATE DATABASE {name}")
    conn.close()
    return f"{url}/{name}"


# -- plumbing ----------------------------------------------------------------------------------
def test_two_workers_share_the_trials(tmp_path, storage):
    d = study_dict(tmp_path, storage, n_trials=6)
    open_study(load_study(d))  # create it once, so the workers do not race on creation
    procs = [fork_worker(d, "w0"), fork_worker(d, "w1")]
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    ts = trials(d)
    done = [t for t in ts if t.state.name == "COMPLETE"]
    assert len(done) == 6, [(t.number, t.state.name, t.user_attrs) for t in ts]
    assert all(t.user_attrs.get("surplus") for t in ts if t.state.name != "COMPLETE")
    assert {t.user_attrs["worker"] for t in done} == {"w0", "w1"}, "both workers took trials"
    run_dirs = [t.user_attrs["run_dir"] for t in done]
    assert len(set(run_dirs)) == 6
    launched = [x.split()[0] for x in (tmp_path / "study" / "trials" / "invocations.txt").read_text().splitlines()]
    assert sorted(launched) == sorted(run_dirs), "every trial ran exactly once"
    for t in done:
        th = t.params["freeze.threshold"]
        assert t.value == pytest.approx(1.0 + 100 * th + 1.0 / 6)
        assert t.intermediate_values == {2: pytest.approx(1.5 + 100 * th), 4: pytest.approx(1.25 + 100 * th), 6: t.value}
    best = min(done, key=lambda t: t.value)
    cfg = load_run_config(tmp_path / "study" / "best.yaml")
    assert cfg.freeze.threshold == pytest.approx(best.params["freeze.threshold"])
    expect_comp = {"paper": ["embed", "lm_head", "mlp"], "embed": ["embed"]}[best.params["init.components"]]
    assert cfg.init.components == expect_comp, "categorical names map back to run config values"


def test_pruned_trial_is_stopped_and_recorded(tmp_path, storage):
    d = study_dict(tmp_path, storage, rows=200, delay=0.05, n_trials=2,
                   pruner={"type": "median", "n_startup_trials": 1, "n_warmup_steps": 0})  # fmt: skip
    study = open_study(load_study(d))
    study.enqueue_trial({"freeze.threshold": 0.001, "freeze.patience": 1, "freeze.unfreeze_order": "all", "init.components": "paper"})
    study.enqueue_trial({"freeze.threshold": 0.05, "freeze.patience": 1, "freeze.unfreeze_order": "all", "init.components": "paper"})
    d["trial_command"][3] = "8"  # the first trial is short
    Worker(load_study(d), poll=0.05, log=open(os.devnull, "w")).run(1)
    d["trial_command"][3] = "200"  # the second would take 10 s: pruned at its first val loss
    t0 = time.time()
    Worker(load_study(d), poll=0.05, log=open(os.devnull, "w")).run(2)
    assert time.time() - t0 < 8
    a, b = trials(d)
    assert a.state.name == "COMPLETE" and b.state.name == "PRUNED"
    assert list(b.intermediate_values) == [2]
    run_dir = Path(b.user_attrs["run_dir"])
    assert not (run_dir / "DONE").exists(), "the pruned run's process group was stopped"
    pid = int((run_dir.parent / "invocations.txt").read_text().splitlines()[-1].split()[1])
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_killed_worker_leaves_a_failed_trial_that_is_retried(tmp_path, storage):
    d = study_dict(tmp_path, storage, rows=400, delay=0.05, n_trials=1)
    open_study(load_study(d))
    p = fork_worker(d, "victim")
    inv = tmp_path / "study" / "trials" / "invocations.txt"
    deadline = time.time() + 60
    while not (inv.is_file() and list((tmp_path / "study" / "trials").glob("*/metrics.jsonl"))) and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    fake_pid = int(inv.read_text().split()[1])
    deadline = time.time() + 10
    while _alive(fake_pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(fake_pid), "the trial's process dies with its worker"
    (t,) = trials(d)
    assert t.state.name == "RUNNING"
    # a new worker waits out the grace period, fails the stale trial and runs its retry
    d["trial_command"][3] = "6"
    Worker(load_study(d), poll=0.05, log=open(os.devnull, "w")).run()
    first, retry = trials(d)
    assert first.state.name == "FAIL" and retry.state.name == "COMPLETE"
    assert retry.system_attrs.get("failed_trial") == 0
    assert retry.params == first.params and retry.user_attrs["run_dir"] == first.user_attrs["run_dir"]


def test_journal_storage_and_dead_local_worker(tmp_path):
    d = study_dict(tmp_path, f"journal:{tmp_path / 'journal.log'}", rows=400, delay=0.05, n_trials=2)
    open_study(load_study(d))
    p = fork_worker(d, "victim")
    inv = tmp_path / "study" / "trials" / "invocations.txt"
    deadline = time.time() + 60
    while not inv.is_file() and time.time() < deadline:
        time.sleep(0.1)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    d["trial_command"][3] = "4"
    Worker(load_study(d), poll=0.05, log=open(os.devnull, "w")).run()
    states = [t.state.name for t in trials(d)]
    assert states[0] == "FAIL" and states.count("COMPLETE") == 2, states


def test_bad_study_files(tmp_path):
    s = f"sqlite:///{tmp_path / 'x.db'}"
    bad = study_dict(tmp_path, s)
    bad["search_space"]["freeze.policy"] = {"type": "categorical", "choices": ["lit", "sometimes"]}
    with pytest.raises(StudyError, match=r"search_space.freeze.policy='sometimes'.*freeze.policy='sometimes' is unknown"):
        load_study(bad)
    bad = study_dict(tmp_path, s, objective={"metrics": ["val_loss", "flops_to_target"]})
    with pytest.raises(StudyError, match="target_loss"):
        load_study(bad)
    with pytest.raises(StudyError, match="pruner.type='sometimes'"):
        load_study(study_dict(tmp_path, s, pruner={"type": "sometimes"}))
    with pytest.raises(StudyError, match="log: true needs low > 0"):
        load_study(study_dict(tmp_path, s, search_space={"optim.lr": {"type": "float", "low": 0, "high": 1, "log": True}}))


def test_multi_objective_flops_to_target(tmp_path):
    d = study_dict(tmp_path, f"sqlite:///{tmp_path / 'mo.db'}", n_trials=2,
                   objective={"metrics": ["val_loss", "flops_to_target"], "target_loss": 1.6})  # fmt: skip
    Worker(load_study(d), poll=0.05, log=open(os.devnull, "w")).run()
    for t in trials(d):
        th = t.params["freeze.threshold"]
        # val loss at step s is 1 + 100 th + 1/s: the first eval (even step) at or under 1.6
        hit = [s for s in (2, 4, 6) if 1.0 + 100 * th + 1.0 / s <= 1.6]
        assert t.values[0] == pytest.approx(1.0 + 100 * th + 1 / 6)
        assert t.values[1] == (1e9 * hit[0] if hit else float("inf"))
    assert (tmp_path / "study" / "best.yaml").is_file()


# -- one real trial through the deepspeed launcher ------------------------------------------------
@pytest.mark.slow
def test_real_trial_reports_intermediate_values(tmp_path, tiny_dataset, monkeypatch):
    from xatl_ds.cli import main

    f = tmp_path / "study.yaml"
    f.write_text(yaml.safe_dump({
        "study_name": "real", "out_dir": str(tmp_path / "study"), "n_trials": 1,
        "base": {"model": {"size": "micro", "mixer": "retnet"}, "data": {"path": str(tiny_dataset), "seq_len": 32, "batch_size": 4},
                 "budget": {"steps": 8}, "eval": {"every": 2, "batches": 2}, "checkpoint": {"every": 100}},
        "search_space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 3e-3, "log": True}},
        "pruner": {"type": "median"},
    }))  # fmt: skip
    for k, v in train_env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(REPO)
    assert main(["tune", str(f), "--n-trials", "1", "--worker-id", "real0"]) == 0
    assert (tmp_path / "real.db").is_file(), "default storage: sqlite next to the YAML"
    (t,) = open_study(load_study(f)).get_trials()
    assert t.state.name == "COMPLETE", t
    rows = [json.loads(x) for x in (Path(t.user_attrs["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    vals = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    assert sorted(vals) == [2, 4, 6, 8]
    assert t.intermediate_values == pytest.approx(vals) and t.value == pytest.approx(vals[8])
    assert rows[0]["lr"] and load_run_config(tmp_path / "study" / "best.yaml").optim.lr == pytest.approx(t.params["optim.lr"])


def test_attention_placement_search(tmp_path):
    """``type: layers`` searches which k of n layers keep attention: every draw is k distinct
    layers with k in range, draws differ, and the stored params map back to the same list
    (what best.yaml gets)."""
    from xatl_ds.tune import params_to_values, suggest

    d = study_dict(tmp_path, f"sqlite:///{tmp_path / 'p.db'}")
    d["base"]["model"]["size"] = "tiny"  # 4 layers
    d["search_space"] = {"model.attention_layers": {"type": "layers", "n_layers": 4, "k_low": 1, "k_high": 3}}
    spec = load_study(d)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen = set()
    for _ in range(12):
        t = study.ask()
        layers = suggest(t, spec)["model.attention_layers"]
        assert 1 <= len(layers) <= 3 and layers == sorted(set(layers)) and all(0 <= i < 4 for i in layers)
        assert params_to_values(spec, t.params) == {"model.attention_layers": layers}
        seen.add(tuple(layers))
        study.tell(t, float(len(layers)))
    assert len(seen) >= 5
    with pytest.raises(StudyError, match="k_low <= k_high <= n_layers"):
        load_study({**d, "search_space": {"model.attention_layers": {"type": "layers", "n_layers": 2, "k_high": 3}}})
