"""Summary of a study's confirmation runs (:mod:`xatl_ds.confirm`): does the best trial's
setting beat each reference on fresh seeds?

Per setting: the final validation loss on every confirmation seed, its mean and a 95%
Student-t interval. Per reference: the paired difference best - reference, seed by seed (the
same seed gives both runs the same data order and the same new-mixer draw, so pairing removes
that share of the noise), its mean and 95% t interval; the verdict is "better" or "worse"
only when the interval excludes 0. Beside them, the best trial's own study value: the gap
between it and the best setting's fresh-seed mean is the selection bias.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the Student-t interval of the mean (nan bounds below 2 values)."""
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    m = float(x.mean())
    if len(x) < 2:
        return m, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return m, m - half, m + half


def verdict(low: float, high: float) -> str:
    """Of a difference best - reference (lower loss is better)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "undetermined (too few seeds)"
    if high < 0:
        return "better"
    if low > 0:
        return "worse"
    return "no difference resolved (the interval contains 0)"


def summarize(runs: pd.DataFrame, best: str = "best", aliases: Mapping[str, str] | None = None,
              study_values: Mapping[str, float] | None = None) -> dict[str, Any]:  # fmt: skip
    """``runs``: one row per confirmation run with columns ``setting``, ``seed``, ``val_loss``
    (final), ``flops``. ``aliases``: reference -> the setting it equals (trained once).
    ``study_values``: setting -> its value in the study (the trial seed)."""
    aliases = dict(aliases or {})
    frame = runs.copy()
    for alias, same in aliases.items():  # a reference equal to an earlier setting: its runs, renamed
        frame = pd.concat([frame, runs[runs["setting"] == same].assign(setting=alias)], ignore_index=True)
    per = {}
    for name, g in frame.groupby("setting", sort=False):
        m, lo, hi = t_interval(g["val_loss"].tolist())
        per[name] = {"n": int(g["val_loss"].notna().sum()), "mean": m, "low": lo, "high": hi,
                     "study_value": (study_values or {}).get(name, math.nan)}  # fmt: skip
    diffs = {}
    if best in per:
        b = frame[frame["setting"] == best].set_index("seed")["val_loss"]
        for name in per:
            if name == best:
                continue
            r = frame[frame["setting"] == name].set_index("seed")["val_loss"]
            seeds = sorted(set(b.dropna().index) & set(r.dropna().index))
            d = [float(b[s] - r[s]) for s in seeds]
            m, lo, hi = t_interval(d)
            diffs[name] = {"n": len(d), "seeds": seeds, "diff": d, "mean": m, "low": lo, "high": hi,
                           "verdict": "identical setting" if name in aliases and aliases[name] == best else verdict(lo, hi)}  # fmt: skip
    return {"settings": per, "differences": diffs, "aliases": aliases}


def confirm_markdown(summary: Mapping[str, Any], title: str, notes: Sequence[str] = ()) -> str:
    lines = [f"# {title}", ""] + ([*notes, ""] if notes else [])
    lines += ["## Final validation loss on the confirmation seeds", "",
              "| setting | runs | mean | 95% interval | value in the study (trial seed) |", "|---|---|---|---|---|"]  # fmt: skip
    for name, s in summary["settings"].items():
        lines.append(f"| {name} | {s['n']} | {s['mean']:.4f} | [{s['low']:.4f}, {s['high']:.4f}] | "
                     f"{_fmt(s['study_value'])} |")  # fmt: skip
    lines += ["", "## Best minus reference, paired by seed (negative: the best setting has the lower loss)", "",
              "| reference | seeds | differences | mean | 95% interval | verdict |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name, d in summary["differences"].items():
        diffs = ", ".join(f"{x:+.4f}" for x in d["diff"])
        lines.append(f"| {name} | {len(d['seeds'])} | {diffs} | {d['mean']:+.4f} | "
                     f"[{d['low']:+.4f}, {d['high']:+.4f}] | {d['verdict']} |")  # fmt: skip
    if summary.get("aliases"):
        lines += ["", "Identical settings (trained once): " + ", ".join(f"{a} = {b}" for a, b in summary["aliases"].items())]
    return "\n".join(lines) + "\n"


def _fmt(v: float) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def write_confirm(summary: Mapping[str, Any], runs: pd.DataFrame, out_dir: str | Path, title: str,
                  notes: Sequence[str] = (), extra: Mapping[str, Any] | None = None) -> Path:  # fmt: skip
    """``confirm.md``, ``confirm.json`` (the summary and ``extra``) and ``confirm_runs.csv``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs.to_csv(out / "confirm_runs.csv", index=False)
    (out / "confirm.json").write_text(json.dumps({**summary, **(extra or {})}, indent=2, default=_json))
    path = out / "confirm.md"
    path.write_text(confirm_markdown(summary, title, notes))
    return path


def _json(v: Any) -> Any:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return str(v)
