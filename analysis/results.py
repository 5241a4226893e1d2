"""Collect a sweep's runs into one pandas table (finished and partial runs alike).

Run directories are found and read through :class:`xatl_ds.rundir.RunDir` (the trainer's
on-disk contract). State: ``done``, ``running``, ``partial`` (metrics but no DONE),
``pending`` (config only). A run whose files cannot be read is skipped and listed with the
reason (:func:`load_runs`), never a reason to fail the whole table.

What the planner and the trainer knew is read, not guessed: a sweep's ``sweep.json`` gives
each run its planned size and the scratch run it is compared with (columns ``size`` and
``baseline_run``); the run's ``config.yaml`` is read back as the typed
:class:`~xatl_ds.config.RunConfig` the trainer ran; the model the trainer built (layers,
width, which layers kept attention) is the trainer's record (``model.json``, else
``meta.json``'s ``model_config``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from xatl_ds.config import ConfigError, RunConfig, load_run_config
from xatl_ds.rundir import RunDir, iter_run_dirs

__all__ = ["RunRecord", "find_runs", "load_run", "load_runs", "plan_records", "results_table", "size_label",
           "recipe_label", "EVAL_PREFIX"]  # fmt: skip

EVAL_PREFIX = "eval/"
_SKIP_DIRS = ("figures", "tasks", "__pycache__", "logs", "configs")


@dataclass
class RunRecord:
    """Everything read from one run directory."""

    run_dir: Path
    state: str
    config: RunConfig
    """The run config the trainer ran (typed; validated once, when it was read)."""
    meta: dict
    metrics: pd.DataFrame
    eval: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    """The model the trainer built (``XatlConfig.to_dict()``); empty before the trainer started."""

    @property
    def val_curve(self) -> pd.DataFrame:
        """Rows with a validation loss: step, tokens, flops, student_flops, wall_time, val_loss.
        ``flops`` is all the compute spent, a distillation teacher's forward passes included;
        ``student_flops`` the student's alone (equal without a teacher)."""
        m = self.metrics
        if m.empty or "val_loss" not in m:
            return pd.DataFrame(columns=["step", "tokens", "flops", "student_flops", "wall_time", "val_loss"])
        cols = [c for c in ("step", "tokens", "flops", "teacher_flops", "wall_time", "val_loss") if c in m]
        c = m.loc[m["val_loss"].notna(), cols].reset_index(drop=True)
        if "flops" in c:
            c.insert(c.columns.get_loc("flops") + 1, "student_flops", c["flops"])
            if "teacher_flops" in c:
                c["flops"] = c["student_flops"] + c.pop("teacher_flops").fillna(0.0)
        return c

    @property
    def unfreeze_events(self) -> list[dict]:
        """Unfreeze events (meta.json when finished, else the metrics rows), each with the
        cumulative FLOPs and tokens at its step."""
        events = list(self.meta.get("unfreeze_events") or [])
        m = self.metrics
        if not events and not m.empty and "unfreeze" in m:
            for ev in m["unfreeze"].dropna():
                events.extend(ev)
        out = []
        for e in events:
            e = dict(e)
            if not m.empty and "step" in m:
                # the event's step is the first step that trains the stage: FLOPs done before it
                prior = m.loc[m["step"] <= max(0, int(e.get("step", 0)) - 1)]
                e["flops"] = float(prior["flops"].iloc[-1]) if len(prior) and "flops" in m else 0.0
                e["tokens"] = float(prior["tokens"].iloc[-1]) if len(prior) and "tokens" in m else 0.0
            out.append(e)
        return out


def find_runs(root: str | Path) -> list[Path]:
    """Run directories under ``root`` (``root`` itself included), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep directory {root} does not exist")
    return [rd.path for rd in iter_run_dirs(root, skip=_SKIP_DIRS)]


def load_run(run_dir: str | Path) -> RunRecord:
    """Read meta.json, config.yaml, metrics.jsonl and eval.json of one run (any may be
    missing); a corrupt one raises ValueError naming the file."""
    rd = RunDir(run_dir)
    meta = rd.meta()
    try:
        raw = rd.read_config()
    except yaml.YAMLError as e:
        raise ValueError(f"{rd.config} is not valid YAML ({e})") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{rd.config} is not a run config mapping")
    try:  # runs made for another machine (model.kernels: cuda) are read here too
        config = load_run_config(raw, machine_checks=False)
    except ConfigError as e:
        raise ValueError(f"{rd.config}: {e}") from None
    metrics = pd.DataFrame(rd.read_metrics())
    state = rd.state()
    model = rd.model_config() or meta.get("model_config") or {}
    return RunRecord(rd.path, state, config, meta, metrics, rd.eval(), model)


def load_runs(root: str | Path) -> tuple[list[RunRecord], list[tuple[Path, str]]]:
    """Every readable run under ``root``, and the unreadable ones with the reason."""
    records, skipped = [], []
    for d in find_runs(root):
        try:
            records.append(load_run(d))
        except (ValueError, OSError) as e:
            skipped.append((d, str(e)))
    return records, skipped


def plan_records(root: str | Path) -> dict[str, dict]:
    """Resolved out_dir -> the planner's record of that run, from every ``sweep.json`` at or
    below ``root`` (the baseline is given as the baseline's out_dir)."""
    root = Path(root)
    out: dict[str, dict] = {}
    for index in sorted(root.rglob("sweep.json")):
        try:
            runs = json.loads(index.read_text()).get("runs", [])
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
        by_key = {r.get("key"): r for r in runs if isinstance(r, dict)}
        for r in by_key.values():
            if not r.get("out_dir"):
                continue
            rec = dict(r)
            base = by_key.get(r.get("baseline"))
            rec["baseline_dir"] = str(Path(base["out_dir"]).resolve()) if base and base.get("out_dir") else None
            out[str(Path(r["out_dir"]).resolve())] = rec
    return out


def size_label(rec: RunRecord, records: dict[str, RunRecord] | None = None) -> str:
    """The size a run was planned at when no planner recorded it: a scratch run's
    ``model.size``; an XATL run's source's, when the source is a run's ``hf/`` export among
    ``records`` (resolved run dir -> record); else, for an outside source, the size-table name
    of the built model's shape, or ``L{layers}-d{width}`` (the config's ``model.size`` before
    the trainer built the model)."""
    c = rec.config
    if c.init.kind == "scratch":
        return c.model.size
    src = (records or {}).get(str(Path(c.init.source).parent.resolve())) if c.init.source else None
    if src is not None and src.config.init.kind == "scratch":
        return src.config.model.size
    # an outside source (a hub model, a folder): nothing planned a size; name its shape
    n, d = rec.model.get("num_hidden_layers"), rec.model.get("hidden_size")
    if not (n and d):  # not built yet: the config's own size field is all there is
        return c.model.size
    from xatl_ds.sizes import SIZES

    return next((name for name, z in SIZES.items() if (z.n_layers, z.d_model) == (int(n), int(d))), f"L{int(n)}-d{int(d)}")


def _attention_layers(rec: RunRecord) -> str:
    """Which layers the trainer built with attention, as a label: ``none``, ``all`` or ``1,3``
    (the config's own spec before the trainer has built the model)."""
    mixers, built = rec.model.get("layer_mixers"), rec.model.get("attention_layers")
    n = rec.model.get("num_hidden_layers")
    if mixers:
        idx, n = [i for i, m in enumerate(mixers) if m == "attention"], len(mixers)
    elif isinstance(built, list) and n:  # the built config holds the resolved indices
        idx = [int(i) for i in built]
    else:
        return str(rec.config.model.attention_layers)
    if not idx:
        return "none"
    return "all" if len(idx) == n else ",".join(str(i) for i in idx)


def _order_label(order: Any) -> str:
    if isinstance(order, str):
        return order
    if isinstance(order, list):
        return " > ".join(",".join(s) if isinstance(s, list) else str(s) for s in order)
    return str(order)


def _last(m: pd.DataFrame, col: str) -> float:
    return float(m[col].dropna().iloc[-1]) if not m.empty and col in m and m[col].notna().any() else math.nan


def recipe_label(config: RunConfig) -> str:
    """The conversion recipe in one token: how the new mixers start (``random``, ``zero_out``,
    ``attention``; ``scratch`` for a scratch run), then ``+align`` for an alignment stage and
    ``+kl`` for distillation (``+distill`` when its KL weights are 0: cross-entropy alone)."""
    init, distill = config.init, config.distill
    parts = [str(init.mixer or "random") if init.kind == "xatl" else "scratch"]
    if config.align.enabled:
        parts.append("align")
    if distill.enabled:
        parts.append("kl" if (distill.kl_weight or distill.reverse_kl_weight) else "distill")
    return "+".join(parts)


def _flops(meta: dict, m: pd.DataFrame) -> tuple[float, float]:
    """``(student, teacher)`` FLOPs a run spent (teacher: a distillation teacher's forward passes)."""
    student = float(meta.get("flops", _last(m, "flops")))
    teacher = meta.get("teacher_flops", _last(m, "teacher_flops"))
    return student, float(teacher) if teacher is not None and math.isfinite(float(teacher)) else 0.0


def _row(rec: RunRecord, root: Path, records: dict[str, RunRecord]) -> dict:
    c, meta, m = rec.config, rec.meta, rec.metrics
    init, fr = c.init, c.freeze
    xatl = init.kind == "xatl"
    budget = {k: getattr(c.budget, k) for k in ("steps", "tokens", "flops") if getattr(c.budget, k) is not None}
    n_layers, d_model = rec.model.get("num_hidden_layers"), rec.model.get("hidden_size")
    if not n_layers and not xatl:  # not built yet: a scratch run's size fixes its model
        from xatl_ds.sizes import get_size

        n_layers, d_model = get_size(c.model.size).n_layers, get_size(c.model.size).d_model
    curve = rec.val_curve
    events = rec.unfreeze_events
    student, teacher = _flops(meta, m)
    tr = meta.get("transfer") or {}
    try:
        rel = str(rec.run_dir.relative_to(root))
    except ValueError:
        rel = str(rec.run_dir)
    row: dict[str, Any] = {
        "run": rel, "run_dir": str(rec.run_dir), "name": meta.get("name") or c.name or rec.run_dir.name,
        "state": rec.state, "size": size_label(rec, records), "n_layers": n_layers, "d_model": d_model,
        "family": rec.model.get("family") or c.model.family,
        "mixer": c.model.mixer, "attention_layers": _attention_layers(rec),
        "init_kind": init.kind, "source": init.source if xatl else None,
        "components": ",".join(init.components or []) if xatl else None,
        "freeze_policy": fr.policy if xatl else None,
        "unfreeze_order": _order_label(fr.unfreeze_order) if xatl else None,
        "lit_threshold": fr.threshold if xatl else None,
        "lit_patience": fr.patience if xatl else None,
        "lit_window": fr.window if xatl else None,
        "rewarmup_steps": fr.rewarmup_steps if xatl else None,
        "seed": c.seed, "budget_kind": next(iter(budget), None),
        "budget": float(next(iter(budget.values()))) if budget else math.nan,
        "lr": c.optim.lr,
        "steps": meta.get("steps", _last(m, "step")), "tokens": meta.get("tokens", _last(m, "tokens")),
        "flops": student + teacher, "student_flops": student, "teacher_flops": teacher,
        "teacher_share": teacher / (student + teacher) if student + teacher > 0 else math.nan,
        "recipe": recipe_label(c), "wall_time": meta.get("wall_time", _last(m, "wall_time")),
        "final_val_loss": float(curve["val_loss"].iloc[-1]) if len(curve) else math.nan,
        "best_val_loss": float(curve["val_loss"].min()) if len(curve) else math.nan,
        "best_val_flops": float(curve.loc[curve["val_loss"].idxmin(), "flops"]) if len(curve) and "flops" in curve else math.nan,
        "n_unfreeze": len(events), "first_unfreeze_step": events[0].get("step") if events else None,
        "first_unfreeze_flops": events[0].get("flops") if events else None,
        "transferred_fraction": tr.get("fraction"), "transferred_fraction_no_embed": tr.get("fraction_no_embed"),
        "config_hash": meta.get("config_hash"), "has_eval": bool(rec.eval.get("tasks")),
    }  # fmt: skip
    for task, r in (rec.eval.get("tasks") or {}).items():
        for metric, v in (r.get("metrics") or {}).items():
            row[f"{EVAL_PREFIX}{task}/{metric}"] = v.get("value")
            row[f"{EVAL_PREFIX}{task}/{metric}_stderr"] = v.get("stderr")
    return row


def results_table(root: str | Path, records: list[RunRecord] | None = None) -> pd.DataFrame:
    """One row per run directory under ``root`` (see the module docstring for the columns'
    sources); ``source_flops`` is filled when an XATL run's source is another run's ``hf/``;
    ``baseline_run`` is the planner's pairing (None for runs no planner recorded)."""
    root = Path(root)
    records = records if records is not None else load_runs(root)[0]
    by_dir = {str(r.run_dir.resolve()): r for r in records}
    df = pd.DataFrame([_row(r, root, by_dir) for r in records])
    if df.empty:
        return df
    plans = plan_records(root)
    by_dir = {str(r.run_dir.resolve()): run for r, run in zip(records, df["run"])}
    planned = [plans.get(str(r.run_dir.resolve())) for r in records]
    df["baseline_run"] = [by_dir.get(p.get("baseline_dir")) if p else None for p in planned]
    df["planned"] = [p is not None for p in planned]
    df["size"] = [p["size"] if p and p.get("size") else s for p, s in zip(planned, df["size"])]
    # sources trained in the sweep: a source path that is some run's hf export
    by_hf = {}
    for r in records:
        by_hf[str((r.run_dir / "hf").resolve())] = r.meta.get("flops")
    df["source_flops"] = [
        by_hf.get(str(Path(s).resolve())) if isinstance(s, str) and s else np.nan for s in df["source"]
    ]
    df["source_flops"] = pd.to_numeric(df["source_flops"], errors="coerce")
    _teacher_recovery(df, records)
    return df


def _teacher_recovery(df: pd.DataFrame, records: list[RunRecord]) -> None:
    """Beside each run, its teacher (its XATL source, or ``distill.teacher``): the teacher's
    validation loss (measured by the trainer), the gap to it, and for every benchmark metric
    the share of the teacher's score retained when the teacher is a run of this table."""
    df["teacher_val_loss"] = [r.meta.get("teacher_val_loss", math.nan) for r in records]
    df["gap_to_teacher"] = df["final_val_loss"] - df["teacher_val_loss"]
    row_of_hf = {str((r.run_dir / "hf").resolve()): i for i, r in zip(df.index, records)}
    teachers = []
    for r, src in zip(records, df["source"]):
        t = r.config.distill.teacher or src
        teachers.append(row_of_hf.get(str(Path(t).resolve())) if isinstance(t, str) and t else None)
    df["teacher_run"] = [df.at[j, "run"] if j is not None else None for j in teachers]
    for col in [c for c in df.columns if c.startswith(EVAL_PREFIX) and not c.endswith("_stderr")]:
        vals = []
        for i, j in zip(df.index, teachers):
            tv = df.at[j, col] if j is not None else math.nan
            ok = j is not None and isinstance(tv, (int, float)) and math.isfinite(tv) and tv != 0
            vals.append(float(df.at[i, col]) / float(tv) if ok else math.nan)
        df["retained/" + col[len(EVAL_PREFIX):]] = vals
