"""``xatl-ds report SWEEP_DIR``: one readable page (report.md) plus the tables behind it.

Writes into the output folder (default SWEEP_DIR): ``report.md``, ``results.csv`` /
``results.parquet`` (one row per run), ``savings.csv`` (one row per XATL/scratch pairing),
``savings_summary.csv`` (over seeds), ``savings_curves.csv``, ``benchmark_deltas.csv`` and
``figures/*.png``. Partial sweeps are fine: the report lists what is missing.
"""
from __future__ import annotations

import glob
import math
import time
from pathlib import Path
from typing import Iterable, Mapping

import pandas as pd
import yaml

from .figures import plot_benchmark_deltas, plot_loss_vs_flops, plot_savings_curves, plot_savings_vs_size
from .results import load_runs, results_table
from .savings import aggregate_savings, benchmark_deltas, pair_runs, savings_curve, savings_table

__all__ = ["write_report", "missing_items", "md_table", "arch_label"]


def arch_label(row: Mapping) -> str:
    """``mamba`` or ``mamba+attn[1,3]``: the mixer and the layers that keep attention."""
    att = str(row.get("attention_layers", "none"))
    return str(row.get("mixer")) + ("" if att in ("", "none", "nan", "None") else f"+attn[{att}]")


def md_table(df: pd.DataFrame, cols: list[str] | None = None, floatfmt: str = "{:.4g}") -> str:
    """A GitHub markdown table (no tabulate dependency); NaN/None print as '-'."""
    if df is None or df.empty:
        return "_(none)_\n"
    cols = [c for c in (cols or list(df.columns)) if c in df.columns]

    def fmt(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if isinstance(v, float):
            return floatfmt.format(v)
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for _, r in df.iterrows()]
    return "\n".join(lines) + "\n"


def _expected_dirs(expected: Iterable[str] | None) -> list[Path]:
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


def _fmt_ratio(mean: float, lo: float, hi: float, n: int, n_ok: int, lb: bool) -> str:
    if not math.isfinite(mean):
        return f"not reached (0/{n})"
    s = f"{'>= ' if lb else ''}{mean:.2f}x"
    if math.isfinite(lo):
        s += f" [{lo:.2f}, {hi:.2f}]"
    if n_ok < n:
        s += f" ({n_ok}/{n} reached)"
    return s


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None, *,
                 source_flops: float | Mapping[str, float] | None = None, expected: Iterable[str] | None = None,
                 eval_tasks: Iterable[str] | None = None, ema: float = 0.0, n_boot: int = 2000) -> Path:  # fmt: skip
    """Build every table and figure for the sweep under ``sweep_dir`` and write report.md;
    returns its path. ``source_flops``: pretraining FLOPs of sources not trained in the sweep
    (one number, or {source: flops}); ``expected``: globs of the sweep's run config YAMLs;
    ``eval_tasks``: tasks every finished run should have (default: whatever any run has)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist")
    out = Path(out_dir) if out_dir is not None else sweep_dir
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    records, skipped = load_runs(sweep_dir)
    df = results_table(sweep_dir, records)
    curves = {}
    events = {}
    if not df.empty:
        for rec, run in zip(records, df["run"]):
            curves[run] = rec.val_curve
            events[run] = rec.unfreeze_events
    if not df.empty:
        df.to_csv(out / "results.csv", index=False)
        df.to_parquet(out / "results.parquet", index=False)
    sav = savings_table(df, curves, source_flops=source_flops, ema=ema) if not df.empty else pd.DataFrame()
    sav.to_csv(out / "savings.csv", index=False)
    agg = aggregate_savings(sav, n_boot=n_boot) if not sav.empty else pd.DataFrame()
    agg.to_csv(out / "savings_summary.csv", index=False)
    scurves, scurve_rows = {}, []
    for _, p in sav.iterrows():
        c = savings_curve(curves[p["scratch_run"]], curves[p["xatl_run"]], ema=ema)
        name = f"{p['size']} {arch_label(p)} s{p['seed']} ({p['freeze_policy']})"
        k = 2
        while name in scurves:  # variants that differ in columns not in the label
            name = f"{p['size']} {arch_label(p)} s{p['seed']} ({p['freeze_policy']}) #{k}"
            k += 1
        scurves[name] = c
        scurve_rows.append(c.assign(xatl_run=p["xatl_run"], scratch_run=p["scratch_run"]))
    (pd.concat(scurve_rows) if scurve_rows else pd.DataFrame()).to_csv(out / "savings_curves.csv", index=False)
    deltas = benchmark_deltas(df) if not df.empty else pd.DataFrame()
    deltas.to_csv(out / "benchmark_deltas.csv", index=False)

    f1 = plot_loss_vs_flops(df, curves, events, figs / "loss_vs_flops.png")
    f2 = plot_savings_vs_size(agg, df, figs / "savings_vs_size.png")
    f3 = plot_savings_curves(scurves, figs / "savings_vs_target_loss.png")
    f4 = plot_benchmark_deltas(deltas, figs / "benchmark_deltas.png")

    tasks = list(eval_tasks) if eval_tasks is not None else sorted(
        {c.split("/")[1] for c in df.columns if c.startswith("eval/")} if not df.empty else set())  # fmt: skip
    miss = missing_items(df, _expected_dirs(expected), tasks)
    md = [f"# XATL sweep report: {sweep_dir}", "", f"_generated {time.strftime('%Y-%m-%d %H:%M')}_", ""]
    n_done = int((df["state"] == "done").sum()) if not df.empty else 0
    md += [f"{len(df)} runs found ({n_done} done), {len(sav)} XATL/scratch pairings.", ""]
    md += ["## Compute-matched savings", "",
           "Savings = FLOPs (tokens, wall time) the scratch run needs to reach its own final validation loss / what "
           "the XATL run needs to reach that loss. Curves are running minima of the validation loss, interpolated "
           "linearly in log-FLOPs. `>=`: XATL was already below the target at its first evaluation (a lower bound). "
           "\"not reached\": the XATL run never got there. Brackets: bootstrap 95% CI over seeds. *incl. source*: the "
           "source model's pretraining FLOPs added to the XATL side.", ""]  # fmt: skip
    if not agg.empty:
        view = agg.copy()
        for col, name in (("savings_flops", "FLOPs"), ("savings_tokens", "tokens"), ("savings_wall_time", "wall time"),
                          ("savings_flops_incl_source", "FLOPs incl. source")):  # fmt: skip
            view[name] = [
                _fmt_ratio(r[f"{col}_mean"], r[f"{col}_ci_low"], r[f"{col}_ci_high"], r["n_seeds"],
                           r[f"n_reached_{col}"], r["any_lower_bound"] and col != "savings_flops_incl_source")
                if not (col == "savings_flops_incl_source" and r["n_reached_savings_flops"] and not r[f"n_reached_{col}"])
                else "source FLOPs unknown (--source-flops)"
                for _, r in agg.iterrows()
            ]  # fmt: skip
        md.append(md_table(view, ["size", "mixer", "attention_layers", "freeze_policy", "unfreeze_order", "n_seeds",
                                  "FLOPs", "tokens", "wall time", "FLOPs incl. source"]))  # fmt: skip
        md += ["", "Per pairing:", ""]
        md.append(md_table(sav, ["xatl_run", "xatl_state", "scratch_run", "seed", "target_loss", "scratch_flops_to_target",
                                 "xatl_flops_to_target", "savings_flops", "reached_flops", "lower_bound_flops",
                                 "source_flops", "savings_flops_incl_source"]))  # fmt: skip
    else:
        md.append("_No XATL run has a scratch baseline with a validation curve yet._\n")
    md += ["", f"![validation loss vs FLOPs](figures/{f1.name})", "",
           f"![savings vs model size](figures/{f2.name})", "",
           "A single ratio at the scratch run's final loss flatters short budgets; the curve shows the ratio for "
           "every target from the loss the XATL run starts at down to the scratch run's final loss.", "",
           f"![savings vs target loss](figures/{f3.name})", "", "## Benchmarks (XATL - scratch)", ""]  # fmt: skip
    if not deltas.empty:
        dv = deltas.copy()
        dv["delta ± se"] = [f"{d:+.4f} ± {s:.4f}" if math.isfinite(s) else f"{d:+.4f}" for d, s in zip(dv["delta"], dv["delta_se"])]
        md.append(md_table(dv, ["size", "mixer", "attention_layers", "seed", "freeze_policy", "task", "metric", "xatl",
                                "scratch", "delta ± se", "flops_ratio"]))  # fmt: skip
        md += ["", f"![benchmark deltas](figures/{f4.name})", ""]
    else:
        md.append("_No pairing has evaluations on both sides yet (`xatl-ds eval RUN_DIR`)._\n")
    md += ["## Runs", ""]
    md.append(md_table(df, ["run", "state", "size", "mixer", "attention_layers", "init_kind", "freeze_policy", "seed",
                            "steps", "flops", "final_val_loss", "best_val_loss", "n_unfreeze", "first_unfreeze_step",
                            "transferred_fraction"]) if not df.empty else "_(no runs found)_\n")  # fmt: skip
    md += ["", "## Missing", ""]
    labels = {"not_started": "Runs not started", "not_done": "Runs not finished", "eval_missing": "Evaluations missing",
              "no_baseline": "XATL runs without a scratch baseline",
              "unpaired_scratch": "Scratch runs without an XATL partner"}  # fmt: skip
    if skipped:
        md += [f"**Unreadable runs, left out** ({len(skipped)}):", ""] + [f"- {d}: {why}" for d, why in skipped] + [""]
    if not any(miss.values()) and not skipped:
        md.append("Nothing: every run is done, evaluated and paired.")
    for k, items in miss.items():
        if items:
            md += [f"**{labels[k]}** ({len(items)}):", ""] + [f"- {x}" for x in items] + [""]
    md += ["", "Files: results.csv, results.parquet, savings.csv, savings_summary.csv, savings_curves.csv, "
           "benchmark_deltas.csv, figures/."]  # fmt: skip
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path
