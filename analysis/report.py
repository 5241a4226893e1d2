"""``xatl-ds report SWEEP_DIR``: one readable page (report.md) plus the tables behind it.

Two definitions of a saving, side by side. The headline is *effective compute* (Hernandez
et al. 2021; :mod:`analysis.effective`): the scratch FLOPs needed to reach the XATL run's final
loss over the XATL run's FLOPs, measured on the scratch curve or extrapolated from its fitted
power law (flagged), with the method next to every number and words where only a bound
exists. Beside it, the paper's definition (:mod:`analysis.savings`): XATL FLOPs to reach the
scratch run's final loss, a lower bound whenever XATL starts below that loss.

Writes into the output folder (default SWEEP_DIR): ``report.md``, ``results.csv`` /
``results.parquet`` (one row per run), ``effective.csv`` (one row per XATL/scratch pairing),
``effective_summary.csv`` (over seeds), ``effective_curves.csv`` (the multiplier at every
evaluation along each XATL curve), ``size_trend.csv`` (the multiplier against
non-embedding parameters, fitted and extrapolated to the Pythia sizes), ``savings.csv`` /
``savings_summary.csv`` / ``savings_curves.csv`` (the paper's definition),
``benchmark_deltas.csv``, ``curves.parquet`` (every run's validation curve and unfreeze
events) and ``figures/*.png``. Partial sweeps are fine: the report lists what is missing.

Without run folders, ``SWEEP_DIR`` may be a folder an earlier report wrote: with its
results.parquet and curves.parquet the report is rebuilt exactly; with results.parquet alone
(reports written before curves.parquet existed) the per-pairing tables are read back and only
what they determine is recomputed (:func:`load_sweep`). A folder with neither runs nor
results.parquet is an error.
"""
from __future__ import annotations

import glob
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import pandas as pd
import yaml

from .effective import aggregate_effective, effective_compute, effective_table
from .figures import size_order  # noqa: E402  (the panels' order)
from .figures import (
    arch_label, variant_label, plot_benchmark_deltas, plot_effective_vs_size, plot_loss_vs_flops, plot_loss_vs_tokens,
    plot_savings_curves, plot_savings_vs_size,
)  # fmt: skip
from .results import RunRecord, load_runs, plan_records, results_table
from .savings import PAIR_KEYS, VARIANT_KEYS, aggregate_savings, benchmark_deltas, pair_runs, savings_curve, savings_table
from .trend import trend_table

__all__ = ["write_report", "missing_items", "md_table", "arch_label", "effective_phrase", "effective_summary_phrase",
           "paper_phrase"]  # fmt: skip

#: what one row of effective_summary.csv stands for: everything a pairing key has but the seed
SUMMARY_KEYS = [k for k in PAIR_KEYS if k != "seed"] + list(VARIANT_KEYS)
#: one size trend per architecture and XATL variant: the summary's keys without the size and
#: without what a size ladder scales with the size (its source, the LIT window, the re-warmup)
TREND_KEYS = [k for k in SUMMARY_KEYS if k not in ("size", "source", "lit_window", "rewarmup_steps")]


def md_table(df: pd.DataFrame, cols: list[str] | None = None, floatfmt: str = ".4g") -> str:
    """A GitHub markdown table (``DataFrame.to_markdown``, i.e. tabulate); NaN/None print as
    '-', floats with ``floatfmt``, strings as they are (no number parsing)."""
    if df is None or df.empty:
        return "_(none)_\n"
    cols = [c for c in (cols or list(df.columns)) if c in df.columns]

    def cell(v):
        if v is None or (pd.api.types.is_scalar(v) and not isinstance(v, str) and pd.isna(v)):
            return "-"
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v).replace("|", "\\|").replace("\n", " ")

    view = pd.DataFrame({c: [cell(v) for v in df[c]] for c in cols}, columns=cols)
    return view.to_markdown(index=False, tablefmt="github", disable_numparse=True) + "\n"


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


def _finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _interval(lo, hi) -> str:
    return f" [{float(lo):.2f}, {float(hi):.2f}]" if _finite(lo) and _finite(hi) else (
        f" [{float(lo):.2f}, unbounded]" if _finite(lo) else "")  # fmt: skip


def paper_phrase(mean: float, lo: float, hi: float, n: int, n_ok: int, lb: bool) -> str:
    """The paper's ratio in words: ``2.00x [1.8, 2.2]``; ``at least 14.33x (lower bound)``
    where XATL was already below the target at its first evaluation; ``not reached (0/3)``."""
    if not math.isfinite(mean):
        return f"not reached (0/{n})"
    s = f"{mean:.2f}x" + _interval(lo, hi)
    if lb:
        s = f"at least {s} (lower bound)"
    if n_ok < n:
        s += f" ({n_ok}/{n} reached)"
    return s


_NO_ESTIMATE = {
    "upper_bound": "upper bound only: scratch reached this loss by its first evaluation",
    "unreachable": "unreachable: the loss lies below the scratch fit's asymptote",
    "no_fit": "no estimate: the scratch curve is too short to fit",
}


def effective_phrase(value: float, lo: float, hi: float, method: str, factor: float = math.nan) -> str:
    """One pairing's multiplier with its method: ``3.10x (interpolated)``, ``3.10x [2.5, 4.0]
    (extrapolated 2.3x past the scratch run)``; words, no number, where only a bound exists."""
    if method in _NO_ESTIMATE or not _finite(value):
        return _NO_ESTIMATE.get(method, f"no estimate ({method})")
    s = f"{float(value):.2f}x" + _interval(lo, hi)
    if method == "extrapolated":
        return s + (f" (extrapolated {float(factor):.1f}x past the scratch run)" if _finite(factor) else " (extrapolated)")
    return s + f" ({method})"


def effective_summary_phrase(row: Mapping, prefix: str = "effective") -> str:
    """An effective_summary.csv row in words: the mean over the seeds with a point estimate,
    its interval and method, and which seeds had none (``2.90x [2.5, 3.3] (extrapolated)``,
    ``no estimate (3 upper bounds)``)."""
    n = int(row.get("n_seeds", 0))
    used = int(row.get(f"n_used_{prefix}", 0))
    left = [(int(row.get(f"n_{m}_{prefix}", 0)), w) for m, w in
            (("upper_bound", "upper bound"), ("unreachable", "unreachable"), ("no_fit", "no fit"))]  # fmt: skip
    why = ", ".join(f"{k} {w}{'s' if k > 1 else ''}" for k, w in left if k)
    if prefix.endswith("incl_source") and not bool(row.get("source_known", True)):
        return "source FLOPs unknown (--source-flops)"
    if not used or not _finite(row.get(f"{prefix}_mean")):
        return f"no estimate ({why or 'no seed'})"
    n_extra = int(row.get(f"n_extrapolated_{prefix}", 0))
    method = "extrapolated" if n_extra == used else f"{n_extra}/{used} seeds extrapolated" if n_extra else "interpolated"
    s = f"{float(row[f'{prefix}_mean']):.2f}x" + _interval(row.get(f"{prefix}_ci_low"), row.get(f"{prefix}_ci_high"))
    s += f" ({method})"
    if used < n:
        s += f"; {used}/{n} seeds ({why})" if why else f"; {used}/{n} seeds"
    return s


def _nonembed_params(records: list[RunRecord], runs: Iterable[str]) -> dict[str, float]:
    """Run -> non-embedding parameters (:func:`xatl_ds.sizes.non_embedding_params`), from the
    exported model config, else (scratch runs) the size table; runs neither gives are absent."""
    try:
        from xatl_ds.sizes import non_embedding_params, size_config
    except Exception:  # noqa: BLE001  (the report still works without the training stack)
        return {}
    out = {}
    for rec, run in zip(records, runs):
        model = rec.config.model
        try:
            if rec.model:
                out[run] = float(non_embedding_params(rec.model))
            elif rec.config.init.kind == "scratch":
                out[run] = float(non_embedding_params(size_config(model.size, model.mixer, model.attention_layers)))
        except Exception:  # noqa: BLE001  (an unknown size or mixer: no count, the trend skips it)
            continue
    return out


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


def _effective_section(eff: pd.DataFrame, summ: pd.DataFrame, trend: pd.DataFrame, trends: dict, skipped: dict,
                       fig: Path) -> list[str]:  # fmt: skip
    md = ["## Effective compute (the headline)", "",
          "Effective-compute multiplier (Hernandez et al. 2021) = the scratch FLOPs needed to reach the XATL run's final "
          "validation loss / the XATL run's FLOPs. *interpolated*: measured on the scratch curve (scratch runs train "
          "longer than XATL runs: `baseline: {budget_factor: K}`). *extrapolated*: even the longest scratch run stops "
          "short, so the scratch curve's fit L(C) = E + A*C^(-alpha) is inverted; its interval comes from refitting "
          "bootstrap replicates of the curve. Where no estimate exists the table says why in words. Means are over the "
          "seeds with an estimate; brackets: 95% bootstrap interval over seeds and, for extrapolated seeds, over the "
          "fit. *incl. source*: the source's pretraining FLOPs added to the XATL side. Runs compared this way should "
          "not anneal their learning rate early (sweeps/cpu_ladder.yaml keeps it constant): a cosine-decayed scratch "
          "curve is not annealed below its budget, where an XATL run's end is, and flattens at its end, which pulls its "
          "fitted asymptote towards its last loss. effective_curves.csv: the multiplier at every XATL evaluation.", ""]  # fmt: skip
    if summ.empty:
        return md + ["_No XATL run with a validation curve has a scratch baseline with one yet._", ""]
    view = summ.assign(arch=[variant_label(r) for _, r in summ.iterrows()])
    teacher = "effective_excl_teacher" in view and (view["effective_excl_teacher"].astype(str) != "").any()
    md.append(md_table(view.rename(columns={"effective": "effective-compute multiplier",
                                            "effective_incl_source": "incl. source", "n_params": "non-embedding params",
                                            "effective_excl_teacher": "excl. teacher"}),
                       ["size", "arch", "non-embedding params", "n_seeds", "effective-compute multiplier",
                        "incl. source", *(["excl. teacher"] if teacher else [])], floatfmt=".3g"))  # fmt: skip
    if teacher:
        md += ["", "Distilled runs: the multiplier counts the teacher's forward FLOPs on the XATL side (they were "
               "spent); *excl. teacher* leaves them out (the student's FLOPs alone).", ""]
    md += ["", "Per pairing:", ""]
    md.append(md_table(eff, ["xatl_run", "xatl_state", "scratch_run", "seed", "budget", "xatl_loss", "scratch_flops",
                             "method", "effective", "effective_incl_source"]))  # fmt: skip
    md += ["", "### Savings against size", "", f"![effective compute vs size](figures/{fig.name})", "",
           "_Caption_: points are the measured means with their 95% intervals; the solid line is the fit "
           "multiplier = exp(a) * N^b over the measured sizes (N: non-embedding parameters), the band its bootstrap "
           "interval over seeds (seed noise only: doubt about the form of the law is not in it). Dashed: the same line carried to the Pythia sizes. That part is an extrapolation, not a "
           "measurement: it assumes the power law seen over a few tiny CPU models on a small corpus holds across "
           "orders of magnitude of size, data and training length, which nothing here tests.", ""]  # fmt: skip
    for key, tr in trends.items():
        g = dict(zip(TREND_KEYS, key))
        ci = (f" [{tr.b_ci_low:.2f}, {tr.b_ci_high:.2f}]" if math.isfinite(tr.b_ci_low)
              else " (one seed per size: no interval)")  # fmt: skip
        md.append(f"- {variant_label(g)}: multiplier ~ N^{tr.b:.3f}{ci} over {len(tr.sizes)} sizes "
                  f"({'grows' if tr.b > 0 else 'shrinks'} with size at the point estimate"
                  + ("; the interval includes 0" if math.isfinite(tr.b_ci_low) and tr.b_ci_low <= 0 <= tr.b_ci_high else "")
                  + ")")  # fmt: skip
    for key, why in skipped.items():
        md.append(f"- {variant_label(dict(zip(TREND_KEYS, key)))}: no trend ({why})")
    ext = trend[trend["kind"] == "extrapolated"] if not trend.empty else trend
    if not ext.empty:
        md += ["", "Extrapolated (not measured):", ""]
        md.append(md_table(ext.assign(arch=[variant_label(r) for _, r in ext.iterrows()]),
                           ["arch", "size", "n_params", "multiplier", "ci_low", "ci_high"], floatfmt=".3g"))  # fmt: skip
    return md + [""]


def _sources_section(df: pd.DataFrame, sources: set[str]) -> list[str]:
    """How far each source trained, against the XATL runs that transfer from it."""
    if not sources:
        return []
    md = ["## Sources", "", "A real source has seen far more tokens than the conversion will; the ratio column "
          "compares each source's FLOPs with the mean FLOPs of the XATL runs that transfer from it.", ""]  # fmt: skip
    hf = {str((Path(d) / "hf").resolve()): r for r, d in zip(df["run"], df["run_dir"])}
    rows = []
    for _, r in df[df["run"].isin(sources)].iterrows():
        users = df[[hf.get(str(Path(s).resolve())) == r["run"] if isinstance(s, str) and s else False
                    for s in df["source"]]]  # fmt: skip
        mean_x = float(users["flops"].astype(float).mean()) if len(users) else math.nan
        rows.append({"source": r["run"], "state": r["state"], "size": r["size"], "steps": r["steps"],
                     "tokens": r["tokens"], "flops": r["flops"], "final_val_loss": r["final_val_loss"],
                     "XATL runs": len(users),
                     "x XATL budget": float(r["flops"]) / mean_x if _finite(mean_x) and mean_x > 0 else math.nan})  # fmt: skip
    return md + [md_table(pd.DataFrame(rows)), ""]


# -- where the runs come from: run folders, or a committed report's parquet --------------------------
@dataclass
class SweepData:
    """What a report is built from. ``mode``: ``runs`` (run folders), ``parquet``
    (results.parquet and curves.parquet of an earlier report: an exact rebuild) or ``tables``
    (results.parquet without curves.parquet: the per-pairing tables of that report are read,
    not recomputed, since their inputs -- the per-run curves -- are not there)."""

    df: pd.DataFrame
    curves: dict[str, pd.DataFrame]
    events: dict[str, list[dict]]
    n_params: dict[str, float]
    skipped: list = field(default_factory=list)
    mode: str = "runs"
    #: the sweep the runs were trained in (the folder's name for run folders)
    origin: str = ""
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


#: what a ``tables`` rebuild reads from an earlier report, besides results.parquet
_TABLES = {"savings": "savings.csv", "effective": "effective.csv", "effective_summary": "effective_summary.csv",
           "effective_curves": "effective_curves.csv", "savings_curves": "savings_curves.csv"}  # fmt: skip
_CURVE_COLS = ["step", "tokens", "flops", "student_flops", "wall_time", "val_loss"]


def curves_frame(curves: Mapping[str, pd.DataFrame], events: Mapping[str, list[dict]]) -> pd.DataFrame:
    """Every run's validation curve (rows ``kind == "val"``) and unfreeze events (``kind ==
    "unfreeze"``, the event as JSON in ``event``) in one long table: what curves.parquet holds
    so that a report rebuilds without the run folders."""
    parts = []
    for run, c in curves.items():
        if c is not None and len(c):
            parts.append(c[[k for k in _CURVE_COLS if k in c]].astype(float).assign(run=run, kind="val"))
        for e in events.get(run, []):
            parts.append(pd.DataFrame([{"run": run, "kind": "unfreeze", "step": float(e.get("step", math.nan)),
                                        "flops": float(e.get("flops", math.nan)), "tokens": float(e.get("tokens", math.nan)),
                                        "event": json.dumps(e, default=str)}]))  # fmt: skip
    cols = ["run", "kind", *_CURVE_COLS, "event"]
    return pd.concat(parts, ignore_index=True).reindex(columns=cols) if parts else pd.DataFrame(columns=cols)


def _read_curves(path: Path) -> tuple[dict[str, pd.DataFrame], dict[str, list[dict]]]:
    cf = pd.read_parquet(path)
    curves, events = {}, {}
    for run, g in cf.groupby("run", sort=False):
        v = g[g["kind"] == "val"]
        curves[run] = v[[k for k in _CURVE_COLS if k in v and v[k].notna().any()]].reset_index(drop=True)
        events[run] = [json.loads(e) for e in g.loc[g["kind"] == "unfreeze", "event"]]
    return curves, events


def _origin(df: pd.DataFrame, fallback: str) -> str:
    """The folder the runs were trained in: ``run_dir`` without its ``run`` suffix."""
    roots = {d[: -len(r)].rstrip("/") for d, r in zip(df.get("run_dir", []), df.get("run", []))
             if isinstance(d, str) and isinstance(r, str) and d.endswith(r) and len(d) > len(r)}  # fmt: skip
    return roots.pop() if len(roots) == 1 else fallback


def load_sweep(sweep_dir: str | Path, *, allow_empty: bool = False) -> SweepData:
    """The runs under ``sweep_dir``; where there are none, the report committed there
    (results.parquet, with curves.parquet for an exact rebuild). FileNotFoundError when there
    is neither (unless ``allow_empty``: a sweep whose runs have not started)."""
    sweep_dir = Path(sweep_dir)
    records, skipped = load_runs(sweep_dir)
    if records:
        df = results_table(sweep_dir, records)
        n_params = _nonembed_params(records, df["run"])
        df["n_params"] = [n_params.get(r, math.nan) for r in df["run"]]
        return SweepData(df, {r: rec.val_curve for rec, r in zip(records, df["run"])},
                         {r: rec.unfreeze_events for rec, r in zip(records, df["run"])}, n_params, skipped,
                         origin=str(sweep_dir))  # fmt: skip
    pq = sweep_dir / "results.parquet"
    if not pq.is_file():
        if allow_empty or skipped:
            return SweepData(pd.DataFrame(), {}, {}, {}, skipped, origin=str(sweep_dir))
        raise FileNotFoundError(f"{sweep_dir} holds no run folders and no results.parquet: nothing to report (point "
                                "at a sweep's folder, or at a folder an earlier `xatl-ds report` wrote)")  # fmt: skip
    df = pd.read_parquet(pq)
    n_params = ({r: float(v) for r, v in zip(df["run"], df["n_params"]) if _finite(v)} if "n_params" in df else {})
    origin = _origin(df, str(sweep_dir))
    if (sweep_dir / "curves.parquet").is_file():
        curves, events = _read_curves(sweep_dir / "curves.parquet")
        return SweepData(df, curves, events, n_params, skipped, "parquet", origin)
    lacking = [f for f in _TABLES.values() if not (sweep_dir / f).is_file()]
    if lacking:
        raise FileNotFoundError(f"{sweep_dir} has results.parquet but neither run folders, curves.parquet nor the "
                                f"tables of an earlier report ({', '.join(lacking)} missing): the per-run validation "
                                "curves are needed to rebuild it")  # fmt: skip
    dtypes = {"attention_layers": str}
    tables = {k: pd.read_csv(sweep_dir / f, dtype=dtypes) if (sweep_dir / f).stat().st_size > 1 else pd.DataFrame()
              for k, f in _TABLES.items()}  # an empty table is written as one newline
    return SweepData(df, {}, {}, n_params, skipped, "tables", origin, tables)


def _provenance(data: SweepData, sweep_dir: Path) -> list[str]:
    if data.mode == "parquet":
        return [f"Rebuilt from `{sweep_dir}`: results.parquet and curves.parquet (the run folders are not here); "
                "every number and figure is recomputed from them.", ""]  # fmt: skip
    if data.mode == "tables":
        return [f"Rebuilt from `{sweep_dir}` without the run folders and without curves.parquet: the per-run "
                "validation curves were not committed with this report, so the per-pairing tables (effective.csv, "
                "effective_summary.csv, effective_curves.csv, savings.csv, savings_curves.csv) are read as the run "
                "folders gave them, the aggregates over seeds of the paper's definition, the size trend and the "
                "benchmark deltas are recomputed from them and results.parquet, and the loss-curve figures are the "
                "ones drawn from the run folders.", ""]  # fmt: skip
    return []


def _kept_figure(sweep_dir: Path, figs: Path, name: str) -> Path | None:
    """A figure of an earlier report, kept (copied when the output folder is another)."""
    src = sweep_dir / "figures" / name
    if not src.is_file():
        return None
    dst = figs / name
    if src.resolve() != dst.resolve():
        shutil.copyfile(src, dst)
    return dst


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None, *,
                 source_flops: float | Mapping[str, float] | None = None, expected: Iterable[str] | None = None,
                 eval_tasks: Iterable[str] | None = None, ema: float = 0.0, n_boot: int = 2000,
                 fit_boot: int = 200) -> Path:  # fmt: skip
    """Build every table and figure for the sweep under ``sweep_dir`` and write report.md;
    returns its path. ``source_flops``: pretraining FLOPs of sources not trained in the sweep
    (one number, or {source: flops}); ``expected``: globs of the sweep's run config YAMLs;
    ``eval_tasks``: tasks every finished run should have (default: whatever any run has);
    ``n_boot``: bootstrap replicates over seeds; ``fit_boot``: refits of each extrapolated
    scratch curve."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist")
    out = Path(out_dir) if out_dir is not None else sweep_dir
    figs = out / "figures"
    data = load_sweep(sweep_dir, allow_empty=bool(_expected_dirs(expected)))
    df, curves, events, skipped, n_params = data.df, data.curves, data.events, data.skipped, data.n_params
    tables = data.mode == "tables"
    figs.mkdir(parents=True, exist_ok=True)
    if not df.empty:
        df.to_csv(out / "results.csv", index=False)
        df.to_parquet(out / "results.parquet", index=False)
        if not tables:
            curves_frame(curves, events).to_parquet(out / "curves.parquet", index=False)
    sources = _source_runs(df, sweep_dir) if not df.empty else set()
    if tables:
        sav = data.tables["savings"]
    else:
        sav = savings_table(df, curves, source_flops=source_flops, ema=ema) if not df.empty else pd.DataFrame()
    sav.to_csv(out / "savings.csv", index=False)
    agg = aggregate_savings(sav, n_boot=n_boot) if not sav.empty else pd.DataFrame()
    if not agg.empty:
        agg["paper_savings"] = [paper_phrase(r["savings_flops_mean"], r["savings_flops_ci_low"], r["savings_flops_ci_high"],
                                             r["n_seeds"], r["n_reached_savings_flops"], r["any_lower_bound"])
                                for _, r in agg.iterrows()]  # fmt: skip
    agg.to_csv(out / "savings_summary.csv", index=False)

    # effective compute: per pairing, over seeds (finished XATL runs only: a partial run's
    # budget is not the one planned), and against size
    if tables:
        eff, ems = data.tables["effective"], []
    else:
        eff, ems = (effective_table(sav, curves, n_params=n_params, fit_boot=fit_boot, ema=ema)
                    if not sav.empty else (pd.DataFrame(), []))  # fmt: skip
    if not eff.empty and not tables:
        eff["effective"] = [effective_phrase(r["multiplier"], r["fit_ci_low"], r["fit_ci_high"], r["method"],
                                             r["extrapolation_factor"]) for _, r in eff.iterrows()]  # fmt: skip
        eff["effective_incl_source"] = [
            effective_phrase(r["multiplier_incl_source"], r["fit_ci_low_incl_source"], r["fit_ci_high_incl_source"],
                             r["method"]) if _finite(r["source_flops"]) else "source FLOPs unknown (--source-flops)"
            for _, r in eff.iterrows()]  # fmt: skip
    eff.to_csv(out / "effective.csv", index=False)
    ecurves = []  # the multiplier along each XATL curve, with the pairing's own fit
    for (_, r), em in zip(eff.iterrows(), ems):
        src = em.source_flops if math.isfinite(em.source_flops) else None
        c = effective_compute(curves[r["scratch_run"]], curves[r["xatl_run"]], source_flops=src, fit=em.fit, ema=ema)
        ecurves.append(c.assign(xatl_run=r["xatl_run"], scratch_run=r["scratch_run"]))
    ecurves = [data.tables["effective_curves"]] if tables else ecurves
    (pd.concat(ecurves, ignore_index=True) if ecurves else pd.DataFrame()).to_csv(out / "effective_curves.csv", index=False)
    done = (eff["xatl_state"] == "done").to_numpy() if not eff.empty else []
    eff_done = eff[done] if not eff.empty else eff
    if tables:  # the over-seeds intervals need each pairing's fit replicates, which no table holds
        summ = data.tables["effective_summary"]
    else:
        summ = aggregate_effective(eff_done.reset_index(drop=True), [m for m, d in zip(ems, done) if d], SUMMARY_KEYS,
                                   n_boot=n_boot) if len(eff_done) else pd.DataFrame()  # fmt: skip
    if not summ.empty and not tables:
        order = [k for k in TREND_KEYS if k in summ] + ["n_params"]  # sizes ascending within each architecture
        summ = summ.sort_values(order, na_position="last", kind="stable").reset_index(drop=True)
        summ["effective"] = [effective_summary_phrase(r) for _, r in summ.iterrows()]
        summ["effective_incl_source"] = [effective_summary_phrase(r, "effective_incl_source")
                                         for _, r in summ.iterrows()]  # fmt: skip
    if not summ.empty and not tables:
        summ["effective_excl_teacher"] = _excl_teacher(df, sav, curves, n_params, summ, fit_boot, ema, n_boot)
    summ.to_csv(out / "effective_summary.csv", index=False)
    trend, trends, no_trend = trend_table(eff_done, TREND_KEYS, targets=_pythia_targets(), n_boot=n_boot)
    if not summ.empty and (not trend.empty or trends):
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
    trend.to_csv(out / "size_trend.csv", index=False)

    if tables:
        scurves = data.tables["savings_curves"]
    else:
        scurve_rows = [savings_curve(curves[p["scratch_run"]], curves[p["xatl_run"]], ema=ema).assign(
            xatl_run=p["xatl_run"], scratch_run=p["scratch_run"]) for _, p in sav.iterrows()]  # fmt: skip
        scurves = pd.concat(scurve_rows, ignore_index=True) if scurve_rows else pd.DataFrame()
    scurves.to_csv(out / "savings_curves.csv", index=False)
    label_cols = [c for c in ("xatl_run", "scratch_run", *PAIR_KEYS, *VARIANT_KEYS) if c in sav]
    scurves_plot = (scurves.merge(sav[label_cols], on=["xatl_run", "scratch_run"], how="left")
                    if not scurves.empty else scurves)  # fmt: skip
    deltas = benchmark_deltas(df) if not df.empty else pd.DataFrame()
    deltas.to_csv(out / "benchmark_deltas.csv", index=False)

    if tables:  # no per-run curves: the loss figures drawn from the run folders are kept as they are
        f1, f6 = (_kept_figure(sweep_dir, figs, n) for n in ("loss_vs_flops.png", "loss_vs_tokens.png"))
    else:
        f1 = plot_loss_vs_flops(df, curves, events, figs / "loss_vs_flops.png", sources=sources)
        f6 = plot_loss_vs_tokens(df, curves, figs / "loss_vs_tokens.png", sources=sources) if not df.empty else None
    f2 = plot_savings_vs_size(agg, df, figs / "savings_vs_size.png")
    f3 = plot_savings_curves(scurves_plot, figs / "savings_vs_target_loss.png", sizes=size_order(df))
    f4 = plot_benchmark_deltas(deltas, figs / "benchmark_deltas.png", sizes=size_order(df))
    f5 = plot_effective_vs_size(trend, figs / "effective_vs_size.png")

    tasks = list(eval_tasks) if eval_tasks is not None else sorted(
        {c.split("/")[1] for c in df.columns if c.startswith("eval/")} if not df.empty else set())  # fmt: skip
    miss = missing_items(df, _expected_dirs(expected), tasks)
    md = [f"# XATL sweep report: {data.origin}", "", f"_generated {time.strftime('%Y-%m-%d %H:%M')}_", ""]
    md += _provenance(data, sweep_dir)
    n_done = int((df["state"] == "done").sum()) if not df.empty else 0
    md += [f"{len(df)} runs found ({n_done} done), {len(sav)} XATL/scratch pairings.", ""]
    md += _effective_section(eff, summ, trend, trends, no_trend, f5)
    md += ["## The paper's definition (secondary)", "",
           "Savings = FLOPs (tokens, wall time) the scratch run needs to reach its own final validation loss / what "
           "the XATL run needs to reach that loss. Curves are running minima of the validation loss, interpolated "
           "linearly in log-FLOPs. \"at least ... (lower bound)\": XATL was already below the target at its first "
           "evaluation, so the ratio has no finite answer at this budget and evaluation spacing. \"not reached\": the "
           "XATL run never got there. Brackets: bootstrap 95% CI over seeds. *incl. source*: the source model's "
           "pretraining FLOPs added to the XATL side.", ""]  # fmt: skip
    if not agg.empty:
        view = agg.copy()
        for col, name in (("savings_flops", "FLOPs"), ("savings_tokens", "tokens"), ("savings_wall_time", "wall time"),
                          ("savings_flops_incl_source", "FLOPs incl. source")):  # fmt: skip
            view[name] = [
                paper_phrase(r[f"{col}_mean"], r[f"{col}_ci_low"], r[f"{col}_ci_high"], r["n_seeds"],
                             r[f"n_reached_{col}"], r["any_lower_bound"] and col != "savings_flops_incl_source")
                if not (col == "savings_flops_incl_source" and r["n_reached_savings_flops"] and not r[f"n_reached_{col}"])
                else "source FLOPs unknown (--source-flops)"
                for _, r in agg.iterrows()
            ]  # fmt: skip
        view["arch"] = [variant_label(r) for _, r in view.iterrows()]
        md.append(md_table(view, ["size", "arch", "n_seeds", "FLOPs", "tokens", "wall time", "FLOPs incl. source"]))
        md += ["", "Per pairing:", ""]
        md.append(md_table(sav, ["xatl_run", "xatl_state", "scratch_run", "seed", "target_loss", "scratch_flops_to_target",
                                 "xatl_flops_to_target", "savings_flops", "reached_flops", "lower_bound_flops",
                                 "source_flops", "savings_flops_incl_source"]))  # fmt: skip
    else:
        md.append("_No XATL run has a scratch baseline with a validation curve yet._\n")
    if f1 is not None:
        md += ["", f"![validation loss vs FLOPs](figures/{f1.name})", "",
               "*Validation loss against training FLOPs, one panel per size: the mean over seeds with a faint band "
               "from the lowest to the highest seed; XATL solid, its scratch baseline dashed in the same colour, the "
               "source dotted black, circles where LIT unfroze a stage.*"]  # fmt: skip
    md += ["", f"![savings vs model size](figures/{f2.name})", "",
           "*The paper's definition by size, a secondary measure kept apart from the effective-compute headline "
           "above: each point is the mean over seeds with its bootstrap interval; an upward arrow is a lower bound "
           "(XATL was already below the target at its first evaluation), so no line joins the sizes.*", "",
           "A single ratio at the scratch run's final loss flatters short budgets; the curve shows the ratio for "
           "every target from the loss the XATL run starts at down to the scratch run's final loss.", "",
           f"![savings vs target loss](figures/{f3.name})", ""]  # fmt: skip
    md += _sources_section(df, sources)
    md += ["## Benchmarks (XATL - scratch)", ""]
    if not deltas.empty:
        dv = deltas.copy()
        dv["delta ± se"] = [f"{d:+.4f} ± {s:.4f}" if math.isfinite(s) else f"{d:+.4f}" for d, s in zip(dv["delta"], dv["delta_se"])]
        md.append(md_table(dv, ["size", "mixer", "attention_layers", "seed", "freeze_policy", "task", "metric", "xatl",
                                "scratch", "delta ± se", "flops_ratio"]))  # fmt: skip
        md += ["", f"![benchmark deltas](figures/{f4.name})", ""]
    else:
        md.append("_No pairing has evaluations on both sides yet (`xatl-ds eval RUN_DIR`)._\n")
    taught = df[df["teacher_run"].notna() | df["teacher_val_loss"].notna()] if "teacher_run" in df else pd.DataFrame()
    if not taught.empty:
        kept = [c for c in df.columns if c.startswith("retained/") and c.endswith("/acc")]
        md += ["## Teacher recovery", "",
               "Each XATL or distilled run beside its teacher (its source, or `distill.teacher`): the teacher's "
               "validation loss on the same batches, the gap to it, and the share of the teacher's accuracy "
               "retained on each local task (when the teacher is a run of this sweep and was evaluated).", ""]  # fmt: skip
        md.append(md_table(taught, ["run", "recipe", "teacher_run", "tokens", "flops", "teacher_share", "final_val_loss",
                                    "teacher_val_loss", "gap_to_teacher", *kept]))  # fmt: skip
        md += ["", "`flops`: all the compute spent, the teacher's forward passes included; `teacher_share`: their "
               "part of it.", ""]
        if f6 is not None:
            md += [f"![validation loss vs tokens, the teacher as a line](figures/{f6.name})", ""]
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
    md += ["", "Files: results.csv, results.parquet, " + ("" if tables else "curves.parquet, ") + "effective.csv, "
           "effective_summary.csv, effective_curves.csv, size_trend.csv, savings.csv, savings_summary.csv, "
           "savings_curves.csv, benchmark_deltas.csv, figures/."]  # fmt: skip
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path
