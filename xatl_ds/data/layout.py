"""The on-disk layout of a prepared dataset directory and the cheap checks on it.

A prepared dataset ``DIR`` holds ``train.bin`` and ``val.bin`` (flat token streams of
:func:`token_dtype`), ``test.jsonl`` (raw held-out units), ``tokenizer/`` and ``meta.json``.
``meta.json`` is written last and carries :data:`DATASET_FORMAT` under ``"format"``: that marker
is what makes a directory "a dataset prepared by xatl-ds", the only non-empty kind that
prepare (with ``--overwrite``) may replace.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError

#: bump when the on-disk layout or the unit/split/tokenize rules change
FORMAT_VERSION = 1
#: value of ``meta.json["format"]``: marks a directory written by ``xatl-ds data prepare``
DATASET_FORMAT = "xatl-ds/packed-tokens"
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
TEST_FILE = "test.jsonl"
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: the splits stored as token shards (``SPLIT.bin``); test stays raw text
SHARD_SPLITS: tuple[str, ...] = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits (vocab <= 65536), else uint32."""
    if vocab_size <= 0:
        raise DataError(f"vocab_size={vocab_size}: must be positive")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_file(data_dir: str | os.PathLike, split: str) -> Path:
    """``DIR/SPLIT.bin``: the token shard of ``split`` (train or val)."""
    return Path(data_dir) / f"{split}.bin"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``meta.json`` of a prepared dataset directory (clear error when it is not one)."""
    p = Path(path) / META_FILE
    if not p.is_file():
        raise DataError(f"{path} is not a prepared dataset (no {META_FILE}); run: xatl-ds data prepare --out {path}")
    try:
        with open(p, encoding="utf-8") as f:
            meta = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{p} is not valid JSON ({e}): not a dataset written by xatl-ds data prepare") from None
    if not isinstance(meta, dict):
        raise DataError(f"{p} holds a {type(meta).__name__}, not an object: not a dataset written by xatl-ds")
    return meta


def is_dataset_meta(meta: dict[str, Any]) -> bool:
    """Whether a parsed ``meta.json`` was written by ``xatl-ds data prepare``: it carries the
    format marker, or (datasets prepared before the marker existed) the keys only prepare writes."""
    if meta.get("format") == DATASET_FORMAT:
        return True
    return (
        meta.get("format_version") == 1
        and isinstance(meta.get("input_fingerprint"), str)
        and isinstance(meta.get("content_sha256"), dict)
    )


def is_prepared_dataset(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding a ``meta.json`` written by ``xatl-ds data prepare``
    (complete or not: prepare writes meta.json last, so a half-written one has none)."""
    p = Path(path)
    if not p.is_dir() or not (p / META_FILE).is_file():
        return False
    try:
        return is_dataset_meta(read_meta(p))
    except (DataError, OSError):
        return False


def check_complete(data_dir: Path, meta: dict[str, Any]) -> None:
    """Every token shard exists with exactly the size meta.json promises (cheap: a stat)."""
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in SHARD_SPLITS:
        f = shard_file(data_dir, split)
        want = meta["splits"][split]["tokens"] * itemsize
        if not f.is_file() or f.stat().st_size != want:
            got = f"{f.stat().st_size} bytes" if f.is_file() else "missing"
            raise DataError(
                f"{f} is missing or truncated (expected {want} bytes, found {got}): "
                f"re-run xatl-ds data prepare --out {data_dir} --overwrite with the same arguments"
            )


def dataset_summary(meta: dict[str, Any]) -> str:
    """One line about a prepared dataset: tokens and units per split, vocab, dtype, shard hash."""
    s = meta["splits"]
    return (
        f"train {s['train']['tokens']:,} tokens ({s['train']['units']} units), val {s['val']['tokens']:,} tokens "
        f"({s['val']['units']} units), test {s['test']['units']} raw units; vocab {meta['vocab_size']} "
        f"({meta['tokenizer_source']}), {meta['dtype']}, shards sha256 {meta['shards_sha256'][:16]}"
    )
