"""The effective-compute saving against the source's training (issue 20, item 3).

Sources trained to several budgets (``sweeps/source_tokens.yaml``: 10 x, 30 x and 100 x the XATL
budget B at size mini) are each converted with a recipe, on 3 seeds, against scratch. Per
(recipe, source):

``multiplier``               scratch FLOPs to reach the XATL loss / XATL FLOPs (the report's
                             headline; method per row: interpolated / extrapolated)
``multiplier_incl_source``   the same with the source's pretraining FLOPs S added to the XATL side
                             (one conversion pays for the whole source)
``payback_conversions``      how many conversions from one source it takes before the source's
                             own cost is paid back: each conversion costs b and saves (m - 1) b
                             against training that model from scratch, so N = S / ((m - 1) b)
                             (infinite when m <= 1); its interval comes from the multiplier's
                             (N is decreasing in m)
``source_tokens``            the source's training tokens; ``source_epochs`` the same over the
                             corpus's training tokens (repeats when > 1)

The trend against source tokens is ``log m = a + g log T`` per recipe (OLS on the per-seed
values, :func:`analysis.length.loglog_fit`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .effective import EffectiveMultiplier, aggregate_over_seeds, effective_table
from .length import source_tokens_of, loglog_fit

__all__ = ["payback_conversions", "source_summary", "source_table", "source_trend", "write_source_tokens"]

GROUP_KEYS = ("size", "mixer", "attention_layers", "recipe", "freeze_policy", "source")


def payback_conversions(multiplier: float, xatl_flops: float, source_flops: float) -> float:
    """Conversions N from one source after which the source's cost S is paid back:
    N = S / ((m - 1) b); ``inf`` when m <= 1 (no conversion saves anything), NaN for NaN."""
    m, b, s = float(multiplier), float(xatl_flops), float(source_flops)
    if not all(math.isfinite(v) for v in (m, b, s)):
        return math.nan
    if m <= 1.0:
        return math.inf
    return s / ((m - 1.0) * b)


def source_table(df: pd.DataFrame, curves: Mapping[str, pd.DataFrame], n_params: Mapping[str, float] | None = None, *,
                 fit_boot: int = 200) -> tuple[pd.DataFrame, list[EffectiveMultiplier]]:  # fmt: skip
    """Every finished (XATL, scratch) pairing of the runs in ``df`` (a results table) with its
    multiplier (:func:`analysis.effective.effective_table`), ``source_tokens`` and ``xatl_tokens``."""
    from .savings import savings_table

    done = df[df["state"] == "done"]
    pairs = savings_table(done, curves) if not done.empty else pd.DataFrame()
    if pairs.empty:
        return pd.DataFrame(), []
    eff, ems = effective_table(pairs, curves, n_params=n_params or {}, fit_boot=fit_boot)
    if eff.empty:
        return eff, ems
    eff["source_tokens"] = [source_tokens_of(df, r) for r in eff["xatl_run"]]
    tok = dict(zip(df["run"], df["tokens"]))
    eff["xatl_tokens"] = [float(tok.get(r, math.nan)) for r in eff["xatl_run"]]
    return eff, ems


def source_summary(table: pd.DataFrame, ems: Sequence[EffectiveMultiplier], *, train_tokens: float | None = None,
                   group: Sequence[str] = GROUP_KEYS, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:  # fmt: skip
    """Over seeds per (recipe, source): the multiplier and the source-inclusive one (means, 95%
    two-level bootstrap intervals, methods), source tokens and epochs, and the payback."""
    if table.empty:
        return pd.DataFrame()
    keys = [g for g in group if g in table]
    out = []
    for key, g in table.groupby(keys, dropna=False, sort=True):
        got = [ems[table.index.get_loc(i)] for i in g.index]
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        row["source_tokens"] = float(np.nanmean(g["source_tokens"])) if g["source_tokens"].notna().any() else math.nan
        row["source_epochs"] = row["source_tokens"] / train_tokens if train_tokens else math.nan
        row["source_flops"] = float(np.nanmean(g["source_flops"])) if g["source_flops"].notna().any() else math.nan
        row["xatl_flops"] = float(np.nanmean(g["budget"]))
        row.update(aggregate_over_seeds(got, n_boot=n_boot, seed=seed).to_row("multiplier"))
        inc = aggregate_over_seeds(got, incl_source=True, n_boot=n_boot, seed=seed).to_row("multiplier_incl_source")
        row.update({k: v for k, v in inc.items() if k != "n_seeds"})
        S, b = row["source_flops"], row["xatl_flops"]
        row["payback_conversions"] = payback_conversions(row["multiplier_mean"], b, S)
        # N falls as m rises: the interval's ends swap
        row["payback_conversions_low"] = payback_conversions(row.get("multiplier_ci_high", math.nan), b, S)
        row["payback_conversions_high"] = payback_conversions(row.get("multiplier_ci_low", math.nan), b, S)
        out.append(row)
    return pd.DataFrame(out).sort_values([k for k in ("recipe", "source_tokens") if k in keys or k == "source_tokens"],
                                         kind="stable").reset_index(drop=True)  # fmt: skip


def source_trend(table: pd.DataFrame, by: Sequence[str] = ("recipe",)) -> pd.DataFrame:
    """Per recipe: ``log m = a + g log T`` on the per-seed point estimates (T = source tokens)."""
    if table.empty:
        return pd.DataFrame()
    ok = table[table["method"].isin(["interpolated", "extrapolated"])]
    keys = [k for k in by if k in ok]
    out = []
    for key, g in ok.groupby(keys, dropna=False, sort=True):
        f = loglog_fit(g["source_tokens"], g["multiplier"])
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        row.update({"exponent": f["b"], "exponent_low": f["b_low"], "exponent_high": f["b_high"],
                    "log_prefactor": f["a"], "n_points": f["n"],
                    "n_extrapolated": int((g["method"] == "extrapolated").sum())})  # fmt: skip
        out.append(row)
    return pd.DataFrame(out)


def _train_tokens(data_dir: str | Path) -> float | None:
    """Training tokens of a prepared dataset (read by the data package, its owner), or None."""
    from xatl_ds.data.layout import read_meta

    try:
        return float(read_meta(data_dir)["splits"]["train"]["tokens"])
    except Exception:  # not prepared (DataError), or an older layout: no epochs then
        return None


def setting_label(summary: pd.DataFrame) -> pd.Series:
    """What a row converts, in words: ``mamba, random, freeze lit`` is the paper's setting."""
    cols = [c for c in ("mixer", "recipe", "freeze_policy") if c in summary]
    return summary[cols].astype(str).apply(
        lambda r: ", ".join(f"freeze {v}" if k == "freeze_policy" else v for k, v in r.items()), axis=1)


def plot_source_tokens(summary: pd.DataFrame, path: str | Path) -> Path | None:
    """Multiplier (and source-inclusive multiplier) against source tokens, one colour per
    setting (:func:`setting_label`)."""
    if summary.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .figures import log_axis

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for (setting, g) in summary.assign(setting=setting_label(summary)).groupby("setting", sort=False):
        g = g.sort_values("source_tokens")
        for ax, pre in zip(axes, ("multiplier", "multiplier_incl_source")):
            y = g[f"{pre}_mean"].to_numpy(dtype=float)
            lo = np.nan_to_num(y - g[f"{pre}_ci_low"].to_numpy(dtype=float))
            hi = np.nan_to_num(g[f"{pre}_ci_high"].to_numpy(dtype=float) - y)
            ax.errorbar(g["source_tokens"], y, yerr=[lo, hi], marker="o", capsize=3, label=str(setting))
    for ax, t in zip(axes, ("effective-compute multiplier", "incl. the source's FLOPs")):
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")  # before the ticks: the line is in the range they cover
        log_axis(ax, "x")
        log_axis(ax, "y")
        ax.set_xlabel("source training tokens (source_tokens)")
        ax.set_title(t, fontsize=9)
    axes[0].legend(title="student mixer, recipe, freezing", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_source_tokens(sweep_dirs: Sequence[str | Path], out_dir: str | Path, *, data_dir: str | Path = "runs/data/builtin",
                        fit_boot: int = 200, n_boot: int = 2000) -> Path:  # fmt: skip
    """source_tokens.csv (per pairing), source_tokens_summary.csv, source_trend.csv,
    law_points.csv, figures/effective_vs_source_tokens.png and source_tokens.md from the runs
    of every sweep in ``sweep_dirs`` (their recipes side by side)."""
    from .length import law_points
    from .report import load_sweep, md_table

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables, all_ems, train_tokens = [], [], _train_tokens(data_dir)
    for d in sweep_dirs:
        try:
            data = load_sweep(d)
        except FileNotFoundError:
            continue
        if data.df.empty:
            continue
        t, e = source_table(data.df, data.curves, data.n_params, fit_boot=fit_boot)
        if not t.empty:
            tables.append(t.assign(sweep=str(d)))
            all_ems.extend(e)
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    summ = source_summary(table, all_ems, train_tokens=train_tokens, n_boot=n_boot)
    trend = source_trend(table)
    table.to_csv(out / "source_tokens.csv", index=False)
    summ.to_csv(out / "source_tokens_summary.csv", index=False)
    trend.to_csv(out / "source_trend.csv", index=False)
    law_points(table.assign(length_factor=1.0) if not table.empty else table, study="source_tokens").to_csv(
        out / "law_points.csv", index=False)  # fmt: skip
    fig = plot_source_tokens(summ, out / "figures" / "effective_vs_source_tokens.png")
    md = ["# Effective compute against the source's training", "",
          f"Corpus training tokens: {train_tokens:,.0f}." if train_tokens else "Corpus training tokens: unknown.", "",
          "`multiplier`: scratch FLOPs to reach the XATL loss / XATL FLOPs; `incl. source`: the source's FLOPs added "
          "to the XATL side; `payback_conversions`: conversions from one source after which its cost is paid back, "
          "S / ((m - 1) b). The method says whether the scratch curve was measured there (interpolated) or its fit "
          "extrapolated.", ""]  # fmt: skip
    if not summ.empty:
        v = summ.copy()
        for pre in ("multiplier", "multiplier_incl_source"):
            v[pre] = [f"{r[f'{pre}_mean']:.2f}x [{r[f'{pre}_ci_low']:.2f}, {r[f'{pre}_ci_high']:.2f}] ({r[f'{pre}_method']})"
                      if math.isfinite(r[f"{pre}_mean"]) else "no estimate" for _, r in v.iterrows()]  # fmt: skip
        v["payback"] = [f"{r['payback_conversions']:.1f} [{r['payback_conversions_low']:.1f}, {r['payback_conversions_high']:.1f}]"
                        for _, r in v.iterrows()]  # fmt: skip
        cols = ["mixer", "recipe", "freeze_policy", "source_tokens", "source_epochs", "n_seeds", "multiplier",
                "multiplier_incl_source", "payback"]  # fmt: skip
        md.append(md_table(v, [c for c in cols if c in v]))
        md += ["", "Trend, log m = a + g log(source_tokens), per recipe:", "", md_table(trend)]
    else:
        md.append("_No finished pairing yet._\n")
    if fig is not None:
        md += ["", f"![multiplier against source tokens](figures/{fig.name})", ""]
    (out / "source_tokens.md").write_text("\n".join(md) + "\n")
    return out / "source_tokens.md"
