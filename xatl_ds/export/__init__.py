"""Export a trained XatlForCausalLM as a folder anyone can load with transformers.

Formats (``xatl-ds export RUN_OR_DIR --out DIR --format ...``):

* ``native``: a transformers class that computes exactly the same function
  (GPT-NeoX / Llama for all-attention models, Bamba for Llama-family Mamba-2 hybrids;
  :mod:`.native`); loads with no remote code. Refused with :class:`NoNativeExport` otherwise.
* ``remote-code``: the XatlForCausalLM weights and config plus the model's own code,
  generated from this package (:mod:`.remote_code`), with ``auto_map`` in config.json:
  loads with ``trust_remote_code=True`` where only torch and transformers are installed,
  and, as before, with xatl_ds imported and no remote code at all.
* ``auto``: native where possible, else remote-code (what the trainer writes to ``OUT/hf``).

Every export gets a model card (:mod:`.card`).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .native import NoNativeExport, is_plain_transformer, native_class_name, native_config, to_native

__all__ = [
    "FORMATS",
    "ExportError",
    "ExportResult",
    "NoNativeExport",
    "export_model",
    "export_run",
    "is_plain_transformer",
    "native_class_name",
    "native_config",
    "resolve_format",
    "save_model",
    "save_model_in_place",
    "to_native",
]

FORMATS = ("auto", "native", "remote-code")


class ExportError(ValueError):
    """The export cannot be made (bad input folder, occupied output, wrong format)."""


@dataclass
class ExportResult:
    path: Path
    format: str  # "native" or "remote-code"
    model_class: str
    files: list[str] = field(default_factory=list)


def resolve_format(model, fmt: str = "auto") -> str:
    """``native`` or ``remote-code`` for ``model`` under ``fmt``; :class:`NoNativeExport` for
    ``native`` where no transformers class computes its function."""
    if fmt not in FORMATS:
        raise ExportError(f"format {fmt!r} is unknown; choose one of {FORMATS}")
    if fmt == "remote-code":
        return fmt
    try:
        native_class_name(model)
    except NoNativeExport:
        if fmt == "native":
            raise
        return "remote-code"
    return "native"


def save_model(model, out_dir: str | Path, fmt: str = "auto") -> ExportResult:
    """Save ``model`` (an XatlForCausalLM) into ``out_dir`` in format ``fmt``: weights and
    config, plus the generated code for remote-code. No tokenizer, no card."""
    from .remote_code import write_remote_code

    out = Path(out_dir)
    kind = resolve_format(model, fmt)
    if kind == "native":
        native = to_native(model)
        native.save_pretrained(out)
        return ExportResult(out, kind, type(native).__name__)
    model.save_pretrained(out)
    return ExportResult(out, kind, type(model).__name__, write_remote_code(out))


def save_model_in_place(model, out_dir: str | Path, fmt: str = "auto", *, tokenizer=None) -> ExportResult:
    """:func:`save_model` and the ``tokenizer`` (if any), written beside ``out_dir`` and then
    renamed into place (an earlier folder is replaced), so that ``out_dir`` is never half
    written: the trainer's ``hf/``. No card (the trainer writes it from meta.json, later)."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    res = save_model(model, tmp, fmt)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    res.path = out
    return res


def export_model(model, out_dir: str | Path, fmt: str = "auto", *, tokenizer=None, run=None) -> ExportResult:
    """:func:`save_model`, the ``tokenizer`` (if any) and the model card (with ``run``'s
    numbers: a :class:`~xatl_ds.rundir.RunDir` or None)."""
    from .card import model_card

    res = save_model(model, out_dir, fmt)
    if tokenizer is not None:
        tokenizer.save_pretrained(res.path)
    text = model_card(model.config, export_format=res.format, model_class=res.model_class, run=run)
    (res.path / "README.md").write_text(text, encoding="utf-8")
    return res


def _locate(run_or_dir: str | Path):
    """(the model folder, its RunDir or None) of a run directory or an hf export folder."""
    from ..rundir import RunDir

    p = Path(run_or_dir)
    if (p / RunDir.HF / "config.json").is_file():
        return p / RunDir.HF, RunDir(p)
    if (p / "config.json").is_file():
        parent = RunDir(p.parent)
        return p, (parent if parent.meta_path.is_file() else None)
    if RunDir(p).is_run_dir():
        raise ExportError(f"{p} has no hf/ export yet ({RunDir(p).state()}); export finished runs")
    raise ExportError(f"{p} is neither a run directory nor a model folder (no config.json)")


def export_run(
    run_or_dir: str | Path, out_dir: str | Path, fmt: str = "auto", *, overwrite: bool = False
) -> ExportResult:
    """Export the model of a run directory (or of an hf folder of one) to ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models import XatlForCausalLM
    from .card import write_card

    src, run = _locate(run_or_dir)
    out = Path(out_dir)
    if out.resolve() == src.resolve():
        raise ExportError(f"--out {out} is the folder being exported; choose another")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"{out} exists and is not empty; remove it or pass --overwrite")
        shutil.rmtree(out)
    # xatl_ds is imported, so an xatl folder loads with the package's own classes: no remote code
    model = AutoModelForCausalLM.from_pretrained(src, trust_remote_code=False).eval()
    tok = None
    if any((src / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=False)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(model, XatlForCausalLM):
        res = export_model(model, tmp, fmt, tokenizer=tok, run=run)
    else:  # already a native class (an all-attention run's hf/)
        if fmt == "remote-code":
            raise ExportError(f"{src} already holds a native {type(model).__name__}; export it with --format native")
        if run is None:
            raise ExportError(f"{src} is a {type(model).__name__} with no run directory around it; nothing to add")
        model.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
        write_card(tmp, run, export_format="native", model_class=type(model).__name__)
        res = ExportResult(tmp, "native", type(model).__name__)
    tmp.rename(out)
    res.path = out
    return res
