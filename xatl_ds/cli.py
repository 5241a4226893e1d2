"""The ``xatl-ds`` command line: one entry point, thin subcommands."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    from . import data, evaluate, launch, quickstart, sweep, transfer, tune

    parser = argparse.ArgumentParser(prog="xatl-ds", description="Cross-Architecture Transfer Learning on DeepSpeed")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data.add_cli(sub)
    transfer.add_cli(sub)
    launch.add_cli(sub)
    evaluate.add_cli(sub)
    sweep.add_cli(sub)
    tune.add_cli(sub)
    quickstart.add_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``xatl-ds`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


def subcommand_main(command: str, argv: Sequence[str] | None = None) -> int:
    """``python -m xatl_ds.<module> ARGS``: the same as ``xatl-ds <command> ARGS``."""
    return main([command, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
