"""The one scheduler: every kind of experiment hands it :class:`~xatl_ds.runspec.RunSpec` s.

Planners (sweep grids, Optuna trials, confirmation runs, the quickstart, the issue-20 studies)
only *plan*: they turn their files into RunSpecs and never start a process. The scheduler owns
everything about running them:

- skip-if-done (a finished run directory is never launched again) and resume (a broken one is
  relaunched; its trainer picks up the last checkpoint);
- dependencies: a run waits for the runs in its ``needs`` (its source, its teacher), and is
  skipped when one of them failed;
- slots: up to ``max_parallel`` runs at once, each with its own launch options (its own GPUs
  on a multi-GPU node, its own rendezvous port);
- lock waits: a run whose directory a live trainer still holds is given ``lock_wait`` seconds
  (a killed launcher's orphan lets go within about a second) and is otherwise not started;
- logs: ``<logs>/<key>.log``, one per run, appended across launches;
- watching: an optional ``watch(spec, row)`` sees every new metrics row of a running run and
  may stop it (Optuna's pruning);
- signals: the first Ctrl-C / SIGTERM / SIGHUP stops the running runs (their last checkpoints
  survive) and the call returns "interrupted".

One vocabulary of states (:data:`STATES`): the run directory's own (:data:`xatl_ds.rundir.STATES`:
pending, partial, running, done) plus ``failed``, the one thing only a launcher knows (its last
launch ended without DONE).
"""
from __future__ import annotations

import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, TextIO

from .executor import Launch, LaunchOptions, RunLocked, check_free, deepspeed_command, train_env, with_port
from .rundir import STATES as DIR_STATES
from .runspec import RunSpec

__all__ = ["STATES", "LOCK_WAIT", "Outcome", "Scheduler", "SchedulerError", "slot_options", "dir_state", "launch_command"]

STATES = DIR_STATES + ("failed",)
#: seconds a launch gives a run's previous trainer to let go of its lock (an orphan of a
#: killed launcher stops within about a second)
LOCK_WAIT = 15.0

#: ``command(spec, config_path, options) -> argv``: how one run is started (default: the
#: deepspeed launcher)
Command = Callable[[RunSpec, Path, LaunchOptions], list]
#: ``watch(spec, metrics_row) -> stop?``
Watch = Callable[[RunSpec, dict], bool]


class SchedulerError(ValueError):
    """Runs cannot be scheduled as asked (the message names the option and the fix)."""


def dir_state(spec: RunSpec, last: str | None = None) -> str:
    """The state of ``spec``: its directory's, or ``failed`` when its last launch (``last``, a
    state recorded by whoever ran it) failed or was running when its launcher went away."""
    s = spec.dir.state()
    if s in ("done", "running"):
        return s
    if last in ("running", "failed"):
        return "failed"
    return s


def slot_options(opts: LaunchOptions, slot: int, max_parallel: int, n_devices: int) -> LaunchOptions:
    """Launch options of concurrent slot ``slot``: on a GPU node its own ``--include
    localhost:<devices>`` block of ``num_gpus`` devices (ports are free per launch)."""
    if max_parallel <= 1:
        return opts
    o = replace(opts, extra=list(opts.extra))
    if opts.master_port:
        o.master_port = opts.master_port + slot
    if n_devices and not opts.hostfile:
        per = opts.num_gpus or 1
        if per * max_parallel > n_devices:
            raise SchedulerError(f"--max-parallel {max_parallel} x {per} GPUs per run needs {per * max_parallel} "
                                 f"devices; this node has {n_devices}")  # fmt: skip
        o.include = "localhost:" + ",".join(str(slot * per + i) for i in range(per))
        o.num_gpus = None
    return o


def launch_command(spec: RunSpec, config_path: Path, opts: LaunchOptions) -> list[str]:
    """The default command: the ``deepspeed`` launcher on the run's config."""
    return deepspeed_command(config_path, opts)


@dataclass
class Outcome:
    """What a :meth:`Scheduler.run` call ended with."""

    states: dict[str, str] = field(default_factory=dict)
    """Run key -> its state at the end (one of :data:`STATES`)."""
    returncodes: dict[str, int] = field(default_factory=dict)
    """Run key -> the exit code of its launch (launched runs only)."""
    failed: list[str] = field(default_factory=list)
    """Names of the runs that failed, could not start or were skipped for a failed dependency."""
    stopped: list[str] = field(default_factory=list)
    """Keys of the runs their ``watch`` stopped."""
    interrupted: bool = False

    @property
    def code(self) -> int:
        """A command's exit code: 130 interrupted, 1 something failed, else 0."""
        return 130 if self.interrupted else 1 if self.failed else 0


@dataclass
class Scheduler:
    """Runs RunSpecs (see the module docstring). One instance per planner invocation."""

    opts: LaunchOptions = field(default_factory=LaunchOptions)
    logs: Path | None = None
    """Folder of the per-run logs (default: ``<spec.root>/logs``)."""
    max_parallel: int = 1
    n_devices: int = 0
    """GPUs on this node to split among concurrent slots (0: do not split)."""
    out: TextIO | None = None
    """Progress lines (default stdout)."""
    tag: str = "sweep"
    poll: float = 0.5
    progress_every: float | None = 20.0
    """Seconds between progress lines for running runs (None: never)."""
    lock_wait: float = LOCK_WAIT
    stop_grace: float = 20.0
    command: Command = launch_command
    on_update: Callable[..., None] | None = None
    """``on_update(spec, state=..., **fields)`` after every change (a planner's index)."""
    handle_signals: bool = True
    """Stop the runs on the first Ctrl-C/SIGTERM/SIGHUP and return interrupted. Off for Optuna
    workers, whose death must leave a RUNNING trial that another worker retries."""

    def __post_init__(self) -> None:
        if self.max_parallel < 1:
            raise SchedulerError("--max-parallel must be >= 1")
        for slot in range(self.max_parallel):  # refuse a layout the node cannot hold before anything starts
            slot_options(self.opts, slot, self.max_parallel, self.n_devices)
        self.out = self.out or sys.stdout

    def say(self, msg: str) -> None:
        print(f"[{self.tag}] {msg}", file=self.out, flush=True)

    def _update(self, spec: RunSpec, **fields) -> None:
        if self.on_update is not None:
            self.on_update(spec, **fields)

    def dry_run(self, specs: list[RunSpec], folder: Path) -> None:
        """Print the command of every run, with its config written to ``folder`` (the commands
        run exactly as printed; nothing is written anywhere else). Each command names its own
        rendezvous port, free when printed: run side by side, or beside another job, they would
        otherwise all take DeepSpeed's default 29500."""
        taken: set[int] = set()
        for slot, r in enumerate(specs):
            path = r.write_config(folder / f"{r.key}.yaml")
            o = with_port(slot_options(self.opts, slot % self.max_parallel, self.max_parallel, self.n_devices), taken)
            taken.add(o.master_port or 0)
            print(f"# {r.name} [{r.id}] {'done' if r.dir.is_done() else 'todo'}", file=self.out)
            print(shlex.join(self.command(r, path, o)), file=self.out)

    def run(self, specs: list[RunSpec], *, deps: dict[str, RunSpec] | None = None, last: dict[str, str] | None = None,
            watch: Watch | None = None) -> Outcome:  # fmt: skip
        """Run every unfinished spec of ``specs`` in order, each once its ``needs`` are done.
        ``deps``: runs outside ``specs`` that some of them need (trained by someone else);
        ``last``: key -> the state a planner recorded at the last launch."""
        known = {**(deps or {}), **{r.key: r for r in specs}}
        res = Outcome()
        todo = []
        for r in specs:
            missing = [k for k in r.needs if k not in known]
            if missing:
                raise SchedulerError(f"run {r.name} needs {missing}, which no planner gave the scheduler")
            if r.dir.is_done():
                res.states[r.key] = "done"
                self.say(f"{r.name}: done, skipped")
            else:
                todo.append(r)
        active: dict[int, tuple[RunSpec, Launch, object]] = {}
        failed_keys: set[str] = set()
        stop_asked = threading.Event()
        next_report = time.monotonic() + (self.progress_every or 0)
        logs = {}

        def fail(r: RunSpec, why: str) -> None:
            self.say(f"{r.name}: {why}")
            failed_keys.add(r.key)
            res.failed.append(r.name)
            res.states[r.key] = "failed"

        def launch(r: RunSpec, slot: int) -> None:
            try:
                check_free(r.dir, wait=self.lock_wait)
            except RunLocked as e:
                fail(r, f"not started: {e}")
                return
            # a free port unless the options fix one: several runs or workers share a node
            opts = with_port(slot_options(self.opts, slot, self.max_parallel, self.n_devices))
            cmd = self.command(r, r.write_config(), opts)
            log_dir = self.logs or r.root / "logs"
            log_dir.mkdir(parents=True, exist_ok=True)
            log = logs[r.key] = open(log_dir / f"{r.key}.log", "a")
            log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
            log.flush()
            self.say(f"{r.name}: {'resuming' if r.dir.has_checkpoint() else 'starting'} (log {log.name})")
            ln = Launch(cmd, log=log, env=train_env()).start()
            res.states[r.key] = "running"
            self._update(r, state="running", pid=ln.pid, started=time.strftime("%Y-%m-%dT%H:%M:%S"), finished=None,
                         returncode=None)  # fmt: skip
            active[slot] = (r, ln, r.dir.tail() if watch else None)

        def reap(slot: int, rc: int) -> None:
            r, ln, _ = active.pop(slot)
            logs.pop(r.key).close()
            res.returncodes[r.key] = rc
            if r.key in res.stopped:
                state = dir_state(r)
                self.say(f"{r.name}: stopped by its watcher ({state})")
            elif rc == 0 and r.dir.is_done():
                state = "done"
                steps, val = r.dir.progress()
                self.say(f"{r.name}: done ({steps} steps, val loss {val})")
            elif stop_asked.is_set():  # the user's interrupt: "failed" by the vocabulary, not an error
                state = "failed"
                fail(r, f"stopped at step {r.dir.progress()[0]}; rerun to resume it from its last checkpoint")
            else:
                state = "failed"
                fail(r, f"FAILED (exit code {rc}; see {ln.log.name})")
            res.states[r.key] = state
            self._update(r, state=state, returncode=rc, pid=None, finished=time.strftime("%Y-%m-%dT%H:%M:%S"))

        def ready(r: RunSpec) -> bool:
            return all(known[k].dir.is_done() for k in r.needs)

        handlers = {}

        def on_signal(signum, frame):  # the first one stops the runs; a second Ctrl-C is a KeyboardInterrupt
            stop_asked.set()
            signal.signal(signum, handlers[signum] if signum == signal.SIGINT else on_signal)

        if self.handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                handlers[sig] = signal.signal(sig, on_signal)
        try:
            while (todo or active) and not stop_asked.is_set():
                for r in [r for r in todo if failed_keys.intersection(r.needs)]:
                    todo.remove(r)
                    fail(r, "skipped (a run it needs failed)")
                for slot in range(self.max_parallel):
                    if slot in active or stop_asked.is_set():
                        continue
                    nxt = next((r for r in todo if ready(r)), None)  # planners put dependencies first
                    if nxt is None:
                        break
                    todo.remove(nxt)
                    launch(nxt, slot)
                for slot, (r, ln, tail) in list(active.items()):
                    rc = ln.poll()
                    if tail is not None and r.key not in res.stopped:
                        if any(watch(r, row) for row in tail.new_rows()):
                            res.stopped.append(r.key)
                            rc = ln.stop(grace=self.stop_grace)
                    if rc is not None:
                        reap(slot, rc)
                if active and self.progress_every and time.monotonic() >= next_report:
                    next_report = time.monotonic() + self.progress_every
                    for r, _, _ in active.values():  # runs log to files: show progress here
                        steps, val = r.dir.progress()
                        self.say(f"{r.name}: step {steps}" + (f", val loss {val:.3f}" if val is not None else ""))
                if active:
                    time.sleep(self.poll)
                elif todo and not any(ready(r) for r in todo):
                    for r in list(todo):  # waiting on a dependency nobody is training
                        fail(r, "skipped (a run it needs is not done)")
                    todo.clear()
        finally:
            if active:
                self.say("stopping the running runs (their last checkpoints survive)")
            for slot, (r, ln, _) in list(active.items()):
                reap(slot, ln.stop(grace=self.stop_grace, first=signal.SIGINT))
            for sig, h in handlers.items():
                signal.signal(sig, h)
        for r in todo:
            res.states.setdefault(r.key, dir_state(r, (last or {}).get(r.key)))
        res.interrupted = stop_asked.is_set()
        if res.interrupted:
            self.say("interrupted; rerun the same command to continue")
        return res
