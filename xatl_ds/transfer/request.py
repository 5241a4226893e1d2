"""One transfer as a value (:class:`TransferRequest`) and the whole job on it: load the source,
build the target, transfer, save (:func:`transfer_to_dir`). Command lines only parse into a
request and print the report."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..models.components import COMPONENTS
from .copier import transfer
from .errors import TransferError
from .planner import resolve_components
from .report import REPORT_FILE, TransferReport
from .source import load_source
from .target import build_target

__all__ = ["DTYPES", "TransferRequest", "transfer_to_dir"]

#: dtypes a source can be loaded and a target saved in
DTYPES = ("float32", "bfloat16", "float16")
#: target options a request may set (XatlConfig fields the source does not fix)
TARGET_OPTIONS = ("d_state", "d_conv", "expand", "mamba2_headdim", "mamba2_ngroups")


@dataclass
class TransferRequest:
    """Everything one source -> target transfer needs."""

    source: str
    """Hub name or ``save_pretrained`` directory of a GPT-NeoX / Llama causal LM."""
    mixer: str = "mamba"
    """Token mixer of the LCI layers."""
    attention_layers: Any = "none"
    """Layers keeping attention (``none``, ``paper``, ``all`` or indices)."""
    components: list[str] = field(default_factory=lambda: list(COMPONENTS))
    """Transferred components (default: all, the paper's set)."""
    mixer_init: str = "random"
    """How the LCI mixers start: ``random``, ``zero_out`` or ``attention``."""
    target_options: dict[str, Any] = field(default_factory=dict)
    """XatlConfig options of the target (``d_state``, ``expand``, ``mamba2_headdim``, ...)."""
    seed: int = 0
    """Seed of the new (mixer) weights."""
    dtype: str = "float32"
    """dtype to load the source and build the target in."""
    strict: bool = True
    """Fail on a mismatching component instead of skipping it."""
    attn_out_mismatch: str | None = None
    """``skip``/``error`` for an impossible ``attn_out``; ``None``: skip for the default set."""

    @classmethod
    def from_cli(
        cls,
        *,
        source: str,
        mixer: str = "mamba",
        attention_layers: Any = "none",
        components: str = "all",
        mixer_init: str = "random",
        seed: int = 0,
        dtype: str = "float32",
        strict: bool = True,
        attn_out_mismatch: str | None = None,
        **target_options: Any,
    ) -> "TransferRequest":
        """A request from command-line strings: ``components`` is ``all``, ``none`` or a comma
        list (checked here, before anything is loaded); ``target_options`` left at ``None``
        are not passed on."""
        a = components.strip().lower()
        if a in ("all", "default", ""):
            comps = list(COMPONENTS)
        elif a == "none":
            comps = []
        else:
            try:
                comps = resolve_components(components)
            except TransferError as e:
                raise TransferError(f"{e} (in --components)") from None
        unknown = sorted(set(target_options) - set(TARGET_OPTIONS))
        if unknown:
            raise TransferError(f"unknown target option(s) {unknown}; known: {list(TARGET_OPTIONS)}")
        opts = {k: v for k, v in target_options.items() if v is not None}
        return cls(source=source, mixer=mixer, attention_layers=attention_layers, components=comps,
                   mixer_init=mixer_init, target_options=opts, seed=seed, dtype=dtype, strict=strict,
                   attn_out_mismatch=attn_out_mismatch)  # fmt: skip


def transfer_to_dir(req: TransferRequest, out: str | Path | None = None, *, overwrite: bool = False) -> TransferReport:
    """Run ``req``: load the source, build the target, transfer; with ``out`` save the target
    (safetensors), the source tokenizer and ``xatl_transfer.json`` there. An ``out`` that
    already holds a model is refused (before any loading) unless ``overwrite``."""
    out = Path(out) if out is not None else None
    if out is not None and (out / "config.json").exists() and not overwrite:
        raise TransferError(f"--out {str(out)!r} already holds a model (config.json); pass --overwrite or choose another directory")
    if req.dtype not in DTYPES:
        raise TransferError(f"dtype={req.dtype!r} is unknown; choose one of {list(DTYPES)}")
    dtype = getattr(torch, req.dtype)
    source, tokenizer = load_source(req.source, dtype=dtype)
    target = build_target(source, req.mixer, req.attention_layers, seed=req.seed, dtype=dtype, **req.target_options)
    report = transfer(source, target, req.components, strict=req.strict,
                      attn_out_mismatch=req.attn_out_mismatch, mixer_init=req.mixer_init)  # fmt: skip
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        target.save_pretrained(out, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        (out / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    return report
