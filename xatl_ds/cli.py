"""The ``xatl-ds`` command line: every argument parser of the project, thin handlers that
call library functions.

Nothing heavy is imported to parse: a command's module (and torch, transformers, DeepSpeed,
Optuna, lm-eval behind it) is imported only when that command runs, so ``xatl-ds --help``
answers at once. The library never imports this module.
"""
from __future__ import annotations

import argparse
import os
import shlex
import socket
import sys
from typing import Callable, Sequence

__all__ = ["build_parser", "main"]

Handler = Callable[[argparse.Namespace], int]


# -- shared options ---------------------------------------------------------------------------
def _add_launch_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-gpus", type=int, help="ranks on this node (GPUs, or CPU ranks); default: all GPUs, or 1 on CPU")
    p.add_argument("--num-nodes", type=int, help="nodes to use from the hostfile")
    p.add_argument("--hostfile", help="DeepSpeed hostfile (multi-node)")
    p.add_argument("--launcher", choices=["pdsh", "openmpi", "mvapich", "slurm", "mpich", "impi"],
                   help="multi-node launcher")  # fmt: skip
    p.add_argument("--include", help="DeepSpeed --include, e.g. localhost:0,1")
    p.add_argument("--master-port", type=int, help="rendezvous port (default: a free port per launch)")


def _launch_options(args: argparse.Namespace):
    from .executor import LaunchOptions

    return LaunchOptions(num_gpus=args.num_gpus, num_nodes=args.num_nodes, hostfile=args.hostfile,
                         launcher=args.launcher, include=args.include, master_port=args.master_port)  # fmt: skip


def _fail(command: str, err: BaseException, code: int = 2) -> int:
    print(f"xatl-ds {command}: {err}", file=sys.stderr)
    return code


#: the C++ op DeepSpeed compiles (torch JIT extension) the first time a rank starts on a CPU
DS_CPU_OP = "deepspeed_shm_comm"


def _cpu_op_build_dir() -> str | None:
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


def _announce_cpu_op_build() -> None:
    """Say so before the first CPU launch compiles DeepSpeed's op: ~60 s of silence otherwise."""
    d = _cpu_op_build_dir()
    if d is not None and not os.path.isfile(os.path.join(d, f"{DS_CPU_OP}.so")):
        print(f"[xatl-ds] first CPU launch: DeepSpeed compiles its C++ op {DS_CPU_OP} now (about a minute, "
              f"once; cached in {d})", file=sys.stderr, flush=True)  # fmt: skip


# -- data ----------------------------------------------------------------------------------------
def _data_parser(p: argparse.ArgumentParser) -> None:
    from .data.config import PrepareConfig

    d = PrepareConfig(out="")
    sub = p.add_subparsers(dest="data_command", required=True, metavar="{prepare,info}")
    prep = sub.add_parser(
        "prepare",
        help="tokenize and pack a corpus into DIR (train.bin, val.bin, test.jsonl, tokenizer/, meta.json)",
        description=(
            "Split a corpus into train/val/test units by a seeded content hash, train a byte-level BPE on "
            "train (or use --tokenizer) and write packed uint16/uint32 token shards. Reruns with the same inputs "
            "are no-ops; the test split is kept as raw text and never enters train.bin."
        ),
    )
    # fmt: off
    arg = prep.add_argument
    arg("--out", required=True, help="dataset directory to create")
    arg("--corpus", nargs="+", action="extend", default=None, metavar="SRC",
        help="'builtin' (default: the shipped public-domain texts), files or directories (.txt, .txt.gz, "
             ".jsonl[.gz] with a text field, .parquet with a text column) or hf:NAME[:CONFIG]; "
             "several are concatenated in order")
    arg("--tokenizer", default=None,
        help="hub name or local dir for AutoTokenizer (no remote code); default: train a byte-level BPE")
    arg("--vocab-size", type=int, default=None, help=f"BPE vocabulary (default {d.vocab_size})")
    arg("--val-frac", type=float, default=None, help=f"fraction of units for val (default {d.val_frac})")
    arg("--test-frac", type=float, default=None,
        help=f"fraction of units held out as raw text in test.jsonl (default {d.test_frac})")
    arg("--seed", type=int, default=None, help=f"split seed (default {d.seed})")
    arg("--unit-chars", type=int, default=None, help=f"size of a split unit in characters (default {d.unit_chars})")
    arg("--max-chars", type=int, default=None,
        help="read at most N characters of each input file / dataset (a prefix; for quick runs)")
    arg("--bpe-max-chars", type=int, default=None,
        help=f"train the BPE on at most ~N chars of train text (default {d.bpe_max_chars})")
    arg("--text-field", default=None, help=f"jsonl field / parquet or HF column with the text (default {d.text_field!r})")
    arg("--hf-split", default=None, help=f"split of an hf: dataset to read (default {d.hf_split!r}); hf: datasets "
        "are streamed, never held whole in memory or on disk")
    arg("--num-proc", type=int, default=None,
        help="tokenizer processes (default: one per available core, at most 16); the output does not depend on it")
    arg("--overwrite", action="store_true",
        help="replace a dataset in --out prepared from different inputs, or rebuild one whose shards are damaged "
             "(only a folder prepare wrote is ever replaced)")
    # fmt: on
    prep.set_defaults(func=_cmd_data_prepare)
    info = sub.add_parser("info", help="print the meta.json summary of a prepared dataset")
    info.add_argument("dir", help="dataset directory")
    info.set_defaults(func=_cmd_data_info)


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    import dataclasses
    import time

    from .data import DataError, PrepareConfig, dataset_summary, prepare, progress_logging

    names = {f.name for f in dataclasses.fields(PrepareConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names and v is not None}
    t0 = time.perf_counter()
    try:
        with progress_logging():
            meta = prepare(PrepareConfig(**kw))
    except DataError as e:
        return _fail("data prepare", e)
    print(f"{args.out}: {dataset_summary(meta)} [{time.perf_counter() - t0:.1f}s]")
    return 0


def _cmd_data_info(args: argparse.Namespace) -> int:
    from .data import DataError, dataset_summary, read_meta

    try:
        meta = read_meta(args.dir)
    except DataError as e:
        return _fail("data info", e)
    print(f"{args.dir}: {dataset_summary(meta)}")
    for s in meta["sources"]:
        print(f"  {s['name']}: {s['chars']:,} chars, {s['documents']} docs, sha256 {s['sha256'][:16]}")
    return 0


# -- transfer --------------------------------------------------------------------------------------
def _transfer_parser(p: argparse.ArgumentParser) -> None:
    # fmt: off
    p.description = ("Load a source causal LM (hub name or local directory), build an XatlForCausalLM with the "
                     "same blocks and the chosen mixer, transfer the shared components, initialise the new mixers, "
                     "print the report and (with --out) save the target, the source tokenizer and xatl_transfer.json.")
    p.add_argument("--source", required=True, help="hub name or save_pretrained directory of a GPT-NeoX / Llama causal LM")
    p.add_argument("--mixer", default="mamba", choices=["attention", "retnet", "mamba", "mamba2"],
                   help="token mixer of the LCI layers (default: mamba)")
    p.add_argument("--attention-layers", default="none",
                   help="layers keeping attention: none, paper ([1, n//2-1]), all, or indices like 1,5 (default: none)")
    p.add_argument("--components", default="all",
                   help="comma list of embed, lm_head, final_norm, norms, mlp, attn_out, attention; "
                        "'all' (default, the paper's set) or 'none' (scratch)")
    p.add_argument("--mixer-init", default="random", choices=["random", "zero_out", "attention"],
                   help="how the LCI mixers start: random (default, the paper), zero_out (output projections 0: "
                        "the target starts as the source without those mixers; takes precedence over attn_out) or "
                        "attention (from the replaced attention: mamba2 V/K/Q -> x/B/C of in_proj, retnet q/k/v; "
                        "W_O -> the output projection)")
    p.add_argument("--d-state", type=int, default=None, help="SSM state size (mamba/mamba2)")
    p.add_argument("--d-conv", type=int, default=None, help="SSM conv width (mamba/mamba2)")
    p.add_argument("--expand", type=int, default=None, help="SSM expansion: d_inner = expand * hidden (W_O transfers only at 1)")
    p.add_argument("--mamba2-headdim", type=int, default=None,
                   help="Mamba-2 head dimension (--mixer-init attention: the source's head_dim)")
    p.add_argument("--mamba2-ngroups", type=int, default=None,
                   help="Mamba-2 B/C groups (--mixer-init attention: the source's head count)")
    p.add_argument("--seed", type=int, default=0, help="seed of the new (mixer) weights (default: 0)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype to load and save in (default: float32)")
    p.add_argument("--no-strict", action="store_true", help="skip (and report) mismatching components instead of failing")
    p.add_argument("--attn-out-mismatch", default=None, choices=["skip", "error"],
                   help="an attn_out whose shapes cannot match: skip it (default with --components all) or fail "
                        "(default with chosen components)")
    p.add_argument("--out", default=None, help="directory to save the target into (safetensors); without it nothing is written")
    p.add_argument("--overwrite", action="store_true", help="allow --out to hold an existing model")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    # fmt: on
    p.set_defaults(func=_cmd_transfer)


def _cmd_transfer(args: argparse.Namespace) -> int:
    import json

    from .transfer import TransferRequest, transfer_to_dir

    try:
        req = TransferRequest.from_cli(
            source=args.source, mixer=args.mixer, attention_layers=args.attention_layers, components=args.components,
            mixer_init=args.mixer_init, seed=args.seed, dtype=args.dtype, strict=not args.no_strict,
            attn_out_mismatch=args.attn_out_mismatch, d_state=args.d_state, d_conv=args.d_conv, expand=args.expand,
            mamba2_headdim=args.mamba2_headdim, mamba2_ngroups=args.mamba2_ngroups,
        )  # fmt: skip
        report = transfer_to_dir(req, args.out, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, OSError) as e:
        return _fail("transfer", f"error: {e}")
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(report.format())
        if args.out is not None:
            print(f"saved the target to {args.out}")
    return 0


# -- train -------------------------------------------------------------------------------------------
def _train_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config YAML")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable), e.g. -o budget.steps=100")  # fmt: skip
    _add_launch_options(p)
    p.add_argument("--dry-run", action="store_true",
                   help="check the config, its data, source and DeepSpeed config, print the command and exit")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_run_config
    from .executor import RunLocked, check_free, deepspeed_command, run_foreground, with_port
    from .preflight import PreflightError, preflight

    try:
        cfg = load_run_config(args.config, args.override)  # fail here, before any process starts
        preflight(cfg, launch=_launch_options(args))  # and everything a rank or the launcher would refuse
    except (ConfigError, PreflightError) as e:
        return _fail("train", f"bad config: {e}")
    try:
        check_free(cfg.out_dir)
    except RunLocked as e:
        return _fail("train", e, 3)
    if args.dry_run:
        print(shlex.join(deepspeed_command(args.config, _launch_options(args), args.override)))
        return 0
    _announce_cpu_op_build()
    rc = run_foreground(deepspeed_command(args.config, with_port(_launch_options(args)), args.override))
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
def _sweep_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="sweep_command", required=True, metavar="SUBCOMMAND")
    r = sub.add_parser("run", help="launch every unfinished run (finished ones are skipped, broken ones resume)")
    r.add_argument("file", help="sweep YAML, or the name of a shipped sweep (e.g. quickstart)")
    r.add_argument("--dry-run", action="store_true", help="print the deepspeed command of every run and exit")
    r.add_argument("--max-parallel", type=int, default=1,
                   help="concurrent runs (on GPUs each gets its own --include device block)")  # fmt: skip
    _add_only_option(r)
    _add_launch_options(r)
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
        if not args.dry_run:
            _announce_cpu_op_build()
        return run_sweep(sweep, _launch_options(args), max_parallel=args.max_parallel, dry_run=args.dry_run)
    except (SweepError, ConfigError) as e:
        return _fail("sweep", e)


def _cmd_sweep_status(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .sweep import STATES, SweepError, format_table, status_rows

    try:
        rows = status_rows(_load_sweep(args.file, args.only))
    except (SweepError, ConfigError) as e:
        return _fail("sweep", e)
    print(format_table(rows, ["name", "id", "state", "steps", "val_loss", "returncode"]))
    counts = {s: sum(r["state"] == s for r in rows) for s in STATES}
    print(", ".join(f"{n} {s}" for s, n in counts.items()))
    return 0


# -- tune ----------------------------------------------------------------------------------------------
def _tune_parser(p: argparse.ArgumentParser) -> None:
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
    _add_launch_options(p)
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
        return _fail("tune", ValueError(f"--workers={args.workers}: give 1 or more"))
    if args.workers > 1 and args.master_port is not None:
        return _fail("tune", ValueError("--master-port with --workers > 1: the workers' trials would share one "
                                        "port; leave it out (each launch takes a free port)"))  # fmt: skip
    from .config import ConfigError, study_file_path

    children = []
    try:
        spec = load_study(study_file_path(args.file))
        if args.storage:
            spec.storage = args.storage
        if args.confirm:
            from .confirm import run_confirm

            return run_confirm(spec, _launch_options(args), max_parallel=args.max_parallel,
                               report_out=args.report_out, dry_run=args.dry_run)  # fmt: skip
        from .executor import Launch
        from .tune import open_study

        wid = args.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        if args.worker_id is None:  # the first worker only (children get an id)
            _announce_cpu_op_build()
        if args.workers > 1:
            open_study(spec)  # create the study (and its sqlite file) once, before the workers start
        children = [Launch(_tune_child_argv(args, f"{wid}-{k}")).start() for k in range(1, args.workers)]
        Worker(spec, _launch_options(args), worker_id=wid).run(args.n_trials)
        rcs = [c.wait() for c in children]
        if any(rcs):
            print(f"[tune] extra workers exited with codes {rcs}", file=sys.stderr)
            return 1
    except (StudyError, ConfigError) as e:
        return _fail("tune", e)
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


# -- export ---------------------------------------------------------------------------------------
def _export_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_OR_DIR", help="run directory (with hf/) or a model folder")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (must not exist or be empty)")
    p.add_argument("--format", default="auto", choices=["auto", "native", "remote-code"],
                   help="native: a transformers class computing the same function (refused where none does); "
                   "remote-code: the model's own code in the folder (trust_remote_code=True); auto: native "
                   "where possible (default)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import ExportError, NoNativeExport, export_run

    try:
        res = export_run(args.run_dir, args.out, args.format, overwrite=args.overwrite)
    except (ExportError, NoNativeExport) as e:
        return _fail("export", e)
    how = "no remote code" if res.format == "native" else "trust_remote_code=True"
    print(f"wrote {res.path}: {res.model_class} ({res.format}; loads with {how}), model card README.md")
    return 0


# -- eval and report ---------------------------------------------------------------------------------
def _eval_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory (with hf/) or an hf export directory")
    p.add_argument("--tasks", default=None, help="comma-separated task names, 'paper' or 'local' (default: local)")
    p.add_argument("--include-path", action="append", default=None, metavar="DIR",
                   help="a folder of lm-eval task YAMLs (repeatable)")  # fmt: skip
    p.add_argument("--data", default=None, metavar="DATA_DIR", help="dataset of the local tasks (default: the run's)")
    p.add_argument("--limit", type=float, default=None, help="examples per task (testing); < 1: a fraction")
    p.add_argument("--batch-size", default=1, type=lambda s: s if s == "auto" else int(s), help="int or 'auto'")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--force", action="store_true", help="re-evaluate even if eval.json has these tasks")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import EvalError, evaluate_run, format_summary
    from .rundir import RunDir

    try:
        s = evaluate_run(args.run_dir, args.tasks, data_dir=args.data, include_path=args.include_path,
                         limit=args.limit, batch_size=args.batch_size, device=args.device, force=args.force)  # fmt: skip
    except EvalError as e:
        return _fail("eval", e)
    for line in format_summary(s):
        print(line)
    print(f"wrote {RunDir(args.run_dir).eval_path}")
    return 0


def _report_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep_dir")
    p.add_argument("--out", default=None, help="output folder (default: SWEEP_DIR)")
    p.add_argument("--source-flops", action="append", default=None, metavar="[SOURCE=]FLOPS",
                   help="pretraining FLOPs of a source model not trained in the sweep (hub sources), e.g. "
                   "EleutherAI/pythia-410m=7.4e20; a bare number applies to every source (repeatable)")  # fmt: skip
    p.add_argument("--expect", action="append", default=None, metavar="GLOB",
                   help="run config YAMLs the sweep should produce (their out_dir), to list runs not started")  # fmt: skip
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from analysis.report import write_report

    source_flops: dict[str, float] | float | None = None
    try:
        for item in args.source_flops or []:
            if "=" in item:
                k, v = item.rsplit("=", 1)
                source_flops = {**(source_flops if isinstance(source_flops, dict) else {}), k: float(v)}
            else:
                source_flops = float(item)
        path = write_report(args.sweep_dir, out_dir=args.out, source_flops=source_flops, expected=args.expect)
    except (FileNotFoundError, ValueError) as e:
        return _fail("report", e)
    print(f"wrote {path}")
    return 0


# -- quickstart ------------------------------------------------------------------------------------------
def _quickstart_parser(p: argparse.ArgumentParser) -> None:
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
        _announce_cpu_op_build()
        return run(path, args.eval_limit, report_out=Path(args.report_out) if args.report_out else None,
                   max_parallel=args.max_parallel, only=args.only)  # fmt: skip
    except (ConfigError, ValueError) as e:
        return _fail("quickstart", e)


#: command -> (one-line help, the function that adds its arguments)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "data": ("prepare tokenized, packed datasets", _data_parser),
    "transfer": ("build an XATL target from a pretrained Transformer and copy the shared weights", _transfer_parser),
    "train": ("train one run config through the deepspeed launcher", _train_parser),
    "eval": ("evaluate a finished run with lm-eval (writes RUN_DIR/eval.json)", _eval_parser),
    "export": ("export a run's model for plain transformers (native class or remote code) with a model card", _export_parser),
    "report": ("results table, compute-matched savings, figures and report.md for a sweep", _report_parser),
    "sweep": ("expand a sweep YAML into runs and launch them", _sweep_parser),
    "tune": ("run an Optuna study (one worker; start several for parallel trials)", _tune_parser),
    "quickstart": ("the main job on the built-in corpus (make quickstart)", _quickstart_parser),
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
