"""Starting, watching and stopping trainer processes: the one owner of a run's process.

Every launch -- ``xatl-ds train``, a sweep's runs, an Optuna trial -- goes through
:class:`Launch`: the ``deepspeed`` launcher command (:func:`deepspeed_command`) started as its
own process group, so that stopping a run stops the launcher *and* its ranks. A run dies with
whoever launched it:

- the launcher process gets ``SIGTERM`` when its parent dies (Linux ``PR_SET_PDEATHSIG``);
- the launcher itself does not pass that on to the ranks, so each rank also watches the
  launching process (``XATL_OWNER`` = pid and kernel start time, set by :func:`train_env`) and
  ends itself within a second of its death (:func:`watch_owner`, called by the trainer);
- ``xatl-ds train`` forwards SIGTERM/SIGINT/SIGHUP to the run's process group
  (:func:`run_foreground`).

Double training is refused by the run directory's lock (:meth:`xatl_ds.rundir.RunDir.acquire_lock`,
taken by the trainer); :func:`check_free` lets a launcher refuse before it starts anything.
A rendezvous port is chosen free for each single-node launch unless one is given.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import IO, Any

from .rundir import RunDir, RunLocked, pid_alive, process_start_time

__all__ = ["LaunchOptions", "Launch", "deepspeed_command", "free_port", "with_port", "train_env", "run_foreground",
           "check_free", "watch_owner", "cuda_devices", "RunLocked", "OWNER_ENV", "LAUNCHERS"]  # fmt: skip

OWNER_ENV = "XATL_OWNER"
LAUNCHERS = ("pdsh", "openmpi", "mvapich", "slurm", "mpich", "impi")
_PR_SET_PDEATHSIG = 1


@dataclass
class LaunchOptions:
    """Where and how the ``deepspeed`` launcher starts the ranks of one run."""

    num_gpus: int | None = None
    """Ranks on this node (GPUs; on a CPU machine, CPU ranks). Default: all GPUs, or 1 on CPU."""
    num_nodes: int | None = None
    """Nodes to use from the hostfile."""
    hostfile: str | None = None
    """DeepSpeed hostfile for multi-node runs."""
    launcher: str | None = None
    """Multi-node launcher: pdsh, openmpi, mvapich, slurm, mpich, impi."""
    include: str | None = None
    """DeepSpeed --include (e.g. ``localhost:0,1``) to pin a run to devices."""
    master_port: int | None = None
    """Rendezvous port; default: a free port per single-node launch (29500 with a hostfile)."""
    extra: list[str] = field(default_factory=list)
    """More launcher arguments, passed through verbatim."""

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "LaunchOptions":
        """From a YAML ``launch:`` mapping; unknown keys are a ValueError naming ``where``."""
        data = data or {}
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) - names:
            bad = sorted(set(data) - names) if isinstance(data, dict) else data
            raise ValueError(f"{where}: unknown option(s) {bad}; valid: {sorted(names)}")
        if data.get("launcher") not in (None, *LAUNCHERS):
            raise ValueError(f"{where}.launcher={data['launcher']!r}: choose one of {list(LAUNCHERS)}")
        return cls(**data)

    def merged(self, other: "LaunchOptions | None") -> "LaunchOptions":
        """These options with every field ``other`` sets (not None, not empty) taking precedence."""
        d = asdict(self)
        for k, v in asdict(other or LaunchOptions()).items():
            if v not in (None, []):
                d[k] = v
        return LaunchOptions(**d)

    def world_size(self) -> int | None:
        """Total ranks when known from these options alone (not with --include)."""
        if self.include or not self.num_gpus:
            return None
        return self.num_gpus * (self.num_nodes or 1)


def free_port() -> int:
    """A TCP port free on this host right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_command(config: str | Path, opts: LaunchOptions, overrides: list[str] | None = None) -> list[str]:
    """The exact command that trains ``config`` (no port chosen here: pass :func:`with_port`'s options)."""
    exe = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    cmd = [exe]
    if opts.hostfile:
        cmd += ["--hostfile", opts.hostfile]
    if opts.launcher:
        cmd += ["--launcher", opts.launcher]
    if opts.num_nodes:
        cmd += ["--num_nodes", str(opts.num_nodes)]
    if opts.include:
        cmd += ["--include", opts.include]
    elif opts.num_gpus:
        cmd += ["--num_gpus", str(opts.num_gpus)]
    if opts.master_port:
        cmd += ["--master_port", str(opts.master_port)]
    cmd += list(opts.extra)
    cmd += ["--module", "xatl_ds.train", "--config", str(config)]
    for ov in overrides or []:
        cmd += ["-o", ov]
    return cmd


def with_port(opts: LaunchOptions, taken: set[int] = frozenset()) -> LaunchOptions:
    """``opts`` with a free rendezvous port, none of ``taken``, when none is given on a single node."""
    if opts.master_port or opts.hostfile:
        return opts
    port = free_port()
    while port in taken:
        port = free_port()
    return replace(opts, master_port=port)


def train_env(owner: bool = True) -> dict:
    """The environment of a launched run; ``owner`` makes its ranks die with this process."""
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if owner:
        env[OWNER_ENV] = f"{os.getpid()}:{process_start_time(os.getpid()) or ''}"
    return env


def _prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _child_setup(prctl):
    """Pre-exec hook: a new session (its own process group) that gets SIGTERM when its parent
    dies. ``prctl`` is resolved in the parent; the forked child only calls it."""

    def setup() -> None:
        os.setsid()
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))

    return setup


def check_free(run_dir: str | os.PathLike | RunDir, wait: float = 0.0) -> None:
    """Raise :class:`RunLocked` if a live process trains ``run_dir``. ``wait``: seconds to give
    a dying holder (an orphan whose launcher was just killed ends within about a second)."""
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    holder = rd.wait_unlocked(wait) if wait > 0 else rd.lock_holder()
    if holder is not None:
        raise RunLocked(f"{rd.path} is being trained by {holder.describe()}; wait for it to finish or stop it "
                        "(a second launch would train the same run twice)")  # fmt: skip


class Launch:
    """One started run: the launcher's process group, its log and how to stop it."""

    def __init__(self, cmd: list[str], *, log: IO | None = None, env: dict | None = None):
        self.cmd = list(cmd)
        self.log = log
        self.env = env if env is not None else train_env()
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Launch":
        out = self.log  # None: the parent's stdout/stderr
        self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT if out is not None else None,
                                     env=self.env, preexec_fn=_child_setup(_prctl()))  # fmt: skip
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def wait(self, timeout: float | None = None) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def send(self, sig: int) -> None:
        """Send ``sig`` to the whole process group (launcher and ranks)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, grace: float = 20.0, first: int = signal.SIGTERM) -> int:
        """``first`` to the process group, SIGKILL after ``grace`` seconds; the exit code. The
        group is killed even after the launcher exits, so no rank outlives it."""
        if self.proc is None:
            return 0
        for sig, wait in ((first, grace), (signal.SIGKILL, 10.0)):
            self.send(sig)
            try:
                rc = self.proc.wait(timeout=wait)
                self.send(signal.SIGKILL)  # stragglers of the group (ranks whose launcher left first)
                return rc
            except subprocess.TimeoutExpired:
                continue
        return self.proc.wait()


def run_foreground(cmd: list[str]) -> int:
    """Run ``cmd`` as a :class:`Launch` attached to this terminal; SIGTERM, SIGINT and SIGHUP
    stop its whole process group. Returns its exit code (128 + signal when stopped)."""
    launch = Launch(cmd).start()
    got: list[int] = []

    def on_signal(signum, frame):
        got.append(signum)
        launch.send(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        while True:
            try:
                rc = launch.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if got and len(got) > 1:  # a second signal: no more grace
                    launch.send(signal.SIGKILL)
    finally:
        if launch.poll() is None or got:
            launch.stop(grace=10.0)
        for s, h in old.items():
            signal.signal(s, h)
    return 128 + got[0] if got else rc


def watch_owner(interval: float = 0.5) -> None:
    """In a rank: end this process (SIGTERM to itself) when the process that launched the run
    (``XATL_OWNER``) is gone, and when this rank's parent (the launcher) dies. No-op for runs
    started by hand (``deepspeed ...`` without xatl-ds)."""
    prctl = _prctl()
    if prctl is not None and os.environ.get("LOCAL_RANK") is not None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    owner = os.environ.get(OWNER_ENV)
    if not owner:
        return
    pid, _, start = owner.partition(":")
    me = os.getpid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if not pid_alive(pid, start or None):
                print(f"[xatl-ds] the process that launched this run (pid {pid}) is gone; stopping rank pid {me}",
                      file=sys.stderr, flush=True)  # fmt: skip
                os.kill(me, signal.SIGTERM)
                return

    threading.Thread(target=watch, name="xatl-owner-watch", daemon=True).start()


def cuda_devices() -> int:
    """GPUs visible on this node (CUDA_VISIBLE_DEVICES, else nvidia-smi), 0 without."""
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        return len([x for x in vis.split(",") if x.strip()])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        return len([x for x in out.stdout.splitlines() if x.startswith("GPU")])
    except (OSError, subprocess.SubprocessError):
        return 0

