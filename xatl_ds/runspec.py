"""A run as planned: a validated run config, its id, its directory and what it depends on.

A run is one typed value from plan to report: :func:`place` validates a config once and
returns a :class:`RunSpec` holding the :class:`~xatl_ds.config.RunConfig`; the scheduler
(:mod:`xatl_ds.scheduler`) writes it to the run directory's ``config.yaml``, the only serialised
copy (the trainer reads it there, ``meta.json`` refers to it, analysis reads it back typed).

Sweeps (:mod:`xatl_ds.sweep`), Optuna studies (:mod:`xatl_ds.tune`), confirmations and the
studies of :mod:`analysis.studies` are planners that turn their files into RunSpecs; all place
a source Transformer the same way
(:func:`source_spec`): a dependency node trained first, whose ``hf/`` export replaces the
``@source`` placeholder of the runs that transfer from it. A planner also records which
scratch run each XATL run is compared with (``baseline``), so analysis reads the pairing
instead of guessing it.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .rundir import RunDir

if TYPE_CHECKING:  # the config package is loaded when a run is placed, not on import
    from .config import RunConfig

__all__ = ["SOURCE_REF", "SOURCE_INHERITS", "RunSpec", "PlanError", "place", "source_spec", "check_name"]

#: placeholder for ``init.source``: the planner's own source run (its ``hf`` export);
#: ``@source:NAME`` names one of several (a sweep's ``sources:``)
SOURCE_REF = "@source"
#: sections a source run takes from the planner's base config unless it sets them
SOURCE_INHERITS = ("data", "deepspeed", "eval", "checkpoint", "log_every")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")


class PlanError(ValueError):
    """A planned run is wrong; the message names the run and field and the fix."""


def check_name(name: str, what: str) -> str:
    """Run names and labels become file names: letters, digits and ``._+=-`` only, no
    separators, no ``..``, not empty, at most 120 characters."""
    s = str(name)
    if not _NAME.match(s) or ".." in s or len(s) > 120:
        raise PlanError(f"{what}={s!r} is not a safe name: use letters, digits and . _ + = - (no '/', no '..', "
                        "not starting with '.' or '-', at most 120 characters)")  # fmt: skip
    return s


@dataclass
class RunSpec:
    """One planned run."""

    name: str
    """Readable name, e.g. ``mamba-xatl-lit-s0``."""
    id: str
    """``RunConfig.content_hash()``: changes whenever anything the run computes changes."""
    config: "RunConfig"
    """The validated run config (``out_dir`` filled in); never re-validated downstream."""
    root: Path
    """The planner's root folder (``runs/`` and ``logs/`` live below it)."""
    key: str = ""
    """The run's file stem: ``<name>-<id>``."""
    role: str = "run"
    """``source`` (a dependency node), ``run`` or ``trial``."""
    needs: list[str] = field(default_factory=list)
    """Keys of the runs whose outputs this one reads (its source)."""
    baseline: str | None = None
    """Key of the scratch run this (XATL) run is compared with."""
    labels: dict[str, str] = field(default_factory=dict)
    """Axis name -> the label of this run's value on it."""

    @property
    def dir(self) -> RunDir:
        return RunDir(self.config.out_dir)

    @property
    def out_dir(self) -> Path:
        return Path(self.config.out_dir)

    @property
    def config_path(self) -> Path:
        """Where the run's config lives: its directory's ``config.yaml``."""
        return self.dir.config

    @property
    def is_source(self) -> bool:
        return self.role == "source"

    @property
    def needs_source(self) -> bool:
        return bool(self.needs)

    @property
    def init_kind(self) -> str:
        return self.config.init.kind

    def write_config(self, path: Path | None = None) -> Path:
        """Write the config YAML (only when its text changed; the trainer writes the same text)
        to ``path`` (default :attr:`config_path`); returns the path."""
        p = path or self.config_path
        p.parent.mkdir(parents=True, exist_ok=True)
        text = self.config.to_yaml()
        if not p.is_file() or p.read_text() != text:
            p.write_text(text)
        return p


def _validated(cfg: dict, what: str):
    from .config import ConfigError, load_run_config

    try:
        return load_run_config(cfg)
    except ConfigError as e:
        raise PlanError(f"{what}: {e}") from None


def place(root: Path, cfg: dict, name: str, *, role: str = "run", sources: dict[str, RunSpec] | None = None,
          out_dir: Path | None = None) -> RunSpec:  # fmt: skip
    """Validate ``cfg`` and give it its id, key and directory (``root/runs/<key>`` unless
    ``out_dir``). A scratch run drops ``init.source`` (scratch twins share axes that name a
    source); a placeholder (``@source``, ``@source:NAME``; the keys of ``sources``) in
    ``init.source`` or ``distill.teacher`` becomes that run's export, whose path is part of the
    run's hash, and the run waits for it."""
    check_name(name, f"run name of {name!r}")
    cfg = copy.deepcopy(cfg)
    init = cfg.setdefault("init", {})
    if init.get("kind", "scratch") == "scratch":
        init.pop("source", None)
    needs: list[str] = []
    # a source and a teacher are the same kind of dependency: a planned run whose export is read
    for section, field_ in (("init", "source"), ("distill", "teacher")):
        node = cfg.get(section) or {}
        ref = node.get(field_)
        if not (isinstance(ref, str) and ref.startswith("@")):
            continue
        if not (ref == SOURCE_REF or ref.startswith(SOURCE_REF + ":")):
            raise PlanError(f"run {name}: {section}.{field_}={ref!r} is not a placeholder: write {SOURCE_REF!r} (this "
                            f"file's source), '{SOURCE_REF}:NAME' (one of its sources:) or a model directory or hub "
                            "name (which never starts with '@')")  # fmt: skip
        src = (sources or {}).get(ref)
        if src is None and not sources:
            raise PlanError(f"run {name}: {section}.{field_} is {ref!r} but there is no source: section (or sources:)")
        if src is None:
            raise PlanError(f"run {name}: {section}.{field_} is {ref!r}, which names none of this file's sources "
                            f"{sorted(sources)}")  # fmt: skip
        node[field_] = str(src.dir.hf)
        if src.key not in needs:
            needs.append(src.key)
    cfg["name"] = name
    cfg["out_dir"] = str(out_dir) if out_dir is not None else "<placed>"
    rc = _validated(cfg, f"run {name}")
    key = f"{name}-{rc.content_hash()}"
    rc.out_dir = str(out_dir if out_dir is not None else Path(root) / "runs" / key)
    return RunSpec(name=name, id=rc.content_hash(), config=rc, root=Path(root), key=key, role=role, needs=needs)


def source_spec(root: Path, base: dict, section: dict | None, name: str | None = None) -> RunSpec | None:
    """The source run of a planner: ``section`` over the ``SOURCE_INHERITS`` parts of
    ``base``, as an all-attention scratch model. None without a section."""
    if section is None:
        return None
    if not isinstance(section, dict):
        raise PlanError("source: must be a run config mapping for the source Transformer")
    from .config import merge_dicts

    inherited = {k: copy.deepcopy(base[k]) for k in SOURCE_INHERITS if k in base}
    defaults = {"model": {"mixer": "attention", "attention_layers": "none"}, "init": {"kind": "scratch"}}
    cfg = merge_dicts(merge_dicts(inherited, defaults), section)
    return place(root, cfg, str(cfg.pop("name", None) or name or "source"), role="source")


def size_of(spec: RunSpec, specs: dict[str, RunSpec]) -> str | None:
    """The size name the run was planned at: its own ``model.size`` for scratch runs, its
    source's for XATL runs from a planned source (None for an outside source)."""
    if spec.init_kind == "scratch":
        return spec.config.model.size
    for k in spec.needs:
        if k in specs:
            return specs[k].config.model.size
    return None


def record(spec: RunSpec, specs: dict[str, RunSpec]) -> dict[str, Any]:
    """What a planner's index stores about ``spec`` for analysis."""
    return {"id": spec.id, "name": spec.name, "key": spec.key, "role": spec.role, "config": str(spec.config_path),
            "out_dir": str(spec.out_dir), "needs": list(spec.needs), "baseline": spec.baseline,
            "labels": dict(spec.labels), "size": size_of(spec, specs)}  # fmt: skip
