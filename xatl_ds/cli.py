"""The ``xatl-ds`` command line: the table of commands, the parser and :func:`main`. The
commands' arguments and their thin handlers, which call library functions, are in
:mod:`xatl_ds.cli_artifacts` (data, transfer, export, eval, report) and
:mod:`xatl_ds.cli_launch` (train, sweep, tune, quickstart); what they share is in
:mod:`xatl_ds.cli_common`.

Nothing heavy is imported to parse: a command's module (and torch, transformers, DeepSpeed,
Optuna, lm-eval behind it) is imported only when that command runs, so ``xatl-ds --help``
answers at once. The library never imports these modules.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from .cli_artifacts import data_parser, eval_parser, export_parser, report_parser, transfer_parser
from .cli_launch import quickstart_parser, sweep_parser, train_parser, tune_parser
from .monitor import bars_off

__all__ = ["build_parser", "main"]

Handler = Callable[[argparse.Namespace], int]


#: command -> (one-line help, the function that adds its arguments)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "data": ("prepare tokenized, packed datasets", data_parser),
    "transfer": ("build an XATL target from a pretrained Transformer and copy the shared weights", transfer_parser),
    "train": ("train one run config through the deepspeed launcher", train_parser),
    "eval": ("evaluate a finished run with lm-eval (writes RUN_DIR/eval.json)", eval_parser),
    "export": ("export a run's model for plain transformers (native class or remote code) with a model card", export_parser),
    "report": ("results table, compute-matched savings, figures and report.md for a sweep", report_parser),
    "sweep": ("expand a sweep YAML into runs and launch them", sweep_parser),
    "tune": ("run an Optuna study (one worker; start several for parallel trials)", tune_parser),
    "quickstart": ("the main job on the built-in corpus (make quickstart)", quickstart_parser),
}


def build_parser(only: str | None = None, *, full: bool = False) -> argparse.ArgumentParser:
    """The ``xatl-ds`` parser. Commands are listed with their help; their arguments are filled
    in for ``only`` (all one invocation needs) or, with ``full``, for every command."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="xatl-ds", description="Cross-Architecture Transfer Learning on DeepSpeed")
    parser.add_argument("--version", action="version", version=f"xatl-ds {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if full or only == name:
            add(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``xatl-ds`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    if os.environ.get("XATL_NO_PROGRESS") == "1":  # the older switch also silences libraries' bars (lm-eval's)
        os.environ.setdefault("TQDM_DISABLE", "1")
    if bars_off():  # transformers' bars (weight loading) follow huggingface_hub's switch, not tqdm's
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # the reader went away (xatl-ds ... | head -1): stop quietly, as other Unix tools do.
        # stdout is pointed at /dev/null so the interpreter's final flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the broken pipe


if __name__ == "__main__":
    sys.exit(main())
