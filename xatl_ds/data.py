"""Tokenized, packed training data: ``xatl-ds data prepare`` and the loaders the trainer uses.

Pipeline (all deterministic: the same inputs give byte-identical shards)::

    sources (builtin texts | .txt/.txt.gz/.jsonl/.parquet | hf:NAME[:CONFIG])
      -> documents -> units (<= unit_chars, cut at paragraph breaks)
      -> split by a seeded hash of the unit's text (train / val / test)
      -> tokenizer (given, or a byte-level BPE trained on the train split)
      -> DIR/train.bin, DIR/val.bin  (flat token streams, EOS after every document run)
         DIR/test.jsonl              (raw held-out units, never tokenized into train)
         DIR/tokenizer/, DIR/meta.json

The split hashes a unit's *content* (not its position), so exact duplicates always land in the
same split and no held-out unit can reappear verbatim in train. Consecutive units of one
document that share a split are written as one contiguous run; an EOS closes every run, so a
unit held out from the middle of a book leaves an EOS where it was.

Loading: :class:`PackedTokens` memory-maps one split. :meth:`PackedTokens.get_batch` is a pure
function of ``(step, micro_step, rank, ...)``: a resumed run sees exactly the batches it would
have seen. :meth:`PackedTokens.iter_eval_batches` gives a fixed slice of val, split over ranks;
:func:`global_mean_loss` all-reduces the per-rank sums.
"""
from __future__ import annotations

import argparse
import array
import bisect
import contextlib
import dataclasses
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

__all__ = [
    "BUILTIN_CORPUS_DIR",
    "BUILTIN_FILES",
    "DataError",
    "EOS_TOKEN",
    "FORMAT_VERSION",
    "PackedTokens",
    "PrepareConfig",
    "add_cli",
    "global_mean_loss",
    "load_tokenizer",
    "main",
    "prepare",
    "read_meta",
    "split_units",
    "token_dtype",
]

logger = logging.getLogger(__name__)

#: bump when the on-disk layout or the unit/split/tokenize rules change
FORMAT_VERSION = 1
EOS_TOKEN = "<|endoftext|>"
BUILTIN_CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
BUILTIN_FILES: tuple[str, ...] = ("austen.txt.gz", "kjv.txt.gz", "shakespeare_gut.txt.gz", "jargon.txt.gz")
SUPPORTED_SUFFIXES: tuple[str, ...] = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
TEST_FILE = "test.jsonl"
SPLITS: tuple[str, ...] = ("train", "val", "test")

_TWO64 = 1 << 64
# a blank line (possibly holding spaces): a unit may end right after it, so the next unit
# starts at a paragraph and keeps that paragraph's indentation
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r]*\n(?:[ \t\r]*\n)*")
# tokenizer batches: long strings are slow in `tokenizers` (alignment bookkeeping), so we
# encode unit by unit and batch many units per call
_ENCODE_BATCH_CHARS = 2_000_000


class DataError(ValueError):
    """Bad data input or a dataset directory in an unexpected state (message says the fix)."""


# --------------------------------------------------------------------------------------------
# configuration


@dataclass
class PrepareConfig:
    """Everything that decides a prepared dataset (all fields but ``out`` and ``overwrite``
    enter the input fingerprint that makes a rerun a no-op)."""

    out: str | os.PathLike
    #: ``builtin``, files / directories (.txt, .txt.gz, .jsonl[.gz] with a text field,
    #: .parquet with a text column) or ``hf:NAME[:CONFIG]``; several are concatenated in order
    corpus: list[str] = field(default_factory=lambda: ["builtin"])
    #: hub name or local directory for ``AutoTokenizer``; None trains a byte-level BPE
    tokenizer: str | None = None
    #: vocabulary of the trained BPE (ignored with ``tokenizer``)
    vocab_size: int = 4096
    val_frac: float = 0.01
    test_frac: float = 0.01
    seed: int = 1234
    #: target size of a split unit in characters (units are cut at paragraph breaks)
    unit_chars: int = 2048
    #: read at most this many characters from each input file / HF dataset (a prefix)
    max_chars: int | None = None
    #: cap on the train text the BPE is trained on (a hash-sampled subset beyond it)
    bpe_max_chars: int = 16_000_000
    #: jsonl field / parquet and HF column holding the text
    text_field: str = "text"
    #: split of an ``hf:`` dataset to read (our own train/val/test split is made from it)
    hf_split: str = "train"
    #: replace an existing dataset prepared from different inputs
    overwrite: bool = False

    def validate(self) -> None:
        """Raise :class:`DataError` naming the offending field (and CLI flag) and the fix."""
        if not self.corpus:
            raise DataError("corpus is empty: give --corpus builtin, local files/dirs or hf:NAME")
        if self.tokenizer is None and not 256 + 1 < self.vocab_size <= 1 << 20:
            raise DataError(f"vocab_size={self.vocab_size} (--vocab-size): a byte-level BPE needs 258..1048576")
        for name in ("val_frac", "test_frac"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise DataError(f"{name}={v} (--{name.replace('_', '-')}): must be in [0, 1)")
        if self.val_frac + self.test_frac >= 0.5:
            raise DataError(
                f"val_frac + test_frac = {self.val_frac + self.test_frac}: leaves too little to train on; keep it < 0.5"
            )
        if self.seed < 0:
            raise DataError(f"seed={self.seed} (--seed): must be >= 0")
        if self.unit_chars < 64:
            raise DataError(f"unit_chars={self.unit_chars} (--unit-chars): must be >= 64")
        if self.max_chars is not None and self.max_chars < 1:
            raise DataError(f"max_chars={self.max_chars} (--max-chars): must be >= 1, or None for everything")
        if self.bpe_max_chars < 1:
            raise DataError(f"bpe_max_chars={self.bpe_max_chars} (--bpe-max-chars): must be >= 1")
        if not self.text_field:
            raise DataError("text_field (--text-field) is empty: name the jsonl field / parquet column with the text")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits (vocab <= 65536), else uint32."""
    if vocab_size <= 0:
        raise DataError(f"vocab_size={vocab_size}: must be positive")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# --------------------------------------------------------------------------------------------
# sources


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    for suf in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suf):
            return suf
    return None


@dataclass
class _Source:
    """One input stream of documents: a local file or an HF dataset split."""

    spec: str  # what the user wrote (builtin / path / hf:...)
    kind: str  # "file" | "hf"
    name: str  # file name or "hf:NAME[:CONFIG]"
    digest: str  # sha256 of the file bytes, or the HF dataset fingerprint
    path: Path | None = None
    dataset: Any = None

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind, "name": self.name, "sha256": self.digest}

    def documents(self, text_field: str, max_chars: int | None = None) -> Iterator[str]:
        """Yield the source's documents as strings, in a fixed order (``max_chars``: a hint
        that the caller reads no more characters than that; it still truncates itself)."""
        if self.kind == "hf":
            yield from _hf_documents(self.dataset, self.name, text_field)
            return
        assert self.path is not None
        suf = _suffix(self.path)
        if suf in (".txt", ".txt.gz"):
            yield _read_text(self.path, max_chars)
        elif suf in (".jsonl", ".jsonl.gz"):
            yield from _jsonl_documents(self.path, text_field)
        elif suf == ".parquet":
            yield from _parquet_documents(self.path, text_field)
        else:  # resolve_sources only admits supported suffixes
            raise DataError(f"{self.path}: unsupported file type")


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{where} is not UTF-8 (byte {e.start}): convert it first, e.g. iconv -f latin1 -t utf-8"
        ) from None


def _read_text(path: Path, max_chars: int | None = None) -> str:
    """The file as text with ``\r\n`` -> ``\n``; with ``max_chars``, exactly the first
    ``max_chars`` characters of that, without reading (or decompressing) the rest."""
    with _open_bytes(path) as f:
        if max_chars is None:
            return _decode(f.read(), str(path)).replace("\r\n", "\n")
        # a character is at most 4 bytes, so 4*(n+1) bytes hold n+1 characters even after
        # \r\n -> \n; an incremental decode tolerates a character cut at the end
        import codecs

        raw = f.read(4 * (max_chars + 1))
        try:
            text = codecs.getincrementaldecoder("utf-8")().decode(raw, final=False)
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path} is not UTF-8 (byte {e.start}): convert it first, e.g. iconv -f latin1 -t utf-8"
            ) from None
        return text.replace("\r\n", "\n")[:max_chars]


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with _open_bytes(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode(raw, f"{path}:{lineno}").strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object"
                ) from None
            if not isinstance(obj, dict) or text_field not in obj:
                keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise DataError(
                    f"{path}:{lineno}: no field {text_field!r} (found {keys}); "
                    f"name the text field with --text-field"
                )
            text = obj[text_field]
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, expected a string")
            yield text


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    columns = pf.schema_arrow.names
    if text_field not in columns:
        raise DataError(f"{path}: no column {text_field!r} (columns: {columns}); name it with --text-field")
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(f"{path}: column {text_field!r} holds {type(text).__name__}, expected strings")
            yield text


def _hf_documents(dataset: Any, name: str, text_field: str) -> Iterator[str]:
    if text_field not in dataset.column_names:
        raise DataError(
            f"{name}: no column {text_field!r} (columns: {dataset.column_names}); name it with --text-field"
        )
    col = dataset.select_columns([text_field])
    for start in range(0, len(col), 1024):
        for text in col[start : start + 1024][text_field]:
            if text:
                yield text


def _load_hf(spec: str, split: str) -> _Source:
    rest = spec[3:]
    name, _, config = rest.partition(":")
    if not name:
        raise DataError(f"corpus {spec!r}: write hf:NAME or hf:NAME:CONFIG")
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise DataError(f"corpus {spec!r} needs the 'datasets' package: pip install datasets") from e
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # offline, unknown name, bad config: all end the same way for the user
        raise DataError(
            f"cannot fetch the Hugging Face dataset {name!r}"
            f"{f' (config {config!r})' if config else ''}, split {split!r}: {type(e).__name__}: {e}. "
            "Without network access (or with HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set) only datasets already in "
            "the local HF cache load. Download it elsewhere and pass local files instead, e.g. "
            "--corpus data/*.jsonl (a 'text' field), .parquet (a 'text' column) or .txt files."
        ) from None
    if isinstance(ds, dict) or not hasattr(ds, "column_names"):
        raise DataError(f"corpus {spec!r}: expected one split, got {type(ds).__name__}; pick one with --hf-split")
    fingerprint = getattr(ds, "_fingerprint", None) or hashlib.sha256(repr(ds).encode()).hexdigest()
    return _Source(spec=spec, kind="hf", name=f"hf:{rest}", digest=str(fingerprint), dataset=ds)


def _resolve_sources(specs: Sequence[str], hf_split: str) -> list[_Source]:
    """Expand corpus specs into concrete sources (files sorted inside directories)."""
    out: list[_Source] = []
    for spec in specs:
        if spec == "builtin":
            for fname in BUILTIN_FILES:
                p = BUILTIN_CORPUS_DIR / fname
                if not p.is_file():
                    raise DataError(
                        f"builtin corpus file {p} is missing: the package install is incomplete "
                        "(package-data 'corpus/*.gz'); reinstall xatl-ds or pass --corpus PATH"
                    )
                out.append(_Source(spec=spec, kind="file", name=f"builtin/{fname}", digest=_sha256_file(p), path=p))
        elif spec.startswith("hf:"):
            out.append(_load_hf(spec, hf_split))
        else:
            p = Path(spec).expanduser()
            if p.is_dir():
                files = sorted(f for f in p.rglob("*") if f.is_file() and _suffix(f) is not None)
                if not files:
                    raise DataError(f"corpus directory {spec!r} holds no {'/'.join(SUPPORTED_SUFFIXES)} files")
                for f in files:
                    rel = f.relative_to(p).as_posix()
                    out.append(_Source(spec=spec, kind="file", name=rel, digest=_sha256_file(f), path=f))
            elif p.is_file():
                if _suffix(p) is None:
                    raise DataError(f"corpus file {spec!r}: unsupported type; use {', '.join(SUPPORTED_SUFFIXES)}")
                out.append(_Source(spec=spec, kind="file", name=p.name, digest=_sha256_file(p), path=p))
            else:
                raise DataError(
                    f"corpus {spec!r} is neither 'builtin', an existing file/directory nor hf:NAME[:CONFIG]"
                )
    return out


# --------------------------------------------------------------------------------------------
# units and splits


def split_units(text: str, unit_chars: int) -> list[str]:
    """Cut ``text`` into consecutive slices of at most ``unit_chars`` characters.

    Cuts prefer the end of a blank line (a paragraph break), then a newline, then a space, and
    fall back to a hard cut. ``"".join(split_units(t, n)) == t`` always holds.
    """
    n = len(text)
    breaks = [m.end() for m in _PARAGRAPH_BREAK.finditer(text)]
    units: list[str] = []
    s = 0
    while s < n:
        if n - s <= unit_chars:
            e = n
        else:
            lim = s + unit_chars
            i = bisect.bisect_right(breaks, lim) - 1
            if i >= 0 and breaks[i] > s:
                e = breaks[i]
            else:
                e = text.rfind("\n", s + 1, lim) + 1
                if e <= s:
                    e = text.rfind(" ", s + 1, lim) + 1
                    if e <= s:
                        e = lim
        units.append(text[s:e])
        s = e
    return units


@dataclass
class _Unit:
    source: int  # index into the resolved sources
    doc: int
    index: int  # position within the document
    raw: str  # exact slice of the document
    text: str  # raw.strip(): what is hashed and what test.jsonl holds
    h_split: int  # 64-bit hash deciding the split
    h_sample: int  # independent 64-bit hash for the BPE training sample


def _iter_units(sources: Sequence[_Source], cfg: PrepareConfig) -> Iterator[_Unit]:
    salt = f"xatl-ds/split/v{FORMAT_VERSION}/seed={cfg.seed}\0".encode()
    for si, src in enumerate(sources):
        remaining = cfg.max_chars
        for di, doc in enumerate(src.documents(cfg.text_field, cfg.max_chars)):
            if remaining is not None:
                if remaining <= 0:
                    break
                doc = doc[:remaining]
                remaining -= len(doc)
            for ui, raw in enumerate(split_units(doc, cfg.unit_chars)):
                text = raw.strip()
                if not text:
                    continue
                d = hashlib.blake2b(salt + text.encode("utf-8"), digest_size=16).digest()
                yield _Unit(si, di, ui, raw, text, int.from_bytes(d[:8], "big"), int.from_bytes(d[8:], "big"))


@dataclass
class _Thresholds:
    test: int  # h_split < test -> test
    val: int  # test <= h_split < val -> val, else train

    def split_of(self, h: int) -> str:
        return "test" if h < self.test else "val" if h < self.val else "train"


def _thresholds(hashes: np.ndarray, cfg: PrepareConfig) -> _Thresholds:
    """Hash thresholds for the split fractions; a split asked for but left empty by a small
    corpus gets the unit(s) with the next-smallest hash (still deterministic)."""
    uniq = np.unique(hashes)
    if uniq.size < 1 + (cfg.val_frac > 0) + (cfg.test_frac > 0):
        raise DataError(
            f"the corpus gives only {uniq.size} distinct unit(s) of <= {cfg.unit_chars} chars: too small to split "
            "into train/val/test; add text, raise --max-chars or lower --unit-chars"
        )
    t_test = min(int(cfg.test_frac * _TWO64), _TWO64 - 1)
    t_val = min(int((cfg.test_frac + cfg.val_frac) * _TWO64), _TWO64 - 1)
    if cfg.test_frac > 0 and not (uniq < np.uint64(t_test)).any():
        t_test = int(uniq[0]) + 1
    t_val = max(t_val, t_test)
    above = uniq[uniq >= np.uint64(t_test)]
    if cfg.val_frac > 0 and not (above < np.uint64(t_val)).any():
        t_val = int(above[0]) + 1
    if not (uniq >= np.uint64(t_val)).any():
        raise DataError("no unit is left for train: add text or lower --val-frac / --test-frac")
    return _Thresholds(t_test, t_val)


# --------------------------------------------------------------------------------------------
# tokenizer


def _train_bpe(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE (lossless; ``<|endoftext|>`` = id 0) wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )


def load_tokenizer(path: str | os.PathLike):
    """``AutoTokenizer`` for a tokenizer directory, a hub name, or a prepared dataset directory
    (its ``tokenizer/``); never runs remote code."""
    from transformers import AutoTokenizer

    p = Path(path)
    if (p / META_FILE).is_file() and (p / TOKENIZER_DIR).is_dir():
        p = p / TOKENIZER_DIR
    target = str(p) if p.exists() else str(path)
    try:
        return AutoTokenizer.from_pretrained(target, trust_remote_code=False)
    except Exception as e:
        raise DataError(
            f"cannot load a tokenizer from {str(path)!r}: {type(e).__name__}: {e}. Give a directory written by "
            "save_pretrained (or a prepared dataset dir), or a hub name that is in the local HF cache"
        ) from None


def _tokenizer_fingerprint(tok: Any) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:  # a slow (python) tokenizer: its vocabulary is the best cheap summary
        body = json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False)
    extra = json.dumps([type(tok).__name__, tok.eos_token, tok.eos_token_id, len(tok)])
    return hashlib.sha256((body + extra).encode("utf-8")).hexdigest()


def _encode(tok: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tok(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


# --------------------------------------------------------------------------------------------
# prepare


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``meta.json`` of a prepared dataset directory (clear error when it is not one)."""
    p = Path(path) / META_FILE
    if not p.is_file():
        raise DataError(f"{path} is not a prepared dataset (no {META_FILE}); run: xatl-ds data prepare --out {path}")
    with open(p, encoding="utf-8") as f:
        return json.load(f)


def _input_fingerprint(cfg: PrepareConfig, sources: Sequence[_Source], tok_fp: str | None) -> str:
    body = {
        "version": FORMAT_VERSION,
        "sources": [s.describe() for s in sources],
        "tokenizer": cfg.tokenizer,
        "tokenizer_sha256": tok_fp,
        "vocab_size": cfg.vocab_size if cfg.tokenizer is None else None,
        "bpe_max_chars": cfg.bpe_max_chars if cfg.tokenizer is None else None,
        "val_frac": cfg.val_frac,
        "test_frac": cfg.test_frac,
        "seed": cfg.seed,
        "unit_chars": cfg.unit_chars,
        "max_chars": cfg.max_chars,
        "text_field": cfg.text_field,
        "hf_split": cfg.hf_split,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _check_complete(out: Path, meta: dict[str, Any]) -> None:
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        f = out / f"{split}.bin"
        want = meta["splits"][split]["tokens"] * itemsize
        if not f.is_file() or f.stat().st_size != want:
            raise DataError(f"{f} is missing or truncated (expected {want} bytes): rerun with --overwrite")


def _clean_stale_tmp(out: Path) -> None:
    """Remove temp dirs that a killed prepare of ``out`` left behind (their pid is gone)."""
    for d in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int(d.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
            continue  # still running: not ours to remove
        except (ValueError, ProcessLookupError):
            pass
        except PermissionError:
            continue
        shutil.rmtree(d, ignore_errors=True)


class _ShardWriter:
    """Buffers unit texts of one split, encodes them in batches and appends the ids (+ EOS at
    the end of every run of consecutive units) to a flat binary file."""

    def __init__(self, path: Path, tok: Any, dtype: np.dtype, eos_id: int):
        self.f = open(path, "wb")
        self.tok, self.dtype, self.eos = tok, dtype, eos_id
        self.limit = np.iinfo(dtype).max
        self.texts: list[str] = []
        self.ends: list[bool] = []
        self.chars = 0
        self.buffered = 0
        self.tokens = 0
        self.runs = 0
        self.units = 0

    def add(self, text: str, run_ends: bool) -> None:
        self.texts.append(text)
        self.ends.append(run_ends)
        self.chars += len(text)
        self.buffered += len(text)
        self.units += 1
        self.runs += run_ends
        if self.buffered >= _ENCODE_BATCH_CHARS:
            self.flush()

    def flush(self) -> None:
        if not self.texts:
            return
        pieces: list[list[int]] = []
        for ids, end in zip(_encode(self.tok, self.texts), self.ends):
            pieces.append(ids)
            if end:
                pieces.append([self.eos])
        arr = np.fromiter((i for p in pieces for i in p), dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() > self.limit):
            raise DataError(
                f"token id {int(arr.max())} does not fit {self.dtype}: the tokenizer's vocab is larger than it reports"
            )
        arr.astype(self.dtype).tofile(self.f)
        self.tokens += int(arr.size)
        self.texts, self.ends, self.buffered = [], [], 0

    def close(self) -> None:
        self.flush()
        self.f.close()


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Build (or reuse) the packed dataset described by ``cfg``; returns its meta dict.

    An existing complete ``cfg.out`` with the same input fingerprint is reused as is; one with a
    different fingerprint raises :class:`DataError` unless ``cfg.overwrite``. The dataset is
    written into a temporary sibling directory and renamed into place at the end, so an
    interrupted run never leaves a directory that looks complete.
    """
    cfg.validate()
    t0 = time.perf_counter()
    out = Path(cfg.out).expanduser().absolute()
    sources = _resolve_sources(cfg.corpus, cfg.hf_split)
    given_tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer is not None else None
    if given_tok is not None and given_tok.eos_token_id is None:
        raise DataError(
            f"tokenizer {cfg.tokenizer!r} has no eos_token: documents need a separator; "
            "set one (tok.eos_token = ...; save_pretrained) or omit --tokenizer to train a BPE"
        )
    fingerprint = _input_fingerprint(cfg, sources, _tokenizer_fingerprint(given_tok) if given_tok else None)

    if (out / META_FILE).is_file():
        meta = read_meta(out)
        if meta.get("input_fingerprint") == fingerprint:
            _check_complete(out, meta)
            logger.info("%s is up to date (same inputs): nothing to do", out)
            return meta
        if not cfg.overwrite:
            raise DataError(
                f"{out} holds a dataset prepared from different inputs (corpus, tokenizer, fractions, seed, "
                "unit/max chars or file contents changed): pass --overwrite to replace it, or choose another --out"
            )
    elif out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.overwrite:
        raise DataError(f"{out} exists and is not a prepared dataset: choose another --out or pass --overwrite")

    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        meta = _build(cfg, sources, given_tok, fingerprint, tmp)
        _swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "prepared %s in %.1fs: train %d tokens, val %d tokens, test %d units",
        out, time.perf_counter() - t0, meta["splits"]["train"]["tokens"], meta["splits"]["val"]["tokens"],
        meta["splits"]["test"]["units"],
    )
    return meta


def _swap_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def _build(cfg: PrepareConfig, sources: list[_Source], tok: Any, fingerprint: str, tmp: Path) -> dict[str, Any]:
    # pass 1: split thresholds and per-source statistics
    t = time.perf_counter()
    hashes = array.array("Q")
    src_stats = [{"documents": 0, "chars": 0, "units": 0} for _ in sources]
    seen_docs: set[tuple[int, int]] = set()
    for u in _iter_units(sources, cfg):
        hashes.append(u.h_split)
        st = src_stats[u.source]
        st["units"] += 1
        st["chars"] += len(u.raw)
        if (u.source, u.doc) not in seen_docs:
            seen_docs.add((u.source, u.doc))
            st["documents"] += 1
    seen_docs.clear()
    if not hashes:
        raise DataError(f"the corpus {cfg.corpus} holds no text (after --max-chars={cfg.max_chars})")
    thr = _thresholds(np.frombuffer(hashes, dtype=np.uint64), cfg)
    del hashes
    logger.info("pass 1 (units, split): %.1fs", time.perf_counter() - t)

    # tokenizer: the given one, or a BPE trained on (a hash sample of) the train split only
    t = time.perf_counter()
    bpe_info: dict[str, Any] | None = None
    if tok is None:
        train_chars = sum(
            len(u.text) for u in _iter_units(sources, cfg) if thr.split_of(u.h_split) == "train"
        )
        rate = min(1.0, cfg.bpe_max_chars / max(train_chars, 1))
        t_sample = _TWO64 if rate >= 1.0 else int(rate * _TWO64)
        used = [0]

        def sample() -> Iterator[str]:
            for u in _iter_units(sources, cfg):
                if u.h_sample < t_sample and thr.split_of(u.h_split) == "train":
                    used[0] += len(u.text)
                    yield u.text

        tok = _train_bpe(sample(), cfg.vocab_size)
        bpe_info = {
            "vocab_size": cfg.vocab_size, "train_chars": used[0], "sample_rate": rate, "max_chars": cfg.bpe_max_chars
        }
        logger.info("BPE (vocab %d) trained on %d chars: %.1fs", cfg.vocab_size, used[0], time.perf_counter() - t)
    tok.save_pretrained(str(tmp / TOKENIZER_DIR))
    vocab = len(tok)
    dtype = token_dtype(vocab)
    eos_id = int(tok.eos_token_id)

    # pass 3: tokenize train/val runs, write held-out test units raw
    t = time.perf_counter()
    writers = {s: _ShardWriter(tmp / f"{s}.bin", tok, dtype, eos_id) for s in ("train", "val")}
    test_units = test_chars = test_dupes = 0
    seen_test: set[bytes] = set()
    pending: tuple[_Unit, str] | None = None  # (unit, split): written once we know if its run ends

    def emit(u: _Unit, split: str, run_ends: bool, run_starts: bool) -> None:
        text = u.raw.lstrip("\r\n") if run_starts else u.raw
        text = text.rstrip() if run_ends else text
        writers[split].add(text, run_ends)

    prev_started = True
    with open(tmp / TEST_FILE, "w", encoding="utf-8", newline="\n") as ftest:
        for u in _iter_units(sources, cfg):
            split = thr.split_of(u.h_split)
            if pending is not None:
                pu, ps = pending
                ends = ps != split or (pu.source, pu.doc) != (u.source, u.doc)
                emit(pu, ps, ends, prev_started)
                prev_started = ends
                pending = None
            if split == "test":
                prev_started = True
                key = hashlib.blake2b(u.text.encode("utf-8"), digest_size=16).digest()
                if key in seen_test:  # identical units share a hash, keep one copy for eval
                    test_dupes += 1
                    continue
                seen_test.add(key)
                rec = {"text": u.text, "source": sources[u.source].name, "doc": u.doc, "unit": u.index}
                ftest.write(json.dumps(rec, ensure_ascii=False) + "\n")
                test_units += 1
                test_chars += len(u.text)
            else:
                pending = (u, split)
        if pending is not None:
            emit(pending[0], pending[1], True, prev_started)
    for w in writers.values():
        w.close()
    logger.info("pass 3 (tokenize, write): %.1fs", time.perf_counter() - t)

    content = {name: _sha256_file(tmp / name) for name in ("train.bin", "val.bin", TEST_FILE)}
    splits = {
        s: {"tokens": w.tokens, "units": w.units, "chars": w.chars, "runs": w.runs} for s, w in writers.items()
    }
    splits["test"] = {"units": test_units, "chars": test_chars, "duplicates_dropped": test_dupes}
    meta = {
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": vocab,
        "eos_token_id": eos_id,
        "tokenizer": TOKENIZER_DIR,
        "tokenizer_source": cfg.tokenizer if cfg.tokenizer is not None else "bpe",
        "bpe": bpe_info,
        "splits": splits,
        "split_fractions": {
            "train": round(1.0 - cfg.val_frac - cfg.test_frac, 12), "val": cfg.val_frac, "test": cfg.test_frac
        },
        "split_thresholds": {"test": str(thr.test), "val": str(thr.val)},
        "seed": cfg.seed,
        "unit_chars": cfg.unit_chars,
        "max_chars": cfg.max_chars,
        "text_field": cfg.text_field,
        "hf_split": cfg.hf_split,
        "corpus": list(cfg.corpus),
        "sources": [dict(s.describe(), **st) for s, st in zip(sources, src_stats)],
        "input_fingerprint": fingerprint,
        "content_sha256": content,
        "shards_sha256": hashlib.sha256("".join(content[k] for k in sorted(content)).encode()).hexdigest(),
    }
    with open(tmp / META_FILE, "w", encoding="utf-8") as f:  # written last: marks the dir complete
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return meta


# --------------------------------------------------------------------------------------------
# loading for training


class PackedTokens:
    """One split (``train`` or ``val``) of a prepared dataset as a read-only token memmap.

    The stream is cut into non-overlapping windows of ``seq_len`` tokens (``window w`` =
    ``tokens[w*seq_len:(w+1)*seq_len]``; the tail shorter than a window is never used).
    Windows may straddle an EOS: documents are packed, as in GPT-style pretraining.
    """

    def __init__(self, path: str | os.PathLike, split: str = "train"):
        if split not in ("train", "val"):
            raise DataError(
                f"split={split!r}: use 'train' or 'val' (the test split is raw text in {TEST_FILE}, for eval tasks)"
            )
        self.path = Path(path)
        self.meta = read_meta(self.path)
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{self.path}: format_version {self.meta.get('format_version')} != {FORMAT_VERSION}: "
                "re-run xatl-ds data prepare --overwrite"
            )
        _check_complete(self.path, self.meta)
        self.split = split
        self.dtype = np.dtype(self.meta["dtype"])
        self.n_tokens = int(self.meta["splits"][split]["tokens"])
        file = self.path / f"{split}.bin"
        # np.memmap refuses empty files
        self.tokens = np.memmap(file, dtype=self.dtype, mode="r") if self.n_tokens else np.zeros(0, self.dtype)
        self._perms: dict[tuple[int, int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        return (
            f"PackedTokens({str(self.path)!r}, split={self.split!r}, tokens={self.n_tokens}, dtype={self.dtype.name})"
        )

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eos_token_id(self) -> int:
        return int(self.meta["eos_token_id"])

    def num_windows(self, seq_len: int) -> int:
        """How many non-overlapping ``seq_len`` windows the split holds."""
        if seq_len < 1:
            raise DataError(f"seq_len={seq_len}: must be >= 1")
        return self.n_tokens // seq_len

    def _windows(self, idx: np.ndarray, seq_len: int):
        import torch

        offsets = idx.astype(np.int64)[:, None] * seq_len + np.arange(seq_len, dtype=np.int64)[None, :]
        return torch.from_numpy(np.asarray(self.tokens[offsets], dtype=np.int64))

    def _perm(self, seed: int, epoch: int, n: int) -> np.ndarray:
        key = (seed, epoch, n)
        perm = self._perms.get(key)
        if perm is None:
            perm = np.random.default_rng([seed, epoch, n]).permutation(n)
            if len(self._perms) >= 2:  # a batch spans at most two epochs
                self._perms.pop(next(iter(self._perms)))
            self._perms[key] = perm
        return perm

    def get_batch(
        self,
        step: int,
        micro_step: int,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        *,
        grad_accum: int = 1,
    ):
        """The ``(batch_size, seq_len)`` LongTensor of input ids for one micro-batch of one rank.

        A pure function of its arguments. Global sample ``g = ((step * grad_accum + micro_step)
        * world_size + rank) * batch_size + b`` is window ``perm_e[g % n]`` of epoch
        ``e = g // n``, where ``perm_e`` is a permutation of the ``n`` windows seeded by
        ``(seed, e)``: ranks and micro-steps never share a window within an epoch, each epoch
        visits every window once in a new order, and each optimizer step sees the same set of
        windows whatever the split of its global batch into ranks x micro-steps.
        """
        for name, v, lo in (("step", step, 0), ("micro_step", micro_step, 0), ("batch_size", batch_size, 1),
                            ("seq_len", seq_len, 1), ("rank", rank, 0), ("world_size", world_size, 1),
                            ("seed", seed, 0), ("grad_accum", grad_accum, 1)):  # fmt: skip
            if int(v) != v or v < lo:
                raise DataError(f"get_batch: {name}={v!r} must be an integer >= {lo}")
        if rank >= world_size:
            raise DataError(f"get_batch: rank={rank} must be < world_size={world_size}")
        if micro_step >= grad_accum:
            raise DataError(
                f"get_batch: micro_step={micro_step} >= grad_accum={grad_accum}: pass grad_accum=<gradient "
                "accumulation steps> so micro-batches of one step get distinct windows"
            )
        n = self.num_windows(seq_len)
        if n == 0:
            raise DataError(
                f"{self.path} {self.split}: {self.n_tokens} tokens hold no window of seq_len={seq_len}; "
                "lower seq_len or prepare more text"
            )
        g0 = ((step * grad_accum + micro_step) * world_size + rank) * batch_size
        g = np.arange(g0, g0 + batch_size, dtype=np.int64)
        epochs, pos = g // n, g % n
        idx = np.empty(batch_size, dtype=np.int64)
        for e in np.unique(epochs):
            m = epochs == e
            idx[m] = self._perm(seed, int(e), n)[pos[m]]
        return self._windows(idx, seq_len)

    def eval_windows(self, batch_size: int, seq_len: int, max_batches: int | None = None) -> int:
        """Number of windows the evaluation covers in total (over all ranks)."""
        n = self.num_windows(seq_len)
        return n if max_batches is None else min(n, max_batches * batch_size)

    def iter_eval_batches(
        self, batch_size: int, seq_len: int, max_batches: int | None = None, rank: int = 0, world_size: int = 1
    ) -> Iterator[Any]:
        """Fixed evaluation batches: the first ``min(num_windows, max_batches * batch_size)``
        windows in stream order (all windows when ``max_batches`` is None), dealt round-robin to
        ranks (window ``i`` -> rank ``i % world_size``) and yielded in batches of up to
        ``batch_size``. The covered windows do not depend on ``world_size``, so the mean loss
        from :func:`global_mean_loss` is comparable across runs. Ranks may get one batch fewer
        than others: reduce once at the end, not per batch.
        """
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"iter_eval_batches: batch_size={batch_size}, rank={rank}, world_size={world_size} invalid")
        if max_batches is not None and max_batches < 1:
            raise DataError(f"iter_eval_batches: max_batches={max_batches} must be >= 1 or None")
        total = self.eval_windows(batch_size, seq_len, max_batches)
        if total == 0:
            raise DataError(
                f"{self.path} {self.split}: {self.n_tokens} tokens hold no window of seq_len={seq_len}; "
                "lower seq_len or prepare with a larger --val-frac"
            )
        mine = np.arange(rank, total, world_size, dtype=np.int64)
        for s in range(0, mine.size, batch_size):
            yield self._windows(mine[s : s + batch_size], seq_len)


def global_mean_loss(loss_sum: float, count: float, device: Any = None) -> float:
    """``sum(loss_sum) / sum(count)`` over all ranks (all-reduce when torch.distributed is up).

    ``loss_sum`` is a rank's summed token losses and ``count`` its number of predicted tokens;
    ``device`` must suit the backend (CUDA for NCCL, CPU for gloo).
    """
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(loss_sum), float(count)], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    if t[1].item() <= 0:
        raise DataError("global_mean_loss: no tokens were evaluated on any rank")
    return float(t[0].item() / t[1].item())


# --------------------------------------------------------------------------------------------
# CLI


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``data`` (with ``prepare`` and ``info``) on an argparse ``subparsers`` object."""
    p = subparsers.add_parser("data", help="prepare tokenized, packed datasets", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="data_command", required=True, metavar="{prepare,info}")
    d = PrepareConfig(out="")
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
    arg("--vocab-size", type=int, default=d.vocab_size, help=f"BPE vocabulary (default {d.vocab_size})")
    arg("--val-frac", type=float, default=d.val_frac, help=f"fraction of units for val (default {d.val_frac})")
    arg("--test-frac", type=float, default=d.test_frac,
        help=f"fraction of units held out as raw text in test.jsonl (default {d.test_frac})")
    arg("--seed", type=int, default=d.seed, help=f"split seed (default {d.seed})")
    arg("--unit-chars", type=int, default=d.unit_chars,
        help=f"size of a split unit in characters (default {d.unit_chars})")
    arg("--max-chars", type=int, default=None,
        help="read at most N characters of each input file / dataset (a prefix; for quick runs)")
    arg("--bpe-max-chars", type=int, default=d.bpe_max_chars,
        help=f"train the BPE on at most ~N chars of train text (default {d.bpe_max_chars})")
    arg("--text-field", default=d.text_field,
        help=f"jsonl field / parquet or HF column with the text (default {d.text_field!r})")
    arg("--hf-split", default=d.hf_split, help=f"split of an hf: dataset to read (default {d.hf_split!r})")
    arg("--overwrite", action="store_true", help="replace a dataset in --out prepared from different inputs")
    # fmt: on
    prep.set_defaults(func=_cli_prepare)
    info = sub.add_parser("info", help="print the meta.json summary of a prepared dataset")
    info.add_argument("dir", help="dataset directory")
    info.set_defaults(func=_cli_info)
    return p


def _config_from_args(args: argparse.Namespace) -> PrepareConfig:
    fields = {f.name for f in dataclasses.fields(PrepareConfig)}
    kw = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    return PrepareConfig(**kw)


def _summary(meta: dict[str, Any]) -> str:
    s = meta["splits"]
    return (
        f"train {s['train']['tokens']:,} tokens ({s['train']['units']} units), val {s['val']['tokens']:,} tokens "
        f"({s['val']['units']} units), test {s['test']['units']} raw units; vocab {meta['vocab_size']} "
        f"({meta['tokenizer_source']}), {meta['dtype']}, shards sha256 {meta['shards_sha256'][:16]}"
    )


@contextlib.contextmanager
def _cli_logging():
    root = logging.getLogger()
    handler = None
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.setLevel(level)
        if handler is not None:
            root.removeHandler(handler)


def _cli_prepare(args: argparse.Namespace) -> int:
    cfg = _config_from_args(args)
    t0 = time.perf_counter()
    with _cli_logging():
        try:
            meta = prepare(cfg)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    print(f"{Path(cfg.out)}: {_summary(meta)} [{time.perf_counter() - t0:.1f}s]")
    return 0


def _cli_info(args: argparse.Namespace) -> int:
    try:
        meta = read_meta(args.dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.dir}: {_summary(meta)}")
    for s in meta["sources"]:
        print(f"  {s['name']}: {s['chars']:,} chars, {s['documents']} docs, sha256 {s['sha256'][:16]}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m xatl_ds.data prepare ...`` (the same as ``xatl-ds data prepare ...``)."""
    from .cli import subcommand_main

    return subcommand_main("data", argv)

if __name__ == "__main__":
    sys.exit(main())
