"""A study's references and its confirmation on fresh seeds (xatl_ds.confirm,
analysis.confirm): references run first and once, bad references are named errors, the
confirmation plans best x references x fresh seeds, and its report computes paired
differences and verdicts from the finished runs."""
from __future__ import annotations

import json
import math
import os

import pandas as pd
import pytest

from analysis.confirm import summarize, t_interval, verdict
from test_tune import study_dict, trials
from xatl_ds.config import load_run_config
from xatl_ds.confirm import confirm_sweep, run_confirm, settings
from xatl_ds.rundir import RunDir
from xatl_ds.sweep import expand, load_sweep
from xatl_ds.tune import StudyError, Worker, load_study, open_study

REF = {"freeze.threshold": 0.01, "freeze.patience": 1, "freeze.unfreeze_order": "all", "init.components": "paper"}


def with_refs(tmp_path, **extra):
    d = study_dict(tmp_path, f"sqlite:///{tmp_path / 'c.db'}", n_trials=4, **extra)
    d["references"] = {"paper": dict(REF)}
    d["confirm"] = {"seeds": [100, 101, 102]}
    return d


def test_references_run_first_and_once(tmp_path):
    d = with_refs(tmp_path)
    Worker(load_study(d), poll=0.05, log=open(os.devnull, "w")).run()
    Worker(load_study(d), poll=0.05, log=open(os.devnull, "w")).run(6)  # a later worker adds trials
    ts = trials(d)
    assert [t.number for t in ts if t.user_attrs.get("reference")] == [0], "enqueued once, as trial 0"
    assert ts[0].params == REF and ts[0].state.name == "COMPLETE"
    assert ts[0].value == pytest.approx(1.0 + 100 * 0.01 + 1 / 6)
    assert len([t for t in ts if t.state.name == "COMPLETE"]) == 6


@pytest.mark.parametrize("change, match", [
    ({"freeze.threshold": 0.5}, r"references.paper.freeze.threshold=0.5: give a number in \[0.001, 0.05\]"),
    ({"freeze.unfreeze_order": "staged-ish"}, r"not a choice; choose one of \['all', 'staged'\]"),
    ({"optim.lr": 0.1}, r"\['optim.lr'\] not in search_space"),
    ({"freeze.patience": 1.5}, "an int parameter needs an integer"),
])  # fmt: skip
def test_bad_references_are_named(tmp_path, change, match):
    d = with_refs(tmp_path)
    d["references"]["paper"].update(change)
    with pytest.raises(StudyError, match=match):
        load_study(d)


def test_incomplete_reference_and_stale_confirm_seeds(tmp_path):
    d = with_refs(tmp_path)
    del d["references"]["paper"]["freeze.patience"]
    with pytest.raises(StudyError, match=r"every search-space key; missing \['freeze.patience'\]"):
        load_study(d)
    d = with_refs(tmp_path)
    d["confirm"] = {"seeds": [0, 1]}  # seed 0 is what every trial ran with
    with pytest.raises(StudyError, match="confirm.seeds has 0.*fresh seeds"):
        load_study(d)
    d["confirm"] = {"seeds": [5]}
    with pytest.raises(StudyError, match="at least 2 distinct"):
        load_study(d)


def finish(run_dir, val_loss: float, flops: float = 6e9) -> None:
    """A finished run as the trainer leaves it (metrics rows and DONE)."""
    rd = RunDir(run_dir)
    rd.path.mkdir(parents=True, exist_ok=True)
    rows = [{"step": 1, "flops": flops / 2, "train_loss": 2.0, "val_loss": val_loss + 1.0},
            {"step": 2, "flops": flops, "train_loss": 1.5, "val_loss": val_loss}]
    rd.metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rd.mark_done()


def test_confirmation_plan_and_report(tmp_path):
    d = with_refs(tmp_path)
    spec = load_study(d)
    # A fixed worker id: the sampler's seed is derived from it (tune.worker_seed), and the default
    # id (host-pid) made the draws differ per run: in ~7% of runs no draw beat the reference.
    Worker(spec, worker_id="confirm-test", poll=0.05, log=open(os.devnull, "w")).run()
    study = open_study(spec)
    best = min((t for t in study.get_trials() if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert best.params != REF, "the fake objective rewards a low threshold: the sampler beats 0.01"
    sweep = load_sweep(confirm_sweep(spec, study))
    runs = expand(sweep)
    assert sorted((r.labels["schedule"], r.config.seed) for r in runs) == sorted(
        (s, k) for s in ("best", "paper") for k in (100, 101, 102))
    for r in runs:
        cfg = r.config
        want = best.params["freeze.threshold"] if r.labels["schedule"] == "best" else 0.01
        assert cfg.freeze.threshold == pytest.approx(want)
        assert cfg.init.components == ["embed", "lm_head", "mlp"] or r.labels["schedule"] == "best"
    # finished runs with known losses: best lower by 0.02, 0.03, 0.04 -> mean -0.03
    loss = {("best", 100): 3.00, ("best", 101): 3.10, ("best", 102): 2.90,
            ("paper", 100): 3.02, ("paper", 101): 3.13, ("paper", 102): 2.94}  # fmt: skip
    for r in runs:
        finish(r.out_dir, loss[(r.labels["schedule"], r.config.seed)])
    out = tmp_path / "report"
    assert run_confirm(spec, report_out=out) == 0
    rep = json.loads((out / "confirm.json").read_text())
    diff = rep["differences"]["paper"]
    assert diff["diff"] == pytest.approx([-0.02, -0.03, -0.04])
    m, lo, hi = t_interval([-0.02, -0.03, -0.04])
    assert (diff["mean"], diff["low"], diff["high"]) == pytest.approx((-0.03, lo, hi))
    assert hi < 0 and diff["verdict"] == "better"
    assert rep["settings"]["best"]["study_value"] == pytest.approx(best.value)
    assert rep["study"]["references"]["paper"]["trial"] == 0
    assert "| paper | 3 | -0.0200, -0.0300, -0.0400 | -0.0300 |" in (out / "confirm.md").read_text()
    assert len(pd.read_csv(out / "trials.csv")) == len(study.get_trials())


def test_reference_equal_to_best_is_trained_once(tmp_path):
    d = with_refs(tmp_path)
    d["references"]["paper"]["freeze.threshold"] = 0.001  # the fake objective's optimum edge
    spec = load_study(d)
    Worker(spec, poll=0.05, log=open(os.devnull, "w")).run(1)  # one trial: the reference itself
    study = open_study(spec)
    distinct, aliases = settings(spec, study)
    assert list(distinct) == ["best"] and aliases == {"paper": "best"}
    rows = pd.DataFrame({"setting": ["best"] * 3, "seed": [100, 101, 102], "val_loss": [1.0, 1.1, 0.9], "flops": 1.0})
    s = summarize(rows, "best", aliases)
    assert s["differences"]["paper"]["diff"] == [0.0, 0.0, 0.0] and s["differences"]["paper"]["verdict"] == "identical setting"


def test_interval_and_verdict():
    m, lo, hi = t_interval([1.0, 2.0, 3.0])
    # mean 2, sd 1, n 3: half width t(0.975, 2) / sqrt(3) = 4.3027 / 1.7321
    assert m == 2.0 and hi - m == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5) and m - lo == pytest.approx(hi - m)
    assert verdict(-0.2, -0.1) == "better" and verdict(0.1, 0.2) == "worse"
    assert verdict(-0.1, 0.1).startswith("no difference") and verdict(math.nan, math.nan).startswith("undetermined")
    assert math.isnan(t_interval([1.0])[1])


@pytest.mark.parametrize("size", ["mini", "tiny"])
def test_ladder_study_reference_is_the_ladder_run(size):
    """sweeps/studies/ladder_lit_<size>.yaml transfers from the ladder's own source, and its paper
    reference is exactly the ladder's <size>-mamba-xatl-lit run (same run id, seed 0): the
    study's trial 0 re-trains it, the confirmation compares against it on fresh seeds."""
    from conftest import REPO
    from xatl_ds.tune import params_to_values, trial_config

    spec = load_study(REPO / "sweeps" / "studies" / f"ladder_lit_{size}.yaml")
    ladder = {r.name: r for r in expand(load_sweep(REPO / "sweeps" / "cpu_ladder.yaml"))}
    assert spec.base["init"]["source"] == str(ladder[f"source-{size}"].dir.hf)
    cfg = load_run_config(trial_config(spec, params_to_values(spec, spec.references["paper"]), 0))
    assert cfg.content_hash() == ladder[f"{size}-mamba-xatl-lit-s0"].id
    assert len(spec.confirm_seeds) == 3 and spec.n_trials >= 20


def test_workers_option_runs_local_child_workers(tmp_path):
    """``xatl-ds tune FILE --workers 2``: one worker in the command, one child process; both
    take trials of the one study, and the command returns once the study is complete."""
    import yaml

    from xatl_ds.cli import main

    d = with_refs(tmp_path, delay=1.0)  # ~6 s a trial: the child is up (imports) long before the study ends
    f = tmp_path / "study.yaml"
    f.write_text(yaml.safe_dump(d))
    assert main(["tune", str(f), "--workers", "2", "--worker-id", "w"]) == 0
    ts = [t for t in trials(d) if t.state.name == "COMPLETE"]
    assert len(ts) == 4 and {t.user_attrs["worker"] for t in ts} == {"w", "w-1"}
    assert main(["tune", str(f), "--workers", "0"]) == 2
