"""xatl-ds benchmark suite (``make bench`` = ``python -m benchmarks.run``).

Sections: training throughput per mixer (:mod:`benchmarks.throughput`), trainer overhead
under the deepspeed launcher (:mod:`benchmarks.trainer_overhead`), cached generation
(:mod:`benchmarks.generation`), RetNet's forms (:mod:`benchmarks.retnet_forms`), the step cost
of distillation (:mod:`benchmarks.distill_overhead`) and a prepared CUDA check
(``benchmarks/gpu_check.py``).

Figures of merit are *ratios* between variants timed interleaved in one process (A, B, A,
B, ... then medians), so load from other jobs on a shared machine hits every variant alike.
This module holds the helpers the sections share.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from typing import Callable, Mapping, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def set_threads(n: int) -> None:
    """Pin torch (intra-op) and OpenMP to ``n`` threads, for this process and its children."""
    os.environ["OMP_NUM_THREADS"] = str(n)  # before torch's first import, OpenMP reads it at load
    import torch

    torch.set_num_threads(n)


def interleaved(fns: Mapping[str, Callable[[], float]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Call every ``fn`` (which returns the seconds it measured) ``warmup`` times, then
    ``repeats`` rounds of one call each, rotating the start of each round so no variant
    always follows the same neighbour. Returns the timed samples per name."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    names = list(fns)
    for _ in range(warmup):
        for k in names:
            fns[k]()
    out: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for i in range(len(names)):
            k = names[(r + i) % len(names)]
            out[k].append(float(fns[k]()))
    return out


def median(xs: Sequence[float]) -> float:
    if not xs:
        raise ValueError("median of no samples")
    return float(statistics.median(xs))


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    """Wrap ``fn`` into a callable returning its wall time in seconds."""

    def run() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def machine_info() -> dict:
    """CPU, cores, ISA, date, load and package versions, for the header of RESULTS.md."""
    import torch

    info = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average": load_average(),
    }
    for mod in ("transformers", "deepspeed", "xatl_ds"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # a broken optional install should not stop the report
            info[mod] = f"unavailable ({type(e).__name__})"
    return info


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
