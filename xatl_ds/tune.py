"""Optuna studies over LIT settings, unfreeze orders, transferred components and the learning
rate. Every trial is a real training run through the ``deepspeed`` launcher, started by the one
scheduler (:mod:`xatl_ds.scheduler`): ask -> :func:`~xatl_ds.study_file.trial_spec` ->
scheduler -> tell. The study file's format: :mod:`xatl_ds.study_file`.

Crash safety: RDB storages (sqlite, PostgreSQL, MySQL) get Optuna's heartbeat; a worker that
dies mid-trial leaves a RUNNING trial whose heartbeat goes stale; the next worker marks it
FAIL and ``RetryFailedTrialCallback`` queues a retry with the same parameters, which trains in
the failed trial's directory (so the trainer resumes from its last checkpoint). Optuna 5's
journal storage has no heartbeat: there each worker records its host and pid on its trials,
and a starting worker fails (and retries) RUNNING trials whose worker on this host is gone.
The trial's process group dies with its worker (:mod:`xatl_ds.executor`), and a retry starts
only once the run directory's lock is free, so a trial never trains twice at once.

``best.yaml`` in ``out_dir``: the best trial as a runnable run config. Every trial records
``run_dir`` (and ``config``) as user attrs, so analysis can join trials with sweep runs.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
import warnings
from pathlib import Path

import yaml

from .executor import LaunchOptions
from .rundir import RunDir, pid_alive
from .runspec import RunSpec
from .scheduler import Scheduler, launch_command
from .study_file import (StudyError, StudySpec, layer_choice, load_study, make_pruner, make_sampler, params_to_values,
                         source_run, trial_config, trial_spec, worker_seed)  # fmt: skip

__all__ = ["StudyError", "StudySpec", "load_study", "trial_config", "params_to_values", "worker_seed", "open_study",
           "make_storage", "heartbeat_interval", "suggest", "Worker", "TrialFailed", "objective_values", "best_trial",
           "write_best"]  # fmt: skip


# -- Optuna objects ------------------------------------------------------------------------
def make_storage(spec: StudySpec):
    """sqlite/RDB URL -> RDBStorage with heartbeat and retry; ``journal:PATH`` -> JournalStorage."""
    import optuna
    from optuna.storages import RDBStorage

    url = spec.storage
    if url.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        p = Path(url[len("journal:"):])
        p.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(p)))
    if "://" not in url:
        raise StudyError(f"storage={url!r}: give an RDB URL (sqlite:///x.db, postgresql://...) or journal:PATH")
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    url = _pg_driver(url)
    hb = spec.heartbeat
    retry, kw = _retry_callback()
    with warnings.catch_warnings():  # heartbeat and retry are "experimental" in Optuna 5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(
            url, heartbeat_interval=int(hb["interval"]), grace_period=int(hb["grace_period"]),
            **{kw: retry(max_retry=int(hb["max_retry"]))},
            engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else {"connect_args": {"timeout": 60}},
        )  # fmt: skip


def _retry_callback():
    """Optuna >= 4.9 renamed RetryFailedTrialCallback (and the storage argument)."""
    import optuna.storages as st

    if hasattr(st, "RetryHeartbeatStaleTrialCallback"):
        return st.RetryHeartbeatStaleTrialCallback, "heartbeat_stale_trial_callback"
    return st.RetryFailedTrialCallback, "failed_trial_callback"


def _retried_trial_number(frozen) -> int | None:
    return _retry_callback()[0].retried_trial_number(frozen)


def _pg_driver(url: str) -> str:
    """SQLAlchemy 2.1 maps ``postgresql://`` to psycopg 3; use psycopg2 (the ``postgres``
    extra) when only that is installed."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            try:
                import psycopg  # noqa: F401
            except ImportError:
                return "postgresql+psycopg2://" + url[len(scheme):]
    return url


def open_study(spec: StudySpec, worker_id: str | None = None):
    """Create or load (``load_if_exists``) the study; ``worker_id`` gives the sampler the
    worker's own seed (see :func:`worker_seed`)."""
    import optuna

    directions = ["minimize"] * len(spec.metrics)
    study = optuna.create_study(
        study_name=spec.study_name, storage=make_storage(spec), sampler=make_sampler(spec),
        pruner=make_pruner(spec), directions=directions, load_if_exists=True,
    )  # fmt: skip
    if worker_id is not None:
        study.sampler = make_sampler(spec, worker_id, len(study.get_trials(deepcopy=False)))
    return study


def heartbeat_interval(study) -> int | None:
    """The storage's heartbeat interval, or None when it has none (journal storage). Optuna
    wraps an RDBStorage in a cache that still implements the heartbeat: ask the interface."""
    from optuna.storages import RDBStorage

    st = study._storage
    backend = getattr(st, "_backend", st)
    if not isinstance(backend, RDBStorage):
        return None
    return st.get_heartbeat_interval() if hasattr(st, "get_heartbeat_interval") else None


def suggest(trial, spec: StudySpec) -> dict:
    """Sample every search-space parameter; returns dotted key -> run config value."""
    out = {}

    def draw(name: str, kind: str, low, high):
        return trial.suggest_int(name, low, high) if kind == "int" else trial.suggest_float(name, low, high)

    for key, p in spec.search_space.items():
        if p["type"] == "layers":
            out[key] = layer_choice(key, p, draw)
        elif p["type"] == "float":
            out[key] = trial.suggest_float(key, float(p["low"]), float(p["high"]), log=bool(p.get("log")))
        elif p["type"] == "int":
            out[key] = trial.suggest_int(key, int(p["low"]), int(p["high"]), step=int(p.get("step", 1)),
                                         log=bool(p.get("log")))  # fmt: skip
        else:
            ch = p["choices"]
            name = trial.suggest_categorical(key, list(ch) if isinstance(ch, dict) else ch)
            out[key] = ch[name] if isinstance(ch, dict) else name
    return out


# -- one trial -----------------------------------------------------------------------------
class TrialFailed(RuntimeError):
    """The trial's training process failed (the trial is recorded FAIL, the worker goes on)."""


class _Surplus(RuntimeError):
    """Another worker already took the study's last trial."""


_EFFECTIVE = ("COMPLETE", "PRUNED", "RUNNING")


def _count(study, before: int | None = None) -> int:
    """Trials that count towards n_trials (finished or running, not FAIL, not WAITING),
    optionally only those numbered < ``before``."""
    return sum(t.state.name in _EFFECTIVE and (before is None or t.number < before)
               for t in study.get_trials(deepcopy=False))  # fmt: skip


class Worker:
    """Runs trials of one study until it has ``n_trials`` COMPLETE/PRUNED/RUNNING trials. Each
    trial is ask -> :func:`trial_spec` -> the :class:`~xatl_ds.scheduler.Scheduler` -> tell
    (Optuna's ``optimize`` asks and tells; the objective plans and hands the run over)."""

    def __init__(self, spec: StudySpec, opts: LaunchOptions | None = None, worker_id: str | None = None,
                 poll: float = 0.5, log=None):  # fmt: skip
        self.spec = spec
        self.opts = spec.launch.merged(opts)
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.log = log or sys.stdout
        # no signal handling: a worker that dies must leave a RUNNING trial for another to retry
        # (its runs die with it, see xatl_ds.executor)
        self.scheduler = Scheduler(self.opts, logs=spec.root / "logs", out=self.log, tag=f"tune {self.worker_id}",
                                   poll=poll, progress_every=None, lock_wait=30.0, stop_grace=spec.stop_grace,
                                   command=self.command, handle_signals=False)  # fmt: skip
        self._finished: list = []

    def say(self, msg: str) -> None:
        self.scheduler.say(msg)

    def command(self, run: RunSpec, config_path: Path, opts: LaunchOptions) -> list[str]:
        """A trial's (or the source's) command: the study's ``trial_command`` template, else the
        deepspeed launcher."""
        if not self.spec.trial_command:
            return launch_command(run, config_path, opts)
        number = int(run.out_dir.name) if run.role == "trial" else -1
        return [str(x).format(config=config_path, out_dir=run.out_dir, trial=number, python=sys.executable)
                for x in self.spec.trial_command]  # fmt: skip

    def ensure_source(self, study) -> None:
        """Train the study's source run once (a file lock keeps concurrent workers to one)."""
        src = source_run(self.spec)
        if src is None:
            return
        import fcntl

        self.spec.root.mkdir(parents=True, exist_ok=True)
        with open(self.spec.root / "source.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent workers: one trains, the others wait
            if src.dir.is_done():
                return
            self.say(f"training the source run in {src.out_dir}")
            res = self.scheduler.run([src])
            if res.states.get(src.key) != "done":
                raise StudyError(f"the source run failed (exit code {res.returncodes.get(src.key)}); see "
                                 f"{self.spec.root / 'logs' / (src.key + '.log')}")  # fmt: skip

    def enqueue_references(self, study) -> None:
        """A new study runs its references first; one worker enqueues them (a file lock for the
        workers of this machine, a study attribute for everyone)."""
        if not self.spec.references:
            return
        import fcntl

        self.spec.root.mkdir(parents=True, exist_ok=True)
        with open(self.spec.root / "references.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if study.user_attrs.get("references_enqueued"):
                return
            for name, ref in self.spec.references.items():
                study.enqueue_trial(ref, user_attrs={"reference": name}, skip_if_exists=True)
            study.set_user_attr("references_enqueued", sorted(self.spec.references))
            self.say(f"enqueued the references {sorted(self.spec.references)} as the first trials")

    def objective(self, trial):
        import optuna

        spec = self.spec
        trial.set_user_attr("worker", self.worker_id)
        # a retry trains in its original trial's directory: the trainer resumes from its checkpoint
        # (Optuna 5's Trial has no system_attrs: read the stored trial)
        first = _retried_trial_number(trial.study._storage.get_trial(trial._trial_id))
        if first is None and _count(trial.study, before=trial.number) >= spec.n_trials:
            trial.set_user_attr("surplus", True)  # two workers raced for the last trial
            raise _Surplus()
        params = suggest(trial, spec)
        run = trial_spec(spec, params, trial.number if first is None else first)
        src = source_run(spec)
        trial.set_user_attr("run_dir", str(run.out_dir))
        trial.set_user_attr("config", str(run.config_path))
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        self.say(f"trial {trial.number}: {params} -> {run.out_dir}")
        multi = len(spec.metrics) > 1
        pruned: list[str] = []

        def watch(_run: RunSpec, row: dict) -> bool:  # report each validation loss; stop a pruned run
            if row.get("val_loss") is None or multi:
                return False
            trial.report(float(row["val_loss"]), int(row["step"]))
            if trial.should_prune():
                pruned.append(f"val_loss {row['val_loss']} at step {row['step']}")
                self.say(f"trial {trial.number}: pruned at step {row['step']} (val loss {row['val_loss']:.4f})")
                return True
            return False

        res = self.scheduler.run([run], deps={src.key: src} if src else None, watch=watch)
        if res.interrupted:
            raise KeyboardInterrupt
        if pruned:
            raise optuna.TrialPruned(pruned[0])
        if res.states.get(run.key) != "done":
            raise TrialFailed(f"trial {trial.number}: the run did not finish (exit code "
                              f"{res.returncodes.get(run.key)}); see {self.spec.root / 'logs' / (run.key + '.log')}")  # fmt: skip
        values = objective_values(run.out_dir, spec)
        self.say(f"trial {trial.number}: {dict(zip(spec.metrics, values))}")
        return values if multi else values[0]

    def fail_dead_local_trials(self, study) -> None:
        """Journal storage (no heartbeat): fail and retry RUNNING trials whose worker on this
        host is gone."""
        import optuna

        if heartbeat_interval(study):
            return
        host = socket.gethostname()
        retry = _retry_callback()[0](max_retry=int(self.spec.heartbeat["max_retry"]))
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            pid = t.user_attrs.get("pid")
            if t.user_attrs.get("host") != host or pid is None or pid_alive(pid):
                continue
            try:
                study._storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            self.say(f"trial {t.number}: its worker (pid {pid}) is gone; marked FAIL")
            retry(study, study._storage.get_trial(t._trial_id))

    def run(self, n_trials: int | None = None) -> int:
        """Work until the study has ``n_trials`` (default: the file's) trials; returns the
        number of trials this worker finished."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with warnings.catch_warnings():  # heartbeat, retry and fail_stale_trials are "experimental"
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return self._run(n_trials)

    def _run(self, n_trials: int | None) -> int:
        import optuna

        study = open_study(self.spec, self.worker_id)
        if n_trials is not None:
            self.spec.n_trials = n_trials
        self.ensure_source(study)
        self.enqueue_references(study)
        done, failures = 0, 0
        heartbeat = heartbeat_interval(study)
        while True:
            self.fail_dead_local_trials(study)
            optuna.storages.fail_stale_trials(study)  # queues retries of trials whose worker died
            trials = study.get_trials(deepcopy=False)
            retries = any(t.state.name == "WAITING" and "failed_trial" in t.system_attrs for t in trials)
            if _count(study) >= self.spec.n_trials and not retries:
                if heartbeat and any(t.state.name == "RUNNING" for t in trials):
                    time.sleep(heartbeat)  # wait: a running trial may yet go stale and be retried
                    continue
                break
            self._finished.clear()
            study.optimize(self.objective, n_trials=1, catch=(TrialFailed, _Surplus), gc_after_trial=False,
                           callbacks=[lambda _s, t: self._finished.append(t)])  # fmt: skip
            for t in self._finished:
                if t.user_attrs.get("surplus"):
                    continue
                if t.state.name == "FAIL":
                    failures += 1
                    if failures >= self.spec.max_failures:
                        self.say(f"{failures} trials failed in a row; stopping this worker")
                        return done
                else:
                    failures, done = 0, done + 1
        write_best(study, self.spec)
        return done


def objective_values(run_dir: Path, spec: StudySpec) -> list[float]:
    """The objective values of a finished run (from its metrics.jsonl)."""
    rows = RunDir(run_dir).read_metrics()
    evals = [r for r in rows if r.get("val_loss") is not None]
    if not evals:
        raise TrialFailed(f"{run_dir}: no validation loss was logged")
    out = []
    for m in spec.metrics:
        if m == "val_loss":
            out.append(float(evals[-1]["val_loss"]))
        else:
            hit = [r for r in evals if r["val_loss"] <= spec.target_loss]
            out.append(float(hit[0]["flops"]) if hit else math.inf)
    return out


def best_trial(study, spec: StudySpec):
    """The best COMPLETE trial (lowest val loss; for multi-objective studies the Pareto trial
    with the lowest val loss), or None."""
    import optuna

    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        return None
    return min(study.best_trials if len(spec.metrics) > 1 else [study.best_trial], key=lambda t: t.values[0])


def write_best(study, spec: StudySpec) -> Path | None:
    """Write the best trial (lowest val loss; for multi-objective studies the Pareto trial with
    the lowest val loss) as a runnable run config ``<out_dir>/best.yaml``."""
    best = best_trial(study, spec)
    if best is None:
        return None
    cfg = trial_config(spec, params_to_values(spec, best.params), best.number)
    cfg["name"] = f"{spec.study_name}-best"
    cfg["out_dir"] = str(spec.root / "best")
    path = spec.root / "best.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    head = (f"# best trial {best.number} of study {spec.study_name}: {dict(zip(spec.metrics, best.values))}\n"
            f"# params: {json.dumps(best.params)}\n")  # fmt: skip
    path.write_text(head + yaml.safe_dump(cfg, sort_keys=False))
    return path
