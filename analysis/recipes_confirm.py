"""The recipe sweep's ranking on fresh seeds (issue 20, item 4).

``sweeps/recipes_confirm.yaml`` re-trains every recipe of ``sweeps/recipes.yaml`` on seeds
100-102 at mini and tiny, and adds small. Per size, each recipe is set against the paper's
(``xatl-lit``) seed by seed: the paired difference of the final validation loss (recipe -
paper; negative: the recipe ends lower at the same compute), its mean and 95% Student-t
interval, and a verdict only when the interval excludes 0 -- :func:`analysis.confirm.summarize`,
the machinery of the Optuna confirmations. Beside it, the same difference on the recipe
sweep's own seeds 0-2 (``docs/results/recipes/results.csv``), so a ranking that came from the
seeds it was picked on shows up as a sign change or a shrinking gap.
"""
from __future__ import annotations

import math
from pathlib import Path
import pandas as pd

from .confirm import summarize, t_interval

__all__ = ["LABELS", "PAPER", "WINNERS", "compare", "write_recipes_confirm"]

#: results.csv's recipe column -> the sweep's init label
LABELS = {"scratch": "scratch", "random": "xatl-lit", "zero_out": "xatl-zero", "random+kl": "xatl-kl",
          "attention+kl": "attn-kl", "attention+align+kl": "align-kl"}  # fmt: skip
PAPER = "xatl-lit"
#: the recipe sweep's winners (docs/results/recipes/ and the README's reading of it)
WINNERS = ("align-kl", "xatl-zero")


def _frame(df: pd.DataFrame) -> pd.DataFrame:
    """XATL runs that finished: size, setting (init label), seed, val_loss, flops."""
    d = df[(df["state"] == "done") & (df["init_kind"] != "scratch")]
    return pd.DataFrame({"size": d["size"].astype(str), "setting": d["recipe"].map(LABELS).fillna(d["recipe"]),
                         "seed": d["seed"].astype(int), "val_loss": d["final_val_loss"].astype(float),
                         "flops": d["flops"].astype(float)}).reset_index(drop=True)  # fmt: skip


def compare(fresh: pd.DataFrame, original: pd.DataFrame | None = None, paper: str = PAPER) -> pd.DataFrame:
    """One row per (size, recipe): the fresh seeds' mean loss and interval, the paired
    difference recipe - paper with its interval and verdict, and the same on the original
    seeds (``original``: the recipe sweep's results table) where it has that size."""
    f = _frame(fresh)
    o = _frame(original) if original is not None and not original.empty else pd.DataFrame(columns=f.columns)
    rows = []
    for size, g in f.groupby("size", sort=False):
        for recipe in [r for r in g["setting"].unique() if r != paper]:
            s = summarize(g[g["setting"].isin([recipe, paper])], best=recipe)
            st, d = s["settings"].get(recipe, {}), s["differences"].get(paper, {})
            row = {"size": size, "recipe": recipe, "winner": recipe in WINNERS, "n_fresh": st.get("n", 0),
                   "loss_fresh": st.get("mean", math.nan), "loss_fresh_low": st.get("low", math.nan),
                   "loss_fresh_high": st.get("high", math.nan), "diff_vs_paper": d.get("mean", math.nan),
                   "diff_low": d.get("low", math.nan), "diff_high": d.get("high", math.nan),
                   "verdict": d.get("verdict", "no paper runs on these seeds"), "diffs": d.get("diff", [])}  # fmt: skip
            og = o[(o["size"] == size)]
            if len(og):
                so = summarize(og[og["setting"].isin([recipe, paper])], best=recipe)
                do = so["differences"].get(paper, {})
                row.update({"loss_original": t_interval(og[og["setting"] == recipe]["val_loss"].tolist())[0],
                            "diff_original": do.get("mean", math.nan), "diff_original_low": do.get("low", math.nan),
                            "diff_original_high": do.get("high", math.nan),
                            "verdict_original": do.get("verdict", "-")})  # fmt: skip
            rows.append(row)
    return pd.DataFrame(rows)


def write_recipes_confirm(fresh: pd.DataFrame, out_dir: str | Path, original: pd.DataFrame | None = None,
                          multipliers: pd.DataFrame | None = None) -> Path:  # fmt: skip
    """recipes_confirm.csv, confirm_runs.csv and recipes_confirm.md. ``multipliers``: the
    fresh sweep's effective_summary.csv, shown beside the losses."""
    from .report import md_table

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = compare(fresh, original)
    table.to_csv(out / "recipes_confirm.csv", index=False)
    _frame(fresh).to_csv(out / "confirm_runs.csv", index=False)
    md = ["# The recipe ranking on fresh seeds (100-102)", "",
          "Per size, each recipe minus the paper's recipe (xatl-lit), final validation loss, paired by seed; negative: "
          "the recipe ends lower at the same FLOPs (teacher forwards counted). Brackets: 95% t intervals. A verdict "
          "only when the interval excludes 0. `original`: the same on the recipe sweep's seeds 0-2.", ""]  # fmt: skip
    if table.empty:
        md.append("_No finished runs yet._\n")
    else:
        v = table.copy()
        fmt = lambda m, lo, hi: (f"{m:+.4f} [{lo:+.4f}, {hi:+.4f}]" if math.isfinite(m) else "-")  # noqa: E731
        v["fresh: recipe - paper"] = [fmt(r["diff_vs_paper"], r["diff_low"], r["diff_high"]) for _, r in v.iterrows()]
        if "diff_original" in v:
            v["original: recipe - paper"] = [fmt(r.get("diff_original", math.nan), r.get("diff_original_low", math.nan),
                                                 r.get("diff_original_high", math.nan)) for _, r in v.iterrows()]  # fmt: skip
        md.append(md_table(v, ["size", "recipe", "winner", "n_fresh", "loss_fresh", "fresh: recipe - paper", "verdict",
                               "original: recipe - paper", "verdict_original"]))  # fmt: skip
    if multipliers is not None and not multipliers.empty and "effective" in multipliers:
        md += ["", "Effective-compute multipliers on the fresh seeds (the report's effective_summary.csv; scratch at "
               "3 x B as in the recipe sweep, so most are extrapolated and labelled):", ""]  # fmt: skip
        md.append(md_table(multipliers, [c for c in ("size", "recipe", "n_seeds", "effective", "effective_excl_teacher")
                                         if c in multipliers]))  # fmt: skip
    (out / "recipes_confirm.md").write_text("\n".join(md) + "\n")
    return out / "recipes_confirm.md"
