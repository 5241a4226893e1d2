"""Starting trainer processes through the ``deepspeed`` launcher (``xatl-ds train``).

The trainer itself is ``xatl_ds.train``; this module only builds the launcher command line,
so that one run, a sweep and an Optuna trial all start training the same way.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, load_run_config


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
    """Rendezvous port (several concurrent runs on one node need distinct ports)."""
    extra: list[str] = field(default_factory=list)
    """More launcher arguments, passed through verbatim."""


def deepspeed_command(config: str | Path, opts: LaunchOptions, overrides: list[str] | None = None) -> list[str]:
    """The exact command that trains ``config``."""
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


def train_env() -> dict:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def add_opts_cli(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-gpus", type=int, help="ranks on this node (GPUs, or CPU ranks); default: all GPUs, or 1 on CPU")
    p.add_argument("--num-nodes", type=int, help="nodes to use from the hostfile")
    p.add_argument("--hostfile", help="DeepSpeed hostfile (multi-node)")
    p.add_argument("--launcher", choices=["pdsh", "openmpi", "mvapich", "slurm", "mpich", "impi"],
                   help="multi-node launcher")  # fmt: skip
    p.add_argument("--include", help="DeepSpeed --include, e.g. localhost:0,1")
    p.add_argument("--master-port", type=int, help="rendezvous port")


def opts_from_args(args: argparse.Namespace) -> LaunchOptions:
    return LaunchOptions(num_gpus=args.num_gpus, num_nodes=args.num_nodes, hostfile=args.hostfile,
                         launcher=args.launcher, include=args.include, master_port=args.master_port)  # fmt: skip


def add_cli(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train one run config through the deepspeed launcher",
                              description="Train one run config: deepspeed [launch options] --module xatl_ds.train")  # fmt: skip
    p.add_argument("config", help="run config YAML")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable), e.g. -o budget.steps=100")  # fmt: skip
    add_opts_cli(p)
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")
    p.set_defaults(func=_run)
    return p


def _run(args: argparse.Namespace) -> int:
    try:
        load_run_config(args.config, args.override)  # fail here, before any process starts
    except ConfigError as e:
        print(f"xatl-ds train: bad config: {e}", file=sys.stderr)
        return 2
    cmd = deepspeed_command(args.config, opts_from_args(args), args.override)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    return subprocess.call(cmd, env=train_env())
