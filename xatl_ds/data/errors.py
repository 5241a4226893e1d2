"""The one exception type of the data pipeline."""
from __future__ import annotations


class DataError(ValueError):
    """Bad data input or a dataset directory in an unexpected state (message says the fix)."""
