"""Confirmation of a study's winner: re-train the best trial's setting and every reference
(``references:`` of the study file, e.g. the paper's LIT setting) on fresh seeds.

The best trial's own value is the minimum over many noisy draws, so it is biased low (the
winner's curse); only runs on seeds no trial used can say whether the winner beats a
reference. The confirmation is a sweep (:mod:`xatl_ds.sweep`) planned from the study: base =
the study's base config, axes = ``schedule`` (best and each reference, as run config values) x
``seed`` (``confirm.seeds``). It lives in ``<study out_dir>/confirm`` and resumes like any sweep
(finished runs are skipped). A reference whose setting equals the best trial's is trained once
and reported under both names. :func:`analysis.confirm.summarize` turns the finished runs into
paired differences with intervals.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

from .tune import StudyError, StudySpec, best_trial, params_to_values, trial_config

if TYPE_CHECKING:
    import pandas as pd

BEST = "best"


def settings(spec: StudySpec, study) -> tuple[dict[str, dict], dict[str, str]]:
    """``(settings, aliases)``: name -> Optuna params of every distinct setting to train (the
    best trial's first), and alias -> name for references equal to an earlier setting."""
    if not spec.confirm_seeds:
        raise StudyError("the study file has no confirm: {seeds: [...]}; add fresh seeds to confirm on")
    best = best_trial(study, spec)
    if best is None:
        raise StudyError(f"study {spec.study_name} has no COMPLETE trial yet; run `xatl-ds tune` first")
    named = {BEST: dict(best.params), **spec.references}
    distinct: dict[str, dict] = {}
    aliases: dict[str, str] = {}
    for name, params in named.items():
        values = params_to_values(spec, params)
        same = next((n for n, p in distinct.items() if params_to_values(spec, p) == values), None)
        if same is None:
            distinct[name] = params
        else:
            aliases[name] = same
    return distinct, aliases


def confirm_sweep(spec: StudySpec, study) -> dict:
    """The confirmation sweep as a sweep dict (see the module docstring)."""
    distinct, _ = settings(spec, study)
    base = trial_config(spec, {}, 0)  # the base with its @source resolved
    base.pop("name", None)
    base.pop("out_dir", None)
    schedule = [{"label": name, **copy.deepcopy(params_to_values(spec, p))} for name, p in distinct.items()]
    return {
        "name": f"{spec.study_name}-confirm", "out_dir": str(confirm_root(spec)), "base": base,
        "axes": {"schedule": schedule, "seed": list(spec.confirm_seeds)},
    }  # fmt: skip


def confirm_root(spec: StudySpec) -> Path:
    return spec.root / "confirm"


def run_rows(sweep) -> pd.DataFrame:
    """One row per planned confirmation run: setting, seed, final val loss and FLOPs (None
    while unfinished), run directory."""
    import pandas as pd

    from .sweep import expand

    rows = []
    for r in expand(sweep):
        evals = [m for m in r.dir.read_metrics() if m.get("val_loss") is not None] if r.dir.is_done() else []
        rows.append({"setting": r.labels["schedule"], "seed": int(r.config.seed),
                     "val_loss": float(evals[-1]["val_loss"]) if evals else None,
                     "flops": float(evals[-1]["flops"]) if evals else None, "run_dir": str(r.out_dir)})  # fmt: skip
    return pd.DataFrame(rows, columns=["setting", "seed", "val_loss", "flops", "run_dir"])


def study_facts(spec: StudySpec, study) -> dict:
    """What the report says about the study itself: trial counts by state, the best trial,
    each reference's own trial."""
    trials = study.get_trials(deepcopy=False)
    best = best_trial(study, spec)
    refs = {}
    for t in trials:
        name = t.user_attrs.get("reference")
        if name and t.state.name == "COMPLETE":
            refs[name] = {"trial": t.number, "value": t.values[0]}
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return {"study_name": spec.study_name, "trial_seed": int(spec.base.get("seed", 0)), "trial_states": counts,
            "best_trial": best.number, "best_value": best.values[0], "best_params": dict(best.params),
            "references": {n: {"params": p, **refs.get(n, {})} for n, p in spec.references.items()},
            "confirm_seeds": list(spec.confirm_seeds)}  # fmt: skip


def run_confirm(spec: StudySpec, opts=None, *, max_parallel: int = 1, report_out: str | Path | None = None,
                dry_run: bool = False) -> int:  # fmt: skip
    """Train the confirmation runs (resumable) and write ``confirm.md`` / ``.json`` /
    ``_runs.csv`` into ``report_out`` (default ``<out_dir>/confirm``); returns the sweep's
    exit code."""
    from analysis.confirm import summarize, write_confirm

    from .sweep import load_sweep, run_sweep
    from .tune import open_study

    study = open_study(spec)
    _, aliases = settings(spec, study)
    sweep = load_sweep(confirm_sweep(spec, study))
    rc = run_sweep(sweep, opts, max_parallel=max_parallel, dry_run=dry_run)
    if rc != 0 or dry_run:
        return rc
    facts = study_facts(spec, study)
    rows = run_rows(sweep)
    values = {BEST: facts["best_value"], **{n: r["value"] for n, r in facts["references"].items() if "value" in r}}
    summary = summarize(rows, BEST, aliases, values)
    states = ", ".join(f"{n} {s}" for s, n in sorted(facts["trial_states"].items()))
    notes = [f"Study `{spec.study_name}`: {states} trials, all on seed {facts['trial_seed']}; the best is trial "
             f"{facts['best_trial']} (value {facts['best_value']:.4f}), params `{facts['best_params']}`.",
             "", "References: " + "; ".join(f"{n} `{r['params']}`" for n, r in facts["references"].items()),
             "", f"Confirmation: every setting re-trained on the fresh seeds {facts['confirm_seeds']}, "
             "nothing else changed; the objective is the final validation loss at the base's budget."]  # fmt: skip
    out = Path(report_out) if report_out else confirm_root(spec)
    path = write_confirm(summary, rows, out, f"Confirmation of study {spec.study_name}", notes, {"study": facts})
    study.trials_dataframe().to_csv(out / "trials.csv", index=False)  # the whole study, beside its confirmation
    print(f"[tune] confirmation report: {path}")
    return 0
