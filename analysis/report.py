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

The work is done in steps, each in its module: :func:`~analysis.report_data.load_sweep` reads
the runs, :func:`~analysis.report_compute.compute_report` computes every table,
:func:`write_tables` writes the CSVs, :func:`~analysis.report_figures.write_figures` draws the
figures and :func:`~analysis.report_markdown.render_markdown` writes the page.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

from .figures import arch_label
from .report_compute import SUMMARY_KEYS, TREND_KEYS, ReportTables, compute_report, missing_items
from .report_data import SweepData, curves_frame, load_sweep
from .report_figures import ReportFigures, write_figures
from .report_markdown import md_table, render_markdown
from .report_phrases import effective_phrase, effective_summary_phrase, paper_phrase

__all__ = ["write_report", "missing_items", "md_table", "arch_label", "effective_phrase", "effective_summary_phrase",
           "paper_phrase", "compute_report", "write_tables", "write_figures", "render_markdown", "load_sweep",
           "curves_frame", "ReportTables", "ReportFigures", "SweepData", "SUMMARY_KEYS", "TREND_KEYS"]  # fmt: skip


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None, *,
                 source_flops: float | Mapping[str, float] | None = None, expected: Iterable[str] | None = None,
                 eval_tasks: Iterable[str] | None = None, ema: float = 0.0, n_boot: int = 2000,
                 fit_boot: int = 200, runs: Iterable[str | Path] | None = None) -> Path:  # fmt: skip
    """Build every table and figure for the sweep under ``sweep_dir`` and write report.md;
    returns its path. ``source_flops``: pretraining FLOPs of sources not trained in the sweep
    (one number, or {source: flops}); ``expected``: globs of the sweep's run config YAMLs;
    ``eval_tasks``: tasks every finished run should have (default: whatever any run has);
    ``n_boot``: bootstrap replicates over seeds; ``fit_boot``: refits of each extrapolated
    scratch curve; ``runs``: report only these run folders (a subset of the sweep's grid, as
    ``quickstart --only`` trains), not every folder under ``sweep_dir``."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist")
    out = Path(out_dir) if out_dir is not None else sweep_dir
    rep = compute_report(sweep_dir, source_flops=source_flops, expected=expected, eval_tasks=eval_tasks, ema=ema,
                         n_boot=n_boot, fit_boot=fit_boot, runs=runs)  # fmt: skip
    write_tables(rep, out)
    figures = write_figures(rep, out / "figures")
    path = out / "report.md"
    path.write_text(render_markdown(rep, figures))
    return path


def write_tables(rep: ReportTables, out: Path) -> None:
    """The report's CSVs (and results.parquet, and curves.parquet unless rebuilt from tables) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    df = rep.data.df
    if not df.empty:
        df.to_csv(out / "results.csv", index=False)
        df.to_parquet(out / "results.parquet", index=False)
        if not rep.from_tables:
            curves_frame(rep.data.curves, rep.data.events).to_parquet(out / "curves.parquet", index=False)
    for name, table in (("savings", rep.savings), ("savings_summary", rep.savings_summary),
                        ("effective", rep.effective), ("effective_curves", rep.effective_curves),
                        ("effective_summary", rep.effective_summary), ("size_trend", rep.size_trend),
                        ("savings_curves", rep.savings_curves), ("benchmark_deltas", rep.benchmark_deltas)):  # fmt: skip
        table.to_csv(out / f"{name}.csv", index=False)
