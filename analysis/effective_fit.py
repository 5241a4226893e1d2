"""The scratch curve's power law ``L(C) = E + A*C^(-alpha)`` (C in FLOPs), fitted to
extrapolate a scratch run past its last evaluation (:mod:`analysis.effective`), and the
residual bootstrap of that fit.

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
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd
from scipy import optimize

from .savings import smooth_curve

__all__ = ["FitError", "ScratchFit", "bootstrap_fits", "curve_xy", "fit_scratch_curve", "power_law_inverse"]

_MIN_FIT_POINTS = 4  # three parameters plus at least one degree of freedom
_ALPHA_GRID = np.geomspace(1e-3, 5.0, 160)


class FitError(ValueError):
    """The scratch curve cannot be fitted by ``E + A*C^(-alpha)`` (too few points, not falling)."""


# -- curves ----------------------------------------------------------------------------------------
def curve_xy(curve: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
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
        return power_law_inverse(self.E, self.A, self.alpha, loss)

    @property
    def rmse(self) -> float:
        """Root-mean-square residual of the fit on its points (loss units)."""
        return float(np.sqrt(np.mean((self.loss - self.predict(self.flops)) ** 2)))

    @property
    def flops_max(self) -> float:
        """Largest FLOPs the fit saw: beyond it, values are extrapolations."""
        return float(self.flops[-1])


def power_law_inverse(E, A, alpha, loss):
    """FLOPs at which ``E + A*C^(-alpha)`` reaches ``loss`` (arrays broadcast: one value per
    bootstrap replicate): ``inf`` at or below ``E``, NaN for a NaN loss."""
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
    x, y = curve_xy((list(flops), list(loss)), "scratch")
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
