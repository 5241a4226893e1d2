"""Analysis on synthetic curves whose answers are known in advance, and the report on a
partial synthetic sweep (fake run directories written here)."""
from __future__ import annotations

import json
import math
import re
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
              config_only: bool = False, size: str = "micro", dims: tuple[int, int] = (2, 64),
              freeze_policy: str = "lit") -> Path:  # fmt: skip
    """A fake run directory the way the trainer writes one (``dims``: layers and width of the
    exported model config, matching ``size``)."""
    d = root / name
    d.mkdir(parents=True)
    cfg = {
        "name": name, "out_dir": str(d), "seed": seed,
        "model": {"size": size, "mixer": mixer, "attention_layers": "none"},
        "init": {"kind": kind, "source": source, "components": ["embed", "mlp"] if kind == "xatl" else []},
        "freeze": {"policy": freeze_policy, "threshold": 0.01, "patience": 1, "window": 3, "unfreeze_order": [["all"]],
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
            "model_config": {"num_hidden_layers": dims[0], "hidden_size": dims[1], "family": "neox",
                             "layer_mixers": [mixer] * dims[0]},
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


def test_report_on_an_empty_sweep(tmp_path, capsys):
    """No runs and no results.parquet: a clear error (exit 2 from the CLI), no empty report;
    with --expect the runs not started are the report."""
    from xatl_ds.cli import main

    with pytest.raises(FileNotFoundError, match="no run folders and no results.parquet"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2 and "nothing to report" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "savings.csv").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "nope")
    cfg = tmp_path / "configs" / "a.yaml"
    cfg.parent.mkdir()
    cfg.write_text(yaml.safe_dump({"name": "a", "out_dir": str(tmp_path / "runs" / "a")}))
    md = write_report(tmp_path, expected=[str(cfg)]).read_text()
    assert "0 runs found" in md and "Runs not started" in md
    assert (tmp_path / "figures" / "loss_vs_flops.png").read_bytes()[:8] == PNG_MAGIC


def _report_numbers(d: Path) -> dict[str, pd.DataFrame]:
    return {f: pd.read_csv(d / f) if (d / f).stat().st_size > 1 else pd.DataFrame() for f in ("results.csv", "savings.csv", "savings_summary.csv", "effective.csv",
                                            "effective_summary.csv", "effective_curves.csv", "size_trend.csv",
                                            "savings_curves.csv", "benchmark_deltas.csv")}  # fmt: skip


def test_report_rebuilds_from_its_parquet_without_the_run_folders(tmp_path, capsys):
    """A report folder (results.parquet + curves.parquet), its run folders gone, rebuilds with
    every table identical; without curves.parquet (reports older than it) the per-pairing
    tables are read back and the rest recomputed to the same numbers."""
    import shutil

    from xatl_ds.cli import main

    sweep = tmp_path / "sweep"
    _ladder_sweep(sweep, {"mini": 4.0, "tiny": 1.0, "small": 1.0}, seeds=(0, 1))
    first = tmp_path / "report"
    write_report(sweep, first, n_boot=200, fit_boot=20)
    assert (first / "curves.parquet").is_file()
    before = _report_numbers(first)
    assert len(pd.read_parquet(first / "curves.parquet").query("kind == 'val'")["run"].unique()) == len(before["results.csv"])
    committed = tmp_path / "committed"
    shutil.copytree(first, committed)
    assert main(["report", str(committed)]) == 0, capsys.readouterr().err
    md = (committed / "report.md").read_text()
    assert "Rebuilt from" in md and "curves.parquet" in md and f"XATL sweep report: {sweep}" in md
    after = _report_numbers(committed)
    for name, frame in before.items():  # the CLI's default n_boot / fit_boot differ: compare what does not use them
        if name in ("savings_summary.csv", "effective.csv", "effective_summary.csv", "size_trend.csv"):
            assert list(after[name].columns) == list(frame.columns), name
            continue
        pd.testing.assert_frame_equal(after[name], frame, check_exact=False, rtol=1e-12, obj=name)
    write_report(committed, n_boot=200, fit_boot=20)
    for name, frame in _report_numbers(committed).items():
        pd.testing.assert_frame_equal(frame, before[name], check_exact=False, rtol=1e-12, obj=name)
    # an older report: no curves.parquet
    (committed / "curves.parquet").unlink()
    write_report(committed, n_boot=200, fit_boot=20)
    md = (committed / "report.md").read_text()
    assert "without curves.parquet" in md and "![validation loss vs FLOPs](figures/loss_vs_flops.png)" in md
    for name, frame in _report_numbers(committed).items():
        pd.testing.assert_frame_equal(frame, before[name], check_exact=False, rtol=1e-12, obj=name)
    # results.parquet and nothing else: the curves are needed
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(first / "results.parquet", bare)
    with pytest.raises(FileNotFoundError, match="per-run validation curves are needed"):
        write_report(bare)


# -- effective compute in the report: known multipliers, both regimes, a known size trend ------------
E_, A_, ALPHA_ = 2.0, 4.0e3, 0.3  # scratch: L(C) = E + A * C^-alpha


def _scratch_loss(c, rng, noise=0.001):
    c = np.asarray(c, dtype=float)
    return E_ + A_ * c**-ALPHA_ + rng.normal(0, noise, len(c))


#: the ladder of the synthetic sweep: size -> (layers, width) and the XATL budget in FLOPs
LADDER = {"mini": ((4, 64), 1e12), "tiny": ((4, 128), 3e12), "small": ((4, 256), 1e13)}
TREND_B = 0.25  # true multiplier m(N) = 2 * (N / 2.5e5)^0.25


def _true_multiplier(n_params: float) -> float:
    return 2.0 * (n_params / 2.5e5) ** TREND_B


def _ladder_sweep(root: Path, scratch_factor: dict[str, float], seeds=(0, 1, 2)) -> dict[str, float]:
    """Per size and seed a scratch run of ``scratch_factor[size]`` x the XATL budget and an
    XATL run whose loss at every budget b is scratch's at m(N) * b; a source for the smallest
    size (its hf/ export is what that size's XATL runs name). Returns size -> m(N)."""
    from xatl_ds.sizes import non_embedding_params, size_config

    src = write_run(root, "source-mini", kind="scratch", seed=0, flops=np.linspace(1e12, 2e13, 20),
                    loss=np.linspace(7.0, 4.0, 20), mixer="attention", size="mini", dims=(4, 64))  # fmt: skip
    (src / "hf").mkdir()
    truth = {}
    for size, (dims, budget) in LADDER.items():
        m = truth[size] = _true_multiplier(non_embedding_params(size_config(size, "mamba")))
        for s in seeds:
            rng = np.random.default_rng(100 * s + dims[1])
            cs = np.linspace(0, scratch_factor[size] * budget, 41)[1:]
            write_run(root, f"{size}-scratch-s{s}", kind="scratch", seed=s, flops=cs, loss=_scratch_loss(cs, rng),
                      mixer="mamba", size=size, dims=dims)  # fmt: skip
            cx = np.linspace(0, budget, 21)[1:]
            write_run(root, f"{size}-xatl-s{s}", kind="xatl", seed=s, flops=cx, mixer="mamba", size=size, dims=dims,
                      loss=E_ + A_ * (m * cx) ** -ALPHA_,
                      source=str(src / "hf") if size == "mini" else "hub/other")  # fmt: skip
    return truth


def test_report_of_a_subset_leaves_other_folders_out(tmp_path):
    """``runs=`` (what ``quickstart --only`` passes): the report covers those folders, not every
    run folder another selection left under the same sweep root."""
    sweep = tmp_path / "sweep"
    _ladder_sweep(sweep, {"mini": 4.0, "tiny": 1.0, "small": 1.0}, seeds=(0,))
    everything = sorted(p.name for p in sweep.iterdir() if (p / "config.yaml").is_file())
    mini = [sweep / n for n in everything if n.startswith(("source-mini", "mini-"))]
    assert 3 == len(mini) < len(everything)
    write_report(sweep, tmp_path / "subset", n_boot=50, fit_boot=5, runs=mini)
    assert sorted(pd.read_csv(tmp_path / "subset" / "results.csv")["run"]) == sorted(p.name for p in mini)
    write_report(sweep, tmp_path / "all", n_boot=50, fit_boot=5)
    assert sorted(pd.read_csv(tmp_path / "all" / "results.csv")["run"]) == everything


def test_report_effective_compute_both_regimes_and_size_trend(tmp_path):
    # mini and tiny: scratch trains 5x the XATL budget (past m * budget: interpolated);
    # small: scratch stops at the XATL budget and never reaches XATL's loss (extrapolated)
    truth = _ladder_sweep(tmp_path, {"mini": 5.0, "tiny": 5.0, "small": 1.0})
    assert 1.9 < truth["mini"] < truth["tiny"] < truth["small"] < 4.5
    md = write_report(tmp_path, n_boot=500, fit_boot=100).read_text()

    eff = pd.read_csv(tmp_path / "effective.csv")
    assert len(eff) == 9 and set(eff["size"]) == set(LADDER)
    for size, m in truth.items():
        rows = eff[eff["size"] == size]
        want = "extrapolated" if size == "small" else "interpolated"
        assert (rows["method"] == want).all(), (size, rows["method"].tolist())
        # measured: within 5%; extrapolated 4x past the data, the fit's noise shows: within 10%
        np.testing.assert_allclose(rows["multiplier"], m, rtol=0.05 if want == "interpolated" else 0.1)
        # the method is in every phrase; an extrapolated number carries its interval and how far it reached
        assert all(p.endswith(f"({want})") or "extrapolated" in p for p in rows["effective"])
    small = eff[eff["size"] == "small"]
    assert (small["extrapolation_factor"] > 3).all() and small["effective"].str.contains(r"\[.*\]").all()
    # source-inclusive: known for mini (its source was trained in the sweep), said in words elsewhere
    mini = eff[eff["size"] == "mini"]
    assert (mini["multiplier_incl_source"] < mini["multiplier"]).all()
    np.testing.assert_allclose(mini["multiplier_incl_source"], mini["scratch_flops"] / (1e12 + 2e13), rtol=1e-6)
    assert (eff.loc[eff["size"] != "mini", "effective_incl_source"] == "source FLOPs unknown (--source-flops)").all()

    along = pd.read_csv(tmp_path / "effective_curves.csv")
    assert len(along) == 9 * 20 and set(along["method"]) <= {"interpolated", "extrapolated", "upper_bound"}
    last = along.groupby("xatl_run").tail(1).set_index("xatl_run")["multiplier"]  # the final budget: effective.csv's
    np.testing.assert_allclose(last.loc[eff["xatl_run"]].to_numpy(), eff["multiplier"].to_numpy(), rtol=1e-9)

    summ = pd.read_csv(tmp_path / "effective_summary.csv").set_index("size")
    for size, m in truth.items():
        r = summ.loc[size]
        assert r["n_seeds"] == 3 and r["n_used_effective"] == 3
        assert r["effective_mean"] == pytest.approx(m, rel=0.05)
        assert r["effective_ci_low"] < m < r["effective_ci_high"]
        assert r["effective_method"] == ("extrapolated" if size == "small" else "interpolated")
        assert r["effective"].startswith(f"{r['effective_mean']:.2f}x [") and r["effective_method"] in r["effective"]
    assert summ.loc["mini", "n_params"] < summ.loc["small", "n_params"] / 10  # the ladder spans > 10x

    trend = pd.read_csv(tmp_path / "size_trend.csv")
    assert set(trend["kind"]) == {"measured", "fit", "extrapolated"}
    fit = trend[trend["kind"] != "measured"]
    b = fit["b"].iloc[0]
    assert fit["b"].nunique() == 1 and b == pytest.approx(TREND_B, rel=0.05)  # the known trend, within 5%
    assert fit["b_ci_low"].iloc[0] < b < fit["b_ci_high"].iloc[0]  # (seed noise only: it may be narrow)
    ext = trend[trend["kind"] == "extrapolated"].set_index("size")
    assert {"pythia-160m", "pythia-1b"} <= set(ext.index)
    n1b = ext.loc["pythia-1b", "n_params"]
    assert ext.loc["pythia-1b", "multiplier"] == pytest.approx(_true_multiplier(n1b), rel=0.5)
    assert (trend.loc[trend["kind"] == "measured", "size"].tolist()) == ["mini", "small", "tiny"] or \
        set(trend.loc[trend["kind"] == "measured", "size"]) == set(LADDER)  # fmt: skip
    png = tmp_path / "figures" / "effective_vs_size.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and "figures/effective_vs_size.png" in md

    headline = md.split("## The paper's definition")[0]
    assert "## Effective compute (the headline)" in headline and "### Savings against size" in headline
    assert f"{summ.loc['tiny', 'effective_mean']:.2f}x [" in headline and "(extrapolated)" in headline
    assert "N^0.2" in headline and "Extrapolated (not measured)" in headline and "pythia-1b" in headline
    assert ">=" not in md
    assert "## Sources" in md and "source-mini" in md.split("## Sources")[1].split("##")[0]


def test_report_without_a_point_estimate_says_so_in_words(tmp_path):
    """XATL worse than scratch's first evaluation: only an upper bound exists, so no number is
    shown for it; a single size gives no trend, and the report says why."""
    g = 1e12 * np.arange(1, 21)
    rng = np.random.default_rng(0)
    write_run(tmp_path, "scratch_s0", kind="scratch", seed=0, flops=g, loss=_scratch_loss(g, rng), mixer="mamba")
    write_run(tmp_path, "xatl_s0", kind="xatl", seed=0, flops=g[:10], loss=np.full(10, 9.0), mixer="mamba",
              source="hub/m")  # fmt: skip
    md = write_report(tmp_path, n_boot=200, fit_boot=50).read_text()
    eff = pd.read_csv(tmp_path / "effective.csv")
    assert eff["method"].tolist() == ["upper_bound"]
    phrase = eff["effective"].iloc[0]
    assert phrase.startswith("upper bound only") and not any(ch.isdigit() for ch in phrase)  # words, no number
    summ = pd.read_csv(tmp_path / "effective_summary.csv")
    assert summ["effective"].tolist() == ["no estimate (1 upper bound)"] and math.isnan(summ["effective_mean"].iloc[0])
    assert "no estimate (1 upper bound)" in md and "One size in this sweep: no trend with size" in md
    assert not (tmp_path / "figures" / "effective_vs_size.png").exists() and "effective_vs_size" not in md
    assert (tmp_path / "size_trend.csv").read_text().strip() == ""  # no trend: an empty table, not a made-up one


def test_non_embedding_params_and_the_ladder_span():
    """One count (xatl_ds.sizes.non_embedding_params, from the FLOP counter's matmul weights):
    12 * layers * d^2 for a Transformer, the same from a meta.json model_config, and the CPU
    ladder's three sizes span >= 10x for both of its architectures."""
    from xatl_ds.sizes import non_embedding_params, size_config
    from xatl_ds.sweep import expand, load_sweep

    assert non_embedding_params(size_config("tiny", "attention")) == 12 * 4 * 128**2
    hybrid = size_config("tiny", "mamba", "paper")
    assert hybrid.layer_mixers == ["mamba", "attention", "mamba", "mamba"]
    as_meta = {"num_hidden_layers": 4, "hidden_size": 128, "layer_mixers": hybrid.layer_mixers}
    assert non_embedding_params(as_meta) == non_embedding_params(hybrid) == non_embedding_params(hybrid.to_dict())
    assert non_embedding_params(size_config("tiny", "mamba")) > non_embedding_params(hybrid)  # Mamba mixers are wider
    runs = expand(load_sweep(Path(__file__).parents[1] / "sweeps" / "cpu_ladder.yaml"))
    ladder = sorted({r.config.model.size for r in runs if r.init_kind == "scratch" and r.role != "source"})
    assert len(ladder) == 3
    for att in ("none", "paper"):
        n = [non_embedding_params(size_config(s, "mamba", att)) for s in ladder]
        assert max(n) / min(n) >= 10, (att, dict(zip(ladder, n)))


def test_legends_name_the_architecture_not_the_run():
    from analysis.figures import _group_label, arch_label

    row = {"run": "runs/mamba-hybrid-xatl-lit-s0-abc123", "mixer": "mamba", "attention_layers": "1",
           "init_kind": "xatl", "freeze_policy": "lit", "seed": 0}  # fmt: skip
    assert arch_label(row) == "mamba+attn[1]" and arch_label({**row, "attention_layers": "none"}) == "mamba"
    assert _group_label(row, False) == "XATL mamba+attn[1] (lit)"
    assert _group_label({**row, "mixer": "attention", "attention_layers": "all"}, True) == "source attention"
    assert _group_label({**row, "init_kind": "scratch"}, False) == "scratch mamba+attn[1]"


def test_teacher_recovery_columns(tmp_path):
    """An XATL run whose source is a run of the table gets the teacher's val loss, the gap to
    it and the share of the teacher's benchmark score retained."""
    g = 1e9 * 1.5 ** np.arange(0, 8)
    src = write_run(tmp_path, "source", kind="scratch", seed=0, flops=g, loss=loglinear(g), mixer="attention",
                    evals=_evals(0.40, 0.03))  # fmt: skip
    (src / "hf").mkdir()
    x = write_run(tmp_path, "xatl_s0", kind="xatl", seed=0, flops=g, loss=loglinear(2 * g), source=str(src / "hf"),
                  evals=_evals(0.30, 0.03))  # fmt: skip
    meta = json.loads((x / "meta.json").read_text())
    meta["teacher_val_loss"] = 4.0
    (x / "meta.json").write_text(json.dumps(meta))
    df = results_table(tmp_path).set_index("name")
    assert df.at["xatl_s0", "teacher_run"] == "source"
    assert df.at["xatl_s0", "gap_to_teacher"] == pytest.approx(loglinear(2 * g)[-1] - 4.0)
    assert df.at["xatl_s0", "retained/xatl_nextsent/acc"] == pytest.approx(0.75)
    assert math.isnan(df.at["source", "retained/xatl_nextsent/acc"]), "a run without a teacher retains nothing"
    md = write_report(tmp_path).read_text()
    assert "## Teacher recovery" in md and re.search(r"\| xatl_s0 +\| random +\| source +\|", md) and "0.75" in md


def test_distilled_runs_count_the_teacher_and_show_the_student_alone(tmp_path):
    """A distilled XATL run whose teacher forward passes cost half its student FLOPs: its
    curve and table FLOPs are the total (teacher included), its recipe is named, and the
    report gives the multiplier both ways: m on all FLOPs, 1.5 m on the student's alone."""
    m = 2.0
    budget = 1e12
    cs = np.linspace(0, 8 * budget, 41)[1:]
    write_run(tmp_path, "scratch-s0", kind="scratch", seed=0, flops=cs, loss=_scratch_loss(cs, np.random.default_rng(0), 0),
              mixer="mamba", size="mini", dims=(4, 64))  # fmt: skip
    student = np.linspace(0, budget / 1.5, 21)[1:]
    total = 1.5 * student
    d = write_run(tmp_path, "kl-s0", kind="xatl", seed=0, flops=student, loss=E_ + A_ * (m * total) ** -ALPHA_,
                  mixer="mamba", size="mini", dims=(4, 64), source="hub/teacher", freeze_policy="none")  # fmt: skip
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    (d / "metrics.jsonl").write_text("".join(json.dumps({**r, "teacher_flops": 0.5 * r["flops"]}) + "\n" for r in rows))
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg["init"]["mixer"] = "attention"
    cfg["distill"] = {"enabled": True, "kl_weight": 1.0}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps({**meta, "config": cfg, "teacher_flops": 0.5 * student[-1]}))
    df = results_table(tmp_path).set_index("name")
    assert df.at["kl-s0", "recipe"] == "attention+kl" and df.at["scratch-s0", "recipe"] == "scratch"
    assert df.at["kl-s0", "flops"] == pytest.approx(total[-1]) and df.at["kl-s0", "student_flops"] == pytest.approx(student[-1])
    assert df.at["kl-s0", "teacher_share"] == pytest.approx(1 / 3)
    write_report(tmp_path, n_boot=200, fit_boot=20)
    summ = pd.read_csv(tmp_path / "effective_summary.csv")
    (row,) = summ[summ["recipe"] == "attention+kl"].to_dict("records")
    assert row["effective_mean"] == pytest.approx(m, rel=0.02)
    assert row["effective_excl_teacher"].startswith(f"{1.5 * m:.2f}x") or \
        float(row["effective_excl_teacher"].split("x")[0]) == pytest.approx(1.5 * m, rel=0.02)
    assert (tmp_path / "figures" / "loss_vs_tokens.png").is_file()


@pytest.mark.parametrize("lo, hi, at_least", [(1.0, 1.35, 3), (4.0, 8.0, 2), (1e5, 1e9, 4)])
def test_log_axis_labels_narrow_and_wide_ranges(lo, hi, at_least):
    """A log axis shows several labels however narrow its range (a lone "1" on 1.0-1.35 was
    the complaint), none of them outside the range."""
    import matplotlib.pyplot as plt

    from analysis.figures import log_axis

    fig, ax = plt.subplots()
    ax.plot([0, 1], [lo, hi])
    log_axis(ax, "y")
    fig.canvas.draw()
    ymin, ymax = ax.get_ylim()
    labelled = [t for t in ax.yaxis.get_major_ticks() if t.label1.get_text() and ymin <= t.get_loc() <= ymax]
    plt.close(fig)
    assert len(labelled) >= at_least


def test_savings_curves_draw_seeds_that_share_no_target_range(tmp_path, monkeypatch):
    """A variant whose seeds reach disjoint target ranges has no mean to draw; each seed's own
    points are drawn instead of the variant silently missing from its panel (it did, for
    zero_out at tiny in docs/results/recipes)."""
    import analysis.figures as figures

    def pairing(run, targets, ratios, lower):
        return pd.DataFrame({"target": targets, "ratio": ratios, "lower_bound": lower, "xatl_run": run,
                             "scratch_run": run + "-scratch", "size": "tiny", "mixer": "mamba2",
                             "attention_layers": "none", "freeze_policy": "lit"})  # fmt: skip

    apart = pd.concat([pairing("a", [6.0, 5.5, 5.2], [2.0, 9.0, 30.0], [1.0, 1.0, 1.0]),
                       pairing("b", [5.1, 5.05], [40.0, 45.0], [0.0, 0.0])])  # fmt: skip
    drawn = {}
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.setdefault("fig", fig) and path)
    figures.plot_savings_curves(apart, tmp_path / "s.png", sizes=["tiny"])
    ax = drawn["fig"].axes[0]
    points = {(round(x, 3), round(y, 3)) for ln in ax.get_lines() for x, y in zip(ln.get_xdata(), ln.get_ydata())}
    assert {(5.1, 40.0), (5.05, 45.0), (6.0, 2.0)} <= points, "every seed's own points are drawn"
    labels = [t.get_text() for t in drawn["fig"].legends[0].get_texts()]
    assert any("drawn apart" in t for t in labels), labels
