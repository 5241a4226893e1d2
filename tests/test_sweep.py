"""Sweeps: grid expansion (axes, zip groups, presets, the @source placeholder), validation
before launch, dry-run commands, GPU slot options, the shipped sweep files, the index and
status, and one real sweep through the deepspeed launcher that is interrupted and resumed."""
from __future__ import annotations

import io
import json
import os
import shlex
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, train_env
from xatl_ds.config import load_run_config
from xatl_ds.executor import LaunchOptions, deepspeed_command
from xatl_ds.scheduler import SchedulerError, slot_options
from xatl_ds.sweep import SOURCE_REF, Index, SweepError, expand, format_table, load_sweep, run_sweep, status_rows

SWEEPS = sorted((REPO / "sweeps").glob("*.yaml")) + sorted((REPO / "sweeps" / "studies").glob("*.yaml"))


def sweep_dict(root: Path, data: str = "runs/data/x", **extra) -> dict:
    d = {
        "name": "t", "out_dir": str(root),
        "source": {"model": {"size": "micro"}, "budget": {"steps": 5}},
        "base": {"model": {"size": "micro"}, "init": {"source": SOURCE_REF},
                 "data": {"path": data, "seq_len": 32, "batch_size": 4}, "budget": {"flops": 1.0e12}},
        "axes": {
            "arch": {"zip": {"model.mixer": ["mamba", "retnet"], "model.attention_layers": ["none", [1]]}},
            "init": [{"label": "scratch", "init.kind": "scratch"},
                     {"label": "xatl-lit", "init.kind": "xatl", "freeze.policy": "lit"}],
            "seed": [0, 1],
        },
    }  # fmt: skip
    d.update(extra)
    return d


def test_expand_grid_zip_presets_and_source(tmp_path):
    sw = load_sweep(sweep_dict(tmp_path / "sw"))
    runs = expand(sw)
    assert len(runs) == 1 + 2 * 2 * 2 and runs[0].is_source
    src = runs[0]
    assert src.config.model.mixer == "attention" and src.config.init.kind == "scratch"
    assert src.config.data.seq_len == 32, "the source inherits data from base"
    names = [r.name for r in runs[1:]]
    assert names[:4] == ["mamba-scratch-s0", "mamba-scratch-s1", "mamba-xatl-lit-s0", "mamba-xatl-lit-s1"]
    assert "retnet-attn1-xatl-lit-s1" in names
    for r in runs[1:]:
        c = r.config
        if c.init.kind == "xatl":
            assert r.needs_source and c.init.source == str(src.out_dir / "hf")
        else:
            assert c.init.source is None and not r.needs_source
        assert c.budget.flops == 1.0e12, "one FLOP budget for every run: compute-matched"
        assert c.content_hash() == r.id and load_run_config(c.to_dict()) == c
        assert Path(c.out_dir) == r.out_dir and r.out_dir.parent == sw.root / "runs"
    assert len({r.id for r in runs}) == len(runs) and len({r.out_dir for r in runs}) == len(runs)
    assert [r.id for r in expand(load_sweep(sweep_dict(tmp_path / "sw")))] == [r.id for r in runs], "ids are stable"
    # a different source changes the id of every run that transfers from it
    other = sweep_dict(tmp_path / "sw")
    other["source"]["budget"] = {"steps": 6}
    changed = {r.name: r.id for r in expand(load_sweep(other))}
    for r in runs[1:]:
        assert (changed[r.name] != r.id) == r.needs_source, r.name
    for r in runs:
        assert r.write_config() == r.out_dir / "config.yaml", "the run folder holds the only copy"
        assert load_run_config(r.config_path) == r.config


def test_bad_combination_fails_before_anything_starts(tmp_path):
    d = sweep_dict(tmp_path / "sw")
    d["axes"]["arch"]["zip"]["model.mixer"] = ["mamba", "lstm"]
    with pytest.raises(SweepError, match=r"run lstm-attn1-scratch-s0: model.mixer='lstm'"):
        run_sweep(load_sweep(d), out=io.StringIO())
    assert not (tmp_path / "sw").exists(), "nothing may be written or launched"
    with pytest.raises(SweepError, match="zipped keys need equal lengths"):
        load_sweep(sweep_dict(tmp_path, axes={"a": {"zip": {"model.mixer": ["mamba"], "seed": [0, 1]}}}))
    with pytest.raises(SweepError, match="no source: section"):
        expand(load_sweep(sweep_dict(tmp_path, source=None)))
    with pytest.raises(SweepError, match="identical configs"):
        expand(load_sweep(sweep_dict(tmp_path, axes={"model.d_conv": [4, 4.0]})))
    with pytest.raises(SweepError, match="batch_size=4 is not divisible by the 3 ranks"):
        expand(load_sweep(sweep_dict(tmp_path)), world_size=3)


def test_dry_run_prints_the_exact_commands(tmp_path, tiny_dataset):
    sw = load_sweep(sweep_dict(tmp_path / "sw", data=str(tiny_dataset), launch={"num_gpus": 2}))
    buf = io.StringIO()
    hosts = str(tmp_path / "hosts")  # a dry run checks the hostfile as the launcher would
    Path(hosts).write_text("localhost slots=2\n")
    assert run_sweep(sw, LaunchOptions(hostfile=hosts, launcher="slurm"), dry_run=True, out=buf) == 0
    cmds = [shlex.split(x) for x in buf.getvalue().splitlines() if not x.startswith("#")]
    runs = expand(sw)
    opts = LaunchOptions(num_gpus=2, hostfile=hosts, launcher="slurm")
    # the same commands, with the configs in a temporary folder: they run as printed
    assert [c[:-1] for c in cmds] == [deepspeed_command(r.config_path, opts)[:-1] for r in runs]
    for c, r in zip(cmds, runs):
        assert c[-2] == "--config" and yaml.safe_load(Path(c[-1]).read_text()) == r.config.to_dict()
        assert not Path(c[-1]).is_relative_to(tmp_path)
    assert cmds[0][1:5] == ["--hostfile", hosts, "--launcher", "slurm"] and "--num_gpus" in cmds[0]
    assert not (tmp_path / "sw").exists()


def test_slot_options_pin_devices_and_ports():
    opts = LaunchOptions(num_gpus=2, master_port=29600)
    a, b = slot_options(opts, 0, 2, 4), slot_options(opts, 1, 2, 4)
    assert (a.include, b.include) == ("localhost:0,1", "localhost:2,3")
    assert (a.master_port, b.master_port) == (29600, 29601)
    cmd = deepspeed_command("x.yaml", b)
    assert "--include" in cmd and "--num_gpus" not in cmd
    cpu = slot_options(LaunchOptions(), 1, 2, 0)
    # no port given: none is fixed per slot, each launch takes a free one (issue 11: 29500 collided)
    assert cpu.include is None and cpu.master_port is None
    from xatl_ds.executor import with_port

    p1, p2 = with_port(cpu).master_port, with_port(cpu).master_port
    assert p1 and p2 and with_port(LaunchOptions(master_port=29600)).master_port == 29600
    with pytest.raises(SchedulerError, match="needs 6 devices"):
        slot_options(LaunchOptions(num_gpus=2), 0, 3, 4)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_shipped_sweep_files_validate(path):
    """Every YAML in sweeps/ loads and every run config it expands to validates."""
    data = yaml.safe_load(path.read_text())
    if "search_space" in data:
        from xatl_ds.tune import load_study

        spec = load_study(path)  # validates the base with every parameter's extremes and choices
        assert spec.n_trials > 0 and spec.search_space
        return
    runs = expand(load_sweep(path))
    assert len(runs) > 1
    expected = {"quickstart.yaml": 7, "pythia_paper.yaml": 24, "scaling.yaml": 60}
    if path.name in expected:
        assert len(runs) == expected[path.name]
    kinds = {r.config.init.kind for r in runs if not r.is_source}
    assert kinds == {"scratch", "xatl"}, f"{path.name}: XATL vs scratch"


def test_shipped_sweeps_are_compute_matched():
    for name in ("quickstart.yaml", "pythia_paper.yaml", "scaling.yaml"):
        runs = [r for r in expand(load_sweep(REPO / "sweeps" / name)) if not r.is_source]
        by_size: dict[str, set] = {}
        for r in runs:
            assert r.config.budget.flops, f"{name}: {r.name} has no FLOP budget"
            by_size.setdefault(r.config.model.size, set()).add(r.config.budget.flops)
        assert all(len(v) == 1 for v in by_size.values()), (name, by_size)


def test_index_and_status(tmp_path):
    sw = load_sweep(sweep_dict(tmp_path / "sw", axes={"model.mixer": ["mamba", "retnet"]}, source=None,
                               base={"model": {"size": "micro"}, "data": {"path": "d", "seq_len": 8, "batch_size": 2},
                                     "budget": {"steps": 3}}))  # fmt: skip
    a, b = expand(sw)
    for r in (a, b):
        r.out_dir.mkdir(parents=True)
    (a.out_dir / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "val_loss": 3.5}\n{"step": 3}\n{"ste')
    (a.out_dir / "DONE").write_text("x")
    (b.out_dir / "metrics.jsonl").write_text('{"step": 1, "val_loss": 4.0}\n')
    idx = Index(sw, [a, b])
    idx.update(b, state="running", pid=2**22 + 12345, returncode=None)  # a dead pid: the run was killed
    rows = {r["name"]: r for r in status_rows(sw)}
    assert rows["mamba"]["state"] == "done" and rows["mamba"]["steps"] == 3 and rows["mamba"]["val_loss"] == 3.5
    assert rows["retnet"]["state"] == "failed" and rows["retnet"]["steps"] == 1
    csv_text = (sw.root / "index.csv").read_text()
    assert csv_text.splitlines()[0].startswith("id,name,key,config,out_dir,state,returncode")
    assert json.loads((sw.root / "sweep.json").read_text())["runs"][1]["pid"] == 2**22 + 12345
    table = format_table(list(rows.values()), ["name", "state", "steps", "val_loss"])
    assert "3.5000" in table and "failed" in table


# -- one real sweep through the launcher: Ctrl-C, then rerun to finish, then rerun to skip ---------
@pytest.mark.slow
def test_real_sweep_interrupt_resume_skip(tmp_path, tiny_dataset, monkeypatch, capsys):
    """In-process (the package is imported already); a watcher thread plays Ctrl-C."""
    from xatl_ds.cli import main as cli_main

    def main(argv: list[str]) -> int:
        return cli_main(["sweep", *argv])

    f = tmp_path / "sweep.yaml"
    f.write_text(yaml.safe_dump({
        "name": "e2e", "out_dir": str(tmp_path / "root"),
        "source": {"model": {"size": "micro"}, "budget": {"steps": 120}, "checkpoint": {"every": 10, "keep": 1}},
        "base": {"model": {"size": "micro", "mixer": "retnet"}, "init": {"kind": "xatl", "source": SOURCE_REF},
                 "data": {"path": str(tiny_dataset), "seq_len": 32, "batch_size": 4}, "budget": {"steps": 6},
                 "freeze": {"policy": "lit", "window": 2}, "eval": {"every": 3, "batches": 2},
                 "checkpoint": {"every": 100}, "optim": {"warmup_steps": 1}},
        "axes": {"seed": [0]},
    }))  # fmt: skip
    for k, v in train_env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(REPO)
    sw = load_sweep(f)
    src, run = expand(sw)

    def ctrl_c() -> None:
        deadline = time.time() + 300
        while not list((src.out_dir / "checkpoints").glob("step*")) and time.time() < deadline:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)

    watcher = threading.Thread(target=ctrl_c, daemon=True)
    watcher.start()
    assert main(["run", str(f)]) == 130
    watcher.join()
    out = capsys.readouterr().out
    assert "interrupted" in out and not (src.out_dir / "DONE").exists()
    assert "source: stopped at step" in out and "FAILED" not in out, "an interrupt is no failure"
    rec = {r["name"]: r for r in json.loads((sw.root / "sweep.json").read_text())["runs"]}
    assert rec["source"]["state"] == "failed" and rec["s0"]["state"] == "pending"
    steps_before = json.loads((src.out_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert 0 < steps_before < 120

    assert main(["run", str(f)]) == 0, capsys.readouterr().out
    assert "source: resuming" in capsys.readouterr().out
    steps = [json.loads(x)["step"] for x in (src.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 121)), "the interrupted source resumed from its checkpoint"
    rows = {x["name"]: x for x in status_rows(sw)}
    assert {x["state"] for x in rows.values()} == {"done"}
    assert rows["s0"]["steps"] == 6 and rows["s0"]["val_loss"] is not None
    meta = json.loads((run.out_dir / "meta.json").read_text())
    assert meta["config"] == "config.yaml" and meta["transfer"], "meta.json refers to the one serialised config"
    assert run.dir.read_config()["init"]["source"] == str(src.out_dir / "hf")
    assert json.loads((run.out_dir / "model.json").read_text())["layer_mixers"], "the model the trainer built"

    assert main(["status", str(f)]) == 0
    assert "2 done" in capsys.readouterr().out
    assert main(["run", str(f), "--dry-run"]) == 0
    assert capsys.readouterr().out.count(" done\n") == 2
    assert main(["run", str(f)]) == 0  # everything is done: nothing launches
    out = capsys.readouterr().out
    assert out.count("done, skipped") == 2 and "starting" not in out


def test_named_sources_and_recorded_baselines(tmp_path):
    """One source per size (``sources:`` + ``@source:NAME``), scratch runs at K x the budget, and
    every XATL run paired with the scratch run of its own size, arch and seed."""
    sw = load_sweep({
        "name": "ladder", "out_dir": str(tmp_path / "root"),
        "sources": {"micro": {"model": {"size": "micro"}, "budget": {"steps": 50}},
                    "tiny": {"model": {"size": "tiny"}, "budget": {"steps": 60}}},
        "baseline": {"budget_factor": 3},
        "base": {"data": {"path": "d", "seq_len": 8, "batch_size": 2}, "budget": {"steps": 10}},
        "axes": {
            "size": {"zip": {"model.size": ["micro", "tiny"], "init.source": ["@source:micro", "@source:tiny"]},
                     "labels": ["micro", "tiny"]},
            "init": [{"label": "scratch", "init.kind": "scratch"}, {"label": "lit", "init.kind": "xatl"},
                     {"label": "nofreeze", "init.kind": "xatl", "freeze.policy": "none"}],
            "seed": [0, 1],
        },
    })  # fmt: skip
    runs = expand(sw)
    srcs = {r.name: r for r in runs if r.is_source}
    assert set(srcs) == {"source-micro", "source-tiny"}
    by_name = {r.name: r for r in runs}
    for size in ("micro", "tiny"):
        for seed in (0, 1):
            scratch = by_name[f"{size}-scratch-s{seed}"]
            assert scratch.config.budget.steps == 30 and scratch.baseline is None
            for v in ("lit", "nofreeze"):
                x = by_name[f"{size}-{v}-s{seed}"]
                assert x.config.budget.steps == 10, "XATL runs keep the base budget"
                assert x.baseline == scratch.key
                assert x.config.init.source == str(srcs[f"source-{size}"].out_dir / "hf")
                assert x.needs == [srcs[f"source-{size}"].key]
    idx = Index(sw, runs)
    rec = {r["name"]: r for r in idx.records.values()}
    assert rec["tiny-lit-s1"]["baseline"] == by_name["tiny-scratch-s1"].key and rec["tiny-lit-s1"]["size"] == "tiny"
    with pytest.raises(SweepError, match=r"'@source:huge'.*none of this file's sources"):
        expand(load_sweep({"name": "b", "out_dir": str(tmp_path / "b"), "sources": {"micro": {}},
                           "base": {"init": {"kind": "xatl", "source": "@source:huge"}, "budget": {"steps": 1}},
                           "axes": {"seed": [0]}}))  # fmt: skip


@pytest.mark.parametrize("label", ["../../escaped", "/abs/x", "a/b", "..", ".hidden"])
def test_labels_and_names_cannot_escape_the_root(tmp_path, label):
    with pytest.raises(SweepError, match="is not a safe name"):
        expand(load_sweep({"name": "t", "out_dir": str(tmp_path / "root"), "base": {"budget": {"steps": 1}},
                           "axes": {"seed": {"zip": {"seed": [0]}, "labels": [label]}}}))  # fmt: skip
    with pytest.raises(SweepError, match="is not a safe name"):
        load_sweep({"name": label, "out_dir": str(tmp_path / "root"), "base": {}, "axes": {"seed": [0]}})
    assert not (tmp_path / "root").exists() and not (tmp_path.parent / "escaped").exists()


def test_dry_run_checks_data_before_anything_starts(tmp_path, tiny_dataset):
    """Problems a launched rank would hit are named by --dry-run, and a real run stops there too."""
    sw = load_sweep(sweep_dict(tmp_path / "sw", data=str(tmp_path / "no-such-data")))
    with pytest.raises(SweepError, match=r"run source: data.path=.*no-such-data"):
        run_sweep(sw, dry_run=True, out=io.StringIO())
    with pytest.raises(SweepError, match=r"data.path=.*no-such-data"):
        run_sweep(sw, out=io.StringIO())
    assert not (tmp_path / "sw").exists(), "nothing written for a sweep that cannot run"
    long = load_sweep(sweep_dict(tmp_path / "sw2", data=str(tiny_dataset), base={
        "model": {"size": "micro"}, "init": {"source": SOURCE_REF}, "budget": {"steps": 3},
        "data": {"path": str(tiny_dataset), "seq_len": 10**6, "batch_size": 2}}))  # fmt: skip
    with pytest.raises(SweepError, match=r"data.seq_len"):
        run_sweep(long, dry_run=True, out=io.StringIO())


def test_a_teacher_is_a_dependency_like_a_source(tmp_path):
    sw = load_sweep({
        "name": "kd", "out_dir": str(tmp_path / "root"),
        "sources": {"src": {"model": {"size": "micro"}, "budget": {"steps": 5}},
                    "big": {"model": {"size": "tiny"}, "budget": {"steps": 5}}},
        "base": {"model": {"size": "micro"}, "data": {"path": "d", "seq_len": 8, "batch_size": 2}, "budget": {"steps": 3},
                 "init": {"kind": "xatl", "source": "@source:src"},
                 "distill": {"enabled": True, "teacher": "@source:big"}},
        "axes": {"seed": [0]},
    })  # fmt: skip
    srcs = {r.name: r for r in expand(sw) if r.is_source}
    (run,) = [r for r in expand(sw) if not r.is_source]
    assert run.config.distill.teacher == str(srcs["source-big"].out_dir / "hf")
    assert run.needs == [srcs["source-src"].key, srcs["source-big"].key], "the run waits for both"


def test_only_selects_a_subset_of_the_same_runs(tmp_path):
    from xatl_ds.sweep import select

    d = {"name": "l", "out_dir": str(tmp_path / "root"),
         "sources": {n: {"model": {"size": n}, "budget": {"steps": 5}} for n in ("micro", "tiny")},
         "base": {"data": {"path": "d", "seq_len": 8, "batch_size": 2}, "budget": {"steps": 3}},
         "axes": {"size": {"zip": {"model.size": ["micro", "tiny"], "init.source": ["@source:micro", "@source:tiny"]},
                           "labels": ["micro", "tiny"]},
                  "init": [{"label": "scratch", "init.kind": "scratch"}, {"label": "xatl", "init.kind": "xatl"}],
                  "seed": [0, 1]}}  # fmt: skip
    full = {r.key: r for r in expand(load_sweep(d))}
    part = expand(select(load_sweep(d), ["size=micro", "seed=s1"]))
    assert [r.name for r in part] == ["source-micro", "micro-scratch-s1", "micro-xatl-s1"]
    assert all(r.key in full and full[r.key].out_dir == r.out_dir for r in part), "the same runs, the same folders"
    assert part[2].baseline == part[1].key
    with pytest.raises(SweepError, match=r"axis size has no label\(s\) \['huge'\]"):
        select(load_sweep(d), ["size=huge"])
    with pytest.raises(SweepError, match="AXIS=LABEL"):
        select(load_sweep(d), ["nope=1"])
