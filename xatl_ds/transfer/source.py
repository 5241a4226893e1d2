"""Loading a source causal LM safely: hub name or local ``save_pretrained`` directory.

Weights are read from safetensors only; pickle files (``pytorch_model.bin``) are never
loaded, since unpickling can run code. Every local safetensors file's header is checked
against the file's size first, so a truncated download is a named error, not a parser
trace. ``trust_remote_code`` is always off.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..families import SUPPORTED_SOURCES, source_family
from .errors import SourceLoadError

__all__ = ["TOKENIZER_FILES", "LoadedSource", "check_safetensors_file", "load_source", "load_source_tokenizer",
           "source_config"]

#: files whose presence means a directory ships a tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.ckpt", "*.pkl")
RESAVE = (
    "re-save the source in safetensors format: model.save_pretrained(DIR, safe_serialization=True) "
    "(or download it again)"
)


class LoadedSource(NamedTuple):
    """A loaded source model and its tokenizer (``None`` when the source ships none)."""

    model: nn.Module
    tokenizer: Any


def _looks_local(src: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything path-like is meant as a local path."""
    return src.startswith((".", "/", "~")) or src.count("/") > 1 or os.sep != "/" and os.sep in src


def check_safetensors_file(path: Path) -> None:
    """SourceLoadError unless ``path`` is a complete safetensors file: ``safetensors.safe_open``
    reads its header and checks that the tensor data it describes fills the file exactly."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise SourceLoadError(
            f"source weights file {str(path)!r} is truncated or not safetensors ({path.stat().st_size} bytes; "
            f"safetensors: {e}): {RESAVE}"
        ) from None


def check_source_files(path: Path) -> None:
    """Named errors for a local source directory whose config.json or weights are missing,
    pickle-only or truncated: what a launcher checks before any process starts."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise SourceLoadError(f"source directory {str(path)!r} has no config.json: it is not a model saved with save_pretrained")
    shards = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SourceLoadError(f"source index {str(index)!r} is not a safetensors index ({e}): {RESAVE}") from None
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise SourceLoadError(f"source {str(path)!r}: shard(s) {missing} named in {index.name} are missing: {RESAVE}")
    if not shards:
        pickles = sorted({p.name for pat in PICKLE_PATTERNS for p in path.glob(pat)})
        if pickles:
            raise SourceLoadError(
                f"source {str(path)!r} has only pickle weights ({', '.join(pickles)}), which xatl-ds never loads "
                f"(unpickling can run code): {RESAVE}"
            )
        raise SourceLoadError(f"source {str(path)!r} has config.json but no weights (*.safetensors): {RESAVE}")
    for shard in shards:
        check_safetensors_file(shard)


def load_source_tokenizer(src: str | os.PathLike) -> Any:
    """The tokenizer a source ships (AutoTokenizer, no remote code), or ``None``: a local
    directory without tokenizer files, or a hub name whose tokenizer cannot be loaded."""
    from transformers import AutoTokenizer

    path = Path(src).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            return None
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    try:
        return AutoTokenizer.from_pretrained(str(src), trust_remote_code=False)
    except (OSError, ValueError):
        return None


def source_config(src: str | os.PathLike) -> tuple[Any, str]:
    """Everything :func:`load_source` checks before it reads weights: the directory or hub name,
    its config.json (a supported causal LM), and for a local directory the safetensors files'
    headers (:func:`check_source_files`). Returns ``(transformers config, where)``; raises as
    :func:`load_source` does. Reads no tensor: a launcher's preflight calls it."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    src = str(src)
    path = Path(src).expanduser()
    local = path.is_dir()
    if not local and (path.exists() or _looks_local(src)):
        what = "is a file, not a directory" if path.exists() else "does not exist"
        raise FileNotFoundError(f"source directory {str(path)!r} {what}; give a save_pretrained directory or a hub name like 'EleutherAI/pythia-410m'")
    if local and not (path / "config.json").is_file():
        raise FileNotFoundError(f"source directory {str(path)!r} has no config.json: it is not a model saved with save_pretrained")
    where = str(path) if local else src
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=False)
    except OSError as e:
        if local:
            raise SourceLoadError(f"source {src!r}: cannot read {str(path / 'config.json')!r}: {e} (re-save the model with save_pretrained)") from e
        raise OSError(
            f"could not load source {src!r}: there is no local directory of that name, and as a hub "
            f"name it failed: {e}\n(a hub name needs network access or a local HF cache; "
            "HF_HUB_OFFLINE=1 allows only cached models)"
        ) from e
    except ValueError as e:  # unknown model_type / remote code
        raise ValueError(f"source {src!r}: {e}\nsupported source model types: {sorted(SUPPORTED_SOURCES)}") from e
    source_family(config)
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    archs = list(getattr(config, "architectures", None) or [])
    if archs and causal not in archs:
        raise SourceLoadError(
            f"source {src!r} was saved as {archs}, which is not a causal LM (expected {causal}): its "
            f"LM head would be randomly initialised. Save the {causal} model instead"
        )
    if local:
        check_source_files(path)
    return config, where


def load_source(src: str | os.PathLike, dtype: torch.dtype = torch.float32) -> LoadedSource:
    """Load a source causal LM (hub name or local ``save_pretrained`` directory) and its tokenizer.

    Raises FileNotFoundError for a missing directory or one without ``config.json``,
    :class:`SourceLoadError` (a ValueError) for weights that are missing, pickle-only,
    truncated or incomplete, or a checkpoint that is not a causal LM (a base model or another
    head, whose LM head would be silently random), ValueError for an unsupported family.
    """
    from transformers import AutoModelForCausalLM

    config, where = source_config(src)
    src = str(src)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            where, dtype=dtype, trust_remote_code=False, use_safetensors=True, output_loading_info=True
        )
    except OSError as e:  # e.g. a hub repo without safetensors weights
        raise SourceLoadError(f"source {src!r}: cannot load safetensors weights: {e}\n{RESAVE}") from e
    except Exception as e:
        if type(e).__name__ != "SafetensorError":
            raise
        raise SourceLoadError(f"source {src!r}: its safetensors weights cannot be read ({e}): {RESAVE}") from e
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise SourceLoadError(
            f"source {src!r} is not a complete causal LM checkpoint: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} missing (would be randomly initialised)"
        )
    model.eval()
    return LoadedSource(model, load_source_tokenizer(where))
