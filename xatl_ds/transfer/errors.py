"""The named errors of the transfer layer (all ValueErrors: the CLI prints them and exits 2)."""
from __future__ import annotations

__all__ = ["MixerInitError", "SourceLoadError", "TokenizerMismatchError", "TransferError"]


class TransferError(ValueError):
    """A transfer cannot be done as asked; the message names the tensor, file or option and
    the fix."""


class SourceLoadError(TransferError):
    """The source checkpoint cannot be read safely (truncated or pickle-only weights, not a
    causal LM, incomplete)."""


class MixerInitError(TransferError):
    """``init.mixer`` cannot be applied to this target (no meaningful map for the mixer, or
    dimensions that do not line up)."""


class TokenizerMismatchError(TransferError):
    """The dataset was tokenized with another tokenizer than the source's."""
