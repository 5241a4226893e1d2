"""Report figures (matplotlib, Agg backend, PNG). Each function writes one file and returns
its path; with no data it still writes a figure that says so, so the report never breaks."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as mticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

__all__ = ["arch_label", "variant_label", "log_axis", "plot_loss_vs_flops", "plot_savings_vs_size", "plot_savings_curves",
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
    """Write and close a figure (``bbox_inches="tight"`` keeps legends outside the axes in
    the picture); returns its path."""
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


PALETTE = plt.get_cmap("tab10").colors
#: XATL variants of one architecture (same colour) told apart by the line style
_VARIANT_STYLES = ("-", "-.", (0, (1, 1)), (0, (5, 1, 1, 1)))


def _compact(v: float, _pos=None) -> str:
    """Tick label: ``2``, ``0.5``, ``3e11`` (no ``10^x`` notation, no ``e+``)."""
    if v <= 0 or not math.isfinite(v):
        return ""
    if 1e-3 <= abs(v) < 1e4:
        return f"{v:g}"
    m, e = f"{v:.0e}".split("e")
    return f"{m}e{int(e)}"


def log_axis(ax, which: str = "x") -> None:
    """Log scale with labels at 1, 2 and 5 of each decade (1, 2, 3, 5, 7 within a narrow
    range; decades only over a wide one), so a range of 4 to 8 still reads; under half a
    decade (1.0 to 1.3), evenly spaced round values. Call it after the data are drawn."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    lo, hi = ax.get_xlim() if which == "x" else ax.get_ylim()
    span = math.log10(hi / lo) if lo > 0 and hi > lo else 3
    if span < 0.5:  # within less than half a decade 1-2-5 may give one label or none: linear-style ticks
        ticks = [t for t in mticker.MaxNLocator(nbins=5, steps=[1, 2, 5, 10]).tick_values(lo, hi) if lo <= t <= hi and t > 0]
        axis.set_major_locator(mticker.FixedLocator(ticks))
    else:
        subs = (1.0, 2.0, 3.0, 5.0, 7.0) if span < 0.8 else (1.0, 2.0, 5.0) if span < 2.5 else (1.0,)
        axis.set_major_locator(mticker.LogLocator(base=10, subs=subs))
    axis.set_major_formatter(mticker.FuncFormatter(_compact))
    axis.set_minor_locator(mticker.LogLocator(base=10, subs=np.arange(1, 10)))
    axis.set_minor_formatter(mticker.NullFormatter())


def _legend(fig, handles, labels, ncol: int = 1, title: str | None = None) -> None:
    """One legend for the whole figure, to the right of the panels."""
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, ncol=ncol,
                   title=title, title_fontsize=8, frameon=False)  # fmt: skip


def size_order(df: pd.DataFrame) -> list[str]:
    if df.empty:
        return []
    if "n_layers" not in df or "d_model" not in df:
        return list(dict.fromkeys(df["size"]))
    d = df.assign(_w=df["n_layers"].fillna(0).astype(float) * df["d_model"].fillna(0).astype(float) ** 2)
    return list(d.sort_values("_w", kind="stable").drop_duplicates("size")["size"])


def _group_label(r: Mapping, is_source: bool) -> str:
    """What seeds share: the role, the architecture and the XATL variant."""
    if is_source:
        return f"source {arch_label(r)}"
    if r.get("init_kind") == "xatl":
        return f"XATL {variant_label(r)}"
    return f"scratch {arch_label(r)}"


def _variant_extra(r: Mapping) -> str:
    """The part of :func:`variant_label` after the architecture (``lit``, ``attention+kl, none``)."""
    v, a = variant_label(r), arch_label(r)
    return v[len(a):].strip(" ()") if v.startswith(a) else v


class _Styles:
    """Colour and line style of every group of a sweep: one colour per architecture (per
    recipe / variant where all XATL runs share one architecture), XATL solid (variants of one
    colour in other line styles), its scratch baseline dashed in the same colour, grey where
    the colour stands for a recipe the scratch run does not have."""

    def __init__(self, rows: pd.DataFrame):
        x = rows[rows["init_kind"] == "xatl"] if "init_kind" in rows else rows.iloc[:0]
        archs = sorted({arch_label(r) for _, r in x.iterrows()})
        self.by_arch = len(archs) > 1 or x.empty
        if self.by_arch:
            keys = sorted({arch_label(r) for _, r in rows.iterrows()})
            self.variants = {a: sorted({_variant_extra(r) for _, r in x.iterrows() if arch_label(r) == a}) for a in keys}
        else:
            keys = sorted({_variant_extra(r) for _, r in x.iterrows()})
            self.variants = {}
        self.colour = {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(keys)}

    def __call__(self, r: Mapping) -> dict:
        if r.get("init_kind") != "xatl":
            c = self.colour.get(arch_label(r), "0.4") if self.by_arch else "0.35"
            return {"color": c, "ls": "--"}
        if self.by_arch:
            a = arch_label(r)
            k = self.variants.get(a, []).index(_variant_extra(r)) if _variant_extra(r) in self.variants.get(a, []) else 0
            return {"color": self.colour.get(a, "0.4"), "ls": _VARIANT_STYLES[k % len(_VARIANT_STYLES)]}
        return {"color": self.colour.get(_variant_extra(r), "0.4"), "ls": "-"}

    def shade(self, r: Mapping) -> Any:
        """The colour of :meth:`__call__`, lighter for an architecture's second and later XATL
        variants: for points and bars, which have no line style to tell variants apart."""
        st = self(r | {"init_kind": "xatl"})
        if not self.by_arch:
            return st["color"]
        k = _VARIANT_STYLES.index(st["ls"]) if st["ls"] in _VARIANT_STYLES else 0
        return tuple(c + (1 - c) * min(0.45 * k, 0.8) for c in matplotlib.colors.to_rgb(st["color"]))


def _seed_mean(cs: list[pd.DataFrame], x: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, mean, min, max) of the seeds' validation losses, cut to the shortest curve (seeds of
    one group evaluate at the same steps, hence the same FLOPs and tokens)."""
    n = min(len(c) for c in cs)
    ys = np.array([c["val_loss"].to_numpy(dtype=float)[:n] for c in cs])
    return cs[0][x].to_numpy(dtype=float)[:n], ys.mean(axis=0), ys.min(axis=0), ys.max(axis=0)


def _loss_panels(df: pd.DataFrame, curves: Mapping[str, pd.DataFrame], events: Mapping[str, list[dict]], path: Path,
                 x: str, xlabel: str, title: str, sources: Iterable[str], teacher: bool) -> Path:  # fmt: skip
    """Validation loss vs ``x``, one panel per size: per group of seeds the mean (a faint band
    from the lowest to the highest seed), XATL solid and scratch dashed in one colour per
    architecture or recipe, sources dotted black, unfreeze events as hollow circles on the mean
    curve, a teacher's loss as a horizontal line; one legend beside the panels."""
    sources = set(sources)
    have = lambda r: r in curves and len(curves[r]) > 0 and x in curves[r]  # noqa: E731
    sizes = [s for s in size_order(df) if any(have(r) for r in df.loc[df["size"] == s, "run"])]
    if not sizes:
        return _empty(path, title, "no validation losses logged yet")
    style = _Styles(df[~df["run"].isin(sources)])
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 3.6), squeeze=False, sharey=True)
    legend: dict[str, Any] = {}
    for ax, size in zip(axes[0], sizes):
        rows = df[(df["size"] == size) & df["run"].map(have)]
        groups: dict[str, list] = {}
        for _, r in rows.iterrows():
            groups.setdefault(_group_label(r, r["run"] in sources), []).append(r)
        for g in sorted(groups, key=lambda g: (g.startswith("source"), g.startswith("scratch"), g)):
            rs = groups[g]
            src = rs[0]["run"] in sources
            st = {"color": "k", "ls": ":"} if src else style(rs[0])
            xs, mean, lo, hi = _seed_mean([curves[r["run"]] for r in rs], x)
            (line,) = ax.plot(xs, mean, lw=1.6 if not src else 1.2, **st)
            if len(rs) > 1:
                ax.fill_between(xs, lo, hi, color=st["color"], alpha=0.15, lw=0)
            for r in rs:
                for e in events.get(r["run"], []) if x in ("flops", "tokens") else []:
                    f = e.get(x)
                    if f is None or not len(xs):
                        continue
                    ax.plot([f], [float(np.interp(f, xs, mean))], "o", color=st["color"], mfc="none", ms=6, mew=1)
            partial = sum(r["state"] != "done" for r in rs)
            n = f"{len(rs)} seeds" if len(rs) > 1 else f"seed {rs[0].get('seed')}"
            legend.setdefault(f"{g} ({n}{f', {partial} partial' if partial else ''})", line)
        if teacher and "teacher_val_loss" in rows:
            t = rows["teacher_val_loss"].astype(float)
            t = t[np.isfinite(t)]
            if len(t):
                legend.setdefault("teacher (source) validation loss",
                                  ax.axhline(float(t.mean()), color="k", lw=1.0, alpha=0.8))  # fmt: skip
        ax.set_title(str(size), fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3, which="major")
        log_axis(ax, "x")
    axes[0][0].set_ylabel("validation loss")
    if any(events.get(r) for r in df["run"]) and x in ("flops", "tokens"):
        legend["unfreeze (LIT)"] = plt.Line2D([], [], ls="none", marker="o", mfc="none", color="0.3")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _legend(fig, list(legend.values()), list(legend.keys()))
    return _save(fig, path)


def plot_loss_vs_flops(df: pd.DataFrame, curves: Mapping[str, pd.DataFrame], events: Mapping[str, list[dict]],
                       path: str | Path, sources: Iterable[str] = ()) -> Path:  # fmt: skip
    """Validation loss vs training FLOPs, one panel per size, seed means with a faint band
    (see :func:`_loss_panels`)."""
    return _loss_panels(df, curves, events, Path(path), "flops", "training FLOPs",
                        "validation loss vs FLOPs: mean over seeds (band: lowest to highest seed)", sources, False)


def plot_loss_vs_tokens(df: pd.DataFrame, curves: Mapping[str, pd.DataFrame], path: str | Path,
                        sources: Iterable[str] = ()) -> Path:  # fmt: skip
    """Validation loss vs training tokens, one panel per size, seed means with a faint band,
    each teacher's validation loss as a horizontal black line: how many tokens a recipe needs
    to come how close to it. Sources are left out (their token counts dwarf the targets')."""
    sources = set(sources)
    return _loss_panels(df[~df["run"].isin(sources)], curves, {}, Path(path), "tokens", "training tokens",
                        "validation loss vs tokens: mean over seeds (band: lowest to highest seed)", (), True)


def plot_savings_vs_size(agg: pd.DataFrame, df: pd.DataFrame, path: str | Path) -> Path:
    """The paper's FLOPs savings against model size: per architecture / XATL variant the mean
    over seeds (bootstrap CI when several seeds) as a point, no joining line; where some seed's
    value is only a lower bound the point is an upward arrow (the saving is at least that); a
    dashed line at 1x (no saving)."""
    path = Path(path)
    if agg.empty or not np.isfinite(agg["savings_flops_mean"].astype(float)).any():
        return _empty(path, "savings vs model size", "no XATL/scratch pair has reached its target yet")
    order = [s for s in size_order(df) if s in set(agg["size"])] or sorted(set(agg["size"]))
    pos = {s: i for i, s in enumerate(order)}
    style = _Styles(agg.assign(init_kind="xatl"))
    group = [k for k in ("mixer", "attention_layers", "recipe", "freeze_policy", "unfreeze_order") if k in agg]
    groups = list(agg.groupby(group, dropna=False, sort=True))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(order) + 2), 3.6))
    width = 0.7 / max(1, len(groups))
    legend = {}
    for k, (_, g) in enumerate(groups):
        st = {"color": style.shade(g.iloc[0].to_dict())}
        g = g[g["size"].isin(pos)]
        xs = g["size"].map(pos).to_numpy(float) - 0.35 + width * (k + 0.5)
        y = g["savings_flops_mean"].astype(float).to_numpy()
        lo, hi = g["savings_flops_ci_low"].astype(float).to_numpy(), g["savings_flops_ci_high"].astype(float).to_numpy()
        lb = g["any_lower_bound"].astype(bool).to_numpy() if "any_lower_bound" in g else np.zeros(len(g), bool)
        ok = np.isfinite(y)
        pt = ok & ~lb
        err = np.vstack([np.where(np.isfinite(lo), y - lo, 0), np.where(np.isfinite(hi), hi - y, 0)])
        ax.errorbar(xs[pt], y[pt], yerr=err[:, pt], fmt="o", ms=5, capsize=2, color=st["color"], lw=1)
        bd = ok & lb
        if bd.any():  # a bound: an arrow up from the value, no error bar
            ax.errorbar(xs[bd], y[bd], yerr=0.25 * y[bd], lolims=True, fmt="_", ms=9, mew=2, color=st["color"], lw=1)
        label = variant_label(g.iloc[0]) + ("" if ok.any() else " (target not reached)")
        legend.setdefault(label, plt.Line2D([], [], color=st["color"], ls="none",
                                            marker="o" if pt.any() or not ok.any() else "^"))  # fmt: skip
    ax.axhline(1.0, color="k", ls="--", lw=0.8)
    ax.set_xticks(range(len(order)), order)
    ax.set_xlim(-0.6, len(order) - 0.4)
    ax.set_ylabel("FLOPs savings (scratch / XATL)")
    ax.set_title("paper's definition: arrows are lower bounds", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    log_axis(ax, "y")
    legend["arrow: at least this (XATL started below the target)"] = plt.Line2D([], [], color="0.3", marker="^", ls="none")
    fig.tight_layout()
    _legend(fig, list(legend.values()), list(legend.keys()))
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
    fig, ax = plt.subplots(figsize=(6, 4))
    palette = PALETTE
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
    log_axis(ax, "x")
    log_axis(ax, "y")
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel("effective-compute multiplier")
    ax.set_title("effective compute vs size (dashed: extrapolation, not a measurement)", fontsize=10)
    ax.grid(alpha=0.3, which="major")
    fig.tight_layout()
    h, l = ax.get_legend_handles_labels()
    _legend(fig, h, l)
    return _save(fig, path)


def plot_savings_curves(curves: pd.DataFrame, path: str | Path, sizes: Iterable[str] | None = None) -> Path:
    """Savings ratio vs target loss (x axis reversed: lower loss to the right), one panel per
    size, per architecture / XATL variant the mean over seeds on the targets all its seeds
    share, with a faint band from the lowest to the highest seed; hollow markers where some
    seed's ratio is only a lower bound, drawn as markers without a line. ``curves``:
    ``savings_curve`` rows with ``size`` and the variant columns (the report's
    savings_curves.csv joined with savings.csv); ``sizes``: the panels' order."""
    path = Path(path)
    if curves is None or curves.empty or not np.isfinite(curves["ratio"].astype(float)).any():
        return _empty(path, "savings vs target loss", "no pairing has a finite ratio yet")
    c = curves[np.isfinite(curves["ratio"].astype(float))]
    present = set(c["size"])
    sizes = [s for s in (sizes or []) if s in present] + sorted(present - set(sizes or []), key=str)
    style = _Styles(c.assign(init_kind="xatl"))
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 3.6), squeeze=False)
    legend = {}
    for ax, size in zip(axes[0], sizes):
        here = c[c["size"] == size]
        by = {}
        for (xr, sr), pc in here.groupby(["xatl_run", "scratch_run"], sort=True):
            by.setdefault(variant_label(pc.iloc[0]), []).append(pc)
        for label, pcs in sorted(by.items()):
            row = pcs[0].iloc[0].to_dict() | {"init_kind": "xatl"}
            st = {"color": style.shade(row), "ls": style(row)["ls"]}
            t_hi = min(float(p["target"].max()) for p in pcs)
            t_lo = max(float(p["target"].min()) for p in pcs)
            if not t_hi > t_lo:  # the seeds share no target range: no mean, each seed's own points
                for p in pcs:
                    lbp = p["lower_bound"].astype(float).to_numpy() > 0.5
                    x, y = p["target"].to_numpy(float), p["ratio"].to_numpy(float)
                    ax.plot(x[~lbp], y[~lbp], "o", color=st["color"], ms=3)
                    ax.plot(x[lbp][::2], y[lbp][::2], "^", mfc="none", color=st["color"], ms=4, mew=0.9)
                legend.setdefault(f"{label} ({len(pcs)} seeds, drawn apart: no target range they share)",
                                  plt.Line2D([], [], ls="none", marker="o", ms=3, color=st["color"]))  # fmt: skip
                continue
            grid = np.linspace(t_hi, t_lo, 40)
            r = np.array([np.interp(grid, p["target"].to_numpy(float)[::-1], p["ratio"].to_numpy(float)[::-1])
                          for p in pcs])  # fmt: skip
            lb = np.array([np.interp(grid, p["target"].to_numpy(float)[::-1],
                                     p["lower_bound"].astype(float).to_numpy()[::-1]) for p in pcs]).max(axis=0) > 0.5
            m = r.mean(axis=0)
            line = ax.plot(np.where(lb, np.nan, grid), np.where(lb, np.nan, m), lw=1.6, **st)[0]
            if len(pcs) > 1:
                ax.fill_between(grid, r.min(axis=0), r.max(axis=0), color=st["color"], alpha=0.12, lw=0)
            ax.plot(grid[lb][::2], m[lb][::2], "^", mfc="none", color=st["color"], ms=4, mew=0.9)
            legend.setdefault(f"{label} ({len(pcs)} seed{'s' if len(pcs) > 1 else ''})",
                              plt.Line2D([], [], marker="^", mfc="none", **st) if lb.any() else line)  # fmt: skip
        ax.axhline(1.0, color="k", ls="--", lw=0.8)
        ax.invert_xaxis()
        ax.set_title(str(size), fontsize=10)
        ax.set_xlabel("target validation loss")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("FLOPs savings (scratch / XATL)")
    legend["^ without a line: a lower bound"] = plt.Line2D([], [], ls="none", marker="^", mfc="none", color="0.3")
    fig.suptitle("paper's definition against the target loss: mean over seeds (band: lowest to highest)", fontsize=10)
    fig.tight_layout()
    _legend(fig, list(legend.values()), list(legend.keys()))
    return _save(fig, path)


def plot_benchmark_deltas(deltas: pd.DataFrame, path: str | Path, sizes: Iterable[str] | None = None) -> Path:
    """XATL - scratch at equal compute, one panel per task/metric (perplexities left out),
    one horizontal bar per size and architecture / XATL variant: the mean over seeds with
    the combined standard error of that mean."""
    path = Path(path)
    if deltas.empty:
        return _empty(path, "benchmark deltas", "no pair with evaluations on both sides yet")
    d = deltas[~deltas["metric"].astype(str).str.contains("perplexity")]
    if d.empty:
        d = deltas
    d = d.assign(label=[f"{r['size']}  {variant_label(r)}" for _, r in d.iterrows()],
                 tm=d["task"].astype(str).str.replace("xatl_", "") + " " + d["metric"].astype(str))  # fmt: skip
    g = d.groupby(["label", "tm"], sort=False).agg(
        delta=("delta", "mean"), se=("delta_se", lambda s: math.sqrt(np.nansum(np.square(s))) / max(1, len(s))))
    g = g.reset_index()
    order = {s: i for i, s in enumerate(list(sizes or []) + size_order(d))}
    order = {s: i for i, s in enumerate(dict.fromkeys(order))}
    labels = sorted(g["label"].unique(), key=lambda l: (order.get(l.split("  ")[0], 99), l))
    first = {l: r for l, r in zip(d["label"], d.to_dict("records"))}
    style = _Styles(d.assign(init_kind="xatl"))
    tms = sorted(g["tm"].unique())
    fig, axes = plt.subplots(1, len(tms), figsize=(min(3.0 * len(tms), 15), 0.28 * len(labels) + 1.4),
                             squeeze=False, sharey=True)  # fmt: skip
    y = np.arange(len(labels))[::-1]
    for ax, tm in zip(axes[0], tms):
        sub = g[g["tm"] == tm].set_index("label").reindex(labels)
        cols = [style.shade(first[l]) for l in labels]
        ax.barh(y, sub["delta"], 0.7, xerr=sub["se"].fillna(0), color=cols, error_kw={"lw": 0.8, "capsize": 2})
        ax.axvline(0, color="k", lw=0.8)
        ax.set_title(tm, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3, axis="x")
    axes[0][0].set_yticks(y, labels, fontsize=8)
    fig.supxlabel("XATL - scratch (mean over seeds ± its standard error)", fontsize=9)
    fig.suptitle("benchmark deltas at equal compute", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
