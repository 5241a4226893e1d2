"""``xatl-ds`` commands that make or read files without training: ``data`` (prepare, info),
``transfer``, ``export``, ``eval`` and ``report``. Each ``*_parser`` fills in a command's
arguments; its handler imports the library only when the command runs."""
from __future__ import annotations

import argparse

from .cli_common import fail

__all__ = ["data_parser", "eval_parser", "export_parser", "report_parser", "transfer_parser"]


# -- data ----------------------------------------------------------------------------------------
def data_parser(p: argparse.ArgumentParser) -> None:
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
        return fail("data prepare", e)
    print(f"{args.out}: {dataset_summary(meta)} [{time.perf_counter() - t0:.1f}s]")
    return 0


def _cmd_data_info(args: argparse.Namespace) -> int:
    from .data import DataError, dataset_summary, read_meta

    try:
        meta = read_meta(args.dir)
    except DataError as e:
        return fail("data info", e)
    print(f"{args.dir}: {dataset_summary(meta)}")
    for s in meta["sources"]:
        print(f"  {s['name']}: {s['chars']:,} chars, {s['documents']} docs, sha256 {s['sha256'][:16]}")
    return 0


# -- transfer --------------------------------------------------------------------------------------
def transfer_parser(p: argparse.ArgumentParser) -> None:
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
        return fail("transfer", f"error: {e}")
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(report.format())
        if args.out is not None:
            print(f"saved the target to {args.out}")
    return 0



# -- export ---------------------------------------------------------------------------------------
def export_parser(p: argparse.ArgumentParser) -> None:
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
        return fail("export", e)
    how = "no remote code" if res.format == "native" else "trust_remote_code=True"
    print(f"wrote {res.path}: {res.model_class} ({res.format}; loads with {how}), model card README.md")
    return 0


# -- eval and report ---------------------------------------------------------------------------------
def eval_parser(p: argparse.ArgumentParser) -> None:
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
        return fail("eval", e)
    for line in format_summary(s):
        print(line)
    print(f"wrote {RunDir(args.run_dir).eval_path}")
    return 0


def report_parser(p: argparse.ArgumentParser) -> None:
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
        return fail("report", e)
    print(f"wrote {path}")
    return 0
