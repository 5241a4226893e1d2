"""The settings of ``xatl-ds data prepare``: one typed, validated dataclass."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from .errors import DataError


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
    #: rebuild ``out`` when it holds a dataset from different inputs or with damaged shards
    #: (only ever a directory that prepare wrote: files and foreign folders are never replaced)
    overwrite: bool = False
    #: tokenizer processes (None: one per available core, at most 16); the shards are the same
    #: for any value, so it is not part of the input fingerprint
    num_proc: int | None = None

    def processes(self) -> int:
        """The number of tokenizer processes ``num_proc`` asks for."""
        if self.num_proc is not None:
            return self.num_proc
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        return max(1, min(cores, 16))

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
        if self.num_proc is not None and self.num_proc < 1:
            raise DataError(f"num_proc={self.num_proc} (--num-proc): must be >= 1, or None for one per core")
        if not self.text_field:
            raise DataError("text_field (--text-field) is empty: name the jsonl field / parquet column with the text")
