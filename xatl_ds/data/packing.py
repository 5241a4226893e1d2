"""``prepare()``: tokenize the train/val units of a corpus into packed token shards.

Pipeline (all deterministic: the same inputs give byte-identical shards)::

    sources -> units -> split (see :mod:`.split`)
      -> tokenizer (given, or a byte-level BPE trained on the train split)
      -> DIR/train.bin, DIR/val.bin  (flat token streams, EOS after every document run)
         DIR/test.jsonl              (raw held-out units, never tokenized into train)
         DIR/tokenizer/, DIR/meta.json

Consecutive units of one document that share a split are written as one contiguous run; an
EOS closes every run, so a unit held out from the middle of a book leaves an EOS where it was.

Scale. Sources are read as streams (``hf:`` datasets included, see :mod:`.corpus`) and nothing
holds more than a few batches of text. With a given tokenizer the corpus is read once: units go
to their split by the nominal hash thresholds of the fractions, which are the final ones unless
a split comes out empty (a tiny corpus; it is then read again to place a unit there). Batches of
~2M characters are tokenized by ``num_proc`` worker processes (in order, so the shards do not
depend on the count); a BPE trained here reads the corpus three more times.
The dataset is built in a temporary sibling directory and swapped into place at the end, and
only an empty directory or a dataset that prepare itself wrote is ever replaced.
"""
from __future__ import annotations

import array
import collections
import contextlib
import dataclasses
import hashlib
import multiprocessing
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .config import PrepareConfig
from .corpus import Source, resolve_sources
from .errors import DataError
from .layout import (
    DATASET_FORMAT,
    FORMAT_VERSION,
    META_FILE,
    SHARD_SPLITS,
    TEST_FILE,
    TOKENIZER_DIR,
    is_prepared_dataset,
    read_meta,
    sha256_file,
    shard_file,
    token_dtype,
)
from .loader import record_shard_check, verify_shard
from .split import Thresholds, Unit, iter_units, nominal_thresholds, sample_threshold, thresholds
from .tokenizer import FINGERPRINT_VERSION, encode_texts, load_tokenizer, tokenizer_fingerprint, train_bpe

logger = logging.getLogger(__name__)

# tokenizer batches: long strings are slow in `tokenizers` (alignment bookkeeping), so we
# encode unit by unit and batch many units per call
_ENCODE_BATCH_CHARS = 2_000_000


@contextlib.contextmanager
def progress_logging() -> Iterator[None]:
    """Show the pipeline's progress (INFO records of ``xatl_ds.data.*``) on stderr while the
    block runs, without touching a logging setup the caller already has."""
    pkg = logging.getLogger(__package__)
    root = logging.getLogger()
    handler = None
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    level = pkg.level
    pkg.setLevel(logging.INFO)
    try:
        yield
    finally:
        pkg.setLevel(level)
        if handler is not None:
            root.removeHandler(handler)


def _input_fingerprint(cfg: PrepareConfig, sources: Sequence[Source], tok_fp: str | None) -> str:
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


def _foreign_reason(out: Path) -> str | None:
    """Why prepare must not touch ``out`` (None: it is missing, empty, or our own dataset)."""
    if not out.exists():
        return "it is a broken symbolic link" if out.is_symlink() else None
    if not out.is_dir():
        return "it is a file, not a directory"
    if is_prepared_dataset(out):
        return None
    if not any(out.iterdir()):
        return None
    if (out / META_FILE).is_file():
        return f"its {META_FILE} was not written by xatl-ds data prepare (no \"format\": {DATASET_FORMAT!r})"
    return f"it is a non-empty directory without a {META_FILE}"


def _refuse_foreign(out: Path) -> None:
    reason = _foreign_reason(out)
    if reason is not None:
        # deliberately no hint at --overwrite: it replaces only datasets that prepare wrote
        raise DataError(
            f"{out} exists and is not a dataset prepared by xatl-ds ({reason}); nothing was changed. "
            "Choose another --out, or move that path away yourself"
        )


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


def _encode_runs(tok: Any, texts: list[str], ends: list[bool], eos: int) -> np.ndarray:
    """The flat ids of a batch of unit texts, an EOS after each unit that ends a run."""
    pieces: list[list[int]] = []
    for ids, end in zip(encode_texts(tok, texts), ends):
        pieces.append(ids)
        if end:
            pieces.append([eos])
    return np.fromiter((i for p in pieces for i in p), dtype=np.int64)


# a tokenizer worker's own copy, loaded once by _init_worker
_WORKER_TOK: Any = None


def _init_worker(tok_dir: str) -> None:
    global _WORKER_TOK
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _WORKER_TOK = load_tokenizer(tok_dir)


def _encode_in_worker(texts: list[str], ends: list[bool], eos: int) -> np.ndarray:
    return _encode_runs(_WORKER_TOK, texts, ends, eos)


class _Encoder:
    """Tokenizes batches here, or, from the first full batch on (a corpus larger than one
    batch) and with ``num_proc`` > 1, in a pool of worker processes that load the tokenizer
    from ``tok_dir``."""

    def __init__(self, tok: Any, tok_dir: Path, num_proc: int):
        self.tok, self.tok_dir, self.num_proc = tok, tok_dir, num_proc
        self.pool = None

    def start_pool(self):
        if self.pool is None and self.num_proc > 1:
            # fork where there is one: workers start at once; their tokenizer is loaded from disk
            # either way, so any start method gives the same ids
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            self.pool = ctx.Pool(self.num_proc, initializer=_init_worker, initargs=(str(self.tok_dir),))
            logger.info("tokenizing in %d processes", self.num_proc)
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


class _ShardWriter:
    """Buffers unit texts of one split, encodes them in batches and appends the ids (+ EOS at
    the end of every run of consecutive units) to a flat binary file, in order."""

    def __init__(self, path: Path, encoder: _Encoder, dtype: np.dtype, eos_id: int, vocab_size: int):
        self.f = open(path, "wb")
        self.enc, self.dtype, self.eos, self.vocab_size = encoder, dtype, eos_id, vocab_size
        self.texts: list[str] = []
        self.ends: list[bool] = []
        self.pending: collections.deque = collections.deque()  # batches in the pool, in order
        self.chars = 0
        self.buffered = 0
        self.tokens = 0
        self.runs = 0
        self.units = 0
        self.max_id = -1

    def add(self, text: str, run_ends: bool) -> None:
        self.texts.append(text)
        self.ends.append(run_ends)
        self.chars += len(text)
        self.buffered += len(text)
        self.units += 1
        self.runs += run_ends
        if self.buffered >= _ENCODE_BATCH_CHARS:
            self.flush(full=True)

    def flush(self, full: bool = False) -> None:
        if not self.texts:
            return
        pool = self.enc.start_pool() if full else self.enc.pool
        if pool is not None:
            self.pending.append(pool.apply_async(_encode_in_worker, (self.texts, self.ends, self.eos)))
            # a bounded queue: at most two batches per process in flight, so memory stays flat
            while len(self.pending) > 2 * self.enc.num_proc:
                self._write(self.pending.popleft().get())
        else:
            self._write(_encode_runs(self.enc.tok, self.texts, self.ends, self.eos))
        self.texts, self.ends, self.buffered = [], [], 0

    def _write(self, arr: np.ndarray) -> None:
        # ids must index an embedding of vocab_size rows (and so fit the dtype chosen from it)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise DataError(
                f"the tokenizer produced id {int(arr.max())} >= its reported size len(tokenizer)={self.vocab_size}: "
                "its vocab is larger than it reports; fix the tokenizer (added tokens) or use another one"
            )
        arr.astype(self.dtype).tofile(self.f)
        self.tokens += int(arr.size)
        self.max_id = max(self.max_id, int(arr.max()) if arr.size else -1)

    def close(self) -> None:
        self.flush()
        while self.pending:
            self._write(self.pending.popleft().get())
        self.f.close()


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Build (or reuse) the packed dataset described by ``cfg``; returns its meta dict.

    An existing ``cfg.out`` with the same input fingerprint and intact shards is reused as is;
    one with a different fingerprint, or damaged shards, raises :class:`DataError` unless
    ``cfg.overwrite``, which rebuilds it. Only a missing path, an empty directory or a dataset
    written by prepare is ever replaced: a file or a foreign directory is an error whatever
    ``overwrite`` says, and nothing is deleted. The dataset is written into a temporary sibling
    directory and renamed into place at the end, so an interrupted run never leaves a
    directory that looks complete.
    """
    cfg.validate()
    t0 = time.perf_counter()
    out = Path(cfg.out).expanduser().absolute()
    _refuse_foreign(out)  # before any expensive work
    sources = resolve_sources(cfg.corpus, cfg.hf_split)
    given_tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer is not None else None
    if given_tok is not None and given_tok.eos_token_id is None:
        raise DataError(
            f"tokenizer {cfg.tokenizer!r} has no eos_token: documents need a separator; "
            "set one (tok.eos_token = ...; save_pretrained) or omit --tokenizer to train a BPE"
        )
    fingerprint = _input_fingerprint(cfg, sources, tokenizer_fingerprint(given_tok) if given_tok else None)

    if is_prepared_dataset(out):
        meta = read_meta(out)
        if meta.get("input_fingerprint") == fingerprint:
            try:  # same inputs: reuse it if its shards are intact (cheap once stamped)
                for split in SHARD_SPLITS:
                    verify_shard(out, split, meta)
            except DataError as e:
                if not cfg.overwrite:
                    raise
                logger.info("rebuilding %s: %s", out, e)
            else:
                logger.info("%s is up to date (same inputs): nothing to do", out)
                return meta
        elif not cfg.overwrite:
            raise DataError(
                f"{out} holds a dataset prepared from different inputs (corpus, tokenizer, fractions, seed, "
                "unit/max chars or file contents changed): pass --overwrite to replace it, or choose another --out"
            )

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
    # checked again: something may have appeared at `out` while the dataset was being built
    _refuse_foreign(out)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        if old.is_symlink():  # a link to a dataset elsewhere: drop the link, keep its target
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)


def _pass1_thresholds(sources: list[Source], cfg: PrepareConfig) -> Thresholds:
    """Pass 1: every unit's split hash (8 bytes a unit, no text kept) -> the split thresholds."""
    t = time.perf_counter()
    hashes = array.array("Q")
    for u in iter_units(sources, cfg):
        hashes.append(u.h_split)
    if not hashes:
        raise DataError(f"the corpus {cfg.corpus} holds no text (after --max-chars={cfg.max_chars})")
    thr = thresholds(np.frombuffer(hashes, dtype=np.uint64), cfg)
    logger.info("pass 1 (units, split): %.1fs", time.perf_counter() - t)
    return thr


@dataclasses.dataclass
class _Written:
    """What one writing pass produced."""

    writers: dict[str, _ShardWriter]
    src_stats: list[dict[str, int]]
    test_units: int = 0
    test_chars: int = 0
    test_dupes: int = 0

    def fills(self, cfg: PrepareConfig) -> bool:
        """Every split asked for got a unit (else the thresholds must come from pass 1)."""
        return (self.writers["train"].units > 0 and (cfg.val_frac == 0 or self.writers["val"].units > 0)
                and (cfg.test_frac == 0 or self.test_units + self.test_dupes > 0))  # fmt: skip


def _write_splits(sources: list[Source], cfg: PrepareConfig, thr: Thresholds, enc: _Encoder, tmp: Path,
                  dtype: np.dtype, eos_id: int, vocab: int) -> _Written:  # fmt: skip
    """Tokenize the train/val runs into their shards and write the held-out test units raw,
    counting each source's documents, units and characters on the way."""
    t = time.perf_counter()
    writers = {s: _ShardWriter(shard_file(tmp, s), enc, dtype, eos_id, vocab) for s in SHARD_SPLITS}
    res = _Written(writers, [{"documents": 0, "chars": 0, "units": 0} for _ in sources])
    seen_test: set[bytes] = set()
    pending: tuple[Unit, str] | None = None  # (unit, split): written once we know if its run ends
    last_doc: tuple[int, int] | None = None

    def emit(u: Unit, split: str, run_ends: bool, run_starts: bool) -> None:
        text = u.raw.lstrip("\r\n") if run_starts else u.raw
        text = text.rstrip() if run_ends else text
        writers[split].add(text, run_ends)

    prev_started = True
    with open(tmp / TEST_FILE, "w", encoding="utf-8", newline="\n") as ftest:
        for u in iter_units(sources, cfg):
            st = res.src_stats[u.source]
            st["units"] += 1
            st["chars"] += len(u.raw)
            if (u.source, u.doc) != last_doc:  # units come document by document
                last_doc = (u.source, u.doc)
                st["documents"] += 1
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
                    res.test_dupes += 1
                    continue
                seen_test.add(key)
                rec = {"text": u.text, "source": sources[u.source].name, "doc": u.doc, "unit": u.index}
                ftest.write(json.dumps(rec, ensure_ascii=False) + "\n")
                res.test_units += 1
                res.test_chars += len(u.text)
            else:
                pending = (u, split)
        if pending is not None:
            emit(pending[0], pending[1], True, prev_started)
    for w in writers.values():
        w.close()
    logger.info("tokenize, write: %.1fs", time.perf_counter() - t)
    return res


def _build(cfg: PrepareConfig, sources: list[Source], tok: Any, fingerprint: str, tmp: Path) -> dict[str, Any]:
    thr: Thresholds | None = None
    bpe_info: dict[str, Any] | None = None
    if tok is None:
        # a BPE trained on (a hash sample of) the train split only: the split must be known first
        thr = _pass1_thresholds(sources, cfg)
        t = time.perf_counter()
        train_chars = sum(len(u.text) for u in iter_units(sources, cfg) if thr.split_of(u.h_split) == "train")
        rate = min(1.0, cfg.bpe_max_chars / max(train_chars, 1))
        t_sample = sample_threshold(rate)
        used = [0]

        def sample() -> Iterator[str]:
            for u in iter_units(sources, cfg):
                if u.h_sample < t_sample and thr.split_of(u.h_split) == "train":
                    used[0] += len(u.text)
                    yield u.text

        tok = train_bpe(sample(), cfg.vocab_size)
        bpe_info = {
            "vocab_size": cfg.vocab_size, "train_chars": used[0], "sample_rate": rate, "max_chars": cfg.bpe_max_chars
        }
        logger.info("BPE (vocab %d) trained on %d chars: %.1fs", cfg.vocab_size, used[0], time.perf_counter() - t)
    tok.save_pretrained(str(tmp / TOKENIZER_DIR))
    # fingerprint of the copy as every later user loads it (load_tokenizer(DIR))
    tok_fp = tokenizer_fingerprint(load_tokenizer(tmp / TOKENIZER_DIR))
    vocab = len(tok)
    dtype = token_dtype(vocab)
    eos_id = int(tok.eos_token_id)

    enc = _Encoder(tok, tmp / TOKENIZER_DIR, cfg.processes())
    try:
        if thr is None:  # one pass at the nominal thresholds; pass 1 only if a split came out empty
            written = _write_splits(sources, cfg, nominal_thresholds(cfg), enc, tmp, dtype, eos_id, vocab)
            if written.fills(cfg):
                thr = nominal_thresholds(cfg)
            else:
                logger.info("a split is empty at the nominal thresholds (a small corpus): splitting by pass 1")
                thr = _pass1_thresholds(sources, cfg)
        if thr != nominal_thresholds(cfg) or bpe_info is not None:
            written = _write_splits(sources, cfg, thr, enc, tmp, dtype, eos_id, vocab)
    finally:
        enc.close()
    writers, src_stats = written.writers, written.src_stats
    test_units, test_chars, test_dupes = written.test_units, written.test_chars, written.test_dupes

    content = {name: sha256_file(tmp / name) for name in ("train.bin", "val.bin", TEST_FILE)}
    for split, w in writers.items():  # the load-time check need not read what we just wrote
        record_shard_check(shard_file(tmp, split), content[shard_file(tmp, split).name], w.max_id)
    splits = {
        s: {"tokens": w.tokens, "units": w.units, "chars": w.chars, "runs": w.runs} for s, w in writers.items()
    }
    splits["test"] = {"units": test_units, "chars": test_chars, "duplicates_dropped": test_dupes}
    meta = {
        "format": DATASET_FORMAT,
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": vocab,
        "eos_token_id": eos_id,
        "tokenizer": TOKENIZER_DIR,
        "tokenizer_source": cfg.tokenizer if cfg.tokenizer is not None else "bpe",
        "tokenizer_fingerprint": tok_fp,
        "tokenizer_fingerprint_version": FINGERPRINT_VERSION,
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
