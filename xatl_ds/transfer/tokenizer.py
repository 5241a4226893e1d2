"""Does the dataset share the source's tokenizer? Token ids mean nothing across tokenizers:
data prepared with a 2048-token BPE would train a 4096-token source's embeddings on the
wrong rows without any error, so the transfer layer compares the two before training."""
from __future__ import annotations

import os

from .errors import TokenizerMismatchError, TransferError
from .source import TOKENIZER_FILES, load_source_tokenizer

__all__ = ["check_tokenizer_compat"]


def _fingerprint_function():
    """``xatl_ds.data.tokenizer_fingerprint``, the one definition of a tokenizer's identity
    (the data package stores the same fingerprint for each prepared dataset)."""
    from .. import data

    fn = getattr(data, "tokenizer_fingerprint", None)
    if fn is None:
        raise TransferError(
            "xatl_ds.data has no tokenizer_fingerprint(tok): this xatl-ds build cannot compare tokenizers "
            "(an internal version mismatch; update xatl-ds)"
        )
    return fn


def check_tokenizer_compat(source_dir: str | os.PathLike, data_tokenizer_fingerprint: str) -> str | None:
    """Compare the source's tokenizer with the dataset's (its fingerprint, e.g. from
    ``xatl_ds.data.dataset_tokenizer_fingerprint(data_dir)``).

    Returns ``None`` when they match and a warning (for ``TransferReport.warnings``) when the
    source ships no tokenizer files, so nothing can be checked. Raises
    :class:`TokenizerMismatchError` when they differ. The source's tokenizer is loaded with
    transformers' AutoTokenizer, never running remote code.
    """
    fingerprint = _fingerprint_function()
    tok = load_source_tokenizer(source_dir)
    if tok is None:
        return (
            f"source {str(source_dir)!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): could not check "
            "that the dataset was prepared with the source's tokenizer"
        )
    src_fp = fingerprint(tok)
    if src_fp != data_tokenizer_fingerprint:
        raise TokenizerMismatchError(
            f"the dataset was tokenized with a different tokenizer than source {str(source_dir)!r} (source: "
            f"{type(tok).__name__} with {len(tok)} tokens, fingerprint {src_fp[:12]}; dataset fingerprint "
            f"{str(data_tokenizer_fingerprint)[:12]}): prepare the data with the source's tokenizer: "
            f"xatl-ds data prepare --tokenizer {source_dir}"
        )
    return None
