"""Analysis on synthetic curves whose answers are known in advance, and the report on a
partial synthetic sweep (fake run directories written here)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from analysis.report import write_report
from analysis.results import results_table
from analysis.savings import (
    aggregate_savings,
    benchmark_deltas,
    bootstrap_ci,
    compute_to_reach,
    savings_curve,
    savings_ratio,
    savings_table,
    smooth_curve,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def loglinear(f):
    """A loss exactly linear in log-FLOPs: interpolation in log-FLOPs is exact on it."""
    return 6.0 - 0.25 * np.log(np.asarray(f, dtype=float) / 1e9)


def powerlaw(f):
    return 2.0 + 10.0 * (np.asarray(f, dtype=float) / 1e9) ** -0.3


# -- savings on curves with a known answer ------------------------------------------------------
def test_shift_by_2x_gives_2_on_the_same_grid():
    g = 1e9 * 2.0 ** np.arange(1, 12)
    scratch_loss = powerlaw(g)
    # XATL is the same curve reached with half the FLOPs: at g/2 it has the loss scratch has at g
    r = savings_ratio(g, scratch_loss, g / 2, scratch_loss)
    assert r["reached"] and not r["lower_bound"]
    assert r["ratio"] == pytest.approx(2.0, rel=1e-12)
    assert r["target"] == pytest.approx(scratch_loss[-1])


def test_shift_by_2x_gives_2_on_different_grids():
    gs = 1e9 * 1.5 ** np.arange(0, 15)
    gx = 1e9 * 1.23 ** np.arange(0, 27)  # a grid unrelated to scratch's: interpolation at work
    r = savings_ratio(gs, loglinear(gs), gx, loglinear(2 * gx))
    assert r["ratio"] == pytest.approx(2.0, rel=1e-9)
    # linear (not log) interpolation is not exact on this curve: the choice matters and is made
    lin = savings_ratio(gs, loglinear(gs), gx, loglinear(2 * gx), log=False)
    assert lin["ratio"] != pytest.approx(2.0, rel=1e-6)


def test_not_reached_is_flagged_not_a_number():
    g = 1e9 * 2.0 ** np.arange(1, 10)
    plateau = np.maximum(powerlaw(g), powerlaw(g[-1]) + 0.5)  # XATL stalls above scratch's final loss
    r = savings_ratio(g, powerlaw(g), g, plateau)
    assert r["reached"] is False and math.isnan(r["ratio"]) and math.isnan(r["xatl"])
    x, reached, lb = compute_to_reach(g, plateau, 0.0)
    assert math.isnan(x) and not reached and not lb


def test_first_eval_below_target_is_a_lower_bound():
    g = 1e9 * 2.0 ** np.arange(1, 10)
    r = savings_ratio(g, powerlaw(g), g * 0.1, np.full(len(g), 1.0))  # XATL better than scratch ever gets
    assert r["reached"] and r["lower_bound"]
    assert r["ratio"] == pytest.approx(g[-1] / (g[0] * 0.1))


def test_running_min_smoothing_and_noise():
    assert list(smooth_curve([5, 4, 4.5, 3, 3.2])) == [5, 4, 4, 3, 3]
    ema = smooth_curve([5, 4, 4.5, 3], ema=0.5)
    assert ema[0] == 5 and np.all(np.diff(ema) <= 0)
    with pytest.raises(ValueError, match="ema"):
        smooth_curve([1.0], ema=1.0)
    # a noise spike in XATL's curve cannot un-reach a loss it already reached
    g = 1e9 * 1.5 ** np.arange(0, 15)
    noisy = loglinear(2 * g)
    noisy[-1] += 3.0  # after the crossing (at g[-1] / 2)
    assert savings_ratio(g, loglinear(g), g, noisy)["ratio"] == pytest.approx(2.0, rel=1e-9)


def test_savings_curve_over_targets():
    gs = 1e9 * 1.5 ** np.arange(0, 15)
    gx = 1e9 * 1.3 ** np.arange(0, 20)
    sc = pd.DataFrame({"flops": gs, "val_loss": loglinear(gs)})
    xc = pd.DataFrame({"flops": gx, "val_loss": loglinear(3 * gx)})
    c = savings_curve(sc, xc, n=10)
    assert len(c) == 10
    assert c["target"].iloc[0] == pytest.approx(loglinear(3 * gx[0]))  # where XATL starts
    assert c["target"].iloc[-1] == pytest.approx(loglinear(gs[-1]))  # scratch's final loss
    assert np.all(np.diff(c["target"]) < 0)
    # the first target is XATL's first point (a bound); every other is exactly 3x
    assert c["lower_bound"].iloc[0] and not c["lower_bound"].iloc[1:].any()
    np.testing.assert_allclose(c["ratio"].iloc[1:], 3.0, rtol=1e-9)


def test_bootstrap_ci_contains_the_mean():
    vals = [1.8, 2.0, 2.3, 2.1, 1.7]
    lo, hi = bootstrap_ci(vals, n_boot=4000, seed=1)
    assert lo < np.mean(vals) < hi
    assert hi - lo < max(vals) - min(vals)
    assert all(math.isnan(v) for v in bootstrap_ci([2.0]))


# -- synthetic sweep ------------------------------------------------------------------------------
def write_run(root: Path, name: str, *, kind: str, seed: int, flops, loss, done: bool = True, mixer: str = "retnet",
              source: str | None = None, events: list | None = None, evals: dict | None = None,
              config_only: bool = False) -> Path:  # fmt: skip
    """A fake run directory the way the trainer writes one."""
    d = root / name
    d.mkdir(parents=True)
    cfg = {
        "name": name, "out_dir": str(d), "seed": seed,
        "model": {"size": "micro", "mixer": mixer, "attention_layers": "none"},
        "init": {"kind": kind, "source": source, "components": ["embed", "mlp"] if kind == "xatl" else []},
        "freeze": {"policy": "lit", "threshold": 0.01, "patience": 1, "window": 3, "unfreeze_order": [["all"]],
                   "rewarmup_steps": 2},
        "budget": {"steps": None, "tokens": None, "flops": float(flops[-1])},
    }  # fmt: skip
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    if config_only:
        return d
    rows = []
    for k, (f, v) in enumerate(zip(flops, loss), 1):
        row = {"step": k, "tokens": 128 * k, "train_loss": float(v) + 0.1, "flops": float(f), "wall_time": f / 1e9,
               "val_loss": float(v)}  # fmt: skip
        if events and k == events[0]["trigger_step"]:
            row["unfreeze"] = events
        rows.append(row)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if evals is not None:
        (d / "eval.json").write_text(json.dumps({"tasks": evals, "requested_tasks": list(evals)}))
    if done:
        meta = {
            "name": name, "config": cfg, "steps": len(rows), "tokens": 128 * len(rows), "flops": float(flops[-1]),
            "wall_time": flops[-1] / 1e9, "final_val_loss": float(loss[-1]), "unfreeze_events": events or [],
            "model_config": {"num_hidden_layers": 2, "hidden_size": 64, "family": "neox",
                             "layer_mixers": [mixer, mixer]},
            "transfer": {"fraction": 0.6, "fraction_no_embed": 0.3} if kind == "xatl" else None,
        }  # fmt: skip
        (d / "meta.json").write_text(json.dumps(meta))
        (d / "DONE").write_text("ok\n")
    return d


def _evals(acc: float, se: float) -> dict:
    return {"xatl_nextsent": {"metrics": {"acc": {"value": acc, "stderr": se}}, "n_samples": 100, "version": 1.0}}


def test_source_inclusive_savings_are_smaller(tmp_path):
    g = 1e9 * 1.5 ** np.arange(0, 12)
    src = write_run(tmp_path, "source", kind="scratch", seed=0, flops=g * 5, loss=loglinear(g), mixer="attention")
    (src / "hf").mkdir()
    write_run(tmp_path, "scratch_s0", kind="scratch", seed=0, flops=g, loss=loglinear(g))
    write_run(tmp_path, "xatl_s0", kind="xatl", seed=0, flops=g, loss=loglinear(2 * g), source=str(src / "hf"))
    df = results_table(tmp_path)
    curves = {r: df for r, df in ((r, _curve(tmp_path / r)) for r in df["run"])}
    sav = savings_table(df, curves)
    assert len(sav) == 1
    row = sav.iloc[0]
    assert row["savings_flops"] == pytest.approx(2.0, rel=1e-9)
    assert row["source_flops"] == pytest.approx(g[-1] * 5)  # from the source run's meta.json
    assert row["savings_flops_incl_source"] < row["savings_flops"]
    assert row["savings_flops_incl_source"] == pytest.approx(g[-1] / (g[-1] / 2 + 5 * g[-1]))
    # tokens and wall time follow the same curve shape here (both linear in the step)
    assert np.isfinite(row["savings_tokens"]) and np.isfinite(row["savings_wall_time"])
    # a user-given number for a source the sweep did not train
    df2 = df.assign(source_flops=np.nan)
    given = savings_table(df2, curves, source_flops={"hf": 1e12}).iloc[0]
    assert given["savings_flops_incl_source"] == pytest.approx(g[-1] / (g[-1] / 2 + 1e12))
    assert math.isnan(savings_table(df2, curves).iloc[0]["savings_flops_incl_source"])


def _curve(d: Path) -> pd.DataFrame:
    from analysis.results import load_run

    return load_run(d).val_curve


def test_seeds_aggregate_with_ci_and_deltas(tmp_path):
    g = 1e9 * 1.5 ** np.arange(0, 12)
    for s, shift in enumerate((1.8, 2.0, 2.4)):
        write_run(tmp_path, f"scratch_s{s}", kind="scratch", seed=s, flops=g, loss=loglinear(g), evals=_evals(0.30, 0.03))
        write_run(tmp_path, f"xatl_s{s}", kind="xatl", seed=s, flops=g, loss=loglinear(shift * g), source="hub/model",
                  evals=_evals(0.34, 0.04))  # fmt: skip
    df = results_table(tmp_path)
    assert set(df["size"]) == {"micro"} and (df["state"] == "done").all()
    curves = {r: _curve(tmp_path / r) for r in df["run"]}
    sav = savings_table(df, curves)
    np.testing.assert_allclose(sorted(sav["savings_flops"]), [1.8, 2.0, 2.4], rtol=1e-9)
    agg = aggregate_savings(sav, n_boot=3000)
    assert len(agg) == 1
    a = agg.iloc[0]
    assert a["n_seeds"] == 3 and a["n_reached_savings_flops"] == 3
    assert a["savings_flops_mean"] == pytest.approx(np.mean([1.8, 2.0, 2.4]))
    assert a["savings_flops_ci_low"] <= a["savings_flops_mean"] <= a["savings_flops_ci_high"]
    d = benchmark_deltas(df)
    assert len(d) == 3
    assert d["delta"].tolist() == pytest.approx([0.04] * 3)
    assert d["delta_se"].tolist() == pytest.approx([0.05] * 3)  # sqrt(0.03^2 + 0.04^2)
    assert d["flops_ratio"].tolist() == pytest.approx([1.0] * 3)


def test_report_on_a_partial_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    g = 1e9 * 1.5 ** np.arange(0, 12)
    ev = [{"step": 5, "stage": 0, "components": ["all"], "rule": "lit", "trigger_step": 4}]
    write_run(sweep, "scratch_s0", kind="scratch", seed=0, flops=g, loss=loglinear(g), evals=_evals(0.3, 0.03))
    write_run(sweep, "xatl_s0", kind="xatl", seed=0, flops=g, loss=loglinear(2 * g), source="hub/m", events=ev,
              evals=_evals(0.35, 0.03))  # fmt: skip
    # seed 1: XATL still training and stalled above scratch's loss (not reached); scratch done, not evaluated
    write_run(sweep, "scratch_s1", kind="scratch", seed=1, flops=g, loss=loglinear(g))
    write_run(sweep, "xatl_s1", kind="xatl", seed=1, flops=g[:5], loss=loglinear(g[:5]) + 0.1, done=False,
              source="hub/m")  # fmt: skip
    # seed 2: XATL launched (config written) but no step yet; no scratch run at all
    write_run(sweep, "xatl_s2", kind="xatl", seed=2, flops=g, loss=loglinear(g), config_only=True, source="hub/m")
    cfgs = tmp_path / "configs"
    cfgs.mkdir()
    (cfgs / "scratch_s2.yaml").write_text(yaml.safe_dump({"name": "scratch_s2", "out_dir": str(sweep / "scratch_s2")}))

    from xatl_ds.cli import main

    assert main(["report", str(sweep), "--expect", str(cfgs / "*.yaml"), "--source-flops", "1e10"]) == 0

    md = (sweep / "report.md").read_text()
    assert "Runs not started" in md and "scratch_s2" in md
    assert "Runs not finished" in md and "xatl_s1 (partial)" in md and "xatl_s2 (pending)" in md
    assert "Evaluations missing" in md and "scratch_s1 (no eval.json)" in md
    assert "XATL runs without a scratch baseline" in md and "xatl_s2" in md
    assert "not reached" not in md.split("Per pairing")[0] or "(1/2 reached)" in md
    assert "2.00x" in md  # seed 0's saving, the only one reached
    sav = pd.read_csv(sweep / "savings.csv")
    s1 = sav[sav["seed"] == 1].iloc[0]
    assert not s1["reached_flops"] and math.isnan(s1["savings_flops"])
    s0 = sav[sav["seed"] == 0].iloc[0]
    assert s0["savings_flops"] == pytest.approx(2.0) and s0["savings_flops_incl_source"] == pytest.approx(
        g[-1] / (g[-1] / 2 + 1e10))  # fmt: skip
    res = pd.read_parquet(sweep / "results.parquet")
    assert len(res) == 5 and len(pd.read_csv(sweep / "results.csv")) == 5
    assert set(res["state"]) == {"done", "partial", "pending"}
    x0 = res[res["name"] == "xatl_s0"].iloc[0]
    assert x0["n_unfreeze"] == 1 and x0["first_unfreeze_step"] == 5 and x0["transferred_fraction"] == 0.6
    assert x0["eval/xatl_nextsent/acc"] == 0.35 and x0["eval/xatl_nextsent/acc_stderr"] == 0.03
    assert x0["best_val_loss"] == pytest.approx(loglinear(2 * g[-1]))
    import matplotlib.image as mpimg

    for name in ("loss_vs_flops", "savings_vs_size", "savings_vs_target_loss", "benchmark_deltas"):
        p = sweep / "figures" / f"{name}.png"
        assert p.read_bytes()[:8] == PNG_MAGIC, name
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert f"figures/{name}.png" in md


def test_report_on_an_empty_sweep(tmp_path):
    path = write_report(tmp_path)
    md = path.read_text()
    assert "0 runs found" in md and (tmp_path / "figures" / "loss_vs_flops.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "nope")
