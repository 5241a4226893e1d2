"""Numbers of a report in words: a ratio with its interval and how it was found, or the reason
there is none (the phrase columns of the report's CSVs and its markdown)."""
from __future__ import annotations

import math
from typing import Mapping

__all__ = ["effective_phrase", "effective_summary_phrase", "finite", "paper_phrase"]


def finite(v) -> bool:
    """``v`` converts to a finite float (None, NaN, inf and text do not)."""
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _interval(lo, hi) -> str:
    return f" [{float(lo):.2f}, {float(hi):.2f}]" if finite(lo) and finite(hi) else (
        f" [{float(lo):.2f}, unbounded]" if finite(lo) else "")  # fmt: skip


def paper_phrase(mean: float, lo: float, hi: float, n: int, n_ok: int, lb: bool) -> str:
    """The paper's ratio in words: ``2.00x [1.8, 2.2]``; ``at least 14.33x (lower bound)``
    where XATL was already below the target at its first evaluation; ``not reached (0/3)``."""
    if not math.isfinite(mean):
        return f"not reached (0/{n})"
    s = f"{mean:.2f}x" + _interval(lo, hi)
    if lb:
        s = f"at least {s} (lower bound)"
    if n_ok < n:
        s += f" ({n_ok}/{n} reached)"
    return s


_NO_ESTIMATE = {
    "upper_bound": "upper bound only: scratch reached this loss by its first evaluation",
    "unreachable": "unreachable: the loss lies below the scratch fit's asymptote",
    "no_fit": "no estimate: the scratch curve is too short to fit",
}


def effective_phrase(value: float, lo: float, hi: float, method: str, factor: float = math.nan) -> str:
    """One pairing's multiplier with its method: ``3.10x (interpolated)``, ``3.10x [2.5, 4.0]
    (extrapolated 2.3x past the scratch run)``; words, no number, where only a bound exists."""
    if method in _NO_ESTIMATE or not finite(value):
        return _NO_ESTIMATE.get(method, f"no estimate ({method})")
    s = f"{float(value):.2f}x" + _interval(lo, hi)
    if method == "extrapolated":
        return s + (f" (extrapolated {float(factor):.1f}x past the scratch run)" if finite(factor) else " (extrapolated)")
    return s + f" ({method})"


def effective_summary_phrase(row: Mapping, prefix: str = "effective") -> str:
    """An effective_summary.csv row in words: the mean over the seeds with a point estimate,
    its interval and method, and which seeds had none (``2.90x [2.5, 3.3] (extrapolated)``,
    ``no estimate (3 upper bounds)``)."""
    n = int(row.get("n_seeds", 0))
    used = int(row.get(f"n_used_{prefix}", 0))
    left = [(int(row.get(f"n_{m}_{prefix}", 0)), w) for m, w in
            (("upper_bound", "upper bound"), ("unreachable", "unreachable"), ("no_fit", "no fit"))]  # fmt: skip
    why = ", ".join(f"{k} {w}{'s' if k > 1 else ''}" for k, w in left if k)
    if prefix.endswith("incl_source") and not bool(row.get("source_known", True)):
        return "source FLOPs unknown (--source-flops)"
    if not used or not finite(row.get(f"{prefix}_mean")):
        return f"no estimate ({why or 'no seed'})"
    n_extra = int(row.get(f"n_extrapolated_{prefix}", 0))
    method = "extrapolated" if n_extra == used else f"{n_extra}/{used} seeds extrapolated" if n_extra else "interpolated"
    s = f"{float(row[f'{prefix}_mean']):.2f}x" + _interval(row.get(f"{prefix}_ci_low"), row.get(f"{prefix}_ci_high"))
    s += f" ({method})"
    if used < n:
        s += f"; {used}/{n} seeds ({why})" if why else f"; {used}/{n} seeds"
    return s
