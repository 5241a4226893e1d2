"""A trainer rank's own process: threads, torch.distributed (no DeepSpeed CPU op), versions.

The launcher side -- starting, watching and stopping the ranks -- is :mod:`xatl_ds.executor`'s;
this module sets up the process a launcher started (or ``python -m xatl_ds.train``, a world of
one), before the trainer builds anything in it.
"""
from __future__ import annotations

import os

import torch

__all__ = ["DS_CPU_OP", "setup_threads", "skip_cpu_inference_op", "init_distributed", "versions"]

#: the C++ op DeepSpeed's CPU backend would compile (torch JIT extension) in every rank it starts
DS_CPU_OP = "deepspeed_shm_comm"


def setup_threads() -> None:
    """One rank per core on CPU: without this, 2 ranks on 2 cores run ~10x slower."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if "OMP_NUM_THREADS" not in os.environ:
        n = max(1, (os.cpu_count() or 1) // max(1, local_world))
        os.environ["OMP_NUM_THREADS"] = str(n)
        torch.set_num_threads(n)


def skip_cpu_inference_op() -> None:
    """Keep DeepSpeed's CPU backend from building and mapping its shared-memory allreduce op.

    The op (``deepspeed_shm_comm``) serves only ``inference_all_reduce`` (tensor-parallel
    inference); training reduces through torch.distributed (gloo). Left on, every new
    environment compiles it at its first launch (~60 s, minutes on a busy machine), each rank maps
    a ~67 MB ``/dev/shm`` segment DeepSpeed never unlinks, and a rank killed while compiling
    leaves torch's lock file behind, after which every later launch waits for it forever.
    DeepSpeed reads its table of usable ops (``deepspeed.ops.__compatible_ops__``) when a backend
    starts and keeps it for edits, so marking the op unusable there is its own way to go
    without it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[DS_CPU_OP] = False


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
    if not cuda:
        skip_cpu_inference_op()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device


def versions() -> dict[str, str]:
    """The software this process trains with (``meta.json``'s ``versions``)."""
    import deepspeed
    import transformers

    from . import __version__

    return {"xatl_ds": __version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__}  # fmt: skip
