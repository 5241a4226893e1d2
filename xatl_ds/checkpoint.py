"""The trainer's DeepSpeed checkpoints: saving one (tag ``stepNNNNNNNN``, the newest few
kept), which one a run resumes from, loading it back into the engine, and reading one as a
full fp32 state dict. No file is read in a way that could execute
code: everything goes through :func:`xatl_ds.safe_load.safe_load` (``weights_only=True``)."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from .safe_load import (CheckpointError, delete_hint, safe_engine_loads, safe_load, safe_torch_loads_in,
                        verify_files)

__all__ = ["CheckpointError", "LATEST", "save_checkpoint", "resume_tag", "load_for_resume", "consolidated_state_dict"]

LATEST = "latest"  # DeepSpeed's pointer to the newest complete checkpoint, written after the save
log = logging.getLogger(__name__)


def _has_model_states(folder: Path) -> bool:
    return any(folder.glob("*model_states.pt"))


def save_checkpoint(engine, ckpt_dir: str | Path, step: int, client_state: dict, keep: int, rank: int) -> None:
    """Save ``engine`` after ``step`` steps as tag ``stepNNNNNNNN`` (zero-padded: tags sort by
    name, which :func:`resume_tag` relies on) with ``client_state``; then rank 0 deletes all
    but the newest ``keep`` tags. Collective: every rank calls it."""
    ckpt_dir = Path(ckpt_dir)
    engine.save_checkpoint(str(ckpt_dir), tag=f"step{step:08d}", client_state=client_state)
    torch.distributed.barrier()
    if rank == 0:
        tags = sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir())
        for old in tags[:-keep]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    torch.distributed.barrier()


def resume_tag(ckpt_dir: str | Path) -> str | None:
    """The checkpoint tag a run resumes from, or None (start from scratch).

    It is the tag ``latest`` names (an empty ``latest``, from a save cut while writing it: the
    newest folder but one). If that folder is gone (deleting a bad checkpoint is the
    documented fix), it is the newest remaining tag older than it; tags sort by name, as the
    trainer's zero-padded ``stepNNNNNNNN`` do. A folder newer than ``latest`` is never used: it
    is a save that did not complete.
    """
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not tag:
        # a save cut while writing ``latest`` (written last): its folder is the newest and may be
        # incomplete; the one before it finished (old tags are deleted only after ``latest``)
        done = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and _has_model_states(p))
        chosen = done[-2] if len(done) >= 2 else None
        log.warning("%s is empty (a save was cut); %s", latest,
                    f"resuming from {chosen}" if chosen else "no earlier checkpoint: starting from scratch")  # fmt: skip
        return chosen
    if (ckpt_dir / tag).is_dir():
        return tag
    older = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name < tag and _has_model_states(p))
    chosen = older[-1] if older else None
    log.warning("checkpoint %s named by %s is missing; %s", tag, latest,
                f"resuming from {chosen}" if chosen else "no earlier checkpoint: starting from scratch")  # fmt: skip
    return chosen


def load_for_resume(engine, ckpt_dir: str | Path) -> tuple[str, dict] | None:
    """Load the checkpoint :func:`resume_tag` picks into a DeepSpeed ``engine``.

    Returns ``(tag, client_state)``, or None when there is nothing to resume. Every rank first
    verifies every file of the tag (pickles only: tensors are memory-mapped, not read), so all
    ranks refuse a tampered shard together rather than some waiting for the others in a
    collective; DeepSpeed then reads the files it needs through the safe loader as well.
    Raises :class:`CheckpointError` naming the file that cannot be loaded safely.
    """
    from deepspeed.utils import zero_to_fp32  # engine.load_checkpoint may consolidate through it

    ckpt_dir = Path(ckpt_dir)
    tag = resume_tag(ckpt_dir)
    if tag is None:
        return None
    folder = ckpt_dir / tag
    if not _has_model_states(folder):
        raise CheckpointError(
            f"checkpoint folder {folder} holds no *model_states.pt file (an incomplete save). " + delete_hint(folder)
        )
    verify_files(sorted(folder.glob("*.pt")))
    with safe_engine_loads(engine), safe_torch_loads_in(zero_to_fp32):
        path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {folder}. " + delete_hint(folder))
    return tag, client


def consolidated_state_dict(ckpt_dir: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """Full fp32 model weights of checkpoint ``tag`` (default: the latest) at any ZeRO stage.

    ZeRO 1-3 keep the fp32 master weights partitioned in the optimizer states; DeepSpeed's
    own consolidation (``zero_to_fp32``) reads them, its ``torch.load`` routed to the safe
    loader. Stage 0 saves the whole module in one file.
    """
    ckpt_dir = Path(ckpt_dir)
    if tag is None:
        tag = (ckpt_dir / LATEST).read_text().strip()
    d = ckpt_dir / tag
    if not d.is_dir():
        raise FileNotFoundError(f"no checkpoint {tag!r} in {ckpt_dir}")
    if any("zero" in p.name for p in d.glob("*optim_states.pt")):
        from deepspeed.utils import zero_to_fp32

        with safe_torch_loads_in(zero_to_fp32):
            sd = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        return {k: v.float() for k, v in sd.items()}
    state = safe_load(d / "mp_rank_00_model_states.pt", map_location="cpu")
    return {k: v.float() for k, v in state["module"].items()}
