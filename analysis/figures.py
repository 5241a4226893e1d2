"""Report figures (matplotlib, Agg backend, PNG). Each function writes one file and returns
its path; with no data it still writes a figure that says so, so the report never breaks."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

__all__ = ["plot_loss_vs_flops", "plot_savings_vs_size", "plot_savings_curves", "plot_benchmark_deltas"]


def _empty(path: Path, title: str, msg: str) -> Path:
    fig, ax = plt.subplots(figsize=(5, 2.5))
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, msg, ha="center", va="center", transform=ax.transAxes)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _size_order(df: pd.DataFrame) -> list[str]:
    if df.empty:
        return []
    d = df.assign(_w=df["n_layers"].fillna(0).astype(float) * df["d_model"].fillna(0).astype(float) ** 2)
    return list(d.sort_values("_w").drop_duplicates("size")["size"])


def _label(r: Mapping) -> str:
    att = r.get("attention_layers")
    base = f"{r.get('mixer')}" + (f"+attn[{att}]" if att not in (None, "none") else "")
    if r.get("init_kind") == "xatl":
        return f"XATL {base} ({r.get('freeze_policy')}) s{r.get('seed')}"
    return f"scratch {base} s{r.get('seed')}"


def plot_loss_vs_flops(df: pd.DataFrame, curves: Mapping[str, pd.DataFrame],
                       events: Mapping[str, list[dict]], path: str | Path) -> Path:  # fmt: skip
    """Validation loss vs training FLOPs, one panel per size; XATL solid, scratch dashed;
    unfreeze events marked with a vertical tick and a dot on the curve."""
    path = Path(path)
    sizes = [s for s in _size_order(df) if any(len(curves.get(r, ())) for r in df.loc[df["size"] == s, "run"])]
    if not sizes:
        return _empty(path, "validation loss vs FLOPs", "no validation losses logged yet")
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for _, r in df[df["size"] == size].iterrows():
            c = curves.get(r["run"])
            if c is None or not len(c):
                continue
            ls = "-" if r["init_kind"] == "xatl" else "--"
            (line,) = ax.plot(c["flops"], c["val_loss"], ls, marker=".", ms=3, label=_label(r) + ("" if r["state"] == "done" else " (partial)"))  # fmt: skip
            for e in events.get(r["run"], []):
                f = e.get("flops")
                if f is None or not len(c):
                    continue
                y = float(np.interp(f, c["flops"], c["val_loss"])) if f > 0 else float(c["val_loss"].iloc[0])
                ax.axvline(f, color=line.get_color(), alpha=0.3, lw=1)
                ax.plot([f], [y], "o", color=line.get_color(), mfc="none", ms=8)
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel("validation loss")
        ax.set_title(f"{size} (o = unfreeze)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_savings_vs_size(agg: pd.DataFrame, df: pd.DataFrame, path: str | Path) -> Path:
    """Mean FLOPs savings (with bootstrap CI when several seeds) vs model size, one line per
    mixer / attention layers / XATL variant; a dashed line at 1x (no saving)."""
    path = Path(path)
    if agg.empty or not np.isfinite(agg["savings_flops_mean"].astype(float)).any():
        return _empty(path, "savings vs model size", "no XATL/scratch pair has reached its target yet")
    order = _size_order(df)
    pos = {s: i for i, s in enumerate(order)}
    fig, ax = plt.subplots(figsize=(6, 4))
    group = ["mixer", "attention_layers", "freeze_policy", "unfreeze_order"]
    for key, g in agg.groupby([k for k in group if k in agg], dropna=False):
        g = g.assign(_x=g["size"].map(pos)).sort_values("_x")
        y = g["savings_flops_mean"].astype(float)
        lo, hi = g["savings_flops_ci_low"].astype(float), g["savings_flops_ci_high"].astype(float)
        err = np.vstack([np.where(np.isfinite(lo), y - lo, 0), np.where(np.isfinite(hi), hi - y, 0)])
        label = " ".join(str(k) for k in (key if isinstance(key, tuple) else (key,)) if k is not None and k == k)
        ax.errorbar(g["_x"], y, yerr=err, marker="o", capsize=3, label=label)
    ax.axhline(1.0, color="k", ls="--", lw=1)
    ax.set_xticks(range(len(order)), order, rotation=20)
    ax.set_ylabel("FLOPs savings (scratch / XATL)")
    ax.set_title("compute savings vs model size")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_savings_curves(curves: Mapping[str, pd.DataFrame], path: str | Path) -> Path:
    """Savings ratio vs target loss per pairing (x axis reversed: lower loss to the right);
    hollow markers where the ratio is a lower bound."""
    path = Path(path)
    curves = {k: v for k, v in curves.items() if len(v) and np.isfinite(v["ratio"].astype(float)).any()}
    if not curves:
        return _empty(path, "savings vs target loss", "no pairing has a finite ratio yet")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, c in curves.items():
        (line,) = ax.plot(c["target"], c["ratio"], "-", label=name)
        lb = c[c["lower_bound"]]
        ax.plot(lb["target"], lb["ratio"], "o", mfc="none", color=line.get_color(), ms=4)
    ax.axhline(1.0, color="k", ls="--", lw=1)
    ax.invert_xaxis()
    ax.set_xlabel("target validation loss")
    ax.set_ylabel("FLOPs savings (scratch / XATL)")
    ax.set_title("savings vs target loss (o = lower bound)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_benchmark_deltas(deltas: pd.DataFrame, path: str | Path) -> Path:
    """XATL - scratch per task/metric (mean over seeds), error bars = combined stderr."""
    path = Path(path)
    if deltas.empty:
        return _empty(path, "benchmark deltas", "no pair with evaluations on both sides yet")
    d = deltas[deltas["metric"].isin(["acc", "acc_norm"]) | ~deltas["metric"].str.contains("perplexity")]
    if d.empty:
        d = deltas
    d = d.assign(label=d["size"].astype(str) + " " + d["mixer"].astype(str),
                 tm=d["task"] + "/" + d["metric"])  # fmt: skip
    g = d.groupby(["label", "tm"]).agg(delta=("delta", "mean"),
                                       se=("delta_se", lambda s: math.sqrt(np.nansum(np.square(s))) / max(1, len(s))))  # fmt: skip
    g = g.reset_index()
    tms, labels = sorted(g["tm"].unique()), sorted(g["label"].unique())
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(tms) * max(1, len(labels)) / 2 + 2), 4))
    w = 0.8 / len(labels)
    for k, lab in enumerate(labels):
        sub = g[g["label"] == lab].set_index("tm").reindex(tms)
        ax.bar(np.arange(len(tms)) + k * w, sub["delta"], w, yerr=sub["se"].fillna(0), capsize=3, label=lab)
    ax.axhline(0, color="k", lw=1)
    ax.set_xticks(np.arange(len(tms)) + 0.4 - w / 2, tms, rotation=25, ha="right")
    ax.set_ylabel("XATL - scratch")
    ax.set_title("benchmark deltas at equal compute")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
