"""``xatl-ds quickstart``: the whole method on the built-in corpus, on a laptop.

prepare the corpus -> train a tiny source Transformer -> XATL vs scratch for Mamba, RetNet
and the paper hybrid under one FLOP budget (``sweeps/quickstart.yaml``) -> lm-eval on the
local held-out tasks -> ``report.md``. Every step reuses what is already done, so a rerun
finishes fast; Ctrl-C loses at most the steps since each run's last checkpoint.

The same orchestrator runs any sweep end to end (``make study``: ``sweeps/cpu_ladder.yaml``,
its report written to ``docs/results/cpu_ladder/`` with ``report_out``).
"""
from __future__ import annotations

import csv
import time
from pathlib import Path


def _say(msg: str) -> None:
    print(f"[quickstart {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(sweep_file: Path, eval_limit: int | None = None, report_out: Path | None = None, max_parallel: int = 1,
        only: list[str] | None = None) -> int:
    """Prepare, train (finished runs skipped), evaluate every run and write the report into
    ``report_out`` (default: the sweep root); ``max_parallel``: runs trained at once (on a CPU
    machine each run's single rank uses one core). Returns the exit code."""
    from analysis.report import write_report

    from .data import PrepareConfig, prepare
    from .sweep import expand, load_sweep, run_sweep, select

    if max_parallel < 1:
        raise ValueError(f"max_parallel={max_parallel} must be >= 1 (runs trained and evaluated at once)")
    t0 = time.monotonic()
    sweep = load_sweep(sweep_file)
    if only:
        sweep = select(sweep, only)  # a subset of the grid (``--only size=mini``)
    runs = expand(sweep)  # validates every run config once, before anything starts
    data_dir = Path(runs[0].config.data.path)

    _say(f"1/4 preparing the built-in corpus into {data_dir} (skipped when done)")
    meta = prepare(PrepareConfig(out=data_dir))
    _say(f"    {meta['splits']['train']['tokens']:,} training tokens, vocab {meta['vocab_size']}")

    _say(f"2/4 training {len(runs)} runs of {sweep_file.name} (source first; logs in {sweep.root / 'logs'})")
    rc = run_sweep(sweep, max_parallel=max_parallel, runs=runs)
    if rc != 0:
        _say(f"the sweep stopped (exit code {rc}); rerun the same command to continue (finished runs are kept)")
        return rc

    _say("3/4 evaluating every run on the local held-out tasks (lm-eval)"
         + (f", {max_parallel} at a time" if max_parallel > 1 and len(runs) > 1 else ""))
    for name, res in _evaluate_all(runs, data_dir, eval_limit, max_parallel):
        scores = ", ".join(f"{t} acc {v['metrics']['acc']['value']:.3f}" for t, v in res["tasks"].items())
        _say(f"    {name}: {scores}")

    _say("4/4 writing the report" + (f" into {report_out}" if report_out is not None else ""))
    # this grid's runs only: not folders another selection (--only) or an older version of the file left
    report = write_report(sweep.root, out_dir=report_out, runs=[r.out_dir for r in runs])
    _say(f"report: {report} ({(time.monotonic() - t0) / 60:.1f} minutes in all)")
    for line in summary_lines(report.parent):
        print(line)
    return 0


def _eval_one(run_dir: str, data_dir: str, limit: int | None) -> dict:
    """One run's local-task evaluation (module level: a worker process runs it)."""
    from .evaluate import evaluate_run

    return evaluate_run(run_dir, data_dir=data_dir, limit=limit, batch_size=8)


def _evaluate_all(runs: list, data_dir: Path, limit: int | None, workers: int):
    """(run name, eval result) for every run, in ``workers`` processes when > 1 (each run's
    eval is single-threaded, so a 2-core machine evaluates two at once)."""
    if workers <= 1 or len(runs) <= 1:
        for r in runs:
            yield r.name, _eval_one(str(r.out_dir), str(data_dir), limit)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from .tasks import build_tasks

    build_tasks(data_dir)  # built once here, so the workers only read the task files
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = {pool.submit(_eval_one, str(r.out_dir), str(data_dir), limit): r.name for r in runs}
        for job in as_completed(jobs):
            yield jobs[job], job.result()


def _labels(rows: list[dict]) -> list[str]:
    """Architecture labels with the recipe (unless the paper's random mixers), and the size and
    the freeze policy only where they tell rows apart."""
    from analysis.report import arch_label

    sizes = {r.get("size") for r in rows}
    recipe = [f" {r['recipe']}" if r.get("recipe") not in (None, "", "random", "scratch") else "" for r in rows]
    base = [(f"{r.get('size')} " if len(sizes) > 1 else "") + arch_label(r) + x for r, x in zip(rows, recipe)]
    return [b + (f" ({r.get('freeze_policy')})" if base.count(b) > 1 else "") for b, r in zip(base, rows)]


def summary_lines(report_dir: Path) -> list[str]:
    """The closing summary, from the report's tables: the effective-compute multiplier per
    architecture as a point estimate with its method (and counting the source), the paper's
    figure as a secondary line (a lower bound said in words where it is one), the benchmark
    deltas, and where the details are."""
    out = []
    e = report_dir / "effective_summary.csv"
    rows = list(csv.DictReader(e.open())) if e.is_file() else []
    if rows:
        labels = _labels(rows)
        out.append("effective-compute savings (scratch FLOPs to reach the XATL run's final val loss / XATL FLOPs): "
                   + "; ".join(f"{lab} {r['effective']}" for lab, r in zip(labels, rows)))  # fmt: skip
        out.append("  counting the source's own training: "
                   + "; ".join(f"{lab} {r['effective_incl_source']}" for lab, r in zip(labels, rows)))  # fmt: skip
    else:
        out.append("effective-compute savings: none yet (no finished XATL run with a scratch baseline; see the report)")
    s = report_dir / "savings_summary.csv"
    if s.is_file():
        rows = list(csv.DictReader(s.open()))
        if rows and "paper_savings" in rows[0]:  # (an older report has no phrase column: no line)
            out.append("  paper's definition (XATL FLOPs to reach the scratch run's final val loss), secondary: "
                       + "; ".join(f"{lab} {r['paper_savings']}" for lab, r in zip(_labels(rows), rows)))  # fmt: skip
    d = report_dir / "benchmark_deltas.csv"
    if d.is_file():
        rows = [r for r in csv.DictReader(d.open()) if r.get("metric") == "acc"]
        by: dict[tuple[str, str], list[float]] = {}  # seeds of one architecture and task: their mean
        for lab, r in zip(_labels(rows), rows):
            by.setdefault((lab, r["task"]), []).append(float(r["delta"]))
        out.append("accuracy deltas (XATL - scratch, local tasks): " + ("; ".join(
            f"{lab} {task} {sum(v) / len(v):+.3f}" + (f" (mean of {len(v)})" if len(v) > 1 else "")
            for (lab, task), v in by.items()) or "none (no pairing evaluated on both sides)"))  # fmt: skip
    out.append(f"details: {report_dir / 'report.md'}")
    return out
