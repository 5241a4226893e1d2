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

The fit (:func:`fit_scratch_curve`) is a variable-projection least-squares fit on the running
minimum of the scratch curve: for a fixed ``alpha`` the model is linear in ``(E, A)``, so those
have a closed form and only ``alpha`` is searched (a coarse log grid for the bracket, then
``scipy.optimize.minimize_scalar``); the grid removes any starting-point sensitivity. Warmup
rule: points with ``C <= 0``, points before the smoothed loss first falls (a plateau at
initialisation) and points with ``C < warmup_frac * C_max`` (default 0.1: the LR warmup and
the steep early phase, which a power law does not describe) are left out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import optimize

from .savings import compute_to_reach, smooth_curve

__all__ = [
    "METHODS", "POINT_METHODS", "EffectiveMultiplier", "FitError", "ScratchFit", "SeedAggregate",
    "aggregate_effective", "aggregate_over_seeds", "bootstrap_fits", "effective_compute", "effective_multiplier",
    "effective_table", "fit_scratch_curve", "percentile_interval",
]  # fmt: skip

#: values of the ``method`` column, see the module docstring
METHODS = ("interpolated", "upper_bound", "extrapolated", "unreachable", "no_fit")
#: methods whose number is a point estimate that may enter a mean over seeds
POINT_METHODS = ("interpolated", "extrapolated")
_POINT_METHODS = POINT_METHODS
_MIN_FIT_POINTS = 4  # three parameters plus at least one degree of freedom
_ALPHA_GRID = np.geomspace(1e-3, 5.0, 160)


class FitError(ValueError):
    """The scratch curve cannot be fitted by ``E + A*C^(-alpha)`` (too few points, not falling)."""


# -- curves ----------------------------------------------------------------------------------------
def _curve_xy(curve: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(flops, val_loss) of a curve given as a DataFrame / mapping with those columns, or as a
    pair of arrays; finite points only, sorted by FLOPs."""
    if isinstance(curve, (pd.DataFrame, Mapping)):
        missing = [c for c in ("flops", "val_loss") if c not in curve]
        if missing:
            raise ValueError(f"{name} curve lacks column(s) {missing}; it needs 'flops' and 'val_loss' "
                             "(RunRecord.val_curve has them)")  # fmt: skip
        x, y = np.asarray(curve["flops"], dtype=float), np.asarray(curve["val_loss"], dtype=float)
    else:
        try:
            x, y = (np.asarray(v, dtype=float) for v in curve)
        except (TypeError, ValueError):
            raise ValueError(f"{name} curve must be a DataFrame with 'flops' and 'val_loss' or a pair "
                             "(flops, loss) of arrays") from None  # fmt: skip
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"{name} curve: flops and val_loss differ in length ({x.shape} vs {y.shape})")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    order = np.argsort(x, kind="stable")
    return x[order], y[order]


# -- the scratch fit -------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ScratchFit:
    """``L(C) = E + A * C**(-alpha)`` fitted on a scratch run's smoothed curve (C in FLOPs)."""

    #: irreducible loss (the asymptote); never below 0
    E: float
    #: scale, in loss * FLOPs**alpha
    A: float
    #: power-law exponent (> 0)
    alpha: float
    #: FLOPs of the points the fit used (after the warmup rule)
    flops: np.ndarray = field(repr=False)
    #: running-minimum losses of those points (what was fitted)
    loss: np.ndarray = field(repr=False)
    #: the raw losses of those points (their residuals drive :func:`bootstrap_fits`)
    raw_loss: np.ndarray = field(repr=False)
    #: how many curve points the warmup rule left out
    n_dropped: int = 0
    #: the EMA factor applied before the running minimum
    ema: float = 0.0

    def predict(self, flops: float | np.ndarray) -> float | np.ndarray:
        """Fitted loss at ``flops`` (> 0)."""
        c = np.asarray(flops, dtype=float)
        out = self.E + np.exp(math.log(self.A) - self.alpha * np.log(c))
        return float(out) if out.ndim == 0 else out

    def inverse(self, loss: float | np.ndarray) -> float | np.ndarray:
        """FLOPs at which the fitted curve reaches ``loss``: ``inf`` at or below ``E`` (never),
        NaN for a NaN loss."""
        return _inverse(self.E, self.A, self.alpha, loss)

    @property
    def rmse(self) -> float:
        """Root-mean-square residual of the fit on its points (loss units)."""
        return float(np.sqrt(np.mean((self.loss - self.predict(self.flops)) ** 2)))

    @property
    def flops_max(self) -> float:
        """Largest FLOPs the fit saw: beyond it, values are extrapolations."""
        return float(self.flops[-1])


def _inverse(E, A, alpha, loss):
    E, A, alpha = (np.asarray(v, dtype=float) for v in (E, A, alpha))
    L = np.asarray(loss, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        gap = L - E
        c = np.exp((np.log(A) - np.log(np.where(gap > 0, gap, 1.0))) / alpha)
    out = np.where(np.isnan(L), np.nan, np.where(gap > 0, c, np.inf))
    return float(out) if out.ndim == 0 else out


def _solve_linear(x: np.ndarray, y: np.ndarray, alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least squares of ``y = E + A * x**-alpha`` at each fixed ``alpha`` with ``E >= 0``:
    arrays (sse, E, A) over ``alphas``; sse = inf where the best A is not positive (a curve
    that does not fall)."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        z = x[None, :] ** -np.asarray(alphas, dtype=float)[:, None]
        zm, ym = z.mean(axis=1, keepdims=True), y.mean()
        szz = ((z - zm) ** 2).sum(axis=1)
        A = ((z - zm) * (y - ym)).sum(axis=1) / szz
        E = ym - A * zm[:, 0]
        neg = E < 0  # cross-entropy is never negative: pin the asymptote at 0 there
        A = np.where(neg, (z * y).sum(axis=1) / (z * z).sum(axis=1), A)
        E = np.where(neg, 0.0, E)
        sse = ((y[None, :] - E[:, None] - A[:, None] * z) ** 2).sum(axis=1)
    ok = np.isfinite(sse) & np.isfinite(szz) & (szz > 0) & (A > 0)
    return np.where(ok, sse, np.inf), E, A


def _fit_points(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(E, A, alpha) on points already selected; x are raw FLOPs.

    Variable projection: for a fixed ``alpha`` the least-squares ``(E, A)`` have a closed form
    (:func:`_solve_linear`), so only the profiled residual sum of squares over ``log(alpha)`` is
    minimised, by :func:`scipy.optimize.minimize_scalar` (bounded Brent) inside the bracket
    around the best point of a coarse log grid. The grid is what makes the fit global: the
    profile can have several local minima over four decades of ``alpha``, which a local
    search from one starting point would not see."""
    c_ref = float(x.max())
    xn = x / c_ref  # O(1) values: x**-alpha stays representable for any alpha on the grid
    sse = _solve_linear(xn, y, _ALPHA_GRID)[0]
    if not np.isfinite(sse).any():
        raise FitError("the scratch curve does not fall with compute: no E + A*C^(-alpha) with A > 0 fits it")
    k = int(np.argmin(sse))
    lo, hi = math.log(_ALPHA_GRID[max(k - 1, 0)]), math.log(_ALPHA_GRID[min(k + 1, len(_ALPHA_GRID) - 1)])
    res = optimize.minimize_scalar(lambda t: float(_solve_linear(xn, y, np.array([math.exp(t)]))[0][0]),
                                   bounds=(lo, hi), method="bounded", options={"xatol": 1e-9})  # fmt: skip
    alpha = math.exp(res.x) if res.success and res.fun <= sse[k] else float(_ALPHA_GRID[k])
    _, E, A_n = (float(v[0]) for v in _solve_linear(xn, y, np.array([alpha])))
    return E, A_n * c_ref**alpha, alpha  # back to raw FLOPs: A_n * (C/c_ref)^-alpha = A * C^-alpha


def fit_scratch_curve(flops: Iterable[float], loss: Iterable[float], *, warmup_frac: float = 0.1,
                      ema: float = 0.0) -> ScratchFit:  # fmt: skip
    """Fit ``L(C) = E + A*C^(-alpha)`` to a scratch run's validation curve.

    The fit uses the running minimum of the curve (``savings.smooth_curve``, after an optional
    EMA) and leaves out points with ``C <= 0``, the leading points before the smoothed loss
    first falls, and points with ``C < warmup_frac * max(C)``. Raises :class:`FitError` with
    fewer than 4 points left or a curve that does not fall.
    """
    if not 0.0 <= warmup_frac < 1.0:
        raise ValueError(f"warmup_frac={warmup_frac} must be in [0, 1)")
    x, y = _curve_xy((list(flops), list(loss)), "scratch")
    keep = x > 0
    x, raw = x[keep], y[keep]
    s = smooth_curve(raw, ema)
    n0 = len(x)
    if n0:
        falling = np.nonzero(s < s[0])[0]
        first = int(falling[0]) if len(falling) else n0  # the plateau is initialisation, not the power law
        sel = (np.arange(n0) >= first) & (x >= warmup_frac * x.max())
        x, s, raw = x[sel], s[sel], raw[sel]
    if len(x) < _MIN_FIT_POINTS:
        raise FitError(f"the scratch curve has {len(x)} usable point(s) after the warmup rule (need "
                       f"{_MIN_FIT_POINTS}); evaluate more often (eval.every) or lower warmup_frac")  # fmt: skip
    E, A, alpha = _fit_points(x, s)
    return ScratchFit(E=E, A=A, alpha=alpha, flops=x, loss=s, raw_loss=raw, n_dropped=int(len(y) - len(x)), ema=ema)


def bootstrap_fits(fit: ScratchFit, n_boot: int = 200, seed: int = 0) -> np.ndarray:
    """(n, 3) array of (E, A, alpha) refitted on residual-bootstrap replicates of ``fit``'s
    curve: fitted values plus the raw points' residuals drawn with replacement, smoothed into
    a running minimum again and refitted. Re-applying the running minimum matters: it makes the
    residuals of the smoothed curve correlated, and resampling the smoothed points as if they
    were independent gives intervals that are too narrow (measured on synthetic power laws:
    87% coverage for a nominal 95% resampling smoothed points, 93% this way). Replicates that
    do not fit are dropped."""
    rng = np.random.default_rng(seed)
    fitted = np.asarray(fit.predict(fit.flops), dtype=float)
    resid = fit.raw_loss - fitted
    out = []
    for _ in range(n_boot):
        y = smooth_curve(fitted + resid[rng.integers(0, len(resid), len(resid))], fit.ema)
        try:
            out.append(_fit_points(fit.flops, y))
        except FitError:
            continue
    return np.asarray(out, dtype=float).reshape(-1, 3)


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
    sx, sy = _curve_xy(scratch_curve, "scratch")
    xx, xy = _curve_xy(xatl_curve, "XATL")
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
    xx, _ = _curve_xy(xatl_curve, "XATL")
    if not len(xx) or xx[-1] <= 0:
        raise ValueError("the XATL curve has no evaluation with FLOPs > 0")
    sx, sy = _curve_xy(scratch_curve, "scratch")
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
        c = _inverse(params[:, 0], params[:, 1], params[:, 2], r["xatl_loss"]) if len(params) else np.empty(0)
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


# -- over seeds ------------------------------------------------------------------------------------
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


def aggregate_over_seeds(rows: Sequence[EffectiveMultiplier | Mapping], *, incl_source: bool = False,
                         n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> SeedAggregate:  # fmt: skip
    """Mean of the seeds' multipliers with a two-level percentile bootstrap: each replicate
    resamples the seeds with replacement and, for an extrapolated seed, also draws one of its
    fit-bootstrap replicates (``boot``), so the interval carries the fit's uncertainty. With
    one interpolated seed the interval is NaN (nothing to resample); with one extrapolated seed
    it is the fit's interval.

    ``rows``: :class:`EffectiveMultiplier` objects or mappings with ``multiplier``, ``method``
    and optionally ``boot`` (``multiplier_incl_source`` / ``boot_incl_source`` with
    ``incl_source``).

    Why not ``scipy.stats.bootstrap``: it resamples observations and applies a statistic to
    them, while each replicate here also draws, per resampled seed, one of that seed's own fit
    replicates (a second level of resampling whose pool differs from seed to seed), and the
    interval must keep ``inf`` replicates as an ``inf`` bound, which its interpolating
    quantile turns into NaN. The same goes for :func:`bootstrap_fits`, a residual bootstrap
    that refits the curve.
    """
    col, bcol = ("multiplier_incl_source", "boot_incl_source") if incl_source else ("multiplier", "boot")
    methods = [str(_field(r, "method")) for r in rows]
    bad = sorted({m for m in methods if m not in METHODS})
    if bad:
        raise ValueError(f"unknown method(s) {bad}; expected one of {METHODS}")
    used = []  # (value, fit replicates, method) of the seeds that enter the mean
    for r, m in zip(rows, methods):
        v = float(_field(r, col))
        if m in _POINT_METHODS and math.isfinite(v):
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
