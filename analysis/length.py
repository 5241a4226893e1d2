"""The effective-compute saving against training length (issue 20, item 2).

One XATL run and one scratch run per seed are trained far past the ladder's XATL budget ``B``
(``sweeps/savings_length.yaml``: XATL 10 x B, scratch 30 x B). With a constant learning rate
and a LIT schedule counted in steps, the first ``k x B`` of such a run *is* the ``k x B`` run, so
the multiplier at length ``k`` is read by cutting the XATL curve at ``k x B`` (its last
evaluation at or before that many FLOPs) and asking the scratch curve what it needs to reach
the loss there (:func:`analysis.effective.effective_multiplier`: ``interpolated`` on the
measured scratch curve, ``extrapolated`` through its fitted power law when scratch stops
short -- flagged in every row).

Columns name the axis plainly: ``length_factor`` is the nominal k (1, 3, 10),
``length_factor_actual`` the FLOPs of the evaluation used / B (a little below k: the last
evaluation at or before k x B). ``loss_gap`` = scratch's (running-min) loss at the same FLOPs
minus XATL's, a second, model-free view of "does scratch catch up" (0 when it has).

Catch-up: per group, ``log m = a + b log k`` is fitted on the per-seed values (ordinary least
squares); where ``b < 0`` the multiplier reaches 1 at ``k* = exp(-a / b)``. ``k*`` inside the
measured lengths is a measurement (some seed's multiplier at or below 1 there); beyond them it
is an extrapolation of the fitted trend and labelled so.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from .effective import EffectiveMultiplier, FitError, aggregate_over_seeds, effective_compute, effective_multiplier, fit_scratch_curve
from .savings import smooth_curve

__all__ = ["FACTORS", "GROUP_KEYS", "catch_up", "length_curves", "length_summary", "length_table", "loglog_fit",
           "write_length"]  # fmt: skip

#: the lengths read off every long run, in units of the ladder's XATL budget B
FACTORS = (1.0, 3.0, 10.0)
#: one row of length_summary.csv: a pairing key without the seed, and the length
GROUP_KEYS = ("size", "mixer", "attention_layers", "recipe", "freeze_policy")
#: an XATL curve must reach this share of k x B for length k to count (else: "not reached")
_REACH = 0.85


def _xy(curve: Any) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(curve, (pd.DataFrame, Mapping)):
        x, y = np.asarray(curve["flops"], dtype=float), np.asarray(curve["val_loss"], dtype=float)
    else:
        x, y = (np.asarray(v, dtype=float) for v in curve)
    ok = np.isfinite(x) & np.isfinite(y)
    o = np.argsort(x[ok], kind="stable")
    return x[ok][o], y[ok][o]


def _interp_loss(sx: np.ndarray, ss: np.ndarray, c: float) -> float:
    """Running-min scratch loss at FLOPs ``c``, linear in log-FLOPs; NaN outside the curve."""
    pos = sx > 0
    sx, ss = sx[pos], ss[pos]
    if not len(sx) or c < sx[0] or c > sx[-1]:
        return math.nan
    return float(np.interp(math.log(c), np.log(sx), ss))


def length_table(pairs: pd.DataFrame, curves: Mapping[str, Any], base_budget: Mapping[str, float] | float, *,
                 factors: Sequence[float] = FACTORS, tokens: Mapping[str, Any] | None = None, fit_boot: int = 200,
                 warmup_frac: float = 0.1, ema: float = 0.0,
                 seed: int = 0) -> tuple[pd.DataFrame, list[EffectiveMultiplier | None]]:  # fmt: skip
    """The multiplier of every (XATL, scratch) pairing at every length factor.

    ``pairs``: rows with ``xatl_run``, ``scratch_run`` and the pairing key (``size`` picks the
    base budget when ``base_budget`` is a mapping size -> B; a number applies to every row);
    ``curves``: run -> validation curve (``flops``, ``val_loss``; ``tokens`` is carried when
    present). Returns one row per (pairing, length factor) and the multipliers row for row
    (None where the XATL run does not reach the length: ``method`` "not_reached")."""
    rows: list[dict] = []
    ems: list[EffectiveMultiplier | None] = []
    for k_pair, (_, p) in enumerate(pairs.iterrows()):
        cx, cs = curves.get(p["xatl_run"]), curves.get(p["scratch_run"])
        if cx is None or cs is None or not len(cx) or not len(cs):
            continue
        B = float(base_budget[p["size"]] if isinstance(base_budget, Mapping) else base_budget)
        xx, xy = _xy(cx)
        sx, sy = _xy(cs)
        try:
            fit = fit_scratch_curve(sx, sy, warmup_frac=warmup_frac, ema=ema)
        except FitError:
            fit = None
        ss = smooth_curve(sy, ema)
        xt = None
        if isinstance(cx, pd.DataFrame) and "tokens" in cx:
            t = cx.assign(_f=pd.to_numeric(cx["flops"], errors="coerce")).dropna(subset=["_f", "val_loss"])
            xt = t.sort_values("_f", kind="stable")["tokens"].to_numpy(dtype=float)
        key = {c: p[c] for c in pairs.columns if c not in ("xatl_run", "scratch_run")}
        for k in factors:
            target = float(k) * B
            keep = (xx > 0) & (xx <= target * (1 + 1e-9))
            base = {**key, "xatl_run": p["xatl_run"], "scratch_run": p["scratch_run"], "length_factor": float(k),
                    "base_budget": B}  # fmt: skip
            if not keep.any() or xx[keep][-1] < _REACH * target:
                rows.append({**base, "method": "not_reached", "multiplier": math.nan,
                             "budget": float(xx[keep][-1]) if keep.any() else math.nan})  # fmt: skip
                ems.append(None)
                continue
            em = effective_multiplier((sx, sy), (xx[keep], xy[keep]), fit=fit, ema=ema, n_boot=fit_boot,
                                      seed=seed + 1000 * k_pair + int(k))  # fmt: skip
            s_loss = _interp_loss(sx, ss, em.budget)
            rows.append({**base, **em.to_row(), "length_factor_actual": em.budget / B,
                         "xatl_tokens": float(xt[np.nonzero(keep)[0][-1]]) if xt is not None else math.nan,
                         "scratch_loss_same_flops": s_loss, "loss_gap": s_loss - em.xatl_loss})  # fmt: skip
            ems.append(em)
    return pd.DataFrame(rows), ems


def length_summary(table: pd.DataFrame, ems: Sequence[EffectiveMultiplier | None], *,
                   group: Sequence[str] = GROUP_KEYS, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:  # fmt: skip
    """Over seeds, per group and length factor: the mean multiplier with its two-level
    bootstrap interval (:func:`analysis.effective.aggregate_over_seeds`: seeds and, for
    extrapolated seeds, their fit replicates), its method (``interpolated`` only when every
    seed was measured), the mean loss gap and the seeds' counts."""
    if table.empty:
        return pd.DataFrame()
    keys = [g for g in group if g in table] + ["length_factor"]
    out = []
    for key, g in table.groupby(keys, dropna=False, sort=True):
        idx = [table.index.get_loc(i) for i in g.index]
        got = [ems[i] for i in idx if ems[i] is not None]
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        row["n_not_reached"] = int(sum(ems[i] is None for i in idx))
        if got:
            row.update(aggregate_over_seeds(got, n_boot=n_boot, seed=seed).to_row("multiplier"))
        else:
            row.update({"multiplier_mean": math.nan, "multiplier_method": "none", "n_seeds": 0})
        row["length_factor_actual"] = float(np.nanmean(g.get("length_factor_actual", pd.Series([math.nan]))))
        row["loss_gap_mean"] = float(np.nanmean(g["loss_gap"])) if "loss_gap" in g and g["loss_gap"].notna().any() else math.nan
        row["xatl_tokens"] = float(np.nanmean(g["xatl_tokens"])) if "xatl_tokens" in g and g["xatl_tokens"].notna().any() else math.nan
        out.append(row)
    return pd.DataFrame(out)


def loglog_fit(x: Iterable[float], y: Iterable[float], level: float = 0.95) -> dict[str, float]:
    """OLS of ``log y = a + b log x``: a, b, b's t interval, n (finite positive points only)."""
    from scipy import stats

    x, y = np.asarray(list(x), dtype=float), np.asarray(list(y), dtype=float)
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    lx, ly = np.log(x[ok]), np.log(y[ok])
    n = len(lx)
    if n < 2 or np.ptp(lx) == 0:
        return {"a": math.nan, "b": math.nan, "b_low": math.nan, "b_high": math.nan, "n": n}
    b, a = np.polyfit(lx, ly, 1)
    lo = hi = math.nan
    if n > 2:
        resid = ly - (a + b * lx)
        se = math.sqrt(float(resid @ resid) / (n - 2) / float(((lx - lx.mean()) ** 2).sum()))
        h = float(stats.t.ppf(0.5 + level / 2, n - 2)) * se
        lo, hi = b - h, b + h
    return {"a": float(a), "b": float(b), "b_low": lo, "b_high": hi, "n": n}


def catch_up(table: pd.DataFrame, group: Sequence[str] = GROUP_KEYS) -> pd.DataFrame:
    """Per group: the log-log trend of the per-seed multipliers against ``length_factor`` and
    the length at which it reaches 1 (scratch has caught up), measured or extrapolated."""
    if table.empty:
        return pd.DataFrame()
    keys = [g for g in group if g in table]
    ok = table[table["method"].isin(["interpolated", "extrapolated"])] if "method" in table else table
    out = []
    for key, g in ok.groupby(keys, dropna=False, sort=True):
        f = loglog_fit(g["length_factor"], g["multiplier"])
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        row.update({"trend_exponent": f["b"], "trend_exponent_low": f["b_low"], "trend_exponent_high": f["b_high"],
                    "multiplier_at_1": math.exp(f["a"]) if math.isfinite(f["a"]) else math.nan, "n_points": f["n"]})  # fmt: skip
        kmax = float(g["length_factor"].max())
        at_or_below = g[g["multiplier"] <= 1.0]
        if len(at_or_below):
            k_star, kind = float(at_or_below["length_factor"].min()), "measured"
        elif math.isfinite(f["b"]) and f["b"] < 0:
            k_star = math.exp(-f["a"] / f["b"])
            kind = "extrapolated" if k_star > kmax else "fitted"
        else:
            k_star, kind = math.inf, "never (the multiplier does not fall with length)"
        row.update({"catch_up_length_factor": k_star, "catch_up": kind, "max_length_factor": kmax})
        out.append(row)
    return pd.DataFrame(out)


def length_curves(pairs: pd.DataFrame, curves: Mapping[str, Any], base_budget: Mapping[str, float] | float, *,
                  ema: float = 0.0) -> pd.DataFrame:  # fmt: skip
    """The multiplier at every evaluation of every long XATL run (the curve behind the figure):
    :func:`analysis.effective.effective_compute` with ``length_factor`` = budget / B."""
    parts = []
    for _, p in pairs.iterrows():
        cx, cs = curves.get(p["xatl_run"]), curves.get(p["scratch_run"])
        if cx is None or cs is None or not len(cx) or not len(cs):
            continue
        B = float(base_budget[p["size"]] if isinstance(base_budget, Mapping) else base_budget)
        try:
            c = effective_compute(cs, cx, ema=ema)
        except ValueError:
            continue
        parts.append(c.assign(length_factor=c["budget"] / B, size=p.get("size"), seed=p.get("seed"),
                              xatl_run=p["xatl_run"], scratch_run=p["scratch_run"]))  # fmt: skip
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def plot_length(summary: pd.DataFrame, curves: pd.DataFrame, path: str | Path) -> Path | None:
    """Multiplier against length_factor, log-log, one colour per size: each pairing's curve faint
    (dotted where extrapolated), the seed means at 1 / 3 / 10 x B with their intervals (filled:
    every seed interpolated; hollow: some seed extrapolated), the break-even line at 1."""
    if summary.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (size, g) in enumerate(summary.groupby("size", sort=False)):
        col = colours[i % len(colours)]
        if not curves.empty and "size" in curves:
            for _, c in curves[curves["size"] == size].groupby("xatl_run"):
                c = c[np.isfinite(c["multiplier"])]
                meas = c[c["method"] == "interpolated"]
                ax.plot(meas["length_factor"], meas["multiplier"], color=col, alpha=0.25, lw=0.8)
                ex = c[c["method"] == "extrapolated"]
                ax.plot(ex["length_factor"], ex["multiplier"], color=col, alpha=0.25, lw=0.8, ls=":")
        g = g.sort_values("length_factor")
        y = g["multiplier_mean"].to_numpy(dtype=float)
        lo = y - g.get("multiplier_ci_low", pd.Series(np.nan, index=g.index)).to_numpy(dtype=float)
        hi = g.get("multiplier_ci_high", pd.Series(np.nan, index=g.index)).to_numpy(dtype=float) - y
        meas = (g["multiplier_method"] == "interpolated").to_numpy()
        ax.errorbar(g["length_factor"], y, yerr=[np.nan_to_num(lo), np.nan_to_num(hi)], color=col, fmt="none", capsize=3)
        ax.plot(g["length_factor"], y, color=col, lw=1.5, label=str(size))
        ax.scatter(g["length_factor"][meas], y[meas], color=col, zorder=3)
        ax.scatter(g["length_factor"][~meas], y[~meas], facecolor="white", edgecolor=col, zorder=3)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("XATL training length / the ladder's XATL budget B (length_factor)")
    ax.set_ylabel("effective-compute multiplier")
    ax.set_title("Saving against training length (filled: measured; hollow: extrapolated)", fontsize=9)
    ax.legend(title="size")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_length(sweep_dir: str | Path, out_dir: str | Path, base_budget: Mapping[str, float], *,
                 factors: Sequence[float] = FACTORS, fit_boot: int = 200, n_boot: int = 2000) -> Path:  # fmt: skip
    """length.csv (per pairing and length), length_summary.csv (over seeds), catch_up.csv,
    length_curves.csv, law_points.csv, figures/effective_vs_length.png and length.md from the
    runs under ``sweep_dir``."""
    from .report import load_sweep, md_table
    from .savings import savings_table

    data = load_sweep(sweep_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = data.df[data.df["state"] == "done"] if not data.df.empty else data.df
    pairs = savings_table(done, data.curves) if not done.empty else pd.DataFrame()
    cols = [c for c in ("xatl_run", "scratch_run", "size", "mixer", "attention_layers", "seed", "recipe",
                        "freeze_policy") if c in pairs]  # fmt: skip
    pairs = pairs[cols] if not pairs.empty else pairs
    table, ems = length_table(pairs, data.curves, base_budget, factors=factors, fit_boot=fit_boot) if len(pairs) else (pd.DataFrame(), [])
    if not table.empty:
        table["n_params"] = [data.n_params.get(r, math.nan) for r in table["xatl_run"]]
        table["source_tokens"] = [source_tokens_of(data.df, r) for r in table["xatl_run"]]
    summ = length_summary(table, ems, n_boot=n_boot)
    cu = catch_up(table)
    lc = length_curves(pairs, data.curves, base_budget) if len(pairs) else pd.DataFrame()
    table.to_csv(out / "length.csv", index=False)
    summ.to_csv(out / "length_summary.csv", index=False)
    cu.to_csv(out / "catch_up.csv", index=False)
    lc.to_csv(out / "length_curves.csv", index=False)
    law_points(table, study="savings_length").to_csv(out / "law_points.csv", index=False)
    fig = plot_length(summ, lc, out / "figures" / "effective_vs_length.png")
    md = ["# Effective compute against training length", "",
          "`length_factor` k: the XATL run cut at k x B (B: the ladder's XATL budget of its size); the multiplier is "
          "scratch FLOPs to reach the XATL loss there / the XATL FLOPs there. *interpolated*: read off the measured "
          "scratch curve; *extrapolated*: scratch stopped short, its fitted power law was inverted. Brackets: 95% "
          "bootstrap interval over seeds (and fit replicates for extrapolated seeds).", ""]  # fmt: skip
    if not summ.empty:
        v = summ.copy()
        v["multiplier"] = [_phrase(r) for _, r in v.iterrows()]
        md.append(md_table(v, ["size", "mixer", "length_factor", "length_factor_actual", "n_seeds", "multiplier",
                               "loss_gap_mean", "n_not_reached"]))  # fmt: skip
    else:
        md.append("_No finished pairing yet._\n")
    md += ["", "## Does scratch catch up?", "",
           "log m = a + b log k fitted on the per-seed multipliers; `catch_up_length_factor`: where m reaches 1 "
           "(*measured*: some seed at or below 1 there; *extrapolated*: beyond the longest measured length).", ""]  # fmt: skip
    md.append(md_table(cu) if not cu.empty else "_No trend yet._\n")
    if fig is not None:
        md += ["", f"![multiplier against length](figures/{fig.name})", ""]
    (out / "length.md").write_text("\n".join(md) + "\n")
    return out / "length.md"


def _phrase(r: Mapping) -> str:
    m = r.get("multiplier_mean", math.nan)
    if not isinstance(m, float) or not math.isfinite(m):
        return "no estimate"
    lo, hi = r.get("multiplier_ci_low", math.nan), r.get("multiplier_ci_high", math.nan)
    ci = f" [{lo:.2f}, {hi:.2f}]" if math.isfinite(lo) and math.isfinite(hi) else ""
    return f"{m:.2f}x{ci} ({r.get('multiplier_method')})"


def source_tokens_of(df: pd.DataFrame, run: str) -> float:
    """Training tokens of the source an XATL run transferred from (its ``hf/`` is another run's)."""
    row = df[df["run"] == run]
    if row.empty or "source" not in df:
        return math.nan
    src = row["source"].iloc[0]
    if not isinstance(src, str) or not src:
        return math.nan
    d = str(Path(src).parent.resolve())
    hit = df[[str(Path(x).resolve()) == d for x in df["run_dir"]]]
    return float(hit["tokens"].iloc[0]) if len(hit) else math.nan


def law_points(table: pd.DataFrame, study: str) -> pd.DataFrame:
    """The rows :mod:`analysis.law` fits: one per pairing (and length), with the law's variables
    (``n_params``, ``xatl_tokens``, ``source_tokens``) and the multiplier with its method."""
    cols = ["study", "size", "mixer", "attention_layers", "recipe", "freeze_policy", "seed", "length_factor",
            "n_params", "xatl_tokens", "source_tokens", "multiplier", "method", "xatl_run", "scratch_run"]  # fmt: skip
    if table.empty:
        return pd.DataFrame(columns=cols)
    t = table.assign(study=study)
    return t.reindex(columns=cols)
