"""The figures of a report (``figures/*.png``), drawn from a :class:`~analysis.report_compute.ReportTables`."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .figures import (
    plot_benchmark_deltas, plot_effective_vs_size, plot_loss_vs_flops, plot_loss_vs_tokens, plot_savings_curves,
    plot_savings_vs_size, size_order,
)  # fmt: skip
from .report_compute import ReportTables
from .savings import PAIR_KEYS, VARIANT_KEYS

__all__ = ["ReportFigures", "write_figures"]


@dataclass
class ReportFigures:
    """The figure files of a report; None where a figure was not drawn (no runs, or a rebuild
    from tables whose source report had none)."""

    loss_vs_flops: Path | None
    loss_vs_tokens: Path | None
    savings_vs_size: Path
    savings_vs_target_loss: Path
    benchmark_deltas: Path
    effective_vs_size: Path | None  # None: one size, nothing to trend


def write_figures(rep: ReportTables, figs: Path) -> ReportFigures:
    """Draw every figure into the folder ``figs`` (created)."""
    figs.mkdir(parents=True, exist_ok=True)
    df, data, sav, scurves = rep.data.df, rep.data, rep.savings, rep.savings_curves
    if rep.from_tables:  # no per-run curves: the loss figures drawn from the run folders are kept as they are
        f1, f6 = (_kept_figure(rep.sweep_dir, figs, n) for n in ("loss_vs_flops.png", "loss_vs_tokens.png"))
    else:
        f1 = plot_loss_vs_flops(df, data.curves, data.events, figs / "loss_vs_flops.png", sources=rep.sources)
        f6 = plot_loss_vs_tokens(df, data.curves, figs / "loss_vs_tokens.png", sources=rep.sources) if not df.empty else None
    label_cols = [c for c in ("xatl_run", "scratch_run", *PAIR_KEYS, *VARIANT_KEYS) if c in sav]
    scurves_plot = (scurves.merge(sav[label_cols], on=["xatl_run", "scratch_run"], how="left")
                    if not scurves.empty else scurves)  # fmt: skip
    return ReportFigures(
        loss_vs_flops=f1, loss_vs_tokens=f6,
        savings_vs_size=plot_savings_vs_size(rep.savings_summary, df, figs / "savings_vs_size.png"),
        savings_vs_target_loss=plot_savings_curves(scurves_plot, figs / "savings_vs_target_loss.png", sizes=size_order(df)),
        benchmark_deltas=plot_benchmark_deltas(rep.benchmark_deltas, figs / "benchmark_deltas.png", sizes=size_order(df)),
        effective_vs_size=(plot_effective_vs_size(rep.size_trend, figs / "effective_vs_size.png")
                           if len(size_order(df)) >= 2 else _drop(figs / "effective_vs_size.png")),
    )  # fmt: skip


def _kept_figure(sweep_dir: Path, figs: Path, name: str) -> Path | None:
    """A figure of an earlier report, kept (copied when the output folder is another)."""
    src = sweep_dir / "figures" / name
    if not src.is_file():
        return None
    dst = figs / name
    if src.resolve() != dst.resolve():
        shutil.copyfile(src, dst)
    return dst


def _drop(path: Path) -> None:
    """No figure: remove a stale one an earlier report wrote there."""
    path.unlink(missing_ok=True)
