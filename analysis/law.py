"""One law for the saving (issue 20, item 5): the effective-compute multiplier against
non-embedding parameters N, XATL training tokens D and source training tokens T together,

    m = C * N^a * D^b * T^g      i.e.   log m = log C + a log N + b log D + g log T,

fitted by ordinary least squares on the logs (numpy ``lstsq``; standard errors and 95% t
intervals from the residual variance, scipy's t quantile). Each study varies one variable with
the others held: the ladder (``docs/results/headlines``) varies N (and, through the per-size
budget, D and T a little), the length study D, the source study T, so together they identify
all three exponents. A variable with no spread in the points is left out of the fit and the
table says so.

The points are per seed (``law_points.csv`` of each study folder), each with the method of its
multiplier: the fit uses measured (``interpolated``) and ``extrapolated`` point estimates by
default and says how many of each it used; ``methods=("interpolated",)`` fits the measured
ones alone. Residuals (log, and as a ratio) are returned per point. Predictions outside the
range of the fitted points in any variable are labelled ``extrapolated`` with the variable(s)
named; inside, ``within the data``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = ["TERMS", "LawFit", "fit_law", "write_law", "collect_points"]

#: the law's variables, in the order of the exponents
TERMS = ("n_params", "xatl_tokens", "source_tokens")
#: the studies whose law_points.csv the law reads, under docs/results/
STUDIES = ("headlines", "savings_length", "source_tokens")
#: the points of one architecture and recipe: the paper's setting on pure Mamba
DEFAULT_SELECT = {"mixer": "mamba", "attention_layers": "none", "recipe": "random", "freeze_policy": "lit"}


@dataclass
class LawFit:
    """A fitted multiplicative power law."""

    #: the variables in the fit (those with spread), in TERMS order
    terms: list[str]
    #: log C
    intercept: float
    #: exponent per term
    exponents: dict[str, float]
    #: standard errors: "intercept" and each term
    se: dict[str, float]
    #: 95% t intervals: name -> (low, high)
    ci: dict[str, tuple[float, float]]
    r2: float
    n: int
    dof: int
    #: the variables left out (no spread in the points)
    dropped: list[str]
    #: per-point observed, fitted, residuals (log and ratio)
    residuals: pd.DataFrame = field(repr=False)
    #: the range of each term over the fitted points
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)

    def predict(self, **values: float) -> float:
        """The multiplier at the given variable values (every term of the fit needed)."""
        s = self.intercept
        for t in self.terms:
            s += self.exponents[t] * math.log(float(values[t]))
        return math.exp(s)

    def label(self, **values: float) -> str:
        """``within the data``, or ``extrapolated (VAR ...)`` naming the variables outside the
        fitted points' range."""
        out = [t for t in self.terms
               if not (self.ranges[t][0] * (1 - 1e-9) <= float(values[t]) <= self.ranges[t][1] * (1 + 1e-9))]  # fmt: skip
        return "within the data" if not out else "extrapolated (" + ", ".join(f"{t} beyond the data" for t in out) + ")"

    def table(self) -> pd.DataFrame:
        rows = [{"term": "log_prefactor", "estimate": self.intercept, "se": self.se["intercept"],
                 "ci_low": self.ci["intercept"][0], "ci_high": self.ci["intercept"][1]}]  # fmt: skip
        rows += [{"term": t, "estimate": self.exponents[t], "se": self.se[t], "ci_low": self.ci[t][0],
                  "ci_high": self.ci[t][1]} for t in self.terms]  # fmt: skip
        rows += [{"term": f"{t} (dropped: no spread)", "estimate": math.nan} for t in self.dropped]
        return pd.DataFrame(rows).assign(n=self.n, dof=self.dof, r2=self.r2)


def fit_law(points: pd.DataFrame, terms: Sequence[str] = TERMS, *, y: str = "multiplier",
            methods: Iterable[str] | None = ("interpolated", "extrapolated"), level: float = 0.95) -> LawFit:  # fmt: skip
    """OLS of ``log y`` on ``log`` of each term (see the module docstring). Points need finite,
    positive values of ``y`` and every term; with ``methods``, only rows whose ``method`` is
    one of them. Raises ValueError with fewer points than parameters + 1."""
    from scipy import stats

    p = points.copy()
    if methods is not None and "method" in p:
        p = p[p["method"].isin(list(methods))]
    cols = [y, *terms]
    for c in cols:
        p[c] = pd.to_numeric(p[c], errors="coerce")
    p = p[np.isfinite(p[cols]).all(axis=1) & (p[cols] > 0).all(axis=1)].reset_index(drop=True)
    logs = {t: np.log(p[t].to_numpy(dtype=float)) for t in terms}
    used = [t for t in terms if len(p) and np.ptp(logs[t]) > 1e-9]
    dropped = [t for t in terms if t not in used]
    n, k = len(p), len(used) + 1
    if n < k + 1:
        raise ValueError(f"{n} usable point(s) for {k} parameters: the law needs at least {k + 1}")
    X = np.column_stack([np.ones(n)] + [logs[t] for t in used])
    ly = np.log(p[y].to_numpy(dtype=float))
    beta, *_ = np.linalg.lstsq(X, ly, rcond=None)
    fitted = X @ beta
    resid = ly - fitted
    dof = n - k
    s2 = float(resid @ resid) / dof if dof > 0 else math.nan
    cov = s2 * np.linalg.pinv(X.T @ X)
    se = np.sqrt(np.clip(np.diag(cov), 0, None))
    q = float(stats.t.ppf(0.5 + level / 2, dof)) if dof > 0 else math.nan
    names = ["intercept", *used]
    tss = float(((ly - ly.mean()) ** 2).sum())
    res = p.assign(fitted=np.exp(fitted), log_residual=resid, ratio=np.exp(resid))
    return LawFit(terms=used, intercept=float(beta[0]), exponents={t: float(b) for t, b in zip(used, beta[1:])},
                  se={nm: float(s) for nm, s in zip(names, se)},
                  ci={nm: (float(b - q * s), float(b + q * s)) for nm, b, s in zip(names, beta, se)},
                  r2=1 - float(resid @ resid) / tss if tss > 0 else math.nan, n=n, dof=dof, dropped=dropped,
                  residuals=res, ranges={t: (float(p[t].min()), float(p[t].max())) for t in used})  # fmt: skip


def collect_points(results_dir: str | Path = "docs/results", studies: Sequence[str] = STUDIES,
                   select: Mapping[str, str] | None = None) -> pd.DataFrame:  # fmt: skip
    """The ``law_points.csv`` of each study folder that has one, filtered by ``select``
    (column -> value; default :data:`DEFAULT_SELECT`)."""
    parts = []
    for s in studies:
        f = Path(results_dir) / s / "law_points.csv"
        if f.is_file() and f.stat().st_size > 1:
            parts.append(pd.read_csv(f, dtype={"attention_layers": str}))
    if not parts:
        return pd.DataFrame()
    pts = pd.concat(parts, ignore_index=True)
    for c, v in (DEFAULT_SELECT if select is None else select).items():
        if c in pts:
            pts = pts[pts[c].astype(str) == str(v)]
    return pts.reset_index(drop=True)


def _predictions(fit: LawFit, points: pd.DataFrame) -> pd.DataFrame:
    """The law at every measured configuration and one decade past each edge of the data."""
    rows = []
    cfgs = points.groupby([t for t in fit.terms], dropna=False).size().reset_index()[list(fit.terms)]
    for _, r in cfgs.iterrows():
        v = {t: float(r[t]) for t in fit.terms}
        rows.append({**v, "multiplier": fit.predict(**v), "kind": fit.label(**v)})
    mid = {t: math.sqrt(fit.ranges[t][0] * fit.ranges[t][1]) for t in fit.terms}
    for t in fit.terms:
        v = {**mid, t: fit.ranges[t][1] * 10}
        rows.append({**v, "multiplier": fit.predict(**v), "kind": fit.label(**v)})
    return pd.DataFrame(rows)


def plot_residuals(fit: LawFit, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .figures import log_axis

    r = fit.residuals
    fig, axes = plt.subplots(1, len(fit.terms) + 1, figsize=(3.2 * (len(fit.terms) + 1), 3.2))
    axes = np.atleast_1d(axes)
    study = r["study"].astype(str) if "study" in r else pd.Series("points", index=r.index)
    for s in sorted(study.unique()):
        g = r[study == s]
        meas = g["method"] == "interpolated" if "method" in g else pd.Series(True, index=g.index)
        axes[0].scatter(g["fitted"][meas], g["multiplier"][meas], label=s, s=14)
        axes[0].scatter(g["fitted"][~meas], g["multiplier"][~meas], facecolor="none", edgecolor="k", s=14)
        for ax, t in zip(axes[1:], fit.terms):
            ax.scatter(g[t], g["log_residual"], s=14)
    lo, hi = float(r[["fitted", "multiplier"]].min().min()), float(r[["fitted", "multiplier"]].max().max())
    axes[0].plot([lo, hi], [lo, hi], color="grey", lw=0.8)
    axes[0].set_xlabel("law")
    axes[0].set_ylabel("measured multiplier\n(hollow: extrapolated)")
    axes[0].legend(fontsize=7)
    for ax, t in zip(axes[1:], fit.terms):
        log_axis(ax, "x")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel(t)
        ax.set_ylabel("log residual")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_law(results_dir: str | Path = "docs/results", out_dir: str | Path = "docs/results/law") -> Path:
    """law.csv (coefficients, both fits), law_residuals.csv, law_predictions.csv,
    figures/law_residuals.png and law.md from the studies' law_points.csv."""
    from .report import md_table

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pts = collect_points(results_dir)
    pts.to_csv(out / "law_points.csv", index=False)
    md = ["# One law: multiplier = C * N^a * D^b * T^g", "",
          "N: non-embedding parameters; D: XATL training tokens; T: source training tokens. Points: one per seed "
          "(and per length in the length study) of the paper's setting on pure Mamba, from "
          + ", ".join(f"docs/results/{s}/law_points.csv" for s in STUDIES) + ". Log-linear least squares; brackets: "
          "95% t intervals.", ""]  # fmt: skip
    tables = []
    for name, methods in (("all point estimates", ("interpolated", "extrapolated")), ("measured only", ("interpolated",))):
        try:
            fit = fit_law(pts, methods=methods) if not pts.empty else None
        except ValueError as e:
            md += [f"## Fit on {name}", "", f"_No fit: {e}._", ""]
            continue
        if fit is None:
            md += [f"## Fit on {name}", "", "_No points yet: the studies have not run._", ""]
            continue
        tables.append(fit.table().assign(fit=name))
        md += [f"## Fit on {name}", "", f"{fit.n} points, R^2 = {fit.r2:.3f}.", "", md_table(fit.table()), ""]
        if name == "all point estimates":
            fit.residuals.to_csv(out / "law_residuals.csv", index=False)
            pred = _predictions(fit, fit.residuals)
            pred.to_csv(out / "law_predictions.csv", index=False)
            md += ["Predictions (past the data: labelled extrapolated):", "", md_table(pred), ""]
            f = plot_residuals(fit, out / "figures" / "law_residuals.png")
            md += [f"![law residuals](figures/{f.name})", ""]
    (pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()).to_csv(out / "law.csv", index=False)
    (out / "law.md").write_text("\n".join(md) + "\n")
    return out / "law.md"
