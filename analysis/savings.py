"""Compute-matched savings of XATL runs over their scratch baselines.

Pairing. A sweep records which scratch run each XATL run is compared with (``baseline_run``,
from ``sweep.json``); that pairing is used as it is. Runs no planner recorded (hand-made
folders) pair with the one scratch run of the same :data:`PAIR_KEYS`; two candidates are an
ambiguity, reported, never resolved by a guess.

Definition (per pairing of an XATL run with its scratch run): the FLOPs the scratch run needs to reach its own final validation
loss, divided by the FLOPs the XATL run needs to reach that same loss. Tokens and wall time
likewise.

Curves. Validation losses are noisy and are logged only every ``eval.every`` steps, so each
curve is first smoothed into its running minimum (the best loss seen so far; optionally after a
light EMA): "needs X FLOPs to reach loss L" then has one answer, the first X at which the
smoothed curve is <= L. Between two evaluations the loss is interpolated linearly in
log-FLOPs (log-tokens, log-seconds). The target is the smoothed scratch curve's last value.

Flags, never fake numbers: a run that never gets to the target gives ``NaN`` and
``reached=False``. When the XATL run's first evaluation is already at or below the target, the
crossing happened at some unknown point before it: its first evaluation's FLOPs are used and
the ratio is flagged ``lower_bound=True`` (the true saving is at least that).

Source-inclusive savings add the source model's own pretraining FLOPs to the XATL side:
``scratch / (xatl + source)``. They are known when the source was trained in the sweep (its
meta.json) or given by the user (hub sources); else NaN.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np
import pandas as pd
from scipy import stats

__all__ = [
    "PAIR_KEYS", "aggregate_savings", "benchmark_deltas", "compute_to_reach", "pair_runs", "savings_curve",
    "savings_ratio", "savings_table", "smooth_curve", "bootstrap_ci",
]  # fmt: skip

#: a pairing's key: XATL run and scratch run agree on these
PAIR_KEYS = ("size", "mixer", "attention_layers", "seed")
#: what unrecorded runs must share to be paired (a partial XATL run's family is not known yet)
_FALLBACK_KEYS = PAIR_KEYS
#: columns that tell XATL variants of one key apart (several may share one scratch run)
VARIANT_KEYS = ("recipe", "components", "freeze_policy", "unfreeze_order", "lit_threshold", "lit_patience", "lit_window",
                "rewarmup_steps", "source")  # fmt: skip
AXES = ("flops", "tokens", "wall_time")


def smooth_curve(loss: Iterable[float], ema: float = 0.0) -> np.ndarray:
    """Running minimum of ``loss`` (after an EMA with factor ``ema`` in [0, 1) when > 0):
    non-increasing, so "first point at or below a target" is well defined."""
    y = np.asarray(list(loss), dtype=float)
    if not 0.0 <= ema < 1.0:
        raise ValueError(f"ema={ema} must be in [0, 1)")
    if ema > 0 and len(y):
        out = np.empty_like(y)
        acc = y[0]
        for i, v in enumerate(y):
            acc = ema * acc + (1 - ema) * v if i else v
            out[i] = acc
        y = out
    return np.minimum.accumulate(y) if len(y) else y


def compute_to_reach(x: Iterable[float], loss: Iterable[float], target: float, *, log: bool = True,
                     ema: float = 0.0, smoothed: bool = False) -> tuple[float, bool, bool]:  # fmt: skip
    """(x at which the smoothed curve first reaches ``target``, reached, lower_bound).

    ``x`` increasing (FLOPs, tokens, seconds), ``loss`` the validation losses at those points.
    Linear interpolation in ``log x`` (``log=False``: in ``x``) between the last point above
    and the first point at/below the target. Not reached: ``(nan, False, False)``. At or below
    the target from the first point: ``(x[0], True, True)`` (an upper bound on the true x).
    """
    xs = np.asarray(list(x), dtype=float)
    ys = np.asarray(list(loss), dtype=float)
    ok = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[ok], ys[ok]
    if len(xs) == 0 or not math.isfinite(target):
        return math.nan, False, False
    s = ys if smoothed else smooth_curve(ys, ema)
    hit = np.nonzero(s <= target)[0]
    if len(hit) == 0:
        return math.nan, False, False
    i = int(hit[0])
    if i == 0:
        return float(xs[0]), True, True
    x0, x1, y0, y1 = xs[i - 1], xs[i], s[i - 1], s[i]
    frac = (y0 - target) / (y0 - y1) if y0 != y1 else 1.0
    if log and x0 > 0 and x1 > 0:
        return float(math.exp(math.log(x0) + frac * (math.log(x1) - math.log(x0)))), True, False
    return float(x0 + frac * (x1 - x0)), True, False


def savings_ratio(scratch_x, scratch_loss, xatl_x, xatl_loss, *, target: float | None = None, log: bool = True,
                  ema: float = 0.0) -> dict:  # fmt: skip
    """Savings of one pairing on one axis: ``{target, scratch, xatl, ratio, reached,
    lower_bound}``; ``target`` defaults to the scratch curve's final smoothed loss."""
    s_scr = smooth_curve(scratch_loss, ema)
    if target is None:
        target = float(s_scr[-1]) if len(s_scr) else math.nan
    xs, _, _ = compute_to_reach(scratch_x, s_scr, target, log=log, smoothed=True)
    xx, reached, lb = compute_to_reach(xatl_x, xatl_loss, target, log=log, ema=ema)
    ratio = xs / xx if reached and math.isfinite(xs) and xx > 0 else math.nan
    return {"target": target, "scratch": xs, "xatl": xx, "ratio": ratio, "reached": bool(reached),
            "lower_bound": bool(lb)}  # fmt: skip


def savings_curve(scratch: pd.DataFrame, xatl: pd.DataFrame, *, axis: str = "flops", n: int = 25,
                  log: bool = True, ema: float = 0.0) -> pd.DataFrame:  # fmt: skip
    """The ratio over ``n`` target losses, from the loss the XATL run starts at (its first
    smoothed evaluation; the scratch run's first when XATL starts lower than scratch ends)
    down to the scratch run's final loss. Columns: target, scratch, xatl, ratio, reached,
    lower_bound. A single ratio at the final loss flatters short budgets; this shows the trend."""
    s_scr, s_x = smooth_curve(scratch["val_loss"], ema), smooth_curve(xatl["val_loss"], ema)
    if not len(s_scr) or not len(s_x):
        return pd.DataFrame(columns=["target", "scratch", "xatl", "ratio", "reached", "lower_bound"])
    lo = float(s_scr[-1])
    hi = float(s_x[0]) if s_x[0] > lo else float(s_scr[0])
    targets = np.linspace(hi, lo, n) if hi > lo else np.array([lo])
    rows = [savings_ratio(scratch[axis], s_scr, xatl[axis], s_x, target=float(t), log=log) for t in targets]
    return pd.DataFrame(rows)


# -- pairing -------------------------------------------------------------------------------------
def _key(row: Mapping, keys=PAIR_KEYS) -> tuple:
    return tuple(None if (isinstance(row.get(k), float) and math.isnan(row.get(k))) else row.get(k) for k in keys)


def pair_runs(df: pd.DataFrame) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Pair every XATL row with its scratch row (see the module docstring).

    Returns (pairs as (xatl_index, scratch_index), unpaired XATL indices, unpaired scratch
    indices). Several XATL variants may share one scratch run.
    """
    if df.empty:
        return [], [], []
    by_run = {r: i for i, r in zip(df.index, df["run"])}
    candidates: dict[tuple, list[int]] = {}
    for i, r in df[df["init_kind"] == "scratch"].iterrows():
        if not bool(r.get("planned", False)):
            candidates.setdefault(_key(r, _FALLBACK_KEYS), []).append(i)
    pairs, lonely = [], []
    for i, r in df[df["init_kind"] == "xatl"].iterrows():
        if bool(r.get("planned", False)):
            j = by_run.get(r.get("baseline_run"))
        else:
            found = candidates.get(_key(r, _FALLBACK_KEYS), [])
            j = found[0] if len(found) == 1 else None
        (pairs.append((i, j)) if j is not None else lonely.append(i))
    used = {j for _, j in pairs}
    scratch_rows = df.index[df["init_kind"] == "scratch"]
    unpaired_scratch = [j for j in scratch_rows if j not in used and df.at[j, "mixer"] != "attention"]
    return pairs, lonely, unpaired_scratch


def _source_flops_for(row: Mapping, given: float | Mapping[str, float] | None) -> float:
    v = row.get("source_flops")
    if v is not None and not (isinstance(v, float) and math.isnan(v)):
        return float(v)
    if isinstance(given, Mapping):
        src = row.get("source")
        for k, f in given.items():
            if src == k or (isinstance(src, str) and src.rstrip("/").endswith(k.rstrip("/"))):
                return float(f)
        return math.nan
    return float(given) if given is not None else math.nan


def savings_table(df: pd.DataFrame, curves: Mapping[str, pd.DataFrame], *,
                  source_flops: float | Mapping[str, float] | None = None, ema: float = 0.0) -> pd.DataFrame:  # fmt: skip
    """One row per (XATL, scratch) pairing: the key, XATL variant columns, both runs and
    states, the target loss, for each axis in (flops, tokens, wall_time) the scratch and XATL
    amounts and their ratio (``savings_<axis>``) with ``reached_<axis>`` and
    ``lower_bound_<axis>``, and ``source_flops`` / ``savings_flops_incl_source``.

    ``curves``: run -> its validation curve (columns flops, tokens, wall_time, val_loss).
    """
    pairs, _, _ = pair_runs(df)
    rows = []
    for i, j in pairs:
        x, s = df.loc[i], df.loc[j]
        cx, cs = curves.get(x["run"]), curves.get(s["run"])
        row = {k: x[k] for k in PAIR_KEYS}
        row.update({k: x.get(k) for k in VARIANT_KEYS})
        row.update({"xatl_run": x["run"], "scratch_run": s["run"], "xatl_state": x["state"],
                    "scratch_state": s["state"], "xatl_total_flops": x["flops"], "scratch_total_flops": s["flops"]})  # fmt: skip
        for axis in AXES:
            ok = cx is not None and cs is not None and len(cx) and len(cs) and axis in cx and axis in cs
            r = savings_ratio(cs[axis], cs["val_loss"], cx[axis], cx["val_loss"], ema=ema) if ok else \
                {"target": math.nan, "scratch": math.nan, "xatl": math.nan, "ratio": math.nan, "reached": False,
                 "lower_bound": False}  # fmt: skip
            if axis == "flops":
                row["target_loss"] = r["target"]
            row[f"scratch_{axis}_to_target"] = r["scratch"]
            row[f"xatl_{axis}_to_target"] = r["xatl"]
            row[f"savings_{axis}"] = r["ratio"]
            row[f"reached_{axis}"] = r["reached"]
            row[f"lower_bound_{axis}"] = r["lower_bound"]
        sf = _source_flops_for(x, source_flops)
        row["source_flops"] = sf
        row["savings_flops_incl_source"] = (
            row["scratch_flops_to_target"] / (row["xatl_flops_to_target"] + sf)
            if row["reached_flops"] and math.isfinite(sf) else math.nan
        )  # fmt: skip
        rows.append(row)
    return pd.DataFrame(rows)


# -- seeds -----------------------------------------------------------------------------------------
def bootstrap_ci(values: Iterable[float], *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (``scipy.stats.bootstrap``; NaN with
    fewer than 2 finite values)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) < 2:
        return math.nan, math.nan
    if np.ptp(v) == 0:  # every resample has the same mean; scipy warns about the degenerate case
        return float(v[0]), float(v[0])
    res = stats.bootstrap((v,), np.mean, n_resamples=n_boot, confidence_level=level, method="percentile",
                          vectorized=True, rng=np.random.default_rng(seed))  # fmt: skip
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def aggregate_savings(sav: pd.DataFrame, *, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Over seeds: per (size, mixer, attention_layers, XATL variant) the mean of each savings
    column over the seeds that reached the target, a bootstrap 95% CI of that mean, and how
    many seeds there are and how many reached (a mean over fewer seeds than run is flagged by
    ``n_reached < n_seeds``)."""
    if sav.empty:
        return pd.DataFrame()
    group = [k for k in PAIR_KEYS if k != "seed"] + [k for k in VARIANT_KEYS if k in sav]
    rows = []
    for key, g in sav.groupby(group, dropna=False, sort=True):
        row = dict(zip(group, key if isinstance(key, tuple) else (key,)))
        row["n_seeds"] = len(g)
        for col in ("savings_flops", "savings_tokens", "savings_wall_time", "savings_flops_incl_source"):
            vals = g[col].astype(float)
            fin = vals[np.isfinite(vals)]
            row[f"n_reached_{col}"] = int(len(fin))
            row[f"{col}_mean"] = float(fin.mean()) if len(fin) else math.nan
            lo, hi = bootstrap_ci(fin, n_boot=n_boot, seed=seed)
            row[f"{col}_ci_low"], row[f"{col}_ci_high"] = lo, hi
        row["any_lower_bound"] = bool(g["lower_bound_flops"].any())
        rows.append(row)
    return pd.DataFrame(rows)


# -- benchmarks ------------------------------------------------------------------------------------
def benchmark_deltas(df: pd.DataFrame, prefix: str = "eval/") -> pd.DataFrame:
    """Per pairing and eval metric: XATL minus scratch, with the combined standard error
    sqrt(se_x^2 + se_s^2) from lm-eval's stderrs, and the FLOPs ratio of the two runs (1.0 =
    equal compute; compute-matched sweeps give the pair one FLOPs budget)."""
    pairs, _, _ = pair_runs(df)
    metrics = sorted(c[len(prefix):] for c in df.columns if c.startswith(prefix) and not c.endswith("_stderr"))
    rows = []
    for i, j in pairs:
        x, s = df.loc[i], df.loc[j]
        for m in metrics:
            vx, vs = x.get(prefix + m), s.get(prefix + m)
            if vx is None or vs is None or not (np.isfinite(vx) and np.isfinite(vs)):
                continue
            task, metric = m.split("/", 1)
            ex, es = x.get(prefix + m + "_stderr"), s.get(prefix + m + "_stderr")
            se = math.sqrt(ex**2 + es**2) if ex is not None and es is not None and np.isfinite(ex) and np.isfinite(es) \
                else math.nan  # fmt: skip
            row = {k: x[k] for k in PAIR_KEYS}
            row.update({k: x.get(k) for k in VARIANT_KEYS})
            row.update({"xatl_run": x["run"], "scratch_run": s["run"], "task": task, "metric": metric,
                        "xatl": float(vx), "scratch": float(vs), "delta": float(vx - vs), "delta_se": se,
                        "flops_ratio": float(x["flops"]) / float(s["flops"]) if s["flops"] else math.nan})  # fmt: skip
            rows.append(row)
    return pd.DataFrame(rows)
