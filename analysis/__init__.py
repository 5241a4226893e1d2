"""Sweep analysis: results table, compute-matched savings, benchmark deltas, figures, report.

``analysis.results``  runs under a sweep root -> a pandas table (finished and partial runs)
``analysis.savings``  XATL vs scratch: FLOPs/tokens/time to reach the scratch run's final loss
``analysis.figures``  matplotlib (Agg) PNGs
``analysis.report``   ``write_report(SWEEP_DIR)`` -> report.md (CLI: ``xatl-ds report SWEEP_DIR``)
"""
from .results import find_runs, load_run, results_table
from .savings import aggregate_savings, benchmark_deltas, compute_to_reach, savings_curve, savings_table
from .report import write_report

__all__ = ["find_runs", "load_run", "results_table", "aggregate_savings", "benchmark_deltas", "compute_to_reach",
           "savings_curve", "savings_table", "write_report"]
