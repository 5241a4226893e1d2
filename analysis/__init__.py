"""Sweep analysis: results table, effective compute, compute-matched savings, size trend,
benchmark deltas, figures, report.

``analysis.results``    runs under a sweep root -> a pandas table (finished and partial runs)
``analysis.effective``  effective compute (the headline): scratch FLOPs to reach each XATL loss,
                        measured or extrapolated from a fitted scratch curve, per pairing and over seeds
``analysis.trend``      the effective-compute multiplier against non-embedding parameters
``analysis.savings``    the paper's definition: XATL FLOPs/tokens/time to reach the scratch run's final loss
``analysis.figures``    matplotlib (Agg) PNGs
``analysis.report``     ``write_report(SWEEP_DIR)`` -> report.md (CLI: ``xatl-ds report SWEEP_DIR``)
"""
from .results import find_runs, load_run, results_table
from .savings import aggregate_savings, benchmark_deltas, compute_to_reach, savings_curve, savings_table
from .effective import aggregate_effective, effective_multiplier, effective_table
from .trend import size_trend, trend_table
from .report import write_report

__all__ = ["find_runs", "load_run", "results_table", "aggregate_savings", "benchmark_deltas", "compute_to_reach",
           "savings_curve", "savings_table", "aggregate_effective", "effective_multiplier", "effective_table",
           "size_trend", "trend_table", "write_report"]
