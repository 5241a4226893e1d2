"""Units and the train/val/test split.

Documents are cut into units of at most ``unit_chars`` characters at paragraph breaks; each
unit's split is decided by a seeded 64-bit hash of its stripped *content* (not its position),
so exact duplicates always land in the same split and no held-out unit can reappear verbatim
in train. A second, independent hash of the unit samples the BPE's training text.
"""
from __future__ import annotations

import bisect
import hashlib
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from .config import PrepareConfig
from .corpus import Source
from .errors import DataError
from .layout import FORMAT_VERSION

#: unit hashes are uniform in [0, HASH_SPACE): a fraction f of units lies below f * HASH_SPACE
HASH_SPACE = 1 << 64
# a blank line (possibly holding spaces): a unit may end right after it, so the next unit
# starts at a paragraph and keeps that paragraph's indentation
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r]*\n(?:[ \t\r]*\n)*")


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
class Unit:
    """One slice of one document, with the two hashes that place it."""

    source: int  # index into the resolved sources
    doc: int
    index: int  # position within the document
    raw: str  # exact slice of the document
    text: str  # raw.strip(): what is hashed and what test.jsonl holds
    h_split: int  # 64-bit hash deciding the split
    h_sample: int  # independent 64-bit hash for the BPE training sample


def iter_units(sources: Sequence[Source], cfg: PrepareConfig) -> Iterator[Unit]:
    """Every non-blank unit of every source, in corpus order (``max_chars`` caps each source)."""
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
                yield Unit(si, di, ui, raw, text, int.from_bytes(d[:8], "big"), int.from_bytes(d[8:], "big"))


@dataclass
class Thresholds:
    """Where the split hash ``h_split`` of a unit sends it."""

    test: int  # h_split < test -> test
    val: int  # test <= h_split < val -> val, else train

    def split_of(self, h: int) -> str:
        """``train``, ``val`` or ``test`` for a unit with split hash ``h``."""
        return "test" if h < self.test else "val" if h < self.val else "train"


def nominal_thresholds(cfg: PrepareConfig) -> Thresholds:
    """The thresholds of the split fractions alone: :func:`thresholds` returns them whenever
    every split asked for gets a unit by them (any corpus that is not tiny)."""
    t_test = min(int(cfg.test_frac * HASH_SPACE), HASH_SPACE - 1)
    t_val = min(int((cfg.test_frac + cfg.val_frac) * HASH_SPACE), HASH_SPACE - 1)
    return Thresholds(t_test, max(t_val, t_test))


def thresholds(hashes: np.ndarray, cfg: PrepareConfig) -> Thresholds:
    """Hash thresholds for the split fractions; a split asked for but left empty by a small
    corpus gets the unit(s) with the next-smallest hash (still deterministic)."""
    uniq = np.unique(hashes)
    if uniq.size < 1 + (cfg.val_frac > 0) + (cfg.test_frac > 0):
        raise DataError(
            f"the corpus gives only {uniq.size} distinct unit(s) of <= {cfg.unit_chars} chars: too small to split "
            "into train/val/test; add text, raise --max-chars or lower --unit-chars"
        )
    nominal = nominal_thresholds(cfg)
    t_test = nominal.test
    t_val = min(int((cfg.test_frac + cfg.val_frac) * HASH_SPACE), HASH_SPACE - 1)
    if cfg.test_frac > 0 and not (uniq < np.uint64(t_test)).any():
        t_test = int(uniq[0]) + 1
    t_val = max(t_val, t_test)
    above = uniq[uniq >= np.uint64(t_test)]
    if cfg.val_frac > 0 and not (above < np.uint64(t_val)).any():
        t_val = int(above[0]) + 1
    if not (uniq >= np.uint64(t_val)).any():
        raise DataError("no unit is left for train: add text or lower --val-frac / --test-frac")
    return Thresholds(t_test, t_val)


def sample_threshold(rate: float) -> int:
    """Hash threshold that keeps a fraction ``rate`` of units (``h_sample < threshold``)."""
    return HASH_SPACE if rate >= 1.0 else int(rate * HASH_SPACE)
