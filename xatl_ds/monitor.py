"""Metrics where people look: TensorBoard event files and, optionally, Weights & Biases.

``metrics.jsonl`` stays the contract (every reader of the project parses it); the monitors
here are mirrors of it, fed with the very rows the trainer writes there. The trainer opens the
metrics file through :func:`open_metrics` (rank 0 only): a file object whose ``write`` appends
to ``metrics.jsonl`` and hands each complete row to the configured monitors.

How a row maps (the same names as the ``metrics.jsonl`` columns, the x-axis is ``step``):

* a number (``train_loss``, ``val_loss``, ``tokens``, ``flops``, ``freeze_stage``, ...) is a
  scalar of that name;
* a mapping (``lr``: one learning rate per freeze stage / parameter group) gives one scalar
  per numeric entry, ``lr/<key>``; one with non-numeric entries (``kernel_paths``,
  ``align_end``) is also written as text;
* a list (``unfreeze``: the unfreeze events of the step) is written as text, and each
  released stage as the scalar ``unfreeze/stage``;
* a string is written as text.

The trainer's progress bar (:func:`progress_bar`, :func:`bar_postfix`) shows a few columns
of the same rows on the terminal.

:func:`replay` writes the event files of a finished (or running) run from its
``metrics.jsonl``: runs trained before the option existed, or with ``log.tensorboard: false``.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, TextIO

__all__ = ["TENSORBOARD_DIR", "bars_off", "Monitor", "TensorBoardMonitor", "WandbMonitor", "MonitorError", "MetricsFile",
           "flatten_row", "open_metrics", "open_monitors", "replay", "progress_bar", "bar_postfix"]

#: the event files' folder inside a run directory
TENSORBOARD_DIR = "tensorboard"


class MonitorError(RuntimeError):
    """A monitor cannot start (its package is missing); the message says what to install."""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def flatten_row(row: dict) -> tuple[dict[str, float], dict[str, str]]:
    """``(scalars, texts)`` of one metrics row (see the module docstring); ``step`` itself is
    the x-axis, not a scalar."""
    scalars: dict[str, float] = {}
    texts: dict[str, str] = {}
    for key, v in row.items():
        if key == "step":
            continue
        if _is_number(v):
            scalars[key] = float(v)
        elif isinstance(v, dict):
            numeric = {k: x for k, x in v.items() if _is_number(x)}
            scalars.update({f"{key}/{k}": float(x) for k, x in numeric.items()})
            if len(numeric) < len(v):
                texts[key] = json.dumps(v, sort_keys=True)
        elif isinstance(v, list):
            texts[key] = json.dumps(v, sort_keys=True)
            stages = [e["stage"] for e in v if isinstance(e, dict) and _is_number(e.get("stage"))]
            if stages:  # several stages may open at one step: the scalar shows the last one
                scalars[f"{key}/stage"] = float(max(stages))
        elif isinstance(v, str):
            texts[key] = v
    return scalars, texts


class Monitor:
    """One place metrics rows are mirrored to."""

    def log(self, row: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TensorBoardMonitor(Monitor):
    """Event files in ``log_dir`` (``torch.utils.tensorboard.SummaryWriter``).

    ``first_step``: the first step this session writes. Events of an earlier session at or
    after it are purged when TensorBoard reads the files, so a resumed run (whose
    ``metrics.jsonl`` was cut back to its checkpoint) shows each step once."""

    def __init__(self, log_dir: str | os.PathLike, first_step: int = 1):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch's writer needs the tensorboard package for its protos
            raise MonitorError(
                f"log.tensorboard: true needs the 'tensorboard' package ({e}): pip install tensorboard, "
                "or set log.tensorboard: false"
            ) from None
        self.log_dir = Path(log_dir)
        # purge_step: TensorBoard drops earlier sessions' events from that step on (a no-op on a
        # fresh folder; a run restarted from scratch in the same out_dir purges everything)
        self.writer = SummaryWriter(str(self.log_dir), purge_step=first_step, flush_secs=30)

    def log(self, row: dict) -> None:
        step = int(row["step"])
        scalars, texts = flatten_row(row)
        for tag, v in scalars.items():
            self.writer.add_scalar(tag, v, step)
        for tag, t in texts.items():
            # markdown: a code span keeps JSON readable in the TEXT tab
            self.writer.add_text(tag, f"`{t}`", step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbMonitor(Monitor):
    """A Weights & Biases run (``wandb`` imported only here). The run id is derived from the
    run directory, so a resumed run continues the same W&B run."""

    def __init__(self, project: str, *, entity: str | None, mode: str, name: str, out_dir: str | os.PathLike,
                 config: dict | None = None):  # fmt: skip
        try:
            import wandb
        except ImportError:
            raise MonitorError(
                f"log.wandb_project={project!r} needs the 'wandb' package: pip install wandb (or "
                "pip install 'xatl-ds[wandb]'), then wandb login; or drop log.wandb_project"
            ) from None
        out = Path(out_dir).absolute()
        run_id = hashlib.sha256(str(out).encode()).hexdigest()[:16]
        self.run = wandb.init(project=project, entity=entity, mode=mode, name=name, id=run_id, resume="allow",
                              dir=str(out), config=config)  # fmt: skip

    def log(self, row: dict) -> None:
        scalars, texts = flatten_row(row)
        self.run.log({**scalars, **texts}, step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()


def open_monitors(cfg: Any, out_dir: str | os.PathLike, first_step: int = 1) -> list[Monitor]:
    """The monitors a run config's ``log`` section asks for (``cfg``: a RunConfig)."""
    log = cfg.log
    out: list[Monitor] = []
    try:
        if log.tensorboard:
            out.append(TensorBoardMonitor(Path(out_dir) / TENSORBOARD_DIR, first_step))
        if log.wandb_project:
            out.append(WandbMonitor(log.wandb_project, entity=log.wandb_entity, mode=log.wandb_mode, name=cfg.name,
                                    out_dir=out_dir, config=cfg.to_dict()))  # fmt: skip
    except BaseException:
        for m in out:
            m.close()
        raise
    return out


class MetricsFile:
    """``metrics.jsonl`` opened for appending, mirrored: every complete line written is also
    parsed back and logged to each monitor, so the monitors see exactly the contract's rows."""

    def __init__(self, f: TextIO, monitors: Iterable[Monitor]):
        self.f, self.monitors, self._buf = f, list(monitors), ""

    def write(self, text: str) -> int:
        n = self.f.write(text)
        self._buf += text
        *lines, self._buf = self._buf.split("\n")
        for line in lines:
            if line.strip():
                row = json.loads(line)
                for m in self.monitors:
                    m.log(row)
        return n

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        try:
            self.f.close()
        finally:
            for m in self.monitors:
                m.close()


def open_metrics(rundir: Any, cfg: Any, step: int = 0) -> MetricsFile:
    """The trainer's metrics file (rank 0): ``rundir.metrics`` for appending, mirrored to the
    monitors of ``cfg.log``. ``step``: the step training continues from (0: a fresh start)."""
    monitors = open_monitors(cfg, rundir.path, first_step=step + 1)
    return MetricsFile(open(rundir.metrics, "a"), monitors)


def bars_off() -> bool:
    """Progress bars are off: tqdm's own ``TQDM_DISABLE``, or ``XATL_NO_PROGRESS=1`` (which
    xatl_ds.cli turns into ``TQDM_DISABLE`` for the libraries' bars too)."""
    if os.environ.get("XATL_NO_PROGRESS") == "1":
        return True
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


def progress_bar(name: str, total: int | None, initial: int, resumed: bool) -> Any:
    """The trainer's progress bar on the terminal (rank 0), a tqdm over steps (``total``
    None: a FLOP budget, no known end). ``TQDM_DISABLE=1`` (tqdm's own variable) turns it off;
    ``XATL_NO_PROGRESS=1`` is still honoured."""
    from tqdm import tqdm

    desc = f"{name}" + (" (resumed)" if resumed else "")
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0,
                **({"disable": True} if bars_off() else {}))  # fmt: skip


def bar_postfix(row: dict, val: float | None) -> dict:
    """What the progress bar shows of a metrics row: the loss (the alignment loss while
    aligning), tokens/s, the freeze stage and the last validation loss ``val``."""
    loss = ("loss", row["train_loss"]) if "train_loss" in row else ("align", row["align_loss"])
    d = {loss[0]: f"{loss[1]:.3f}", "tok/s": f"{row['tokens_per_s']:.0f}", "stage": row["freeze_stage"]}
    if val is not None:
        d["val"] = f"{val:.3f}"
    return d


def replay(run_dir: str | os.PathLike, log_dir: str | os.PathLike | None = None) -> Path:
    """Write TensorBoard event files of the rows in ``RUN_DIR/metrics.jsonl`` (into
    ``RUN_DIR/tensorboard`` unless ``log_dir``); returns the folder."""
    from .rundir import RunDir

    rd = RunDir(run_dir)
    rows = rd.read_metrics()
    if not rows:
        raise FileNotFoundError(f"{rd.metrics} has no rows")
    dest = Path(log_dir) if log_dir is not None else rd.path / TENSORBOARD_DIR
    tb = TensorBoardMonitor(dest, first_step=1)
    try:
        for row in rows:
            tb.log(row)
    finally:
        tb.close()
    return dest
