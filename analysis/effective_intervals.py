"""Intervals of effective-compute multipliers: the percentile interval that keeps ``inf``
replicates, and the mean over seeds with its two-level bootstrap (:func:`aggregate_over_seeds`).
The ``method`` vocabulary is :mod:`analysis.effective`'s (see its docstring)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["METHODS", "POINT_METHODS", "SeedAggregate", "aggregate_over_seeds", "percentile_interval"]

#: values of the ``method`` column, see :mod:`analysis.effective`
METHODS = ("interpolated", "upper_bound", "extrapolated", "unreachable", "no_fit")
#: methods whose number is a point estimate that may enter a mean over seeds
POINT_METHODS = ("interpolated", "extrapolated")


def percentile_interval(samples: Iterable[float], level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of ``samples`` without interpolating between order statistics
    (``numpy.quantile`` with ``method="lower"`` / ``"higher"``), so ``inf`` replicates (a refit
    whose asymptote lies above the target) give an ``inf`` bound instead of NaN. NaN samples
    are ignored; (NaN, NaN) with fewer than 2 samples."""
    s = np.asarray([v for v in samples if not math.isnan(v)], dtype=float)
    if len(s) < 2:
        return math.nan, math.nan
    a = (1 - level) / 2
    return float(np.quantile(s, a, method="lower")), float(np.quantile(s, 1 - a, method="higher"))


@dataclass(frozen=True)
class SeedAggregate:
    """Mean multiplier over seeds with a bootstrap interval. ``mean`` averages the seeds whose
    value is a point estimate (interpolated or extrapolated); upper bounds, unreachable and
    unfitted seeds are counted, never averaged."""

    mean: float
    ci_low: float
    ci_high: float
    level: float
    n_seeds: int
    #: seeds in the mean
    n_used: int
    n_extrapolated: int
    n_upper_bound: int
    n_unreachable: int
    n_no_fit: int

    @property
    def extrapolated(self) -> bool:
        """True when any seed in the mean was extrapolated: the value is not a measurement."""
        return self.n_extrapolated > 0

    @property
    def method(self) -> str:
        """``interpolated`` / ``extrapolated`` (any seed extrapolated) / ``none`` (no seed usable)."""
        return "none" if not self.n_used else "extrapolated" if self.extrapolated else "interpolated"

    def to_row(self, prefix: str = "effective") -> dict:
        """Flat columns ``<prefix>_mean``, ``_ci_low``, ``_ci_high``, ``_method`` and the counts."""
        return {f"{prefix}_mean": self.mean, f"{prefix}_ci_low": self.ci_low, f"{prefix}_ci_high": self.ci_high,
                f"{prefix}_method": self.method, "n_seeds": self.n_seeds, f"n_used_{prefix}": self.n_used,
                f"n_extrapolated_{prefix}": self.n_extrapolated, f"n_upper_bound_{prefix}": self.n_upper_bound,
                f"n_unreachable_{prefix}": self.n_unreachable, f"n_no_fit_{prefix}": self.n_no_fit}  # fmt: skip


def _field(row: Any, name: str, default: Any = None) -> Any:
    return row.get(name, default) if isinstance(row, Mapping) else getattr(row, name, default)


def aggregate_over_seeds(rows: Sequence[Any], *, incl_source: bool = False,
                         n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> SeedAggregate:  # fmt: skip
    """Mean of the seeds' multipliers with a two-level percentile bootstrap: each replicate
    resamples the seeds with replacement and, for an extrapolated seed, also draws one of its
    fit-bootstrap replicates (``boot``), so the interval carries the fit's uncertainty. With
    one interpolated seed the interval is NaN (nothing to resample); with one extrapolated seed
    it is the fit's interval.

    ``rows``: :class:`~analysis.effective.EffectiveMultiplier` objects or mappings with
    ``multiplier``, ``method`` and optionally ``boot`` (``multiplier_incl_source`` /
    ``boot_incl_source`` with ``incl_source``).

    Why not ``scipy.stats.bootstrap``: it resamples observations and applies a statistic to
    them, while each replicate here also draws, per resampled seed, one of that seed's own fit
    replicates (a second level of resampling whose pool differs from seed to seed), and the
    interval must keep ``inf`` replicates as an ``inf`` bound, which its interpolating
    quantile turns into NaN. The same goes for :func:`~analysis.effective_fit.bootstrap_fits`,
    a residual bootstrap that refits the curve.
    """
    col, bcol = ("multiplier_incl_source", "boot_incl_source") if incl_source else ("multiplier", "boot")
    methods = [str(_field(r, "method")) for r in rows]
    bad = sorted({m for m in methods if m not in METHODS})
    if bad:
        raise ValueError(f"unknown method(s) {bad}; expected one of {METHODS}")
    used = []  # (value, fit replicates, method) of the seeds that enter the mean
    for r, m in zip(rows, methods):
        v = float(_field(r, col))
        if m in POINT_METHODS and math.isfinite(v):
            used.append((v, np.asarray(_field(r, bcol, ()) if m == "extrapolated" else (), dtype=float), m))
    counts = {m: methods.count(m) for m in METHODS}
    n_extra = sum(1 for *_, m in used if m == "extrapolated")
    mean = float(np.mean([v for v, *_ in used])) if used else math.nan
    lo = hi = math.nan
    if used:
        rng = np.random.default_rng(seed)
        # draws[k, i]: seed i's value in replicate k (its fit replicate when extrapolated)
        draws = np.empty((n_boot, len(used)))
        for i, (v, b, _) in enumerate(used):
            draws[:, i] = b[rng.integers(0, len(b), n_boot)] if len(b) else v
        if len(used) > 1 or len(used[0][1]):
            pick = rng.integers(0, len(used), (n_boot, len(used)))
            with np.errstate(invalid="ignore"):
                means = np.take_along_axis(draws, pick, axis=1).mean(axis=1)
            lo, hi = percentile_interval(means, level)
    return SeedAggregate(mean=mean, ci_low=lo, ci_high=hi, level=level, n_seeds=len(methods), n_used=len(used),
                         n_extrapolated=n_extra, n_upper_bound=counts["upper_bound"],
                         n_unreachable=counts["unreachable"], n_no_fit=counts["no_fit"])  # fmt: skip
