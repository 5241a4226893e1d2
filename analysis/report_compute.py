"""The numbers of a report, computed once (:func:`compute_report`): every table it writes
and shows, the size trends and what the sweep still lacks, as a :class:`ReportTables`. Nothing
is written here (:mod:`analysis.report` writes; :mod:`analysis.report_markdown` renders)."""
from __future__ import annotations

import glob
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import pandas as pd
import yaml

from .effective import aggregate_effective, effective_compute, effective_table
from .figures import variant_label
from .report_data import SweepData, load_sweep
from .report_phrases import effective_phrase, effective_summary_phrase, finite, paper_phrase
from .results import plan_records
from .savings import PAIR_KEYS, VARIANT_KEYS, aggregate_savings, benchmark_deltas, pair_runs, savings_curve, savings_table
from .trend import trend_table

__all__ = ["SUMMARY_KEYS", "TREND_KEYS", "ReportTables", "compute_report", "expected_run_dirs", "missing_items"]  # fmt: skip

#: what one row of effective_summary.csv stands for: everything a pairing key has but the seed
SUMMARY_KEYS = [k for k in PAIR_KEYS if k != "seed"] + list(VARIANT_KEYS)
#: one size trend per architecture and XATL variant: the summary's keys without the size and
#: without what a size ladder scales with the size (its source, the LIT window, the re-warmup)
TREND_KEYS = [k for k in SUMMARY_KEYS if k not in ("size", "source", "lit_window", "rewarmup_steps")]


def expected_run_dirs(expected: Iterable[str] | None) -> list[Path]:
    """out_dir of every run config matched by the globs in ``expected``."""
    out = []
    for pattern in expected or []:
        for f in sorted(glob.glob(pattern, recursive=True)):
            try:
                cfg = yaml.safe_load(Path(f).read_text()) or {}
            except (OSError, yaml.YAMLError):
                continue
            if isinstance(cfg, dict) and cfg.get("out_dir"):
                out.append(Path(cfg["out_dir"]))
    return out


def missing_items(df: pd.DataFrame, expected_dirs: Iterable[Path] = (), eval_tasks: Iterable[str] | None = None) -> dict:
    """What the sweep still lacks: runs not started (expected but absent), runs not done,
    finished runs without eval.json (or without some of ``eval_tasks``), XATL runs without a
    scratch baseline and scratch runs no XATL run pairs with."""
    have = {str(Path(p).resolve()) for p in df.get("run_dir", [])}
    not_started = [str(p) for p in expected_dirs if str(Path(p).resolve()) not in have]
    if df.empty:
        return {"not_started": not_started, "not_done": [], "eval_missing": [], "no_baseline": [], "unpaired_scratch": []}
    not_done = [f"{r['run']} ({r['state']})" for _, r in df.iterrows() if r["state"] != "done"]
    done = df[df["state"] == "done"]
    eval_missing = []
    tasks = list(eval_tasks or [])
    for _, r in done.iterrows():
        if not r.get("has_eval"):
            eval_missing.append(f"{r['run']} (no eval.json)")
        elif tasks:
            lack = [t for t in tasks if not any(c.startswith(f"eval/{t}/") and r.get(c) == r.get(c) and r.get(c) is not None
                                                for c in df.columns)]  # fmt: skip
            if lack:
                eval_missing.append(f"{r['run']} (missing {', '.join(lack)})")
    pairs, lonely, unpaired = pair_runs(df)
    key = lambda r: f"size={r['size']} mixer={r['mixer']} attention={r['attention_layers']} seed={r['seed']}"  # noqa: E731
    return {
        "not_started": not_started, "not_done": not_done, "eval_missing": eval_missing,
        "no_baseline": [f"{df.loc[i, 'run']} ({key(df.loc[i])})" for i in lonely],
        "unpaired_scratch": [f"{df.loc[j, 'run']} ({key(df.loc[j])})" for j in unpaired],
    }  # fmt: skip


def _pythia_targets():
    """group row -> {pythia size: non-embedding parameters} for that architecture (a hybrid
    keeps attention in the paper's layers at every size); {} without the training stack."""
    try:
        from xatl_ds.sizes import PYTHIA_SIZES, non_embedding_params, size_config
    except Exception:  # noqa: BLE001
        return lambda row: {}
    cache: dict[tuple, dict] = {}

    def targets(row: Mapping) -> dict[str, float]:
        att = str(row.get("attention_layers", "none"))
        spec = att if att in ("none", "all") else "paper"
        key = (row.get("mixer"), spec)
        if key not in cache:
            try:
                cache[key] = {n: float(non_embedding_params(size_config(n, str(row.get("mixer")), spec)))
                              for n in PYTHIA_SIZES}  # fmt: skip
            except Exception:  # noqa: BLE001
                cache[key] = {}
        return cache[key]

    return targets


def _excl_teacher(df: pd.DataFrame, sav: pd.DataFrame, curves: Mapping[str, pd.DataFrame], n_params: Mapping[str, float],
                  summ: pd.DataFrame, fit_boot: int, ema: float, n_boot: int) -> list[str]:  # fmt: skip
    """Per summary row, the multiplier with a distillation teacher's forward FLOPs left out of
    the XATL side (its student FLOPs alone), in words; "" for groups without a teacher."""
    taught = set(df.loc[df["teacher_flops"].astype(float) > 0, "run"]) if "teacher_flops" in df else set()
    pairs = sav[sav["xatl_run"].isin(taught)] if taught and not sav.empty else sav.iloc[:0]
    if pairs.empty:
        return [""] * len(summ)
    student = {r: c.assign(flops=c["student_flops"]) if "student_flops" in c else c for r, c in curves.items()}
    eff, ems = effective_table(pairs, student, n_params=n_params, fit_boot=fit_boot, ema=ema)
    if eff.empty:
        return [""] * len(summ)
    done = (eff["xatl_state"] == "done").to_numpy()
    if not done.any():
        return [""] * len(summ)
    agg = aggregate_effective(eff[done].reset_index(drop=True), [m for m, d in zip(ems, done) if d], SUMMARY_KEYS,
                              n_boot=n_boot)  # fmt: skip
    keys = [k for k in SUMMARY_KEYS if k in agg and k in summ]
    phrase = {_norm_key(tuple(r[k] for k in keys)): effective_summary_phrase(r) for _, r in agg.iterrows()}
    return [phrase.get(_norm_key(tuple(r[k] for k in keys)), "") for _, r in summ.iterrows()]


def _source_runs(df: pd.DataFrame, sweep_dir: Path) -> set[str]:
    """Runs that are sources: planned with role ``source``, or whose ``hf/`` export an XATL
    run transfers from."""
    plans = plan_records(sweep_dir)
    hf = {str((Path(d) / "hf").resolve()): r for r, d in zip(df["run"], df["run_dir"])}
    used = {hf.get(str(Path(s).resolve())) for s in df["source"] if isinstance(s, str) and s}
    planned = {r for r, d in zip(df["run"], df["run_dir"])
               if (plans.get(str(Path(d).resolve())) or {}).get("role") == "source"}  # fmt: skip
    return (used | planned) - {None}


def _norm_key(key: tuple) -> tuple:
    """A group key with NaN as None (groupby keeps NaN, rows hold None or NaN)."""
    return tuple(None if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in key)


@dataclass
class ReportTables:
    """Everything a report writes and shows, as :func:`compute_report` found it. Each frame is
    the CSV of the same name (``data.df``: results.csv); empty where there is nothing yet."""

    #: the folder reported on
    sweep_dir: Path
    #: the runs, their curves and where they came from
    data: SweepData
    #: runs that are sources of the sweep's XATL runs
    sources: set[str]
    savings: pd.DataFrame
    savings_summary: pd.DataFrame
    savings_curves: pd.DataFrame
    effective: pd.DataFrame
    effective_summary: pd.DataFrame
    effective_curves: pd.DataFrame
    size_trend: pd.DataFrame
    #: TREND_KEYS group -> its fitted :class:`~analysis.trend.SizeTrend`
    trends: dict
    #: TREND_KEYS group -> why it has no trend
    no_trend: dict
    benchmark_deltas: pd.DataFrame
    #: :func:`missing_items` of the sweep
    missing: dict[str, list[str]]

    @property
    def from_tables(self) -> bool:
        """Rebuilt from an earlier report's tables (``SweepData.mode == "tables"``)."""
        return self.data.mode == "tables"


def compute_report(sweep_dir: str | Path, *, source_flops: float | Mapping[str, float] | None = None,
                   expected: Iterable[str] | None = None, eval_tasks: Iterable[str] | None = None, ema: float = 0.0,
                   n_boot: int = 2000, fit_boot: int = 200, runs: Iterable[str | Path] | None = None) -> ReportTables:  # fmt: skip
    """Every table of the report on ``sweep_dir`` (arguments: :func:`analysis.report.write_report`'s)."""
    sweep_dir = Path(sweep_dir)
    expected_dirs = expected_run_dirs(expected)
    data = load_sweep(sweep_dir, allow_empty=bool(expected_dirs), runs=runs)
    df, curves, tables = data.df, data.curves, data.mode == "tables"
    sources = _source_runs(df, sweep_dir) if not df.empty else set()
    if tables:
        sav = data.tables["savings"]
    else:
        sav = savings_table(df, curves, source_flops=source_flops, ema=ema) if not df.empty else pd.DataFrame()
    agg = aggregate_savings(sav, n_boot=n_boot) if not sav.empty else pd.DataFrame()
    if not agg.empty:
        agg["paper_savings"] = [paper_phrase(r["savings_flops_mean"], r["savings_flops_ci_low"], r["savings_flops_ci_high"],
                                             r["n_seeds"], r["n_reached_savings_flops"], r["any_lower_bound"])
                                for _, r in agg.iterrows()]  # fmt: skip
    eff, ecurves, summ = _effective_tables(data, sav, ema=ema, n_boot=n_boot, fit_boot=fit_boot)
    eff_done = eff[(eff["xatl_state"] == "done").to_numpy()] if not eff.empty else eff
    trend, trends, no_trend = trend_table(eff_done, TREND_KEYS, targets=_pythia_targets(), n_boot=n_boot)
    trend = _with_measured(trend, trends, summ)
    if tables:
        scurves = data.tables["savings_curves"]
    else:
        scurve_rows = [savings_curve(curves[p["scratch_run"]], curves[p["xatl_run"]], ema=ema).assign(
            xatl_run=p["xatl_run"], scratch_run=p["scratch_run"]) for _, p in sav.iterrows()]  # fmt: skip
        scurves = pd.concat(scurve_rows, ignore_index=True) if scurve_rows else pd.DataFrame()
    deltas = benchmark_deltas(df) if not df.empty else pd.DataFrame()
    tasks = list(eval_tasks) if eval_tasks is not None else sorted(
        {c.split("/")[1] for c in df.columns if c.startswith("eval/")} if not df.empty else set())  # fmt: skip
    return ReportTables(sweep_dir=sweep_dir, data=data, sources=sources, savings=sav, savings_summary=agg,
                        savings_curves=scurves, effective=eff, effective_summary=summ, effective_curves=ecurves,
                        size_trend=trend, trends=trends, no_trend=no_trend, benchmark_deltas=deltas,
                        missing=missing_items(df, expected_dirs, tasks))  # fmt: skip


def _effective_tables(data: SweepData, sav: pd.DataFrame, *, ema: float, n_boot: int,
                      fit_boot: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:  # fmt: skip
    """effective.csv, effective_curves.csv and effective_summary.csv: per pairing, along each
    XATL curve and over seeds (finished XATL runs only: a partial run's budget is not the one
    planned). A ``tables`` rebuild reads them back as they are."""
    if data.mode == "tables":  # the over-seeds intervals need each pairing's fit replicates, which no table holds
        return data.tables["effective"], data.tables["effective_curves"], data.tables["effective_summary"]
    curves, n_params = data.curves, data.n_params
    eff, ems = (effective_table(sav, curves, n_params=n_params, fit_boot=fit_boot, ema=ema)
                if not sav.empty else (pd.DataFrame(), []))  # fmt: skip
    if not eff.empty:
        eff["effective"] = [effective_phrase(r["multiplier"], r["fit_ci_low"], r["fit_ci_high"], r["method"],
                                             r["extrapolation_factor"]) for _, r in eff.iterrows()]  # fmt: skip
        eff["effective_incl_source"] = [
            effective_phrase(r["multiplier_incl_source"], r["fit_ci_low_incl_source"], r["fit_ci_high_incl_source"],
                             r["method"]) if finite(r["source_flops"]) else "source FLOPs unknown (--source-flops)"
            for _, r in eff.iterrows()]  # fmt: skip
    ecurves = []  # the multiplier along each XATL curve, with the pairing's own fit
    for (_, r), em in zip(eff.iterrows(), ems):
        src = em.source_flops if math.isfinite(em.source_flops) else None
        c = effective_compute(curves[r["scratch_run"]], curves[r["xatl_run"]], source_flops=src, fit=em.fit, ema=ema)
        ecurves.append(c.assign(xatl_run=r["xatl_run"], scratch_run=r["scratch_run"]))
    done = (eff["xatl_state"] == "done").to_numpy() if not eff.empty else []
    eff_done = eff[done] if not eff.empty else eff
    summ = aggregate_effective(eff_done.reset_index(drop=True), [m for m, d in zip(ems, done) if d], SUMMARY_KEYS,
                               n_boot=n_boot) if len(eff_done) else pd.DataFrame()  # fmt: skip
    if not summ.empty:
        order = [k for k in TREND_KEYS if k in summ] + ["n_params"]  # sizes ascending within each architecture
        summ = summ.sort_values(order, na_position="last", kind="stable").reset_index(drop=True)
        summ["effective"] = [effective_summary_phrase(r) for _, r in summ.iterrows()]
        summ["effective_incl_source"] = [effective_summary_phrase(r, "effective_incl_source")
                                         for _, r in summ.iterrows()]  # fmt: skip
        summ["effective_excl_teacher"] = _excl_teacher(data.df, sav, curves, n_params, summ, fit_boot, ema, n_boot)
    return eff, pd.concat(ecurves, ignore_index=True) if ecurves else pd.DataFrame(), summ


def _with_measured(trend: pd.DataFrame, trends: dict, summ: pd.DataFrame) -> pd.DataFrame:
    """size_trend.csv: the fitted and extrapolated rows of ``trend`` after the measured means
    of the groups with a trend, each row labelled with its architecture."""
    if summ.empty or (trend.empty and not trends):
        return trend
    fitted = {_norm_key(k) for k in trends}
    measured = summ[[_norm_key(tuple(r.get(k) for k in TREND_KEYS if k in summ)) in fitted
                     for _, r in summ.iterrows()]]  # fmt: skip
    measured = measured.assign(kind="measured", multiplier=measured["effective_mean"],
                               ci_low=measured["effective_ci_low"], ci_high=measured["effective_ci_high"],
                               method=measured["effective_method"])  # fmt: skip
    cols = [k for k in TREND_KEYS if k in summ] + ["size", "n_params", "kind", "multiplier", "ci_low", "ci_high",
                                                   "method"]  # fmt: skip
    trend = pd.concat([measured[cols], trend], ignore_index=True)
    trend.insert(0, "label", [variant_label(r) for _, r in trend.iterrows()])
    return trend
