"""Tokenized, packed training data: ``xatl-ds data prepare`` and the loaders the trainer uses.

Pipeline (all deterministic: the same inputs give byte-identical shards)::

    sources (builtin texts | .txt/.txt.gz/.jsonl/.parquet | hf:NAME[:CONFIG])   corpus.py
      -> documents -> units (<= unit_chars, cut at paragraph breaks)             split.py
      -> split by a seeded hash of the unit's text (train / val / test)          split.py
      -> tokenizer (given, or a byte-level BPE trained on the train split)       tokenizer.py
      -> DIR/train.bin, DIR/val.bin  (flat token streams, EOS after every run)   packing.py
         DIR/test.jsonl              (raw held-out units, never tokenized into train)
         DIR/tokenizer/, DIR/meta.json                                           layout.py

Loading (loader.py): :class:`PackedTokens` memory-maps one split after checking it against
meta.json (size always; sha256 and id range once per file identity) and serves batches that
are pure functions of the step; :func:`global_mean_loss` all-reduces evaluation sums.
``tokenizer_fingerprint`` / ``dataset_tokenizer_fingerprint`` tell whether a dataset and a
model share token ids. The CLI (``xatl-ds data prepare|info``) lives in xatl_ds/cli_artifacts.py.
"""
from __future__ import annotations

from .config import PrepareConfig
from .corpus import BUILTIN_CORPUS_DIR, BUILTIN_FILES
from .errors import DataError
from .layout import FORMAT_VERSION, dataset_summary, read_meta, token_dtype
from .loader import PackedTokens, global_mean_loss
from .packing import prepare, progress_logging
from .split import split_units
from .tokenizer import EOS_TOKEN, dataset_tokenizer_fingerprint, load_tokenizer, tokenizer_fingerprint

__all__ = [
    "BUILTIN_CORPUS_DIR",
    "BUILTIN_FILES",
    "DataError",
    "EOS_TOKEN",
    "FORMAT_VERSION",
    "PackedTokens",
    "PrepareConfig",
    "dataset_summary",
    "dataset_tokenizer_fingerprint",
    "global_mean_loss",
    "load_tokenizer",
    "prepare",
    "progress_logging",
    "read_meta",
    "split_units",
    "token_dtype",
    "tokenizer_fingerprint",
]
