"""Tokenizers: the byte-level BPE that prepare trains, loading (never remote code), and the
fingerprint that tells whether two tokenizers map text to the same ids."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from .errors import DataError
from .layout import META_FILE, TOKENIZER_DIR, read_meta

EOS_TOKEN = "<|endoftext|>"
#: bump when :func:`tokenizer_fingerprint` hashes something else (meta.json records it)
FINGERPRINT_VERSION = 1
# the parts of a `tokenizers` JSON that decide text -> ids
_FINGERPRINT_PARTS = ("normalizer", "pre_tokenizer", "model")
_ADDED_TOKEN_KEYS = ("id", "content", "special", "single_word", "lstrip", "rstrip", "normalized")


def train_bpe(texts: Iterable[str], vocab_size: int):
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


def _canonical_merges(merges: list[Any]) -> list[list[str]]:
    # `tokenizers` wrote merges as "a b" strings before 0.20 and as [a, b] pairs since
    return [m.split(" ", 1) if isinstance(m, str) else list(m) for m in merges]


def tokenizer_fingerprint(tok: Any) -> str:
    """A sha256 (hex) of everything that decides how ``tok`` maps text to ids.

    Covers, for a fast (``tokenizers``-backed) tokenizer: the model (its type, vocabulary,
    merges and options such as the unk token or byte fallback), the normalizer, the
    pre-tokenizer and every added / special token (content, id and matching flags). Not
    covered: file paths and hub names, the wrapper class, the decoder (ids -> text), the
    post-processor (templates applied only with ``add_special_tokens``, which data preparation
    never uses), padding / truncation / ``model_max_length`` and which token is called EOS
    (meta.json records ``eos_token_id`` separately). The same tokenizer saved with
    ``save_pretrained`` and loaded again has the same fingerprint; a different vocabulary or
    merge list gives another. A slow (pure Python) tokenizer is summarised by its class and
    its token -> id map only.
    """
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        full = json.loads(backend.to_str())
        body: dict[str, Any] = {k: full.get(k) for k in _FINGERPRINT_PARTS}
        model = dict(body["model"] or {})
        if isinstance(model.get("merges"), list):
            model["merges"] = _canonical_merges(model["merges"])
        body["model"] = model
        body["added_tokens"] = sorted(
            ({k: t.get(k) for k in _ADDED_TOKEN_KEYS} for t in full.get("added_tokens") or []),
            key=lambda t: (t["id"], t["content"]),
        )
    else:
        body = {"class": type(tok).__name__, "vocab": sorted(tok.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))}
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(f"xatl-ds/tokenizer/v{FINGERPRINT_VERSION}\0{text}".encode("utf-8")).hexdigest()


def dataset_tokenizer_fingerprint(data_dir: str | os.PathLike) -> str:
    """:func:`tokenizer_fingerprint` of the tokenizer a prepared dataset was tokenized with.

    Read from meta.json (no tokenizer load) when prepare recorded it with the current
    fingerprint version, else computed from ``DIR/tokenizer/``. Compare it with
    ``tokenizer_fingerprint(source_tokenizer)`` to check that data and model share ids.
    """
    meta = read_meta(data_dir)
    fp = meta.get("tokenizer_fingerprint")
    if isinstance(fp, str) and meta.get("tokenizer_fingerprint_version") == FINGERPRINT_VERSION:
        return fp
    return tokenizer_fingerprint(load_tokenizer(data_dir))


def encode_texts(tok: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (one batched call)."""
    if not texts:
        return []
    return tok(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
