"""Options and helpers every ``xatl-ds`` command module shares: the launcher options, the
error exit, and the notice before DeepSpeed's first CPU op build. Nothing heavy is imported at
module level (see :mod:`xatl_ds.cli`)."""
from __future__ import annotations

import argparse
import os
import sys

__all__ = ["DS_CPU_OP", "add_launch_options", "announce_cpu_op_build", "cpu_op_build_dir", "fail", "launch_options"]


def add_launch_options(p: argparse.ArgumentParser) -> None:
    """The options of a command that launches training ranks (read back by :func:`launch_options`)."""
    p.add_argument("--num-gpus", type=int, help="ranks on this node (GPUs, or CPU ranks); default: all GPUs, or 1 on CPU")
    p.add_argument("--num-nodes", type=int, help="nodes to use from the hostfile")
    p.add_argument("--hostfile", help="DeepSpeed hostfile (multi-node)")
    p.add_argument("--launcher", choices=["pdsh", "openmpi", "mvapich", "slurm", "mpich", "impi"],
                   help="multi-node launcher")  # fmt: skip
    p.add_argument("--include", help="DeepSpeed --include, e.g. localhost:0,1")
    p.add_argument("--master-port", type=int, help="rendezvous port (default: a free port per launch)")


def launch_options(args: argparse.Namespace):
    """The :class:`~xatl_ds.executor.LaunchOptions` of :func:`add_launch_options`' arguments."""
    from .executor import LaunchOptions

    return LaunchOptions(num_gpus=args.num_gpus, num_nodes=args.num_nodes, hostfile=args.hostfile,
                         launcher=args.launcher, include=args.include, master_port=args.master_port)  # fmt: skip


def fail(command: str, err: BaseException, code: int = 2) -> int:
    """Say why ``xatl-ds COMMAND`` failed on stderr; returns the exit code."""
    print(f"xatl-ds {command}: {err}", file=sys.stderr)
    return code


#: the C++ op DeepSpeed compiles (torch JIT extension) the first time a rank starts on a CPU
DS_CPU_OP = "deepspeed_shm_comm"


def cpu_op_build_dir() -> str | None:
    """Where torch keeps DeepSpeed's CPU op (its JIT-extension folder rule); None on CUDA."""
    import torch

    if torch.cuda.is_available():
        return None
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        acc = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
        root = os.path.join(get_default_build_root(), f"py{sys.version_info.major}{sys.version_info.minor}"
                            f"{getattr(sys, 'abiflags', '')}_{acc}")  # fmt: skip
    return os.path.join(root, DS_CPU_OP)


def announce_cpu_op_build() -> None:
    """Say so before the first CPU launch compiles DeepSpeed's op: ~60 s of silence otherwise."""
    d = cpu_op_build_dir()
    if d is not None and not os.path.isfile(os.path.join(d, f"{DS_CPU_OP}.so")):
        print(f"[xatl-ds] first CPU launch: DeepSpeed compiles its C++ op {DS_CPU_OP} now (about a minute, "
              f"once; cached in {d})", file=sys.stderr, flush=True)  # fmt: skip
