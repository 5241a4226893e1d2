"""Corpus sources: the builtin texts, local .txt/.txt.gz/.jsonl[.gz]/.parquet files and
directories, and ``hf:NAME[:CONFIG]`` datasets, each read as a stream of documents (strings)
in a fixed order.

``hf:`` datasets are streamed (``datasets.load_dataset(..., streaming=True)``): documents are
read batch by batch as the pipeline consumes them, so neither memory nor the local disk has to
hold the dataset (a Pile-sized corpus included). NAME may be a hub name or a local folder of
data files (parquet, jsonl, csv, txt, arrow). Only in offline mode (``HF_HUB_OFFLINE`` /
``HF_DATASETS_OFFLINE``), where nothing can be streamed from the hub, is a hub dataset loaded
from the local cache instead (memory-mapped Arrow files)."""
from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from .errors import DataError
from .layout import sha256_file

logger = logging.getLogger(__name__)

# the package lives in xatl_ds/data/, the shipped texts in xatl_ds/corpus/
BUILTIN_CORPUS_DIR = Path(__file__).resolve().parent.parent / "corpus"
BUILTIN_FILES: tuple[str, ...] = ("austen.txt.gz", "kjv.txt.gz", "shakespeare_gut.txt.gz", "jargon.txt.gz")
SUPPORTED_SUFFIXES: tuple[str, ...] = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    for suf in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suf):
            return suf
    return None


@dataclass
class Source:
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


def _decode(raw: bytes, where: str, *, partial: bool = False) -> str:
    """UTF-8 text of ``raw``; ``partial``: ``raw`` may end inside a character (dropped)."""
    try:
        if partial:
            return codecs.getincrementaldecoder("utf-8")().decode(raw, final=False)
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{where} is not UTF-8 (byte {e.start}): convert it first, e.g. iconv -f latin1 -t utf-8"
        ) from None


def _read_text(path: Path, max_chars: int | None = None) -> str:
    """The file as text with CRLF -> LF; with ``max_chars``, exactly the first ``max_chars``
    characters of that, without reading (or decompressing) the rest."""
    with _open_bytes(path) as f:
        if max_chars is None:
            return _decode(f.read(), str(path)).replace("\r\n", "\n")
        # a character is at most 4 bytes, so 4*(n+1) bytes hold n+1 characters even after
        # CRLF -> LF
        text = _decode(f.read(4 * (max_chars + 1)), str(path), partial=True)
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
    columns = dataset.column_names  # None for a stream whose features are not known up front
    if columns is not None and text_field not in columns:
        raise DataError(f"{name}: no column {text_field!r} (columns: {columns}); name it with --text-field")
    if columns is not None:
        dataset = dataset.select_columns([text_field])
    # batches of rows: one Arrow slice per 1024 documents, the same for a stream and a table
    for batch in dataset.iter(batch_size=1024):
        if text_field not in batch:
            raise DataError(f"{name}: no column {text_field!r} (columns: {sorted(batch)}); name it with --text-field")
        for text in batch[text_field]:
            if text:
                if not isinstance(text, str):
                    raise DataError(f"{name}: column {text_field!r} holds {type(text).__name__}, expected strings")
                yield text


def _offline() -> bool:
    import datasets.config

    return bool(datasets.config.HF_HUB_OFFLINE) or os.environ.get("HF_DATASETS_OFFLINE", "0").upper() in (
        "1", "ON", "YES", "TRUE")


def _local_digest(path: Path) -> str:
    """Content hash of a local dataset folder (or file): every file's path and bytes."""
    files = [path] if path.is_file() else sorted(
        f for f in path.rglob("*") if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts))
    h = hashlib.sha256(b"xatl-ds/hf-local/v1\0")
    for f in files:
        h.update(f"{f.relative_to(path).as_posix() if f != path else f.name}\0{sha256_file(f)}\0".encode())
    return h.hexdigest()


def _hub_digest(name: str, config: str, split: str) -> str:
    """The dataset repository's commit (what a stream reads), with config and split."""
    try:
        from huggingface_hub import HfApi

        sha = HfApi().dataset_info(name).sha
    except Exception as e:  # reached the data but not the API: fingerprint without the commit
        logger.warning("hf:%s: no commit id from the hub (%s); a changed upstream dataset will not be noticed",
                       name, type(e).__name__)  # fmt: skip
        sha = None
    body = {"name": name, "config": config or None, "split": split, "commit": sha}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _load_hf(spec: str, split: str) -> Source:
    rest = spec[3:]
    name, _, config = rest.partition(":")
    if not name:
        raise DataError(f"corpus {spec!r}: write hf:NAME or hf:NAME:CONFIG")
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise DataError(f"corpus {spec!r} needs the 'datasets' package: pip install datasets") from e
    local = Path(name).expanduser()
    stream = local.exists() or not _offline()
    try:
        ds = datasets.load_dataset(str(local) if local.exists() else name, config or None, split=split,
                                   streaming=stream)  # fmt: skip
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
    if local.exists():
        fingerprint = _local_digest(local)
    elif stream:
        fingerprint = _hub_digest(name, config, split)
    else:  # a cached table: datasets' own fingerprint of its files
        fingerprint = getattr(ds, "_fingerprint", None) or hashlib.sha256(repr(ds).encode()).hexdigest()
    return Source(spec=spec, kind="hf", name=f"hf:{rest}", digest=str(fingerprint), dataset=ds)


def resolve_sources(specs: Sequence[str], hf_split: str) -> list[Source]:
    """Expand corpus specs into concrete sources (files sorted inside directories)."""
    out: list[Source] = []
    for spec in specs:
        if spec == "builtin":
            for fname in BUILTIN_FILES:
                p = BUILTIN_CORPUS_DIR / fname
                if not p.is_file():
                    raise DataError(
                        f"builtin corpus file {p} is missing: the package install is incomplete "
                        "(package-data 'corpus/*.gz'); reinstall xatl-ds or pass --corpus PATH"
                    )
                out.append(Source(spec=spec, kind="file", name=f"builtin/{fname}", digest=sha256_file(p), path=p))
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
                    out.append(Source(spec=spec, kind="file", name=rel, digest=sha256_file(f), path=f))
            elif p.is_file():
                if _suffix(p) is None:
                    raise DataError(f"corpus file {spec!r}: unsupported type; use {', '.join(SUPPORTED_SUFFIXES)}")
                out.append(Source(spec=spec, kind="file", name=p.name, digest=sha256_file(p), path=p))
            else:
                raise DataError(
                    f"corpus {spec!r} is neither 'builtin', an existing file/directory nor hf:NAME[:CONFIG]"
                )
    return out
