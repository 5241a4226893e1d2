"""The error every run-config reader raises, and the did-you-mean hint its messages carry.

The bottom of the config package: every other module of it imports this one, and this one
imports none of them.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A run config field is wrong; the message names the field and the fix."""


def did_you_mean(unknown: list, valid) -> str:
    """`` (did you mean 'x'?)`` for the first unknown name close to a valid one, else ''."""
    import difflib

    for u in unknown:
        close = difflib.get_close_matches(str(u), sorted(valid), n=1)
        if close:
            return f" (did you mean {close[0]!r}?)"
    return ""
