"""Effective compute of XATL runs (Hernandez et al. 2021, "Scaling laws for transfer").

For an XATL run with a FLOPs budget ``b`` and (smoothed) validation loss ``L_x(b)`` there, the
*effective compute* is the scratch FLOPs ``C_s`` needed to reach ``L_x(b)``, and the
*multiplier* is ``C_s / b`` (``C_s / (b + source_flops)`` counting the source's pretraining).
Unlike the paper's figure (XATL FLOPs to reach the scratch run's final loss) it has a finite
answer at small budgets, where the XATL run starts below everything scratch ever reaches --
provided scratch is known there, which needs scratch runs longer than the XATL run or a fitted
scratch curve to extrapolate.

How ``C_s`` is found, per budget (the ``method`` column; never a bare number without it):

``interpolated``   the scratch curve (running minimum) crosses ``L_x(b)`` between two of its
                   evaluations: linear interpolation in log-FLOPs (``savings.compute_to_reach``).
``upper_bound``    scratch's first evaluation after step 0 is already at or below ``L_x(b)``:
                   the crossing happened earlier, ``C_s`` (and the multiplier) is at most the
                   value given.
``extrapolated``   even the longest scratch run stops short of ``L_x(b)``: ``C_s`` comes from
                   the fit ``L(C) = E + A*C^(-alpha)`` of that scratch curve; its interval
                   comes from refitting residual-bootstrap replicates of the curve.
``unreachable``    ``L_x(b)`` is at or below the fit's asymptote ``E``: scratch would never get
                   there, no number.
``no_fit``         extrapolation was needed but the scratch curve cannot be fitted.

The fit and its bootstrap live in :mod:`analysis.effective_fit`, the intervals and the mean over
seeds in :mod:`analysis.effective_intervals`; their public names are importable from here too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from .effective_fit import FitError, ScratchFit, bootstrap_fits, curve_xy, fit_scratch_curve, power_law_inverse
from .effective_intervals import METHODS, POINT_METHODS, SeedAggregate, aggregate_over_seeds, percentile_interval
from .savings import compute_to_reach, smooth_curve

__all__ = [
    "METHODS", "POINT_METHODS", "EffectiveMultiplier", "FitError", "ScratchFit", "SeedAggregate",
    "aggregate_effective", "aggregate_over_seeds", "bootstrap_fits", "effective_compute", "effective_multiplier",
    "effective_table", "fit_scratch_curve", "percentile_interval",
]  # fmt: skip


# -- effective compute along the XATL curve --------------------------------------------------------
def _scratch_compute(L: float, sx: np.ndarray, ss: np.ndarray, fit: ScratchFit | None) -> tuple[float, str]:
    """(scratch FLOPs to reach L, method) on a smoothed scratch curve, with its fit or None."""
    c, reached, at_first = compute_to_reach(sx, ss, L, smoothed=True)
    if reached:
        return c, "upper_bound" if at_first else "interpolated"
    if fit is None:
        return math.nan, "no_fit"
    c = fit.inverse(L)
    return (c, "extrapolated") if math.isfinite(c) else (math.nan, "unreachable")


def _budget_losses(xx: np.ndarray, xs: np.ndarray, budgets: np.ndarray) -> np.ndarray:
    """Running-min XATL loss known at each budget (the last evaluation at or before it)."""
    idx = np.searchsorted(xx, budgets, side="right") - 1
    if (idx < 0).any():
        bad = budgets[idx < 0]
        raise ValueError(f"budget(s) {bad.tolist()} lie before the XATL curve's first evaluation ({xx[0]:.4g} FLOPs)")
    return xs[idx]


def effective_compute(scratch_curve: Any, xatl_curve: Any, budgets: Iterable[float] | None = None, *,
                      source_flops: float | None = None, fit: ScratchFit | None = None, warmup_frac: float = 0.1,
                      ema: float = 0.0) -> pd.DataFrame:  # fmt: skip
    """Effective compute of one XATL run over a grid of budgets.

    ``scratch_curve`` / ``xatl_curve``: validation curves (DataFrames with ``flops`` and
    ``val_loss``, e.g. ``RunRecord.val_curve``; or ``(flops, loss)`` arrays). ``budgets``:
    XATL FLOPs (default: every XATL evaluation with FLOPs > 0, the final one included). ``fit``:
    the scratch fit to extrapolate with (default: :func:`fit_scratch_curve` of the scratch
    curve, made only when needed). ``source_flops``: the source's pretraining FLOPs, for the
    source-inclusive multiplier.

    Columns: budget, xatl_loss (running min at the budget), scratch_flops, multiplier
    (scratch_flops / budget), method (see :data:`METHODS`), extrapolated (bool),
    extrapolation_factor (scratch_flops / the scratch curve's last FLOPs; > 1 only when
    extrapolated), source_flops, multiplier_incl_source (NaN without source_flops).
    """
    sx, sy = curve_xy(scratch_curve, "scratch")
    xx, xy = curve_xy(xatl_curve, "XATL")
    # interpolation is in log-FLOPs: a scratch evaluation at 0 FLOPs (step 0) cannot bracket a
    # crossing, so a target above scratch's first trained evaluation is an upper bound instead
    pos = sx > 0
    sx, sy = sx[pos], sy[pos]
    if not len(sx) or not len(xx):
        raise ValueError("effective_compute needs a scratch curve with an evaluation at FLOPs > 0 and an XATL "
                         "curve with a finite point")  # fmt: skip
    ss, xs = smooth_curve(sy, ema), smooth_curve(xy, ema)
    if budgets is None:
        b = xx[xx > 0]
    else:
        b = np.asarray(list(budgets), dtype=float)
        if not (np.isfinite(b) & (b > 0)).all():
            raise ValueError(f"budgets must be finite and > 0, got {b.tolist()}")
    if not len(b):
        raise ValueError("the XATL curve has no evaluation with FLOPs > 0: no budget to evaluate")
    losses = _budget_losses(xx, xs, b)
    need_fit = fit is None and any(L < ss[-1] for L in losses)
    if need_fit:
        try:
            fit = fit_scratch_curve(sx, sy, warmup_frac=warmup_frac, ema=ema)
        except FitError:
            fit = None
    src = float(source_flops) if source_flops is not None else math.nan
    rows = []
    for budget, L in zip(b, losses):
        c, method = _scratch_compute(float(L), sx, ss, fit)
        rows.append({
            "budget": float(budget), "xatl_loss": float(L), "scratch_flops": c, "multiplier": c / budget,
            "method": method, "extrapolated": method == "extrapolated",
            "extrapolation_factor": c / sx[-1] if sx[-1] > 0 else math.nan,
            "source_flops": src, "multiplier_incl_source": c / (budget + src),
        })  # fmt: skip
    return pd.DataFrame(rows)


@dataclass(frozen=True, eq=False)
class EffectiveMultiplier:
    """The effective-compute multiplier of one (XATL, scratch) pairing at the XATL run's final
    budget. ``multiplier`` is NaN unless ``method`` is interpolated, upper_bound or extrapolated;
    an extrapolated value carries the bootstrap replicates of its scratch fit."""

    budget: float
    xatl_loss: float
    scratch_flops: float
    multiplier: float
    #: one of :data:`METHODS`
    method: str
    source_flops: float
    multiplier_incl_source: float
    extrapolation_factor: float
    #: multiplier replicates from refitting the scratch curve on bootstrap replicates (extrapolated
    #: values only; ``inf`` where a refit's asymptote lies above the target); empty otherwise
    boot: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)
    #: the same replicates for the source-inclusive multiplier
    boot_incl_source: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)
    #: the fit's interval alone (extrapolated values; NaN otherwise)
    fit_ci_low: float = math.nan
    fit_ci_high: float = math.nan
    fit: ScratchFit | None = field(default=None, repr=False)

    @property
    def extrapolated(self) -> bool:
        return self.method == "extrapolated"

    def to_row(self) -> dict:
        """A flat dict for a DataFrame row (replicates and the fit left out)."""
        return {"budget": self.budget, "xatl_loss": self.xatl_loss, "scratch_flops": self.scratch_flops,
                "multiplier": self.multiplier, "method": self.method, "extrapolated": self.extrapolated,
                "extrapolation_factor": self.extrapolation_factor, "source_flops": self.source_flops,
                "multiplier_incl_source": self.multiplier_incl_source, "fit_ci_low": self.fit_ci_low,
                "fit_ci_high": self.fit_ci_high, "fit_E": self.fit.E if self.fit else math.nan,
                "fit_alpha": self.fit.alpha if self.fit else math.nan}  # fmt: skip


def effective_multiplier(scratch_curve: Any, xatl_curve: Any, *, source_flops: float | None = None,
                         fit: ScratchFit | None = None, warmup_frac: float = 0.1, ema: float = 0.0,
                         n_boot: int = 200, level: float = 0.95, seed: int = 0) -> EffectiveMultiplier:  # fmt: skip
    """The multiplier at the XATL curve's final evaluation (see :func:`effective_compute`);
    an extrapolated one also gets ``n_boot`` fit-bootstrap replicates and their interval."""
    xx, _ = curve_xy(xatl_curve, "XATL")
    if not len(xx) or xx[-1] <= 0:
        raise ValueError("the XATL curve has no evaluation with FLOPs > 0")
    sx, sy = curve_xy(scratch_curve, "scratch")
    if fit is None:
        try:
            fit = fit_scratch_curve(sx, sy, warmup_frac=warmup_frac, ema=ema)
        except FitError:
            fit = None
    r = effective_compute((sx, sy), xatl_curve, [xx[-1]], source_flops=source_flops, fit=fit, ema=ema).iloc[0]
    boot = boot_src = np.empty(0)
    lo = hi = math.nan
    if r["method"] == "extrapolated":
        params = bootstrap_fits(fit, n_boot=n_boot, seed=seed)
        c = power_law_inverse(params[:, 0], params[:, 1], params[:, 2], r["xatl_loss"]) if len(params) else np.empty(0)
        boot = np.atleast_1d(c) / r["budget"]
        boot_src = np.atleast_1d(c) / (r["budget"] + r["source_flops"])
        lo, hi = percentile_interval(boot, level)
    return EffectiveMultiplier(
        budget=float(r["budget"]), xatl_loss=float(r["xatl_loss"]), scratch_flops=float(r["scratch_flops"]),
        multiplier=float(r["multiplier"]), method=str(r["method"]), source_flops=float(r["source_flops"]),
        multiplier_incl_source=float(r["multiplier_incl_source"]),
        extrapolation_factor=float(r["extrapolation_factor"]), boot=boot, boot_incl_source=boot_src,
        fit_ci_low=lo, fit_ci_high=hi, fit=fit,
    )  # fmt: skip


# -- a sweep's pairings ----------------------------------------------------------------------------
def _has_budget(curve: Any) -> bool:
    """The curve has an evaluation with FLOPs > 0 (something to measure a multiplier at)."""
    if curve is None or not len(curve) or "flops" not in curve or "val_loss" not in curve:
        return False
    f, v = np.asarray(curve["flops"], dtype=float), np.asarray(curve["val_loss"], dtype=float)
    return bool((np.isfinite(f) & np.isfinite(v) & (f > 0)).any())


def effective_table(pairs: pd.DataFrame, curves: Mapping[str, Any], *, n_params: Mapping[str, float] | None = None,
                    fit_boot: int = 200, warmup_frac: float = 0.1, ema: float = 0.0,
                    seed: int = 0) -> tuple[pd.DataFrame, list[EffectiveMultiplier]]:  # fmt: skip
    """The multiplier of every pairing at its XATL run's final budget.

    ``pairs``: one row per (XATL, scratch) pairing with the pairing key, the XATL variant
    columns, ``xatl_run``, ``scratch_run`` and ``source_flops`` (``savings.savings_table``'s
    rows); ``curves``: run -> validation curve; ``n_params``: run -> non-embedding parameters
    (column ``n_params``, the XATL run's, else its scratch run's). Pairings where either run
    has no evaluation at FLOPs > 0 yet are left out. Returns the table (the pairs' columns,
    ``n_params``, :meth:`EffectiveMultiplier.to_row` and the fit interval of the
    source-inclusive multiplier) and the multipliers, row for row
    (their bootstrap replicates feed :func:`aggregate_effective`)."""
    n_params = n_params or {}
    rows, found = [], []
    for k, (_, p) in enumerate(pairs.iterrows()):
        cx, cs = curves.get(p["xatl_run"]), curves.get(p["scratch_run"])
        if not (_has_budget(cx) and _has_budget(cs)):
            continue
        sf = p.get("source_flops")
        sf = float(sf) if sf is not None and math.isfinite(float(sf)) else None
        em = effective_multiplier(cs, cx, source_flops=sf, warmup_frac=warmup_frac, ema=ema, n_boot=fit_boot,
                                  seed=seed + k)  # fmt: skip
        n = n_params.get(p["xatl_run"], n_params.get(p["scratch_run"], math.nan))
        lo, hi = percentile_interval(em.boot_incl_source) if len(em.boot_incl_source) else (math.nan, math.nan)
        rows.append({**p.to_dict(), "n_params": float(n) if n is not None else math.nan, **em.to_row(),
                     "fit_ci_low_incl_source": lo, "fit_ci_high_incl_source": hi})  # fmt: skip
        found.append(em)
    return pd.DataFrame(rows), found


def aggregate_effective(table: pd.DataFrame, multipliers: Sequence[EffectiveMultiplier], group: Sequence[str], *,
                        n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:  # fmt: skip
    """Over seeds: per ``group`` (e.g. size, mixer, attention layers, XATL variant) the
    :func:`aggregate_over_seeds` of the multiplier (columns ``effective_*``) and of the
    source-inclusive one (``effective_incl_source_*``), ``n_params`` and ``source_known``
    (some seed's source FLOPs are known). ``table`` / ``multipliers``: :func:`effective_table`'s."""
    if table.empty:
        return pd.DataFrame()
    if len(table) != len(multipliers):
        raise ValueError(f"{len(table)} table rows but {len(multipliers)} multipliers; pass effective_table's pair")
    group = [g for g in group if g in table]
    out = []
    for key, g in table.groupby(group, dropna=False, sort=True):
        ems = [multipliers[table.index.get_loc(i)] for i in g.index]
        row = dict(zip(group, key if isinstance(key, tuple) else (key,)))
        row["n_params"] = float(g["n_params"].astype(float).mean())
        row.update(aggregate_over_seeds(ems, n_boot=n_boot, level=level, seed=seed).to_row("effective"))
        row.update(aggregate_over_seeds(ems, incl_source=True, n_boot=n_boot, level=level,
                                        seed=seed).to_row("effective_incl_source"))  # fmt: skip
        row["source_known"] = bool(np.isfinite(g["source_flops"].astype(float)).any())
        out.append(row)
    return pd.DataFrame(out)
