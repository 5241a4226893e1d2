"""``xatl-ds`` commands that start training processes through the DeepSpeed launcher: ``train``,
``sweep`` (run, status, list), ``tune`` and ``quickstart``. Each ``*_parser`` fills in a
command's arguments; its handler imports the library only when the command runs."""
from __future__ import annotations

import argparse
import os
import shlex
import socket
import sys

from .cli_common import add_launch_options, fail, launch_options

__all__ = ["quickstart_parser", "sweep_parser", "train_parser", "tune_parser"]


# -- train -------------------------------------------------------------------------------------------
def train_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config YAML")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable), e.g. -o budget.steps=100")  # fmt: skip
    add_launch_options(p)
    p.add_argument("--dry-run", action="store_true",
                   help="check the config, its data, source and DeepSpeed config, print the command and exit")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_run_config
    from .executor import RunLocked, check_free, deepspeed_command, run_foreground, with_port
    from .preflight import PreflightError, preflight

    try:
        cfg = load_run_config(args.config, args.override)  # fail here, before any process starts
        preflight(cfg, launch=launch_options(args))  # and everything a rank or the launcher would refuse
    except (ConfigError, PreflightError) as e:
        return fail("train", f"bad config: {e}")
    try:
        check_free(cfg.out_dir)
    except RunLocked as e:
        return fail("train", e, 3)
    cmd = deepspeed_command(args.config, with_port(launch_options(args)), args.override)
    if args.dry_run:
        print(shlex.join(cmd))  # with a port free now, not DeepSpeed's shared default
        return 0
    rc = run_foreground(cmd)
    if rc == 0:
        _print_outputs(cfg)
    return rc


def _print_outputs(cfg) -> None:
    """Where a finished run's model, metrics and summary are, and what to run next."""
    from .monitor import TENSORBOARD_DIR
    from .rundir import RunDir

    rd = RunDir(cfg.out_dir)
    if not rd.is_done():
        return
    tb = f"  (TensorBoard: tensorboard --logdir {rd.path / TENSORBOARD_DIR})" if cfg.log.tensorboard else ""
    print(f"[xatl-ds] {cfg.name} done: {rd.path}\n"
          f"  model    {rd.hf}  (model card {rd.hf / 'README.md'})\n"
          f"  metrics  {rd.metrics}{tb}\n"
          f"  summary  {rd.meta_path}  (config, FLOPs, final val loss, unfreeze events)\n"
          f"  next     xatl-ds eval {rd.path}   |   xatl-ds export {rd.path} --out DIR")  # fmt: skip


# -- sweep -------------------------------------------------------------------------------------------
def sweep_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="sweep_command", required=True, metavar="SUBCOMMAND")
    r = sub.add_parser("run", help="launch every unfinished run (finished ones are skipped, broken ones resume)")
    r.add_argument("file", help="sweep YAML, or the name of a shipped sweep (e.g. quickstart)")
    r.add_argument("--dry-run", action="store_true", help="print the deepspeed command of every run and exit")
    r.add_argument("--max-parallel", type=int, default=1,
                   help="concurrent runs (on GPUs each gets its own --include device block)")  # fmt: skip
    _add_only_option(r)
    add_launch_options(r)
    r.set_defaults(func=_cmd_sweep_run)
    s = sub.add_parser("status", help="table of runs: state, steps done, last val loss")
    s.add_argument("file", help="sweep YAML, or the name of a shipped sweep")
    _add_only_option(s)
    s.set_defaults(func=_cmd_sweep_status)
    ls = sub.add_parser("list", help="the shipped sweeps (sweep run NAME) and Optuna studies (tune NAME), one line each")
    ls.set_defaults(func=_cmd_sweep_list)


def _summary(path, width: int = 100) -> str:
    """The first sentence of a shipped YAML's header comment (its lines up to the first blank
    or indented one: those are example commands)."""
    words = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("# ") or line.startswith("#  "):
            break
        words.append(line[2:].strip())
    text = " ".join(words)
    end = text.find(". ")
    text = text[: end + 1] if end >= 0 else text
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."


def _cmd_sweep_list(args: argparse.Namespace) -> int:
    from .config import shipped_yaml_names, study_file_path, sweep_file_path

    for title, kind, find in (("sweeps (xatl-ds sweep run NAME)", "sweep", sweep_file_path),
                              ("studies (xatl-ds tune NAME)", "study", study_file_path)):  # fmt: skip
        names = shipped_yaml_names(kind)
        print(title)
        w = max(map(len, names), default=0)
        for n in names:
            print(f"  {n:<{w}}  {_summary(find(n))}")
    return 0


def _add_only_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", action="append", default=[], metavar="AXIS=LABEL[,LABEL]",
                   help="keep only these labels of an axis (repeatable), e.g. --only size=mini,tiny: a subset "
                        "of the same runs, which the whole grid later skips")  # fmt: skip


def _load_sweep(file: str, only: list[str] | None = None):
    from .config import sweep_file_path
    from .sweep import load_sweep, select

    sweep = load_sweep(sweep_file_path(file))
    return select(sweep, only) if only else sweep


def _cmd_sweep_run(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .sweep import SweepError, run_sweep

    try:
        sweep = _load_sweep(args.file, args.only)
        return run_sweep(sweep, launch_options(args), max_parallel=args.max_parallel, dry_run=args.dry_run)
    except (SweepError, ConfigError) as e:
        return fail("sweep", e)


def _cmd_sweep_status(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .sweep import STATES, SweepError, format_table, status_rows

    try:
        rows = status_rows(_load_sweep(args.file, args.only))
    except (SweepError, ConfigError) as e:
        return fail("sweep", e)
    print(format_table(rows, ["name", "id", "state", "steps", "val_loss", "returncode"]))
    counts = {s: sum(r["state"] == s for r in rows) for s in STATES}
    print(", ".join(f"{n} {s}" for s, n in counts.items()))
    return 0


# -- tune ----------------------------------------------------------------------------------------------
def tune_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="study YAML, or the name of a shipped study (e.g. lit_search; see xatl-ds sweep list)")
    p.add_argument("--storage", help="override the storage: an RDB URL or journal:PATH")
    p.add_argument("--n-trials", type=int, help="trials the study should reach, all workers together (0: write best.yaml)")
    p.add_argument("--worker-id", help="name of this worker in logs, trial attrs and its sampler seed (default host-pid)")
    p.add_argument("--workers", type=int, default=1,
                   help="workers on this machine, each training one trial at a time (default 1); "
                        "the extra ones are child processes that die with this command")  # fmt: skip
    p.add_argument("--confirm", action="store_true",
                   help="re-train the best trial's setting and the references: on the fresh confirm.seeds, "
                        "then write confirm.md (see xatl_ds.confirm)")  # fmt: skip
    p.add_argument("--max-parallel", type=int, default=1, help="with --confirm: concurrent runs (default 1)")
    p.add_argument("--report-out", default=None, metavar="DIR", help="with --confirm: report folder (default OUT_DIR/confirm)")
    p.add_argument("--dry-run", action="store_true", help="with --confirm: print the confirmation runs' commands")
    add_launch_options(p)
    p.set_defaults(func=_cmd_tune)


def _tune_child_argv(args: argparse.Namespace, worker_id: str) -> list[str]:
    """The command line of an extra local worker: this one's, as one worker named ``worker_id``."""
    argv = ["tune", args.file, "--worker-id", worker_id]
    for flag, v in (("--storage", args.storage), ("--n-trials", args.n_trials), ("--num-gpus", args.num_gpus),
                    ("--num-nodes", args.num_nodes), ("--hostfile", args.hostfile), ("--launcher", args.launcher),
                    ("--include", args.include)):  # fmt: skip
        if v is not None:
            argv += [flag, str(v)]
    return [sys.executable, "-c", "import sys; from xatl_ds.cli import main; sys.exit(main())", *argv]


def _cmd_tune(args: argparse.Namespace) -> int:
    from .tune import StudyError, Worker, load_study

    if args.workers < 1:
        return fail("tune", ValueError(f"--workers={args.workers}: give 1 or more"))
    if args.workers > 1 and args.master_port is not None:
        return fail("tune", ValueError("--master-port with --workers > 1: the workers' trials would share one "
                                        "port; leave it out (each launch takes a free port)"))  # fmt: skip
    from .config import ConfigError, study_file_path

    children = []
    try:
        spec = load_study(study_file_path(args.file))
        if args.storage:
            spec.storage = args.storage
        if args.confirm:
            from .confirm import run_confirm

            return run_confirm(spec, launch_options(args), max_parallel=args.max_parallel,
                               report_out=args.report_out, dry_run=args.dry_run)  # fmt: skip
        from .executor import Launch
        from .tune import open_study

        wid = args.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        if args.workers > 1:
            open_study(spec)  # create the study (and its sqlite file) once, before the workers start
        children = [Launch(_tune_child_argv(args, f"{wid}-{k}")).start() for k in range(1, args.workers)]
        Worker(spec, launch_options(args), worker_id=wid).run(args.n_trials)
        rcs = [c.wait() for c in children]
        if any(rcs):
            print(f"[tune] extra workers exited with codes {rcs}", file=sys.stderr)
            return 1
    except (StudyError, ConfigError) as e:
        return fail("tune", e)
    except KeyboardInterrupt:  # the running trial is FAIL and its process group stopped
        print("[tune] interrupted; rerun the same command to continue the study", file=sys.stderr)
        return 130
    finally:
        for c in children:
            if c.poll() is None:
                c.stop(grace=30.0)
    best = spec.root / "best.yaml"
    print(f"[tune] study {spec.study_name}: best config {best if best.is_file() else '(none yet)'}")
    return 0



# -- quickstart ------------------------------------------------------------------------------------------
def quickstart_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sweep", default="quickstart", help="sweep YAML or shipped sweep name (default: quickstart)")
    p.add_argument("--eval-limit", type=int, default=None, help="examples per eval task (default: all)")
    p.add_argument("--report-out", default=None, metavar="DIR",
                   help="also write the report (report.md, CSVs, figures) into DIR (make study: docs/results/cpu_ladder)")
    p.add_argument("--max-parallel", type=int, default=1, help="concurrent runs and lm-eval processes (default 1)")
    _add_only_option(p)
    p.set_defaults(func=_cmd_quickstart)


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .config import ConfigError, sweep_file_path
    from .quickstart import run

    try:
        path = sweep_file_path(args.sweep)
        return run(path, args.eval_limit, report_out=Path(args.report_out) if args.report_out else None,
                   max_parallel=args.max_parallel, only=args.only)  # fmt: skip
    except (ConfigError, ValueError) as e:
        return fail("quickstart", e)
