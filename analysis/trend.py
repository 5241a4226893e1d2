"""How the effective-compute multiplier changes with model size.

:func:`size_trend` fits ``log(multiplier) = a + b*log(N)`` (``N``: non-embedding parameters,
e.g. from the ``xatl_ds/sizes.py`` dimensions) to per-size, per-seed multipliers, by ordinary
least squares on each size's mean log-multiplier. ``b > 0``: savings grow with size (what
transfer scaling laws predict); ``b < 0``: they shrink (what upcycling finds at large
compute). The interval of ``b`` is a percentile bootstrap (``scipy.stats.bootstrap``) that
resamples the seeds within each size (stratified), so it reflects seed noise, not how well a
straight line in log-log describes sizes that were never run. :meth:`SizeTrend.extrapolate` predicts the multiplier at another
size with the same bootstrap; outside the measured sizes it is flagged ``extrapolated`` and is
only as good as the assumption that the power law continues.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from .effective import POINT_METHODS

__all__ = ["SizeTrend", "TrendPoint", "size_trend", "trend_table"]


@dataclass(frozen=True)
class TrendPoint:
    """The trend's multiplier at one size, with its bootstrap interval."""

    n_params: float
    multiplier: float
    ci_low: float
    ci_high: float
    #: outside the sizes the trend was fitted on
    extrapolated: bool


@dataclass(frozen=True, eq=False)
class SizeTrend:
    """``multiplier(N) = exp(a) * N**b`` fitted over sizes, with bootstrap replicates of (a, b)."""

    a: float
    #: the exponent: the trend's headline number
    b: float
    b_ci_low: float
    b_ci_high: float
    level: float
    #: the sizes used (non-embedding parameters), ascending
    sizes: tuple[float, ...]
    #: mean log-multiplier of each size
    log_mean: tuple[float, ...]
    #: seeds with a usable (finite, > 0) multiplier, per size
    n_seeds: tuple[int, ...]
    #: (n_boot, 2) replicates of (a, b); empty when no size has two seeds
    boot: np.ndarray = field(repr=False, default_factory=lambda: np.empty((0, 2)))

    def predict(self, n_params: float) -> float:
        """The fitted multiplier at ``n_params``."""
        return float(math.exp(self.a + self.b * math.log(n_params)))

    def extrapolate(self, n_params: float) -> TrendPoint:
        """The multiplier at ``n_params`` with its interval (from the (a, b) replicates)."""
        if not (n_params > 0 and math.isfinite(n_params)):
            raise ValueError(f"n_params={n_params} must be a positive number of parameters")
        lo = hi = math.nan
        if len(self.boot):
            a = (1 - self.level) / 2  # the same percentile rule as scipy.stats.bootstrap's interval of b
            lo, hi = (float(v) for v in np.quantile(np.exp(self.boot[:, 0] + self.boot[:, 1] * math.log(n_params)),
                                                    [a, 1 - a]))  # fmt: skip
        outside = n_params < self.sizes[0] * (1 - 1e-9) or n_params > self.sizes[-1] * (1 + 1e-9)
        return TrendPoint(n_params=float(n_params), multiplier=self.predict(n_params), ci_low=lo, ci_high=hi,
                          extrapolated=bool(outside))  # fmt: skip


def _ols(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intercepts and slopes of y ~ x for each row of ``y`` (x shared): ``scipy.stats.linregress``."""
    r = stats.linregress(np.broadcast_to(x, np.shape(y)), y, axis=-1)
    return np.asarray(r.intercept), np.asarray(r.slope)


def size_trend(sizes_nonembed_params: Sequence[float], multipliers_per_size: Sequence[Iterable[float]], *,
               n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> SizeTrend:  # fmt: skip
    """Fit ``log(multiplier) = a + b*log(N)``.

    ``sizes_nonembed_params[k]``: size k's non-embedding parameter count; ``multipliers_per_size[k]``:
    its per-seed multipliers (NaN, inf and values <= 0 -- unreachable or unfitted seeds -- are
    left out). Needs at least two sizes with a usable multiplier, and distinct sizes.
    """
    if len(sizes_nonembed_params) != len(multipliers_per_size):
        raise ValueError(f"{len(sizes_nonembed_params)} sizes but {len(multipliers_per_size)} lists of multipliers")
    groups = []
    for n, ms in zip(sizes_nonembed_params, multipliers_per_size):
        n = float(n)
        if not (n > 0 and math.isfinite(n)):
            raise ValueError(f"size {n} is not a positive parameter count")
        v = np.asarray([m for m in ms if m is not None and math.isfinite(m) and m > 0], dtype=float)
        if len(v):
            groups.append((n, np.log(v)))
    groups.sort(key=lambda g: g[0])
    sizes = np.array([g[0] for g in groups])
    if len(groups) < 2 or len(np.unique(sizes)) < 2:
        raise ValueError(f"a size trend needs >= 2 distinct sizes with a usable multiplier; got {sizes.tolist()}")
    x = np.log(sizes)
    y = np.array([g[1].mean() for g in groups])
    a, b = (float(v) for v in _ols(x, y))
    boot = np.empty((0, 2))
    lo = hi = math.nan
    multi = [k for k, g in enumerate(groups) if len(g[1]) > 1]
    if multi:
        # stratified: each size's seeds are resampled among themselves (scipy resamples every
        # sample passed to it independently); a size with one seed enters as its constant
        def statistic(*resampled, axis=-1):
            means = [g[1].mean() for g in groups]
            cols = [np.broadcast_to(means[k], resampled[0].shape[:-1]) for k in range(len(groups))]
            for k, r in zip(multi, resampled):
                cols[k] = r.mean(axis=axis)
            ab = _ols(x, np.stack(cols, axis=-1))
            return np.stack(ab)

        res = stats.bootstrap(tuple(groups[k][1] for k in multi), statistic, n_resamples=n_boot,
                              confidence_level=level, method="percentile", vectorized=True, paired=False,
                              rng=np.random.default_rng(seed))  # fmt: skip
        boot = np.asarray(res.bootstrap_distribution).T.reshape(-1, 2)
        lo, hi = (float(v) for v in (res.confidence_interval.low[1], res.confidence_interval.high[1]))
    return SizeTrend(a=a, b=b, b_ci_low=lo, b_ci_high=hi, level=level, sizes=tuple(sizes.tolist()),
                     log_mean=tuple(y.tolist()), n_seeds=tuple(len(g[1]) for g in groups), boot=boot)  # fmt: skip


def trend_table(effective: pd.DataFrame, group: Sequence[str], *,
                targets: Callable[[Mapping], Mapping[str, float]] | None = None, value: str = "multiplier",
                n_boot: int = 2000, level: float = 0.95,
                seed: int = 0) -> tuple[pd.DataFrame, dict[tuple, SizeTrend], dict[tuple, str]]:  # fmt: skip
    """:func:`size_trend` per ``group`` (e.g. mixer, attention layers, XATL variant) over the
    sizes in ``effective`` (per-pairing rows with ``size``, ``n_params``, ``method`` and
    ``value``; only point estimates -- interpolated or extrapolated -- are used).

    ``targets(group_row)``: sizes to extrapolate to, name -> non-embedding parameters (e.g.
    the Pythia sizes for that architecture). Returns (rows, trends, skipped): one row per
    group and size with the group's columns, ``size``, ``n_params``, ``kind`` (``fit`` at a
    measured size, ``extrapolated`` at a target outside them), ``multiplier``, ``ci_low``,
    ``ci_high`` and the exponent ``b`` with its interval; the fitted trends by group key; and,
    for groups without a trend, why."""
    rows: list[dict] = []
    trends: dict[tuple, SizeTrend] = {}
    skipped: dict[tuple, str] = {}
    if effective.empty:
        return pd.DataFrame(rows), trends, skipped
    group = [g for g in group if g in effective]
    for key, g in effective.groupby(group, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        base = dict(zip(group, key))
        pts = g[g["method"].isin(POINT_METHODS) & np.isfinite(g["n_params"].astype(float))]
        by_size = [(str(s), float(h["n_params"].mean()), h[value].astype(float).tolist())
                   for s, h in pts.groupby("size")]  # fmt: skip
        usable = [t for t in by_size if any(math.isfinite(v) and v > 0 for v in t[2])]
        if len({t[1] for t in usable}) < 2:
            skipped[key] = (f"{len(usable)} size(s) with a finite multiplier (a trend needs 2); sizes run: "
                            f"{', '.join(sorted(map(str, g['size'].unique())))}")  # fmt: skip
            continue
        tr = size_trend([t[1] for t in usable], [t[2] for t in usable], n_boot=n_boot, level=level, seed=seed)
        trends[key] = tr
        common = {"b": tr.b, "b_ci_low": tr.b_ci_low, "b_ci_high": tr.b_ci_high, "n_sizes": len(tr.sizes)}
        points = [(name, n) for name, n, _ in usable]
        measured = {n for _, n in points}
        extra = targets(base) if targets else {}
        points += [(name, float(n)) for name, n in extra.items() if float(n) not in measured]
        for name, n in sorted(points, key=lambda t: t[1]):
            p = tr.extrapolate(n)
            rows.append({**base, "size": name, "n_params": n, "kind": "extrapolated" if p.extrapolated else "fit",
                         "multiplier": p.multiplier, "ci_low": p.ci_low, "ci_high": p.ci_high, **common})  # fmt: skip
    return pd.DataFrame(rows), trends, skipped
