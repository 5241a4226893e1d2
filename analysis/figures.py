"""Report figures (matplotlib, Agg backend, PNG). Each function writes one file and returns
its path; with no data it still writes a figure that says so, so the report never breaks."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

__all__ = ["arch_label", "variant_label", "plot_loss_vs_flops", "plot_savings_vs_size", "plot_savings_curves",
           "plot_benchmark_deltas", "plot_effective_vs_size", "plot_loss_vs_tokens"]  # fmt: skip


def arch_label(row: Mapping) -> str:
    """``mamba`` or ``mamba+attn[1,3]``: the mixer and the layers that keep attention (every
    legend and table names architectures this way)."""
    att = str(row.get("attention_layers", "none"))
    if row.get("mixer") == "attention":  # a plain Transformer (a source): attention everywhere, nothing to add
        return "attention"
    return str(row.get("mixer")) + ("" if att in ("", "none", "nan", "None") else f"+attn[{att}]")


def variant_label(r: Mapping) -> str:
    """``mamba+attn[1] (lit)``: architecture and XATL variant (recipe unless the paper's random
    mixers, freeze policy, unfreeze order)."""
    extra = [str(r.get(k)) for k in ("recipe", "freeze_policy", "unfreeze_order")
             if r.get(k) is not None and r.get(k) == r.get(k) and str(r.get(k)) not in ("all", "", "random", "scratch")]  # fmt: skip
    return arch_label(r) + (f" ({', '.join(extra)})" if extra else "")


def _empty(path: Path, title: str, msg: str) -> Path:
    fig, ax = plt.subplots(figsize=(5, 2.5))
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, msg, ha="center", va="center", transform=ax.transAxes)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _save(fig, path: Path) -> Path:
    """Lay out, write and close a figure; returns its path."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _loss_axes(ax, xlabel: str, title: str) -> None:
    """A validation-loss panel: log x, labels, legend, grid."""
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss")
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _size_order(df: pd.DataFrame) -> list[str]:
    if df.empty:
        return []
    d = df.assign(_w=df["n_layers"].fillna(0).astype(float) * df["d_model"].fillna(0).astype(float) ** 2)
    return list(d.sort_values("_w").drop_duplicates("size")["size"])


def _group_label(r: Mapping, is_source: bool) -> str:
    """What seeds share: the role, the architecture and the XATL variant."""
    if is_source:
        return f"source {arch_label(r)}"
    if r.get("init_kind") == "xatl":
        return f"XATL {variant_label(r)}"
    return f"scratch {arch_label(r)}"


def plot_loss_vs_flops(df: pd.DataFrame, curves: Mapping[str, pd.DataFrame], events: Mapping[str, list[dict]],
                       path: str | Path, sources: Iterable[str] = ()) -> Path:  # fmt: skip
    """Validation loss vs training FLOPs, one panel per size; XATL solid, scratch dashed, the
    source runs (``sources``: their run names) dotted black, so the reader sees how far the
    source trained; one colour and one legend entry per group of seeds; unfreeze events marked
    with a vertical tick and a dot on the curve."""
    path = Path(path)
    sources = set(sources)
    sizes = [s for s in _size_order(df) if any(len(curves.get(r, ())) for r in df.loc[df["size"] == s, "run"])]
    if not sizes:
        return _empty(path, "validation loss vs FLOPs", "no validation losses logged yet")
    labels = {r["run"]: _group_label(r, r["run"] in sources) for _, r in df.iterrows()}
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    groups = sorted({g for run, g in labels.items() if run not in sources})
    colour = {g: palette[k % len(palette)] for k, g in enumerate(groups)}
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4.2), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        rows = df[df["size"] == size]
        drawn = [r for _, r in rows.iterrows() if curves.get(r["run"]) is not None and len(curves[r["run"]])]
        count = {g: sum(1 for r in drawn if labels[r["run"]] == g) for g in {labels[r["run"]] for r in drawn}}
        partial = {g: sum(1 for r in drawn if labels[r["run"]] == g and r["state"] != "done") for g in count}
        seen: set[str] = set()
        for r in drawn:
            c, g = curves[r["run"]], labels[r["run"]]
            src = r["run"] in sources
            label = None
            if g not in seen:
                seen.add(g)
                extra = [f"{count[g]} seeds"] if count[g] > 1 else [f"s{r.get('seed')}"]
                extra += [f"{partial[g]} partial"] if partial[g] else []
                label = f"{g} ({', '.join(extra)})"
            style = (dict(color="k", ls=":", lw=1.5) if src
                     else dict(color=colour[g], ls="-" if r["init_kind"] == "xatl" else "--"))  # fmt: skip
            (line,) = ax.plot(c["flops"], c["val_loss"], marker=".", ms=3, alpha=0.85, label=label, **style)
            for e in events.get(r["run"], []):
                f = e.get("flops")
                if f is None:
                    continue
                y = float(np.interp(f, c["flops"], c["val_loss"])) if f > 0 else float(c["val_loss"].iloc[0])
                ax.axvline(f, color=line.get_color(), alpha=0.25, lw=1)
                ax.plot([f], [y], "o", color=line.get_color(), mfc="none", ms=8)
        _loss_axes(ax, "training FLOPs", f"{size} (o = unfreeze, dotted = source)")
    return _save(fig, path)


def plot_loss_vs_tokens(df: pd.DataFrame, curves: Mapping[str, pd.DataFrame], path: str | Path,
                        sources: Iterable[str] = ()) -> Path:  # fmt: skip
    """Validation loss vs training tokens, one panel per size: the mean over seeds of each
    group (role, architecture, recipe; seeds cut to the shortest curve of the group so the
    mean is over all of them), its seeds faint behind it, and each teacher's validation loss
    as a horizontal black line: how many tokens a recipe needs to come how close to it."""
    path = Path(path)
    sources = set(sources)
    rows = df[~df["run"].isin(sources)]
    sizes = [s for s in _size_order(rows) if any(len(curves.get(r, ())) for r in rows.loc[rows["size"] == s, "run"])]
    if not sizes:
        return _empty(path, "validation loss vs tokens", "no validation losses logged yet")
    labels = {r["run"]: _group_label(r, False) for _, r in rows.iterrows()}
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {g: palette[k % len(palette)] for k, g in enumerate(sorted(set(labels.values())))}
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4.2), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        here = rows[rows["size"] == size]
        for g in sorted({labels[r] for r in here["run"]}):
            cs = [curves[r] for r in here["run"]
                  if labels[r] == g and r in curves and len(curves[r]) and "tokens" in curves[r]]
            if not cs:
                continue
            for c in cs:
                ax.plot(c["tokens"], c["val_loss"], color=colour[g], alpha=0.2, lw=0.8)
            n = min(len(c) for c in cs)
            mean = np.mean([c["val_loss"].to_numpy()[:n] for c in cs], axis=0)
            ls = "--" if g.startswith("scratch") else "-"
            ax.plot(cs[0]["tokens"].to_numpy()[:n], mean, ls, color=colour[g], lw=1.6, label=f"{g} ({len(cs)} seeds)")
        teacher = here["teacher_val_loss"].astype(float) if "teacher_val_loss" in here else pd.Series(dtype=float)
        teacher = teacher[np.isfinite(teacher)]
        if len(teacher):
            ax.axhline(float(teacher.mean()), color="k", lw=1.2, label=f"teacher {teacher.mean():.3f}")
        _loss_axes(ax, "training tokens", f"{size}: mean over seeds (faint: each seed)")
    return _save(fig, path)


def plot_savings_vs_size(agg: pd.DataFrame, df: pd.DataFrame, path: str | Path) -> Path:
    """The paper's FLOPs savings (mean, bootstrap CI when several seeds) vs model size, one
    line per architecture / XATL variant; hollow markers where a seed's value is only a lower
    bound; a dashed line at 1x (no saving)."""
    path = Path(path)
    if agg.empty or not np.isfinite(agg["savings_flops_mean"].astype(float)).any():
        return _empty(path, "savings vs model size", "no XATL/scratch pair has reached its target yet")
    order = _size_order(df)
    pos = {s: i for i, s in enumerate(order)}
    fig, ax = plt.subplots(figsize=(6, 4))
    group = ["mixer", "attention_layers", "recipe", "freeze_policy", "unfreeze_order"]
    for _, g in agg.groupby([k for k in group if k in agg], dropna=False):
        g = g.assign(_x=g["size"].map(pos)).sort_values("_x")
        y = g["savings_flops_mean"].astype(float)
        lo, hi = g["savings_flops_ci_low"].astype(float), g["savings_flops_ci_high"].astype(float)
        err = np.vstack([np.where(np.isfinite(lo), y - lo, 0), np.where(np.isfinite(hi), hi - y, 0)])
        line = ax.errorbar(g["_x"], y, yerr=err, marker="o", capsize=3, label=variant_label(g.iloc[0]))[0]
        lb = g[g["any_lower_bound"].astype(bool)] if "any_lower_bound" in g else g.iloc[:0]
        ax.plot(lb["_x"], lb["savings_flops_mean"].astype(float), "o", ms=9, mfc="white", color=line.get_color())
    ax.axhline(1.0, color="k", ls="--", lw=1)
    ax.set_xticks(range(len(order)), order, rotation=20)
    ax.set_ylabel("FLOPs savings (scratch / XATL)")
    ax.set_title("paper's definition vs model size (hollow = lower bound)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_effective_vs_size(trend: pd.DataFrame, path: str | Path) -> Path:
    """Effective-compute multiplier vs non-embedding parameters, log-log, one colour per
    architecture / XATL variant (column ``label``): the measured sizes as points with their
    intervals (rows ``kind == "measured"``), the fitted power law solid over the measured sizes
    (``fit``) and dashed where it is extrapolated (``extrapolated``, e.g. to the Pythia sizes,
    named on the plot), with its bootstrap band; a dashed line at 1x."""
    path = Path(path)
    if trend.empty or not (trend["kind"] == "measured").any():
        return _empty(path, "effective compute vs model size", "a size trend needs >= 2 sizes with a finite multiplier")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    named: dict[str, float] = {}
    for k, (label, g) in enumerate(trend.groupby("label", sort=True)):
        col = palette[k % len(palette)]
        m = g[g["kind"] == "measured"].sort_values("n_params")
        y, lo, hi = (m[c].astype(float).to_numpy() for c in ("multiplier", "ci_low", "ci_high"))
        err = np.vstack([np.where(np.isfinite(lo), y - lo, 0), np.where(np.isfinite(hi), hi - y, 0)])
        ax.errorbar(m["n_params"], y, yerr=err, fmt="o", color=col, capsize=3)
        line = g[g["kind"] != "measured"].sort_values("n_params")
        if not len(line):
            ax.plot([], [], "o", color=col, label=f"{label} (measured)")
            continue
        inside = line[line["kind"] == "fit"]
        ax.plot(inside["n_params"], inside["multiplier"], "-", color=col, lw=1.5)
        ax.fill_between(line["n_params"], line["ci_low"].astype(float), line["ci_high"].astype(float), color=col,
                        alpha=0.12, lw=0)  # fmt: skip
        lo, hi = inside["n_params"].min(), inside["n_params"].max()
        for side in (line[line["n_params"] <= lo], line[line["n_params"] >= hi]):
            if len(side) > 1:
                ax.plot(side["n_params"], side["multiplier"], "--", color=col, lw=1.2)
        b = line.iloc[0]
        ci = f" [{b['b_ci_low']:.2f}, {b['b_ci_high']:.2f}]" if math.isfinite(b["b_ci_low"]) else ""
        ax.plot([], [], "o-", color=col, label=f"{label}: measured, fit ~ N^{b['b']:.2f}{ci}")
        for _, r in line[~line["size"].isin(m["size"])].iterrows():  # the target sizes, inside the range or not
            named.setdefault(str(r["size"]), float(r["n_params"]))  # one mark per name (archs differ a little in N)
    if named:
        ax.plot([], [], "--", color="grey", label="dashed: extrapolated to the Pythia sizes (not measured)")
    for name, n in named.items():
        ax.axvline(n, color="grey", lw=0.6, alpha=0.4)
        ax.text(n, 1.0, name.replace("pythia-", ""), transform=ax.get_xaxis_transform(), rotation=90, va="top",
                ha="right", fontsize=7, color="grey")  # fmt: skip
    ax.axhline(1.0, color="k", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel("effective-compute multiplier")
    ax.set_title("effective compute vs size (dashed: extrapolation, not a measurement)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


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
    return _save(fig, path)


def plot_benchmark_deltas(deltas: pd.DataFrame, path: str | Path) -> Path:
    """XATL - scratch per task/metric (mean over seeds), error bars = combined stderr."""
    path = Path(path)
    if deltas.empty:
        return _empty(path, "benchmark deltas", "no pair with evaluations on both sides yet")
    d = deltas[deltas["metric"].isin(["acc", "acc_norm"]) | ~deltas["metric"].str.contains("perplexity")]
    if d.empty:
        d = deltas
    d = d.assign(label=[f"{r['size']} {variant_label(r)}" for _, r in d.iterrows()],
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
    return _save(fig, path)
