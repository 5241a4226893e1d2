"""The run-config reference, generated from the config dataclasses' docstrings.

``python -m xatl_ds.reference`` prints it; ``--write README.md`` replaces the block between
the ``<!-- config-reference -->`` markers. A test fails when the README is out of date.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .config import RunConfig, field_docs

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        v = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        v = f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(v):
            return ""
    else:
        return ""
    return f"`{v!r}`" if not isinstance(v, str) else f"`{v}`"


def reference_markdown() -> str:
    lines = [BEGIN, "", "| field | default | meaning |", "| --- | --- | --- |"]
    sections = []
    docs = field_docs(RunConfig)
    for f in dataclasses.fields(RunConfig):
        tp = RunConfig.__dataclass_fields__[f.name].default_factory  # type: ignore[misc]
        value = tp() if callable(tp) and tp is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(value):
            sections.append((f.name, type(value), docs.get(f.name, "")))
        else:
            lines.append(f"| `{f.name}` | {_default(f)} | {_one_line(docs.get(f.name, ''))} |")
    for name, cls, doc in sections:
        lines.append(f"| **`{name}`** | | {_one_line(doc)} |")
        sub = field_docs(cls)
        for f in dataclasses.fields(cls):
            lines.append(f"| `{name}.{f.name}` | {_default(f)} | {_one_line(sub.get(f.name, ''))} |")
    lines += ["", END]
    return "\n".join(lines)


def _one_line(s: str) -> str:
    return " ".join(s.split()).replace("|", "\\|")


def update_file(path: Path) -> bool:
    """Rewrite the marked block of ``path``; True when it changed."""
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path} has no {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = head + reference_markdown() + tail
    if new != text:
        path.write_text(new)
        return True
    return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m xatl_ds.reference")
    ap.add_argument("--write", metavar="FILE", help="update the marked block of FILE (e.g. README.md)")
    a = ap.parse_args(argv)
    if a.write:
        print("updated" if update_file(Path(a.write)) else "up to date")
    else:
        print(reference_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
