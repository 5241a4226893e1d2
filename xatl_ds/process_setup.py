"""A trainer rank's own process: threads, torch.distributed, DeepSpeed's shared memory, versions.

The launcher side -- starting, watching and stopping the ranks -- is :mod:`xatl_ds.executor`'s;
this module sets up the process a launcher started (or ``python -m xatl_ds.train``, a world of
one), before the trainer builds anything in it.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["SHM_DIR", "setup_threads", "release_shm_workspace", "init_distributed", "versions"]

SHM_DIR = Path("/dev/shm")


def setup_threads() -> None:
    """One rank per core on CPU: without this, 2 ranks on 2 cores run ~10x slower."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if "OMP_NUM_THREADS" not in os.environ:
        n = max(1, (os.cpu_count() or 1) // max(1, local_world))
        os.environ["OMP_NUM_THREADS"] = str(n)
        torch.set_num_threads(n)


def release_shm_workspace(rank: int) -> None:
    """Unlink this rank's name of DeepSpeed's CPU allreduce workspace.

    DeepSpeed's CPU backend maps a ~67 MB shared-memory segment per rank,
    ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``, and never unlinks it:
    with a free port per launch every run would leave its segments behind, and a sweep fills
    /dev/shm (which is RAM). Once every rank has mapped every segment (the barrier: DeepSpeed's
    init returns only after its rank opened all of them) the names can go; the mappings live on
    until the processes exit, however they exit."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port or not SHM_DIR.is_dir():
        return
    torch.distributed.barrier()
    for p in SHM_DIR.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"):
        p.unlink(missing_ok=True)


def init_distributed() -> tuple[int, int, torch.device]:
    """Start torch.distributed through DeepSpeed (gloo on CPU, NCCL on CUDA); returns
    ``(rank, world size, this rank's device)``."""
    import deepspeed

    if "RANK" not in os.environ:  # plain `python -m xatl_ds.train`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        from .executor import free_port

        os.environ.setdefault("MASTER_PORT", str(free_port()))
    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        release_shm_workspace(rank)
        device = torch.device("cpu")
    return rank, world, device


def versions() -> dict[str, str]:
    """The software this process trains with (``meta.json``'s ``versions``)."""
    import deepspeed
    import transformers

    from . import __version__

    return {"xatl_ds": __version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__}  # fmt: skip
