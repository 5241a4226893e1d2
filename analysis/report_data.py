"""Where a report's runs come from: the run folders of a sweep, or the results.parquet (and
curves.parquet) an earlier report wrote (:func:`load_sweep`), and the long table of curves and
unfreeze events that makes such a rebuild exact (:func:`curves_frame`)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import pandas as pd

from .report_phrases import finite
from .results import RunRecord, load_runs, results_table

__all__ = ["SweepData", "curves_frame", "load_sweep"]


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


def load_sweep(sweep_dir: str | Path, *, allow_empty: bool = False, runs: Iterable[str | Path] | None = None) -> SweepData:
    """The runs under ``sweep_dir`` (only those whose folder is in ``runs``, when given: a
    subset of a grid, ``--only``); where there are none, the report committed there
    (results.parquet, with curves.parquet for an exact rebuild). FileNotFoundError when there
    is neither (unless ``allow_empty``: a sweep whose runs have not started)."""
    sweep_dir = Path(sweep_dir)
    records, skipped = load_runs(sweep_dir)
    if runs is not None:
        keep = {Path(r).resolve() for r in runs}
        records = [r for r in records if Path(r.run_dir).resolve() in keep]
        skipped = [(d, why) for d, why in skipped if Path(d).resolve() in keep]
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
    n_params = ({r: float(v) for r, v in zip(df["run"], df["n_params"]) if finite(v)} if "n_params" in df else {})
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


def _nonembed_params(records: list[RunRecord], runs: Iterable[str]) -> dict[str, float]:
    """Run -> non-embedding parameters (:func:`xatl_ds.sizes.non_embedding_params`), from the
    model the trainer built, else (scratch runs) the size table; runs neither gives are absent."""
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
