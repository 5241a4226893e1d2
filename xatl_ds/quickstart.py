"""``xatl-ds quickstart``: the whole method on the built-in corpus, on a laptop.

prepare the corpus -> train a tiny source Transformer -> XATL vs scratch for Mamba, RetNet
and the paper hybrid under one FLOP budget (``sweeps/quickstart.yaml``) -> lm-eval on the
local held-out tasks -> ``report.md``. Every step reuses what is already done, so a rerun
finishes fast; Ctrl-C loses at most the steps since each run's last checkpoint.
"""
from __future__ import annotations

import csv
import time
from pathlib import Path


def _say(msg: str) -> None:
    print(f"[quickstart {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(sweep_file: Path, eval_limit: int | None = None) -> int:
    from analysis.report import write_report

    from .data import PrepareConfig, prepare
    from .evaluate import evaluate_run
    from .sweep import expand, load_sweep, run_sweep

    sweep = load_sweep(sweep_file)
    runs = expand(sweep)  # validates every run config before anything starts
    data_dir = Path(runs[0].config["data"]["path"]) if isinstance(runs[0].config, dict) else None
    data_dir = data_dir or Path("runs/data/builtin")

    _say(f"1/4 preparing the built-in corpus into {data_dir} (skipped when done)")
    meta = prepare(PrepareConfig(out=data_dir))
    _say(f"    {meta['splits']['train']['tokens']:,} training tokens, vocab {meta['vocab_size']}")

    _say(f"2/4 training {len(runs)} runs of {sweep_file.name} (source first; logs in {sweep.root / 'logs'})")
    rc = run_sweep(sweep)
    if rc != 0:
        _say(f"the sweep stopped (exit code {rc}); rerun `make quickstart` to continue")
        return rc

    _say("3/4 evaluating every run on the local held-out tasks (lm-eval)")
    for r in runs:
        res = evaluate_run(r.out_dir, data_dir=data_dir, limit=eval_limit, batch_size=8)
        scores = ", ".join(f"{t} acc {v['metrics']['acc']['value']:.3f}" for t, v in res["tasks"].items())
        _say(f"    {r.name}: {scores}")

    _say("4/4 writing the report")
    report = write_report(sweep.root)
    _say(f"report: {report}")
    for line in summary_lines(report.parent):
        print(line)
    return 0


def summary_lines(report_dir: Path) -> list[str]:
    """Three lines: savings per architecture, benchmark deltas, and where the details are."""
    from analysis.report import arch_label

    out = []
    s = report_dir / "savings_summary.csv"
    if s.is_file():
        parts = []
        for r in csv.DictReader(s.open()):
            v = r.get("savings_flops_mean", "")
            bound = ">=" if r.get("any_lower_bound") == "True" else ""
            parts.append(f"{arch_label(r)} {bound}{float(v):.2f}x" if v not in ("", "nan") else f"{arch_label(r)} not reached")
        out.append("FLOP savings (scratch / XATL, to the scratch run's final val loss): " + "; ".join(parts))
    d = report_dir / "benchmark_deltas.csv"
    if d.is_file():
        parts = [f"{arch_label(r)} {r['task']} {float(r['delta']):+.3f}" for r in csv.DictReader(d.open()) if r["metric"] == "acc"]
        out.append("accuracy deltas (XATL - scratch, local tasks): " + "; ".join(parts))
    out.append(f"details: {report_dir / 'report.md'}")
    return out
