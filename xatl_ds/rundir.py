"""A run's directory: the one owner of what the trainer writes and everything else reads.

Layout of ``OUT`` (a run config's ``out_dir``)::

    config.yaml       the validated run config the trainer ran (written by the scheduler before
                      the launch, or by the trainer): the run's only serialised config
    model.json        the model the trainer built (``XatlConfig.to_dict()``), written at start
    metrics.jsonl     one JSON row per optimizer step (val_loss on evaluation steps)
    checkpoints/      DeepSpeed checkpoints (``latest`` names the newest tag)
    transfer.json     the XATL transfer report (XATL runs)
    hf/               the HF export, written at the end
    meta.json         the run's summary (``config`` names config.yaml; hash, steps, FLOPs, final
                      val loss, ...)
    DONE              written last: the run finished
    eval.json         lm-eval results (``xatl-ds eval``)
    run.lock          held (``flock``) by the trainer while it trains: pid, host, start time

Torn lines. A killed trainer can leave a partial last line in ``metrics.jsonl``. Every reader
here applies one rule: rows are read up to the first line that is not a complete JSON object
(a torn line can only be the last; anything after a bad line is not trusted either).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

__all__ = ["RunDir", "MetricsTail", "LockInfo", "RunLocked", "parse_metrics", "process_start_time", "pid_alive"]

STATES = ("pending", "running", "partial", "done")


class RunLocked(RuntimeError):
    """Another live process is training this run directory."""


def parse_metrics(text: str) -> list[dict]:
    """Rows of a metrics.jsonl text, up to the first incomplete or non-JSON line."""
    rows = []
    for line in text.split("\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if not isinstance(row, dict) or "step" not in row:
            break
        rows.append(row)
    return rows


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (``/proc/PID/stat`` field 22), or None: with the pid
    it names one process, so a recycled pid is not mistaken for the original."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError):
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def pid_alive(pid: Any, start_time: str | None = None) -> bool:
    """Whether ``pid`` runs on this host (and, if given, is the process started at ``start_time``).
    A process we may not signal (EPERM) exists, so it counts as alive."""
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        pass
    if start_time is not None:
        now = process_start_time(int(pid))
        return now is None or now == str(start_time)
    return True


@dataclass
class LockInfo:
    """Who holds (or last held) a run's lock."""

    pid: int
    host: str
    start_time: str | None
    since: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} (since {self.since})"


class MetricsTail:
    """Incremental reader of a growing metrics.jsonl: :meth:`new_rows` returns the complete
    rows appended since the last call. A file that shrank (truncated by a resume) is read
    again from the start; rows already returned (by step) are not returned twice."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.pos = 0
        self.buf = ""
        self.seen: set[int] = set()

    def new_rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        size = os.path.getsize(self.path)
        if size < self.pos:
            self.pos, self.buf = 0, ""
        with open(self.path) as f:
            f.seek(self.pos)
            self.buf += f.read()
            self.pos = f.tell()
        *lines, self.buf = self.buf.split("\n")  # the last piece may be a line still being written
        out = []
        for row in parse_metrics("\n".join(lines)):
            if row["step"] not in self.seen:
                self.seen.add(row["step"])
                out.append(row)
        return out


class RunDir:
    """Paths and state of one run directory (see the module docstring)."""

    CONFIG = "config.yaml"
    METRICS = "metrics.jsonl"
    CHECKPOINTS = "checkpoints"
    TRANSFER = "transfer.json"
    MODEL = "model.json"
    HF = "hf"
    META = "meta.json"
    DONE = "DONE"
    EVAL = "eval.json"
    LOCK = "run.lock"
    #: what makes a folder a run directory (for finding runs under a sweep root)
    MARKERS = (META, METRICS, CONFIG)
    #: a run directory's own subfolders (never searched for runs)
    OWN_DIRS = (HF, HF + ".tmp", CHECKPOINTS)

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # -- paths ---------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def transfer(self) -> Path:
        return self.path / self.TRANSFER

    @property
    def hf(self) -> Path:
        return self.path / self.HF

    @property
    def meta_path(self) -> Path:
        return self.path / self.META

    @property
    def done_path(self) -> Path:
        return self.path / self.DONE

    @property
    def eval_path(self) -> Path:
        return self.path / self.EVAL

    @property
    def lock_path(self) -> Path:
        return self.path / self.LOCK

    # -- state -----------------------------------------------------------------------------
    def is_done(self) -> bool:
        return self.done_path.is_file()

    def is_run_dir(self) -> bool:
        return any((self.path / m).is_file() for m in self.MARKERS)

    def state(self) -> str:
        """``done`` (DONE written), ``running`` (a live trainer holds the lock), ``partial``
        (metrics or checkpoints but nothing training) or ``pending``."""
        if self.is_done():
            return "done"
        if self.lock_holder() is not None:
            return "running"
        if self.metrics.is_file() or self.checkpoints.is_dir():
            return "partial"
        return "pending"

    def has_checkpoint(self) -> bool:
        return (self.checkpoints / "latest").is_file()

    # -- metrics -----------------------------------------------------------------------------
    def read_metrics(self) -> list[dict]:
        return parse_metrics(self.metrics.read_text()) if self.metrics.is_file() else []

    def tail(self) -> MetricsTail:
        return MetricsTail(self.metrics)

    def progress(self) -> tuple[int, float | None]:
        """(steps done, last validation loss)."""
        steps, val = 0, None
        for row in self.read_metrics():
            steps = row["step"]
            if row.get("val_loss") is not None:
                val = row["val_loss"]
        return steps, val

    def start_metrics(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics.write_text("")

    def truncate_metrics(self, step: int) -> None:
        """Keep the rows up to ``step`` (a resume recomputes the rest; a torn line goes too)."""
        if self.metrics.is_file():
            keep = [r for r in self.read_metrics() if r["step"] <= step]
            _atomic_write(self.metrics, "".join(json.dumps(r) + "\n" for r in keep))

    # -- documents -----------------------------------------------------------------------------
    def read_json(self, name: str) -> dict:
        """``meta.json`` / ``eval.json`` / ``transfer.json`` as a dict ({} when absent); a corrupt
        file is a ValueError naming it."""
        p = self.path / name
        if not p.is_file():
            return {}
        try:
            data = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{p} is not valid JSON ({e}); delete it to have it rewritten") from None
        if not isinstance(data, dict):
            raise ValueError(f"{p} holds {type(data).__name__}, not a JSON object; delete it to have it rewritten")
        return data

    def meta(self) -> dict:
        return self.read_json(self.META)

    def eval(self) -> dict:
        return self.read_json(self.EVAL)

    def model_config(self) -> dict:
        """The model the trainer built ({} before it started)."""
        return self.read_json(self.MODEL)

    def write_json(self, name: str, data: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.path / name, json.dumps(data, indent=1, default=str))

    def read_config(self) -> dict:
        """The run config: config.yaml ({} if absent); older runs kept theirs in meta.json."""
        import yaml

        cfg = self.meta().get("config")
        if isinstance(cfg, dict) and cfg:
            return cfg
        if self.config.is_file():
            return yaml.safe_load(self.config.read_text()) or {}
        return {}

    def mark_done(self) -> None:
        self.done_path.write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")

    def clear_done(self) -> None:
        self.done_path.unlink(missing_ok=True)

    # -- the lock --------------------------------------------------------------------------------
    def lock_info(self) -> LockInfo | None:
        """What the lock file says (the last holder), or None."""
        try:
            d = json.loads(self.lock_path.read_text())
            return LockInfo(int(d["pid"]), str(d["host"]), d.get("start_time"), str(d.get("since", "?")))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def lock_holder(self) -> LockInfo | None:
        """The live process holding the lock, or None. On this host the kernel's ``flock``
        decides (a dead holder's lock is gone with it); another host's holder cannot be
        checked from here and counts as live while its lock file exists."""
        if not self.lock_path.is_file():
            return None
        info = self.lock_info()
        if info is not None and info.host != socket.gethostname():
            return info
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return info or LockInfo(-1, socket.gethostname(), None, "?")
        finally:
            os.close(fd)
        return None

    def acquire_lock(self) -> "_HeldLock":
        """Take the run's lock for this process (held until :meth:`_HeldLock.release` or exit);
        :class:`RunLocked` names the live holder. A dead holder's lock is taken over."""
        self.path.mkdir(parents=True, exist_ok=True)
        info = self.lock_info()
        if info is not None and info.host != socket.gethostname():
            raise RunLocked(f"{self.path} is being trained by {info.describe()}; if that process is gone, "
                            f"delete {self.lock_path}")  # fmt: skip
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            who = self.lock_info()
            raise RunLocked(f"{self.path} is being trained by {who.describe() if who else 'another process'}; "
                            "wait for it or stop it first") from None  # fmt: skip
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start_time": process_start_time(os.getpid()),
              "since": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(me).encode())
        return _HeldLock(fd)

    def wait_unlocked(self, timeout: float, poll: float = 0.25) -> LockInfo | None:
        """Wait up to ``timeout`` seconds for the lock to be free; the holder if it is not."""
        deadline = time.monotonic() + timeout
        while True:
            holder = self.lock_holder()
            if holder is None or time.monotonic() >= deadline:
                return holder
            time.sleep(poll)


class _HeldLock:
    def __init__(self, fd: int):
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def iter_run_dirs(root: str | os.PathLike, skip: tuple[str, ...] = ()) -> Iterator[RunDir]:
    """Run directories under ``root`` (``root`` itself included), sorted; a run's own
    subfolders and hidden folders are not searched."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"directory {root} does not exist")
    found, stack = [], [root]
    while stack:
        d = stack.pop()
        if RunDir(d).is_run_dir():
            found.append(d)
            continue
        stack.extend(p for p in d.iterdir()
                     if p.is_dir() and p.name not in RunDir.OWN_DIRS + skip and not p.name.startswith("."))  # fmt: skip
    yield from (RunDir(p) for p in sorted(found))
