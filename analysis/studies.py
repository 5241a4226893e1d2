"""The issue-20 studies, each end to end and resumable: ``python -m analysis.studies NAME``
(``make study-<name>``).

Each study: prepare the built-in corpus (skipped when done), copy in any source run another
study already trained with the same config (same run key; the trainer is deterministic on
CPU, so a copy equals a retrained source), train its sweep(s) two runs at a time (finished
runs skipped, broken ones resumed), write the sweep report (report.md, effective_summary.csv
with the method per row, ...) and the study's own analysis into ``docs/results/<folder>/``,
and append the invocation's wall time to ``timing.csv`` there. No lm-eval: these studies
measure effective compute only.

Studies (see each sweep file for budgets and time estimates):

``headlines``        sweeps/ladder_long.yaml -> docs/results/headlines/ (item 1)
``length``           sweeps/savings_length.yaml -> docs/results/savings_length/ (item 2)
``source-tokens``    sweeps/source_tokens.yaml (+ _recipe) -> docs/results/source_tokens/ (item 3)
``recipes-confirm``  sweeps/recipes_confirm.yaml -> docs/results/recipes_confirm/ (item 4)
``law``              no training: the law over the three studies above -> docs/results/law/ (item 5)
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

RESULTS = Path("docs/results")
DATA = Path("runs/data/builtin")
#: the ladder's XATL budget B per size (sweeps/cpu_ladder.yaml)
LADDER_B = {"mini": 8.0e11, "tiny": 1.91e12, "small": 3.67e12}

STUDIES = {
    "headlines": {"sweeps": [("sweeps/ladder_long.yaml", "")], "out": RESULTS / "headlines"},
    "length": {"sweeps": [("sweeps/savings_length.yaml", "")], "out": RESULTS / "savings_length"},
    "source-tokens": {"sweeps": [("sweeps/source_tokens.yaml", ""), ("sweeps/source_tokens_recipe.yaml", "recipe")],
                      "out": RESULTS / "source_tokens"},
    "recipes-confirm": {"sweeps": [("sweeps/recipes_confirm.yaml", "")], "out": RESULTS / "recipes_confirm"},
    "law": {"sweeps": [], "out": RESULTS / "law"},
}  # fmt: skip


def _say(msg: str) -> None:
    print(f"[study] {msg}", flush=True)


def reuse_sources(sweep, search: str = "runs/sweeps/*/runs") -> list[str]:
    """Copy every source run of ``sweep`` that is not done here but done, under the same key,
    in another sweep's folder (a copy of a finished run is that run: same config, same id).
    A folder already present here (a partial run) is never replaced. Returns the keys copied."""
    import glob

    from xatl_ds.rundir import RunDir
    from xatl_ds.sweep import expand

    copied = []
    for r in expand(sweep):
        if not r.is_source or r.dir.is_done() or Path(r.out_dir).exists():
            continue
        for cand in sorted(glob.glob(f"{search}/{r.key}")):
            if Path(cand).resolve() != Path(r.out_dir).resolve() and RunDir(cand).is_done():
                Path(r.out_dir).parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(cand, r.out_dir, symlinks=True)
                _say(f"source {r.key}: copied from {cand} (same config, same key)")
                copied.append(r.key)
                break
    return copied


def _progress(sweep) -> tuple[int, int]:
    from xatl_ds.sweep import expand

    runs = expand(sweep)
    return sum(r.dir.is_done() for r in runs), len(runs)


def _timing(out: Path, study: str, t0: float, rc: int, done: int, total: int, note: str = "") -> None:
    path = out / "timing.csv"
    new = not path.is_file()
    out.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["study", "started", "finished", "wall_minutes", "exit_code", "runs_done", "runs_total", "nproc",
                        "load_avg_1min_at_end", "note"])  # fmt: skip
        w.writerow([study, time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0)), time.strftime("%Y-%m-%dT%H:%M:%S"),
                    f"{(time.time() - t0) / 60:.1f}", rc, done, total, os.cpu_count(),
                    f"{os.getloadavg()[0]:.2f}", note])  # fmt: skip


def _analyse(study: str, roots: list[tuple[Path, str]], out: Path) -> None:
    from .report import write_report

    for root, sub in roots:
        _say(f"report of {root} -> {out / sub if sub else out}")
        write_report(root, out_dir=out / sub if sub else out)
    if study == "headlines":
        headline_table(out, roots[0][0])
    elif study == "length":
        from .length import write_length

        write_length(roots[0][0], out, LADDER_B)
    elif study == "source-tokens":
        from .source_tokens import write_source_tokens

        write_source_tokens([r for r, _ in roots], out, data_dir=DATA)
    elif study == "recipes-confirm":
        from .recipes_confirm import write_recipes_confirm
        from .report import load_sweep

        data = load_sweep(roots[0][0])
        orig = RESULTS / "recipes" / "results.csv"
        summ = out / "effective_summary.csv"
        write_recipes_confirm(data.df, out, pd.read_csv(orig) if orig.is_file() else None,
                              pd.read_csv(summ) if summ.is_file() and summ.stat().st_size > 1 else None)  # fmt: skip


def headline_table(out: Path, root: Path, ladder: Path = RESULTS / "cpu_ladder") -> Path:
    """headlines.md / headlines.csv: each (size, arch, variant) of the long-scratch ladder with its
    method, beside the ladder's extrapolated value (did the extrapolation hold?), and
    law_points.csv (the per-seed multipliers with N, D, T)."""
    from .length import source_tokens_of, law_points
    from .report import load_sweep, md_table

    summ = pd.read_csv(out / "effective_summary.csv", dtype={"attention_layers": str})
    keys = ["size", "mixer", "attention_layers", "freeze_policy"]
    old = pd.read_csv(ladder / "effective_summary.csv", dtype={"attention_layers": str}) if (ladder / "effective_summary.csv").is_file() else None
    view = summ.copy()
    if old is not None and not summ.empty:
        view = view.merge(old[keys + ["effective_mean", "effective_method", "effective"]].rename(columns={
            "effective_mean": "ladder_3x_mean", "effective_method": "ladder_3x_method", "effective": "ladder_3x"}),
            on=keys, how="left")  # fmt: skip
        view["new_over_ladder_3x"] = view["effective_mean"] / view["ladder_3x_mean"]
    view.to_csv(out / "headlines.csv", index=False)
    md = ["# Headlines read off measured scratch curves", "",
          "Scratch trained 10 x B (sweeps/ladder_long.yaml). `effective_method` per row: *interpolated* (every seed "
          "read off the measured scratch curve) or *extrapolated* (some seed still needed the fitted power law). "
          "`ladder_3x`: the committed ladder's value (docs/results/cpu_ladder, scratch at 3 x B, extrapolated).", ""]  # fmt: skip
    md.append(md_table(view, [c for c in ("size", "mixer", "attention_layers", "freeze_policy", "n_seeds", "effective",
                                          "effective_method", "n_extrapolated_effective", "ladder_3x",
                                          "new_over_ladder_3x") if c in view]) if not view.empty else "_(none)_\n")  # fmt: skip
    (out / "headlines.md").write_text("\n".join(md) + "\n")
    eff = pd.read_csv(out / "effective.csv", dtype={"attention_layers": str}) if (out / "effective.csv").stat().st_size > 1 else pd.DataFrame()
    if not eff.empty:
        try:
            df = load_sweep(root).df
        except FileNotFoundError:
            df = pd.DataFrame()
        if not df.empty:
            tok = dict(zip(df["run"], df["tokens"]))
            eff["xatl_tokens"] = [float(tok.get(r, math.nan)) for r in eff["xatl_run"]]
            eff["source_tokens"] = [source_tokens_of(df, r) for r in eff["xatl_run"]]
        eff["length_factor"] = 1.0
    law_points(eff, study="headlines").to_csv(out / "law_points.csv", index=False)
    return out / "headlines.md"


def run(study: str, max_parallel: int = 2) -> int:
    from xatl_ds.data import PrepareConfig, prepare
    from xatl_ds.sweep import load_sweep, run_sweep

    spec = STUDIES[study]
    out: Path = spec["out"]
    t0 = time.time()
    if study == "law":
        from .law import write_law

        path = write_law(RESULTS, out)
        _say(f"wrote {path}")
        return 0
    _say(f"{study}: preparing the built-in corpus into {DATA} (skipped when done)")
    prepare(PrepareConfig(out=DATA))
    roots, done, total = [], 0, 0
    for file, sub in spec["sweeps"]:
        sweep = load_sweep(file)
        reuse_sources(sweep)
        _say(f"{study}: training {file} ({max_parallel} at a time; finished runs are skipped)")
        rc = run_sweep(sweep, max_parallel=max_parallel)
        d, n = _progress(sweep)
        done, total = done + d, total + n
        if rc != 0:
            _say(f"{study}: {file} stopped (exit code {rc}); rerun `make study-{study}` to continue")
            _timing(out, study, t0, rc, done, total, f"stopped in {file}")
            return rc
        roots.append((sweep.root, sub))
    _analyse(study, roots, out)
    _timing(out, study, t0, 0, done, total, "complete")
    _say(f"{study}: done in {(time.time() - t0) / 60:.1f} minutes -> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.studies", description=__doc__.split("\n\n")[0])
    p.add_argument("study", choices=sorted(STUDIES))
    p.add_argument("--max-parallel", type=int, default=2)
    p.add_argument("--analyse-only", action="store_true", help="no training: the reports and analyses of what exists")
    a = p.parse_args(argv)
    if a.analyse_only:
        spec = STUDIES[a.study]
        from xatl_ds.sweep import load_sweep

        if a.study == "law":
            return run("law")
        _analyse(a.study, [(load_sweep(f).root, sub) for f, sub in spec["sweeps"]], spec["out"])
        return 0
    return run(a.study, a.max_parallel)


if __name__ == "__main__":
    sys.exit(main())
