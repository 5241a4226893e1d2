"""report.md: the page a reader sees, rendered from a report's tables and figures
(:func:`render_markdown`), and :func:`md_table`, the markdown table every analysis page uses."""
from __future__ import annotations

import math
import time
from pathlib import Path

import pandas as pd

from .figures import variant_label
from .report_compute import TREND_KEYS, ReportTables
from .report_data import SweepData
from .report_figures import ReportFigures
from .report_phrases import finite, paper_phrase

__all__ = ["md_table", "render_markdown"]


def md_table(df: pd.DataFrame, cols: list[str] | None = None, floatfmt: str = ".4g") -> str:
    """A GitHub markdown table (``DataFrame.to_markdown``, i.e. tabulate); NaN/None print as
    '-', floats with ``floatfmt``, strings as they are (no number parsing)."""
    if df is None or df.empty:
        return "_(none)_\n"
    cols = [c for c in (cols or list(df.columns)) if c in df.columns]

    def cell(v):
        if v is None or (pd.api.types.is_scalar(v) and not isinstance(v, str) and pd.isna(v)):
            return "-"
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v).replace("|", "\\|").replace("\n", " ")

    view = pd.DataFrame({c: [cell(v) for v in df[c]] for c in cols}, columns=cols)
    return view.to_markdown(index=False, tablefmt="github", disable_numparse=True) + "\n"


def render_markdown(rep: ReportTables, figures: ReportFigures) -> str:
    """The text of report.md, its sections in reading order; ends in a newline."""
    df = rep.data.df
    md = [f"# XATL sweep report: {rep.data.origin}", "", f"_generated {time.strftime('%Y-%m-%d %H:%M')}_", ""]
    md += _provenance(rep.data, rep.sweep_dir)
    n_done = int((df["state"] == "done").sum()) if not df.empty else 0
    md += [f"{len(df)} runs found ({n_done} done), {len(rep.savings)} XATL/scratch pairings.", ""]
    md += _effective_section(rep.effective, rep.effective_summary, rep.size_trend, rep.trends, rep.no_trend,
                             figures.effective_vs_size)  # fmt: skip
    md += _paper_section(rep.savings, rep.savings_summary, figures)
    md += _sources_section(df, rep.sources)
    md += _benchmark_section(rep.benchmark_deltas, figures.benchmark_deltas)
    md += _teacher_section(df, figures.loss_vs_tokens)
    md += _runs_section(df, rep.missing, rep.data.skipped, rep.from_tables)
    return "\n".join(md) + "\n"


def _paper_section(sav: pd.DataFrame, agg: pd.DataFrame, figures: ReportFigures) -> list[str]:
    """The paper's definition of a saving, its figures and the loss curves."""
    f1, f2, f3 = figures.loss_vs_flops, figures.savings_vs_size, figures.savings_vs_target_loss
    md = ["## The paper's definition (secondary)", "",
          "Savings = FLOPs (tokens, wall time) the scratch run needs to reach its own final validation loss / what "
          "the XATL run needs to reach that loss. Curves are running minima of the validation loss, interpolated "
          "linearly in log-FLOPs. \"at least ... (lower bound)\": XATL was already below the target at its first "
          "evaluation, so the ratio has no finite answer at this budget and evaluation spacing. \"not reached\": the "
          "XATL run never got there. Brackets: bootstrap 95% CI over seeds. *incl. source*: the source model's "
          "pretraining FLOPs added to the XATL side.", ""]  # fmt: skip
    if not agg.empty:
        view = agg.copy()
        for col, name in (("savings_flops", "FLOPs"), ("savings_tokens", "tokens"), ("savings_wall_time", "wall time"),
                          ("savings_flops_incl_source", "FLOPs incl. source")):  # fmt: skip
            view[name] = [
                paper_phrase(r[f"{col}_mean"], r[f"{col}_ci_low"], r[f"{col}_ci_high"], r["n_seeds"],
                             r[f"n_reached_{col}"], r["any_lower_bound"] and col != "savings_flops_incl_source")
                if not (col == "savings_flops_incl_source" and r["n_reached_savings_flops"] and not r[f"n_reached_{col}"])
                else "source FLOPs unknown (--source-flops)"
                for _, r in agg.iterrows()
            ]  # fmt: skip
        view["arch"] = [variant_label(r) for _, r in view.iterrows()]
        md.append(md_table(view, ["size", "arch", "n_seeds", "FLOPs", "tokens", "wall time", "FLOPs incl. source"]))
        md += ["", "Per pairing:", ""]
        md.append(md_table(sav, ["xatl_run", "xatl_state", "scratch_run", "seed", "target_loss", "scratch_flops_to_target",
                                 "xatl_flops_to_target", "savings_flops", "reached_flops", "lower_bound_flops",
                                 "source_flops", "savings_flops_incl_source"]))  # fmt: skip
    else:
        md.append("_No XATL run has a scratch baseline with a validation curve yet._\n")
    if f1 is not None:
        md += ["", f"![validation loss vs FLOPs](figures/{f1.name})", "",
               "*Validation loss against training FLOPs, one panel per size: the mean over seeds with a faint band "
               "from the lowest to the highest seed; XATL solid, its scratch baseline dashed in the same colour, the "
               "source dotted black, circles where LIT unfroze a stage.*"]  # fmt: skip
    md += ["", f"![savings vs model size](figures/{f2.name})", "",
           "*The paper's definition by size, a secondary measure kept apart from the effective-compute headline "
           "above: each point is the mean over seeds with its bootstrap interval; an upward arrow is a lower bound "
           "(XATL was already below the target at its first evaluation), so no line joins the sizes.*", "",
           "A single ratio at the scratch run's final loss flatters short budgets; the curve shows the ratio for "
           "every target from the loss the XATL run starts at down to the scratch run's final loss.", "",
           f"![savings vs target loss](figures/{f3.name})", ""]  # fmt: skip
    return md


def _benchmark_section(deltas: pd.DataFrame, fig: Path) -> list[str]:
    """Benchmark scores, XATL minus its scratch baseline."""
    md = ["## Benchmarks (XATL - scratch)", ""]
    if not deltas.empty:
        dv = deltas.copy()
        dv["delta ± se"] = [f"{d:+.4f} ± {s:.4f}" if math.isfinite(s) else f"{d:+.4f}" for d, s in zip(dv["delta"], dv["delta_se"])]
        md.append(md_table(dv, ["size", "mixer", "attention_layers", "seed", "freeze_policy", "task", "metric", "xatl",
                                "scratch", "delta ± se", "flops_ratio"]))  # fmt: skip
        md += ["", f"![benchmark deltas](figures/{fig.name})", ""]
    else:
        md.append("_No pairing has evaluations on both sides yet (`xatl-ds eval RUN_DIR`)._\n")
    return md


def _teacher_section(df: pd.DataFrame, fig: Path | None) -> list[str]:
    """Distilled and XATL runs against their teachers; nothing where no run has one."""
    taught = df[df["teacher_run"].notna() | df["teacher_val_loss"].notna()] if "teacher_run" in df else pd.DataFrame()
    if taught.empty:
        return []
    kept = [c for c in df.columns if c.startswith("retained/") and c.endswith("/acc")]
    md = ["## Teacher recovery", "",
          "Each XATL or distilled run beside its teacher (its source, or `distill.teacher`): the teacher's "
          "validation loss on the same batches, the gap to it, and the share of the teacher's accuracy "
          "retained on each local task (when the teacher is a run of this sweep and was evaluated).", ""]  # fmt: skip
    md.append(md_table(taught, ["run", "recipe", "teacher_run", "tokens", "flops", "teacher_share", "final_val_loss",
                                "teacher_val_loss", "gap_to_teacher", *kept]))  # fmt: skip
    md += ["", "`flops`: all the compute spent, the teacher's forward passes included; `teacher_share`: their "
           "part of it.", ""]
    if fig is not None:
        md += [f"![validation loss vs tokens, the teacher as a line](figures/{fig.name})", ""]
    return md


def _runs_section(df: pd.DataFrame, miss: dict[str, list[str]], skipped: list, tables: bool) -> list[str]:
    """Every run, what the sweep still lacks, and the files written."""
    md = ["## Runs", ""]
    md.append(md_table(df, ["run", "state", "size", "mixer", "attention_layers", "init_kind", "freeze_policy", "seed",
                            "steps", "flops", "final_val_loss", "best_val_loss", "n_unfreeze", "first_unfreeze_step",
                            "transferred_fraction"]) if not df.empty else "_(no runs found)_\n")  # fmt: skip
    md += ["", "## Missing", ""]
    labels = {"not_started": "Runs not started", "not_done": "Runs not finished", "eval_missing": "Evaluations missing",
              "no_baseline": "XATL runs without a scratch baseline",
              "unpaired_scratch": "Scratch runs without an XATL partner"}  # fmt: skip
    if skipped:
        md += [f"**Unreadable runs, left out** ({len(skipped)}):", ""] + [f"- {d}: {why}" for d, why in skipped] + [""]
    if not any(miss.values()) and not skipped:
        md.append("Nothing: every run is done, evaluated and paired.")
    for k, items in miss.items():
        if items:
            md += [f"**{labels[k]}** ({len(items)}):", ""] + [f"- {x}" for x in items] + [""]
    md += ["", "Files: results.csv, results.parquet, " + ("" if tables else "curves.parquet, ") + "effective.csv, "
           "effective_summary.csv, effective_curves.csv, size_trend.csv, savings.csv, savings_summary.csv, "
           "savings_curves.csv, benchmark_deltas.csv, figures/."]  # fmt: skip
    return md


def _effective_section(eff: pd.DataFrame, summ: pd.DataFrame, trend: pd.DataFrame, trends: dict, no_trend: dict,
                       fig: Path | None) -> list[str]:  # fmt: skip
    """The headline: effective compute per group and pairing, and its trend with size (None:
    one size, no trend figure)."""
    md = ["## Effective compute (the headline)", "",
          "Effective-compute multiplier (Hernandez et al. 2021) = the scratch FLOPs needed to reach the XATL run's final "
          "validation loss / the XATL run's FLOPs. *interpolated*: measured on the scratch curve (scratch runs train "
          "longer than XATL runs: `baseline: {budget_factor: K}`). *extrapolated*: even the longest scratch run stops "
          "short, so the scratch curve's fit L(C) = E + A*C^(-alpha) is inverted; its interval comes from refitting "
          "bootstrap replicates of the curve. Where no estimate exists the table says why in words. Means are over the "
          "seeds with an estimate; brackets: 95% bootstrap interval over seeds and, for extrapolated seeds, over the "
          "fit. *incl. source*: the source's pretraining FLOPs added to the XATL side. Runs compared this way should "
          "not anneal their learning rate early (sweeps/cpu_ladder.yaml keeps it constant): a cosine-decayed scratch "
          "curve is not annealed below its budget, where an XATL run's end is, and flattens at its end, which pulls its "
          "fitted asymptote towards its last loss. effective_curves.csv: the multiplier at every XATL evaluation.", ""]  # fmt: skip
    if summ.empty:
        return md + ["_No XATL run with a validation curve has a scratch baseline with one yet._", ""]
    view = summ.assign(arch=[variant_label(r) for _, r in summ.iterrows()])
    teacher = "effective_excl_teacher" in view and (view["effective_excl_teacher"].astype(str) != "").any()
    md.append(md_table(view.rename(columns={"effective": "effective-compute multiplier",
                                            "effective_incl_source": "incl. source", "n_params": "non-embedding params",
                                            "effective_excl_teacher": "excl. teacher"}),
                       ["size", "arch", "non-embedding params", "n_seeds", "effective-compute multiplier",
                        "incl. source", *(["excl. teacher"] if teacher else [])], floatfmt=".3g"))  # fmt: skip
    if teacher:
        md += ["", "Distilled runs: the multiplier counts the teacher's forward FLOPs on the XATL side (they were "
               "spent); *excl. teacher* leaves them out (the student's FLOPs alone).", ""]
    md += ["", "Per pairing:", ""]
    md.append(md_table(eff, ["xatl_run", "xatl_state", "scratch_run", "seed", "budget", "xatl_loss", "scratch_flops",
                             "method", "effective", "effective_incl_source"]))  # fmt: skip
    if fig is None:
        return md + ["", "### Savings against size", "", "_One size in this sweep: no trend with size._", ""]
    md += ["", "### Savings against size", "", f"![effective compute vs size](figures/{fig.name})", "",
           "_Caption_: points are the measured means with their 95% intervals; the solid line is the fit "
           "multiplier = exp(a) * N^b over the measured sizes (N: non-embedding parameters), the band its bootstrap "
           "interval over seeds (seed noise only: doubt about the form of the law is not in it). Dashed: the same line carried to the Pythia sizes. That part is an extrapolation, not a "
           "measurement: it assumes the power law seen over a few tiny CPU models on a small corpus holds across "
           "orders of magnitude of size, data and training length, which nothing here tests.", ""]  # fmt: skip
    for key, tr in trends.items():
        g = dict(zip(TREND_KEYS, key))
        ci = (f" [{tr.b_ci_low:.2f}, {tr.b_ci_high:.2f}]" if math.isfinite(tr.b_ci_low)
              else " (one seed per size: no interval)")  # fmt: skip
        md.append(f"- {variant_label(g)}: multiplier ~ N^{tr.b:.3f}{ci} over {len(tr.sizes)} sizes "
                  f"({'grows' if tr.b > 0 else 'shrinks'} with size at the point estimate"
                  + ("; the interval includes 0" if math.isfinite(tr.b_ci_low) and tr.b_ci_low <= 0 <= tr.b_ci_high else "")
                  + ")")  # fmt: skip
    for key, why in no_trend.items():
        md.append(f"- {variant_label(dict(zip(TREND_KEYS, key)))}: no trend ({why})")
    ext = trend[trend["kind"] == "extrapolated"] if not trend.empty else trend
    if not ext.empty:
        md += ["", "Extrapolated (not measured):", ""]
        md.append(md_table(ext.assign(arch=[variant_label(r) for _, r in ext.iterrows()]),
                           ["arch", "size", "n_params", "multiplier", "ci_low", "ci_high"], floatfmt=".3g"))  # fmt: skip
    return md + [""]


def _sources_section(df: pd.DataFrame, sources: set[str]) -> list[str]:
    """How far each source trained, against the XATL runs that transfer from it."""
    if not sources:
        return []
    md = ["## Sources", "", "A real source has seen far more tokens than the conversion will; the ratio column "
          "compares each source's FLOPs with the mean FLOPs of the XATL runs that transfer from it.", ""]  # fmt: skip
    hf = {str((Path(d) / "hf").resolve()): r for r, d in zip(df["run"], df["run_dir"])}
    rows = []
    for _, r in df[df["run"].isin(sources)].iterrows():
        users = df[[hf.get(str(Path(s).resolve())) == r["run"] if isinstance(s, str) and s else False
                    for s in df["source"]]]  # fmt: skip
        mean_x = float(users["flops"].astype(float).mean()) if len(users) else math.nan
        rows.append({"source": r["run"], "state": r["state"], "size": r["size"], "steps": r["steps"],
                     "tokens": r["tokens"], "flops": r["flops"], "final_val_loss": r["final_val_loss"],
                     "XATL runs": len(users),
                     "x XATL budget": float(r["flops"]) / mean_x if finite(mean_x) and mean_x > 0 else math.nan})  # fmt: skip
    return md + [md_table(pd.DataFrame(rows)), ""]


def _provenance(data: SweepData, sweep_dir: Path) -> list[str]:
    """Where a rebuilt report's numbers come from; nothing for one built from run folders."""
    if data.mode == "parquet":
        return [f"Rebuilt from `{sweep_dir}`: results.parquet and curves.parquet (the run folders are not here); "
                "every number and figure is recomputed from them.", ""]  # fmt: skip
    if data.mode == "tables":
        return [f"Rebuilt from `{sweep_dir}` without the run folders and without curves.parquet: the per-run "
                "validation curves were not committed with this report, so the per-pairing tables (effective.csv, "
                "effective_summary.csv, effective_curves.csv, savings.csv, savings_curves.csv) are read as the run "
                "folders gave them, the aggregates over seeds of the paper's definition, the size trend and the "
                "benchmark deltas are recomputed from them and results.parquet, and the loss-curve figures are the "
                "ones drawn from the run folders.", ""]  # fmt: skip
    return []
