"""Options and helpers every ``xatl-ds`` command module shares: the launcher options and the
error exit. Nothing heavy is imported at module level (see :mod:`xatl_ds.cli`)."""
from __future__ import annotations

import argparse
import sys

__all__ = ["add_launch_options", "fail", "launch_options"]


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
