"""A study file: what an Optuna study over XATL settings searches, and its trials as runs.

A study YAML::

    study_name: lit_search
    storage: null            # default sqlite:///<yaml dir>/<study_name>.db; any RDB URL
                             # (postgresql://user@host/db) or journal:PATH (JournalFileBackend)
    out_dir: runs/studies/lit_search   # trial k trains in <out_dir>/trials/<k>
    n_trials: 20             # trials (COMPLETE or PRUNED) the study should reach, all workers together
    base: {...}              # a run config; init.source may be "@source" (see source:)
    source: {...}            # optional source run, trained once by the first worker (as in sweeps)
    search_space:
      freeze.threshold: {type: float, low: 0.001, high: 0.05, log: true}
      freeze.patience: {type: int, low: 1, high: 3}
      freeze.unfreeze_order: {type: categorical, choices: {all: all, staged: "norms > mlp > embed,lm_head"}}
      init.components: {type: categorical, choices: {paper: [embed, lm_head, ...], no_mlp: [...]}}
      optim.lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
      model.attention_layers: {type: layers, n_layers: 6, k_low: 1, k_high: 2}   # which k layers keep attention
    objective: {metrics: [val_loss]}   # or [val_loss, flops_to_target] with target_loss: 5.0
    pruner: {type: median, n_startup_trials: 2, n_warmup_steps: 20}  # median | hyperband | none
    sampler: {type: tpe, seed: 0}
    heartbeat: {interval: 60, grace_period: 180, max_retry: 2}
    launch: {num_gpus: 1}
    references:              # named settings to compare with (search-space values; choice names)
      paper: {freeze.threshold: 0.01, freeze.patience: 1, freeze.unfreeze_order: all, ...}
    confirm: {seeds: [100, 101, 102]}   # xatl-ds tune FILE --confirm (see xatl_ds.confirm)

Categorical ``choices`` may be a list of plain values or a mapping name -> value (Optuna
stores the name; the run config gets the value), which is how unfreeze orders and component
sets are searched.

The objective is the final validation loss at the base's budget (set ``budget.flops`` for a
fixed compute budget). ``flops_to_target`` is the cumulative training FLOPs at the first
evaluation whose val loss is <= ``objective.target_loss`` (``inf`` if never). Multi-objective
studies cannot prune (Optuna does not support it); single-objective ones report every
validation loss as it is logged (``trial.report(val_loss, step)``) and stop a pruned trial's
process group (SIGTERM, SIGKILL after ``stop_grace`` seconds).

References: each named setting gives every search-space parameter a value (a categorical's
choice name). A new study runs them first (``enqueue_trial``), so the study sees them beside
its samples; ``xatl-ds tune FILE --confirm`` re-trains the best trial and every reference on
the fresh ``confirm.seeds`` (:mod:`xatl_ds.confirm`), because the best trial's own value is
selected on noise.

Sampling: each worker's sampler draws independently of the others. A ``sampler.seed`` is
combined with the worker id and the number of trials the study already holds, so two workers
(or a restarted one) never replay one sequence of draws, and a fresh single-worker study is
still reproducible.

Sources: ``source:`` is placed like a sweep's (``<out_dir>/runs/<name>-<hash>/``, see
:func:`xatl_ds.runspec.source_spec`) and trained once by the first worker.

Running a study is :mod:`xatl_ds.tune`'s job; this module reads the file, checks it (the base
config and every search-space value against the run config), builds Optuna's pruner and
sampler, and plans trials (:func:`trial_spec`: a :class:`~xatl_ds.runspec.RunSpec` like any
other run).
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .executor import LaunchOptions
from .runspec import SOURCE_REF, PlanError, RunSpec, check_name, place, source_spec

__all__ = ["OBJECTIVES", "StudyError", "StudySpec", "load_study", "source_run", "trial_config", "trial_spec",
           "make_pruner", "make_sampler", "worker_seed", "layer_choice", "params_to_values"]  # fmt: skip

OBJECTIVES = ("val_loss", "flops_to_target")
_STUDY_KEYS = {"study_name", "storage", "out_dir", "n_trials", "base", "source", "search_space", "objective",
               "pruner", "sampler", "heartbeat", "launch", "trial_command", "stop_grace", "max_failures",
               "references", "confirm"}  # fmt: skip


class StudyError(ValueError):
    """A study file is wrong; the message names the field and the fix."""


@dataclass
class StudySpec:
    """A parsed study file (see the module docstring)."""

    study_name: str
    storage: str
    root: Path
    base: dict
    search_space: dict[str, dict]
    metrics: list[str] = field(default_factory=lambda: ["val_loss"])
    target_loss: float | None = None
    n_trials: int = 10
    source: dict | None = None
    pruner: dict = field(default_factory=lambda: {"type": "median"})
    sampler: dict = field(default_factory=lambda: {"type": "tpe", "seed": 0})
    heartbeat: dict = field(default_factory=lambda: {"interval": 60, "grace_period": 180, "max_retry": 2})
    launch: LaunchOptions = field(default_factory=LaunchOptions)
    trial_command: list[str] | None = None
    """Replaces the deepspeed command (placeholders ``{config}``, ``{out_dir}``, ``{trial}``):
    for custom launchers (srun wrappers) and plumbing tests."""
    stop_grace: float = 30.0
    max_failures: int = 3
    """A worker stops after this many consecutive failed trials."""
    references: dict[str, dict] = field(default_factory=dict)
    """Name -> a complete setting of the search space (Optuna param values, choice names)."""
    confirm_seeds: list[int] = field(default_factory=list)
    """Fresh seeds on which ``--confirm`` re-trains the best trial and the references."""
    path: Path | None = None


_PARAM_TYPES = ("float", "int", "categorical", "layers")


def load_study(source: str | Path | dict) -> StudySpec:
    """Read and check a study file; the base config and every search-space key are validated
    against the run config (a sample at the low end, high end and every choice)."""
    from .config import ConfigError, load_run_config, read_yaml_source

    data, path = read_yaml_source(source, "study file", StudyError, needs="base: and search_space:")
    unknown = sorted(set(data) - _STUDY_KEYS)
    if unknown:
        raise StudyError(f"unknown study key(s) {unknown}; valid: {sorted(_STUDY_KEYS)}")
    name = str(data.get("study_name") or (path.stem if path else "study"))
    try:
        check_name(name, "study_name")  # it names the default storage file and the trial runs
    except PlanError as e:
        raise StudyError(str(e)) from None
    here = path.resolve().parent if path else Path.cwd()
    storage = data.get("storage") or f"sqlite:///{here / (name + '.db')}"
    space = data.get("search_space") or {}
    if not isinstance(space, dict) or not space:
        raise StudyError("search_space: must map dotted run config keys to {type: float|int|categorical, ...}")
    for key, spec in space.items():
        _check_param(key, spec)
    obj = data.get("objective") or {}
    metrics = obj.get("metrics", ["val_loss"])
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    bad = [m for m in metrics if m not in OBJECTIVES]
    if bad or not metrics or len(set(metrics)) != len(metrics):
        raise StudyError(f"objective.metrics={metrics}: choose distinct ones of {list(OBJECTIVES)}")
    target = obj.get("target_loss")
    if "flops_to_target" in metrics and target is None:
        raise StudyError("objective.metrics has flops_to_target: set objective.target_loss (a val loss to reach)")
    try:
        launch = LaunchOptions.from_dict(data.get("launch"), "launch")
    except ValueError as e:
        raise StudyError(str(e)) from None
    pruner = data.get("pruner") or {"type": "none"}
    sampler = data.get("sampler") or {"type": "tpe", "seed": 0}
    hb = {"interval": 60, "grace_period": 180, "max_retry": 2, **(data.get("heartbeat") or {})}
    spec = StudySpec(
        study_name=name, storage=str(storage), root=Path(data.get("out_dir") or f"runs/studies/{name}"),
        base=data.get("base") or {}, search_space=space, metrics=metrics, target_loss=target,
        n_trials=int(data.get("n_trials", 10)), source=data.get("source"), pruner=pruner, sampler=sampler,
        heartbeat=hb, launch=launch, trial_command=data.get("trial_command"),
        stop_grace=float(data.get("stop_grace", 30.0)), max_failures=int(data.get("max_failures", 3)), path=path,
        references=_references(data.get("references"), space), confirm_seeds=_confirm_seeds(data.get("confirm")),
    )  # fmt: skip
    trial_seed = int(spec.base.get("seed", 0))
    if trial_seed in spec.confirm_seeds:
        raise StudyError(f"confirm.seeds has {trial_seed}, the seed every trial ran with (base seed): "
                         "confirmation needs fresh seeds")  # fmt: skip
    make_pruner(spec), make_sampler(spec)  # fail now on bad options
    _validate_space(spec)
    for name, ref in spec.references.items():
        try:
            load_run_config(trial_config(spec, params_to_values(spec, ref), 0))
        except (ConfigError, PlanError) as e:
            raise StudyError(f"references.{name}: {e}") from None
    return spec


def _references(raw: Any, space: dict) -> dict[str, dict]:
    """``references:`` checked against the search space: every parameter set, each value in
    its range or among its choice names."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise StudyError("references: must map a name to a setting {dotted key: value} of the search space")
    out = {}
    for name, ref in raw.items():
        what = f"references.{name}"
        try:
            check_name(str(name), "references name")
        except PlanError as e:
            raise StudyError(str(e)) from None
        if not isinstance(ref, dict):
            raise StudyError(f"{what}: must be a mapping {{dotted key: value}} over the search space")
        extra, missing = sorted(set(ref) - set(space)), sorted(set(space) - set(ref))
        if extra:
            raise StudyError(f"{what}: {extra} not in search_space; a reference sets search-space keys only")
        if missing:
            raise StudyError(f"{what}: give a value for every search-space key; missing {missing}")
        for key, v in ref.items():
            p = space[key]
            if p["type"] == "layers":
                raise StudyError(f"{what}.{key}: references cannot set a layers parameter; fix model.attention_layers in base")
            if p["type"] == "categorical":
                names = list(p["choices"])
                if v not in names:
                    raise StudyError(f"{what}.{key}={v!r}: not a choice; choose one of {names}")
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or not float(p["low"]) <= v <= float(p["high"]):
                raise StudyError(f"{what}.{key}={v!r}: give a number in [{p['low']}, {p['high']}]")
            elif p["type"] == "int" and int(v) != v:
                raise StudyError(f"{what}.{key}={v!r}: an int parameter needs an integer")
        out[str(name)] = dict(ref)
    return out


def _confirm_seeds(raw: Any) -> list[int]:
    if raw is None:
        return []
    seeds = raw.get("seeds") if isinstance(raw, dict) and set(raw) <= {"seeds"} else None
    ok = isinstance(seeds, list) and len(seeds) >= 2 and len(set(seeds)) == len(seeds)
    if not ok or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seeds):
        raise StudyError("confirm: must be {seeds: [a, b, ...]}: at least 2 distinct non-negative seeds, "
                         "none of them the base's seed the trials ran with")  # fmt: skip
    return list(seeds)


def _check_param(key: str, spec: Any) -> None:
    if not isinstance(spec, dict) or spec.get("type") not in _PARAM_TYPES:
        raise StudyError(f"search_space.{key} needs type: one of {list(_PARAM_TYPES)}")
    t = spec["type"]
    if t in ("float", "int"):
        if "low" not in spec or "high" not in spec or not float(spec["low"]) <= float(spec["high"]):
            raise StudyError(f"search_space.{key}: a {t} needs low <= high")
        if spec.get("log") and float(spec["low"]) <= 0:
            raise StudyError(f"search_space.{key}: log: true needs low > 0")
    elif t == "layers":
        n, lo, hi = spec.get("n_layers"), spec.get("k_low", 1), spec.get("k_high", spec.get("k_low", 1))
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (n, lo, hi))
        if not ok or not 0 <= lo <= hi <= n or n < 1:
            raise StudyError(f"search_space.{key}: layers needs n_layers (the model's layer count) and "
                             "0 <= k_low <= k_high <= n_layers: which k of the n layers keep attention")  # fmt: skip
    else:
        ch = spec.get("choices")
        if not isinstance(ch, (list, dict)) or not ch:
            raise StudyError(f"search_space.{key}: categorical needs choices: a list or a mapping name -> value")
        if isinstance(ch, list) and not all(v is None or isinstance(v, (bool, int, float, str)) for v in ch):
            raise StudyError(f"search_space.{key}: list choices must be plain values; name structured ones "
                             "with a mapping, e.g. choices: {paper: [embed, mlp]}")  # fmt: skip


def _param_values(spec: dict) -> list[Any]:
    """The values a parameter's checks try: the range ends, or every choice."""
    t = spec["type"]
    if t == "float":
        return [float(spec["low"]), float(spec["high"])]
    if t == "int":
        return [int(spec["low"]), int(spec["high"])]
    if t == "layers":  # the first k and the last k layers, at both ends of k
        n, lo, hi = spec["n_layers"], spec.get("k_low", 1), spec.get("k_high", spec.get("k_low", 1))
        return [list(range(lo)), list(range(n - hi, n))]
    ch = spec["choices"]
    return list(ch.values()) if isinstance(ch, dict) else list(ch)


def _validate_space(spec: StudySpec) -> None:
    from .config import ConfigError, load_run_config

    def check(params: dict, what: str) -> None:
        try:
            load_run_config(trial_config(spec, params, 0))
        except (ConfigError, PlanError) as e:
            raise StudyError(f"{what}: {e}") from None

    low = {k: _param_values(v)[0] for k, v in spec.search_space.items()}
    check(low, "the base config with every parameter at its first value")
    for key, p in spec.search_space.items():
        for v in _param_values(p)[1:]:
            check({**low, key: v}, f"search_space.{key}={v!r}")


def source_run(spec: StudySpec) -> RunSpec | None:
    """The study's source run, placed as a sweep places its source; None without one."""
    try:
        return source_spec(spec.root, spec.base, spec.source)
    except PlanError as e:
        raise StudyError(str(e)) from None


def _with_params(spec: StudySpec, params: dict) -> dict:
    from .config import ConfigError, set_dotted

    cfg = copy.deepcopy(spec.base)
    for k, v in params.items():
        try:
            set_dotted(cfg, k, v)
        except ConfigError as e:
            raise StudyError(f"search_space.{k}: {e}") from None
    return cfg


def trial_config(spec: StudySpec, params: dict, number: int) -> dict:
    """The run config (a dict) of trial ``number`` with sampled ``params`` (already mapped
    from choice names to values), its ``@source`` resolved: what ``best.yaml`` and the
    confirmation sweep start from."""
    cfg = _with_params(spec, params)
    if (cfg.get("init") or {}).get("source") == SOURCE_REF:
        if spec.source is None:
            raise StudyError(f"base init.source is {SOURCE_REF!r} but the study has no source: section")
        cfg["init"]["source"] = str(source_run(spec).dir.hf)
    cfg["name"] = f"{spec.study_name}-t{number}"
    cfg["out_dir"] = str(spec.root / "trials" / f"{number:04d}")
    return cfg


def trial_spec(spec: StudySpec, params: dict, number: int) -> RunSpec:
    """Trial ``number`` as a placed run (validated once; it needs the study's source run),
    training in ``<out_dir>/trials/<number>`` so that a retry resumes its failed trial's run."""
    src = source_run(spec)
    try:
        return place(spec.root, _with_params(spec, params), f"{spec.study_name}-t{number}", role="trial",
                     sources={SOURCE_REF: src} if src else None, out_dir=spec.root / "trials" / f"{number:04d}")
    except PlanError as e:
        raise StudyError(str(e)) from None


# -- Optuna's pruner and sampler (built at load time, so bad options fail first) -----------
def make_pruner(spec: StudySpec):
    import optuna

    opts = dict(spec.pruner)
    kind = opts.pop("type", "median")
    try:
        if kind == "median":
            return optuna.pruners.MedianPruner(**opts)
        if kind == "hyperband":
            return optuna.pruners.HyperbandPruner(**opts)
        if kind in ("none", None):
            return optuna.pruners.NopPruner()
    except TypeError as e:
        raise StudyError(f"pruner: {e}") from None
    raise StudyError(f"pruner.type={kind!r} is unknown; choose median, hyperband or none")


def worker_seed(seed: int, worker_id: str, n_existing: int) -> int:
    """A sampler seed of its own for each (worker, study size at start): ``seed`` keeps a study
    reproducible; the worker id and the trials already there keep workers and restarts from
    replaying each other's draws."""
    h = hashlib.sha256(f"{seed}/{worker_id}/{n_existing}".encode()).digest()
    return int.from_bytes(h[:4], "little")


def make_sampler(spec: StudySpec, worker_id: str | None = None, n_existing: int = 0):
    """The configured sampler; with ``worker_id`` its seed is made the worker's own."""
    import optuna

    opts = dict(spec.sampler)
    kind = opts.pop("type", "tpe")
    if worker_id is not None and opts.get("seed") is not None:
        opts["seed"] = worker_seed(int(opts["seed"]), worker_id, n_existing)
    try:
        if kind == "tpe":
            return optuna.samplers.TPESampler(**opts)
        if kind == "random":
            return optuna.samplers.RandomSampler(**opts)
    except TypeError as e:
        raise StudyError(f"sampler: {e}") from None
    raise StudyError(f"sampler.type={kind!r} is unknown; choose tpe or random")


def layer_choice(key: str, p: dict, get) -> list[int]:
    """Attention placement: ``k`` (an int parameter ``KEY.k``) and one score per layer
    (``KEY.score<i>`` in [0, 1)); the k best-scored layers keep attention. Scores let TPE learn
    which layers matter without enumerating the n-choose-k subsets."""
    n, lo, hi = p["n_layers"], p.get("k_low", 1), p.get("k_high", p.get("k_low", 1))
    k = get(f"{key}.k", "int", lo, hi)
    scores = [get(f"{key}.score{i}", "float", 0.0, 1.0) for i in range(n)]
    return sorted(sorted(range(n), key=lambda i: -scores[i])[:k])


def params_to_values(spec: StudySpec, params: dict) -> dict:
    """Optuna's stored params (choice names, placement scores) -> run config values."""
    out = {}
    for key, p in spec.search_space.items():
        if p["type"] == "layers":
            out[key] = layer_choice(key, p, lambda name, *_: params[name])
        elif key in params:
            ch = p.get("choices")
            out[key] = ch[params[key]] if isinstance(ch, dict) else params[key]
    return out
