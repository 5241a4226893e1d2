"""Scaling sweeps: a grid of run configs, launched one after another (or a few at a time)
through the ``deepspeed`` launcher, skipping finished runs and resuming broken ones.

Several sources (one per size, say): ``sources: {NAME: {...}}``, each referenced as
``init.source: "@source:NAME"`` (zip it with ``model.size`` in one axis).

A sweep YAML::

    name: quickstart                 # default: the file's stem
    out_dir: runs/sweeps/quickstart  # sweep root (relative to the working directory)
    launch: {num_gpus: 1}            # LaunchOptions defaults; command-line options win
    source:                          # optional: a source Transformer trained first
      model: {size: tiny}            # (defaults: mixer attention, init scratch; data,
      budget: {steps: 300}           #  deepspeed, eval, checkpoint come from base)
    base:                            # the run config every run starts from
      init: {source: "@source"}      # "@source" -> <root>/runs/<source run>/hf
      budget: {flops: 1.0e15}        # one FLOP budget for every run: compute-matched
    axes:                            # combined as a grid, in this order
      seed: [0, 1]                                    # a key -> values
      arch:                                           # keys zipped together
        zip: {model.mixer: [mamba, retnet], model.attention_layers: [none, paper]}
        labels: [mamba, retnet-hybrid]                # optional readable labels
      init:                                           # presets: dicts of overrides
        - {label: scratch, init.kind: scratch}
        - {label: xatl-lit, init.kind: xatl, freeze.policy: lit}

Budgets: set ``budget.flops`` (analytic training FLOPs, :mod:`xatl_ds.flops`) in ``base``
and every run, XATL or scratch, frozen or not, stops at the same compute; frozen steps
cost fewer FLOPs, so XATL runs take more steps for the same budget. ``budget.tokens``
matches data instead of compute.

A scratch run (``init.kind: scratch`` after the overrides) drops ``init.source``, so XATL and
scratch runs can share axes that set the source (e.g. zipped with ``model.size``).

Baselines. Each XATL run is paired with the scratch run that shares all its other axis values
and takes the first scratch value of the axis that sets ``init.kind`` (the *recipe axis*); the
pairing is written to ``sweep.json`` and read by ``xatl-ds report``. ``baseline: {budget_factor:
k}`` lets every scratch run train k times the base budget (the report then measures effective
compute: what scratch needs to reach each XATL loss).

Layout of the root: ``runs/<run>/`` (the trainer's out_dir, a :class:`xatl_ds.rundir.RunDir`,
whose ``config.yaml`` is the run's config), ``logs/<run>.log``, ``sweep.json`` and ``index.csv``
(run id, name, config path, state, return code, times, pairing). Running is the
:class:`~xatl_ds.scheduler.Scheduler`'s job; this module plans. ``<run>`` is
``<readable name>-<content hash>``; names and labels must be safe file names.
"""
from __future__ import annotations

import copy
import csv
import itertools
import json
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from .executor import LaunchOptions, cuda_devices
from .runspec import SOURCE_REF, PlanError, RunSpec, check_name, place, record, source_spec
from .scheduler import STATES, Scheduler, SchedulerError, dir_state

__all__ = ["SOURCE_REF", "STATES", "Sweep", "SweepError", "Index", "load_sweep", "select", "expand", "run_sweep",
           "status_rows", "format_table"]  # fmt: skip

_SWEEP_KEYS = {"name", "out_dir", "base", "axes", "source", "sources", "launch", "baseline"}
#: run config sections whose axis values make a recipe (what XATL and scratch runs differ in)
_RECIPE_PREFIXES = ("init.", "freeze.", "distill.", "align.")


class SweepError(PlanError):
    """A sweep file is wrong; the message names the run and field and the fix."""


@dataclass
class Axis:
    """One grid dimension: ``values[i]`` is a dict of dotted overrides with label ``labels[i]``."""

    name: str
    values: list[dict[str, Any]]
    labels: list[str]


@dataclass
class Sweep:
    """A parsed sweep file (see the module docstring)."""

    name: str
    root: Path
    base: dict
    axes: list[Axis]
    source: dict | None = None
    launch: LaunchOptions = field(default_factory=LaunchOptions)
    path: Path | None = None
    budget_factor: float = 1.0
    """Scratch runs train this many times the base budget (``baseline.budget_factor``)."""
    sources: dict[str, dict] = field(default_factory=dict)
    """Named source runs (``sources:``), referenced as ``@source:NAME``."""
    only: dict[str, list[str]] = field(default_factory=dict)
    """Axis name -> the labels to keep (:func:`select`); empty: the whole grid."""


# -- parsing -------------------------------------------------------------------------------
def load_sweep(source: str | Path | dict) -> Sweep:
    """Read and check a sweep file (or dict): structure only; :func:`expand` validates runs."""
    from .config import read_yaml_source

    data, path = read_yaml_source(source, "sweep file", SweepError, needs="base: and axes:")
    if not isinstance(data, dict):
        raise SweepError("a sweep file must be a mapping with base: and axes:")
    unknown = sorted(set(data) - _SWEEP_KEYS)
    if unknown:
        raise SweepError(f"unknown sweep key(s) {unknown}; valid: {sorted(_SWEEP_KEYS)}")
    name = str(data.get("name") or (path.stem if path else "sweep"))
    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise SweepError("base: must be a run config mapping")
    raw_axes = data.get("axes") or {}
    if not isinstance(raw_axes, dict):
        raise SweepError("axes: must be a mapping of axis name -> values (see xatl_ds/sweep.py)")
    axes = [_parse_axis(k, v) for k, v in raw_axes.items()]
    src = data.get("source")
    if src is not None and not isinstance(src, dict):
        raise SweepError("source: must be a run config mapping for the source Transformer")
    named = data.get("sources") or {}
    if not isinstance(named, dict) or not all(isinstance(v, dict) for v in named.values()):
        raise SweepError("sources: must map a name to a run config mapping per source (used as @source:NAME)")
    for k in named:
        try:
            check_name(str(k), "sources name")
        except PlanError as e:
            raise SweepError(str(e)) from None
    try:
        launch = LaunchOptions.from_dict(data.get("launch"), "launch")
    except ValueError as e:
        raise SweepError(str(e)) from None
    try:
        check_name(name, "sweep name")
    except PlanError as e:
        raise SweepError(str(e)) from None
    factor = _budget_factor(data.get("baseline"))
    root = Path(data.get("out_dir") or f"runs/sweeps/{name}")
    return Sweep(name=name, root=root, base=base, axes=axes, source=src, launch=launch, path=path, budget_factor=factor,
                 sources={str(k): v for k, v in named.items()})


def _budget_factor(spec: Any) -> float:
    import math

    if spec is None:
        return 1.0
    if not isinstance(spec, dict) or set(spec) - {"budget_factor"}:
        raise SweepError("baseline: must be a mapping {budget_factor: K} (K >= 1: scratch runs train K times the budget)")
    k = spec.get("budget_factor", 1.0)
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or k < 1:
        raise SweepError(f"baseline.budget_factor={k!r} must be a finite number >= 1")
    return float(k)


def _parse_axis(name: str, spec: Any) -> Axis:
    if isinstance(spec, dict) and "presets" in spec:
        spec = spec["presets"]
    if isinstance(spec, dict) and "zip" in spec:
        group = spec["zip"]
        if not isinstance(group, dict) or not group or not all(isinstance(v, list) for v in group.values()):
            raise SweepError(f"axes.{name}.zip must map config keys to lists of equal length")
        lengths = {k: len(v) for k, v in group.items()}
        if len(set(lengths.values())) != 1:
            raise SweepError(f"axes.{name}.zip: lists differ in length {lengths}; zipped keys need equal lengths")
        n = next(iter(lengths.values()))
        values = [{k: group[k][i] for k in group} for i in range(n)]
        labels = spec.get("labels")
        if labels is not None and (not isinstance(labels, list) or len(labels) != n):
            raise SweepError(f"axes.{name}.labels must be a list of {n} names, one per zipped value")
        labels = [str(x) for x in labels] if labels else ["-".join(t for k, v in d.items() if (t := _token(k, v))) for d in values]
        return _checked(Axis(name, values, labels))
    if not isinstance(spec, list) or not spec:
        raise SweepError(f"axes.{name} must be a non-empty list of values, a {{zip: ...}} group or a list of presets")
    if all(isinstance(v, dict) for v in spec):  # presets
        values, labels = [], []
        for i, preset in enumerate(spec):
            preset = dict(preset)
            label = preset.pop("label", None)
            if not preset:
                raise SweepError(f"axes.{name}[{i}] is an empty preset; give dotted overrides like init.kind: xatl")
            values.append(preset)
            labels.append(str(label) if label is not None else "-".join(t for k, v in preset.items() if (t := _token(k, v))))
        return _checked(Axis(name, values, labels))
    if any(isinstance(v, dict) for v in spec):
        raise SweepError(f"axes.{name} mixes presets (dicts) and plain values; use one kind")
    return _checked(Axis(name, [{name: v} for v in spec], [_token(name, v) for v in spec]))


def _checked(axis: Axis) -> Axis:
    """Labels become parts of file names: each must be safe (or empty: the part is left out)."""
    for i, lab in enumerate(axis.labels):
        if lab:
            try:
                check_name(lab, f"axes.{axis.name} label {i}")
            except PlanError as e:
                raise SweepError(str(e)) from None
    return axis

    

def _token(key: str, value: Any) -> str:
    """A short readable name part for ``key=value``."""
    last = key.split(".")[-1]
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        return ""
    if last == "seed":
        return f"s{value}"
    if last == "source" and isinstance(value, str):
        return "" if value == SOURCE_REF else Path(value.rstrip("/")).name.lower()
    if isinstance(value, bool):
        return last if value else f"no-{last}"
    if isinstance(value, (int, float)):
        return f"{last}{value:g}"
    if last == "attention_layers":
        return "attn" + ("_".join(map(str, value)) if isinstance(value, list) else f"-{value}")
    if isinstance(value, list):
        return "_".join(_token(key, v) if isinstance(v, (list, dict)) else str(v) for v in value)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(value))


# -- expansion -----------------------------------------------------------------------------
def _apply(base: dict, overrides: dict) -> dict:
    from .config import set_dotted

    out = copy.deepcopy(base)
    for k, v in overrides.items():
        try:
            set_dotted(out, k, v)
        except ValueError as e:
            raise SweepError(str(e)) from None
    return out


def _is_recipe_axis(axis: Axis) -> bool:
    return any(k == "init.kind" for v in axis.values for k in v)


def _scaled_budget(cfg: dict, factor: float) -> dict:
    """The config with its budget (steps, tokens or FLOPs) times ``factor``."""
    if factor == 1.0:
        return cfg
    cfg = copy.deepcopy(cfg)
    budget = cfg.get("budget") or {}
    for k in ("steps", "tokens", "flops"):
        if budget.get(k) is not None:
            v = float(budget[k]) * factor
            budget[k] = v if k == "flops" else int(round(v))
    return cfg


def select(sweep: Sweep, specs: list[str]) -> Sweep:
    """The sweep restricted to some labels of some axes, ``["size=mini,tiny", ...]``: a subset
    of the same runs (same ids and folders, so the full grid later skips what is done)."""
    only = dict(sweep.only)
    axes = {a.name: a for a in sweep.axes}
    for spec in specs:
        name, _, labels = spec.partition("=")
        if name not in axes or not labels:
            raise SweepError(f"--only {spec!r}: give AXIS=LABEL[,LABEL...] with an axis of {sorted(axes)}")
        wanted = [x.strip() for x in labels.split(",") if x.strip()]
        unknown = sorted(set(wanted) - set(axes[name].labels))
        if unknown:
            raise SweepError(f"--only {spec!r}: axis {name} has no label(s) {unknown}; its labels: {axes[name].labels}")
        only[name] = wanted
    return replace(sweep, only=only)


def expand(sweep: Sweep, world_size: int | None = None) -> list[RunSpec]:
    """Every run of the sweep (the source first), each validated, with its baseline; raises
    :class:`SweepError` naming the run and field on the first bad one. ``world_size`` also
    checks that each batch divides over that many ranks."""
    try:
        return _expand(sweep, world_size)
    except PlanError as e:
        raise SweepError(str(e)) from None


def _expand(sweep: Sweep, world_size: int | None) -> list[RunSpec]:
    runs: list[RunSpec] = []
    sources: dict[str, RunSpec] = {}
    if sweep.source is not None:
        sources[SOURCE_REF] = source_spec(sweep.root, sweep.base, sweep.source)
    for nm, section in sweep.sources.items():
        sources[f"{SOURCE_REF}:{nm}"] = source_spec(sweep.root, sweep.base, section, name=f"source-{nm}")
    runs.extend(sources.values())
    seen: dict[str, str] = {}
    recipe = [i for i, a in enumerate(sweep.axes) if _is_recipe_axis(a)]
    by_combo: dict[tuple, RunSpec] = {}
    for combo in itertools.product(*[list(zip(a.labels, a.values, range(len(a.values)))) for a in sweep.axes]):
        overrides: dict[str, Any] = {}
        for _, vals, _ in combo:
            overrides.update(vals)
        name = "-".join(lab for lab, _, _ in combo if lab) or sweep.name
        cfg = _apply(sweep.base, overrides)
        if (cfg.get("init") or {}).get("kind", "scratch") == "scratch":
            cfg = _scaled_budget(cfg, sweep.budget_factor)
        run = place(sweep.root, cfg, name, sources=sources)
        run.labels = {a.name: lab for a, (lab, _, _) in zip(sweep.axes, combo)}
        if run.id in seen:
            raise SweepError(f"runs {seen[run.id]} and {name} have identical configs (id {run.id}); "
                             "an axis changes nothing the run computes")  # fmt: skip
        seen[run.id] = name
        by_combo[tuple(i for _, _, i in combo)] = run
        runs.append(run)
    _pair(sweep, recipe, by_combo)
    if sweep.only:  # a subset of the grid, and the sources it needs
        keep = [r for r in runs if r.is_source or all(r.labels.get(a) in labs for a, labs in sweep.only.items())]
        needed = {k for r in keep for k in r.needs}
        runs = [r for r in keep if not r.is_source or r.key in needed]
    names = [r.name for r in runs]
    for r in runs:  # duplicate readable names: disambiguated by the key's hash anyway
        if names.count(r.name) > 1:
            r.name = r.key
    if world_size:
        check_world_size(runs, world_size)
    return runs


def check_world_size(runs: list[RunSpec], world_size: int) -> None:
    """Each run's batch divides over ``world_size`` ranks (else :class:`SweepError`)."""
    from .config import ConfigError

    for r in runs:
        try:
            r.config.batch_layout(world_size)
        except ConfigError as e:
            raise SweepError(f"run {r.name}: {e}") from None


def _pair(sweep: Sweep, recipe: list[int], by_combo: dict[tuple, RunSpec]) -> None:
    """Each XATL run's baseline: same values on every other axis, the first scratch value on
    the recipe axes. Without a recipe axis, the one scratch run with otherwise equal axes."""
    for combo, run in by_combo.items():
        if run.init_kind == "scratch":
            continue
        candidates = [r for c, r in by_combo.items() if r.init_kind == "scratch"
                      and all(c[i] == combo[i] for i in range(len(combo)) if i not in recipe)]  # fmt: skip
        if candidates:
            run.baseline = candidates[0].key


# -- the index -----------------------------------------------------------------------------
_INDEX_FIELDS = ("id", "name", "key", "config", "out_dir", "state", "returncode", "started", "finished", "pid",
                 "role", "baseline", "size")  # fmt: skip
_LAUNCH_FIELDS = ("state", "returncode", "started", "finished", "pid")


class Index:
    """``sweep.json`` + ``index.csv`` in the sweep root: one record per run (its plan, its
    pairing and its last launch, as the scheduler reported it)."""

    FILE = "sweep.json"

    def __init__(self, sweep: Sweep, runs: list[RunSpec]):
        self.root = sweep.root
        self.path = self.root / self.FILE
        old = {}
        if self.path.is_file():
            try:
                old = {r["key"]: r for r in json.loads(self.path.read_text()).get("runs", [])}
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                old = {}
        self.name = sweep.name
        self.file = str(sweep.path) if sweep.path else None
        specs = {r.key: r for r in runs}
        self.records: dict[str, dict] = {}
        for r in runs:
            rec = {k: None for k in _INDEX_FIELDS}
            rec.update({k: v for k, v in old.get(r.key, {}).items() if k in _LAUNCH_FIELDS})
            rec.update(record(r, specs))
            rec["state"] = dir_state(r, rec["state"])
            self.records[r.key] = rec

    def last_states(self) -> dict[str, str]:
        return {k: rec["state"] for k, rec in self.records.items()}

    def update(self, run: RunSpec, **kw: Any) -> None:
        self.records[run.key].update(kw)
        self.save()

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"name": self.name, "file": self.file, "runs": list(self.records.values())}, indent=1))
        tmp.replace(self.path)
        with open(self.root / "index.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=_INDEX_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(self.records.values())


# -- running: preflight, then the scheduler --------------------------------------------------
def _preflight(runs: list[RunSpec], world_size: int | None, gpus: int | None = None) -> None:
    """What would fail inside a launched rank, checked for every unfinished run before any
    starts (a source the sweep trains itself is checked when its run starts)."""
    from .preflight import PreflightError, preflight

    for r in runs:
        try:
            preflight(r.config, world_size=world_size, check_source=not r.needs, gpus=gpus)
        except PreflightError as e:
            raise SweepError(f"run {r.name}: {e}") from None


def launch_world_size(opts: LaunchOptions, max_parallel: int, n_devices: int) -> int:
    """The world size of each run of a sweep launched with ``opts`` (after the launcher's own
    checks: :func:`xatl_ds.preflight.check_launch`); concurrent runs on a GPU node each get
    ``num_gpus`` (default 1) devices."""
    from .preflight import PreflightError, check_launch

    try:
        world = check_launch(opts, n_devices)
    except PreflightError as e:
        raise SweepError(str(e)) from None
    if max_parallel > 1 and n_devices and not opts.hostfile:
        return opts.num_gpus or 1
    return world


def run_sweep(sweep: Sweep, opts: LaunchOptions | None = None, *, max_parallel: int = 1, dry_run: bool = False,
              out: TextIO | None = None, poll: float = 0.5, progress_every: float = 20.0,
              runs: list[RunSpec] | None = None) -> int:  # fmt: skip
    """Plan the sweep (or take its ``runs``, already expanded), check every run, and hand the
    runs to the :class:`~xatl_ds.scheduler.Scheduler` (the source first); returns 0 if all are
    done, 130 if interrupted (Ctrl-C or SIGTERM), 1 if a run failed or is trained by another
    process. ``out``: progress lines (default stdout)."""
    out = out or sys.stdout
    opts = sweep.launch.merged(opts)
    if max_parallel < 1:
        raise SweepError("--max-parallel must be >= 1")
    gpus = cuda_devices()
    world = launch_world_size(opts, max_parallel, gpus)
    if runs is None:
        runs = expand(sweep)  # everything validated before anything starts
    check_world_size(runs, world)
    _preflight(runs, world, gpus)
    try:
        sched = Scheduler(opts, logs=sweep.root / "logs", max_parallel=max_parallel,
                          n_devices=gpus if max_parallel > 1 else 0, out=out, poll=poll,
                          progress_every=progress_every)  # fmt: skip
        if dry_run:
            # the commands must run exactly as printed, so their configs exist, in a temporary folder:
            # nothing is written under the sweep root (a real run writes its run folders)
            import tempfile

            tmp = Path(tempfile.mkdtemp(prefix=f"xatl-ds-dry-run-{sweep.name}-"))
            print(f"# dry run: the run configs are in {tmp} (temporary); run the commands from this directory",
                  file=out)  # fmt: skip
            sched.dry_run(runs, tmp)
            return 0
        index = Index(sweep, runs)
        index.save()
        sched.on_update = index.update
        res = sched.run(runs, last=index.last_states())
    except SchedulerError as e:
        raise SweepError(str(e)) from None
    if res.interrupted:
        return res.code
    if res.failed:
        print(f"[sweep] {len(res.failed)} run(s) failed: {', '.join(res.failed)}", file=out)
        return res.code
    print(f"[sweep] all {len(runs)} runs done; index: {index.path}", file=out)
    return 0


def status_rows(sweep: Sweep) -> list[dict]:
    """One row per run: name, id, state, steps, last val loss, return code, out_dir."""
    runs = expand(sweep)
    index = Index(sweep, runs)
    rows = []
    for r in runs:
        rec = index.records[r.key]
        steps, val = r.dir.progress()
        rows.append({"name": r.name, "id": r.id, "state": rec["state"], "steps": steps, "val_loss": val,
                     "returncode": rec["returncode"], "out_dir": str(r.out_dir)})  # fmt: skip
    return rows


def format_table(rows: list[dict], cols: list[str]) -> str:
    cells = [[("-" if row[c] is None else f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c])) for c in cols]
             for row in rows]  # fmt: skip
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
