"""YAML in, and the dict rules every config reader shares (run configs, sweeps, studies).

The strict YAML reader (:func:`read_yaml_source`: duplicate keys and syntax errors named with
file, line and column), the one dict merge rule (:func:`merge_dicts`), the one dotted-key
setter (:func:`set_dotted`) and the ``-o section.field=value`` override built on them
(:func:`apply_override`).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


# -- YAML in: strict about duplicates, named errors ---------------------------------------
class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A YAML mapping names the same key twice (plain YAML keeps the last one silently)."""


class StrictSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (plain data only, no object construction) that refuses duplicate
    keys in a mapping. Merge keys (``<<: *anchor``) may still be overridden explicitly."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # the base class names an unhashable key itself
                if key in first:
                    raise DuplicateKeyError(
                        "while constructing a mapping", node.start_mark,
                        f"duplicate key {key!r} (first at line {first[key].line + 1})", key_node.start_mark,
                    )
                first[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_yaml_text(text: str) -> Any:
    """``yaml.safe_load`` semantics, refusing duplicate keys (:class:`StrictSafeLoader`)."""
    return yaml.load(text, Loader=StrictSafeLoader)  # noqa: S506 (a SafeLoader subclass)


def describe_yaml_error(e: yaml.YAMLError) -> str:
    """``line L, column C: problem`` (1-based) of a YAML error."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    ctx, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if ctx and cmark is not None and not isinstance(e, DuplicateKeyError) and (mark is None or cmark.line != mark.line):
        problem += f" ({ctx} at line {cmark.line + 1}, column {cmark.column + 1})"
    return (f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else "") + problem


_DUPLICATE_FIX = "keep one of them (YAML would silently use the last)"


def read_yaml_source(source: str | Path | dict, what: str, error: type[Exception] = ConfigError,
                     allow_empty: bool = False, needs: str = "at least one setting") -> tuple[dict, Path | None]:
    """A config given as a dict or as a YAML file -> ``(data, path)``; ``path`` is None for a
    dict, whose data is deep-copied. Every problem raises ``error`` naming ``what`` and the file:
    a missing file, one that is not UTF-8, a YAML syntax error or duplicate key (with line and
    column, :func:`load_yaml_text`), a top level that is not a mapping, and, unless
    ``allow_empty``, a file that is empty or only comments (the message says the file
    ``needs`` ...)."""
    if isinstance(source, dict):
        return copy.deepcopy(source), None
    path = Path(source)
    if not path.is_file():
        raise error(
            f"{what} {str(path)!r} does not exist" + (" (it is a directory)" if path.is_dir() else "")
            + "; check the path (a relative one starts at the working directory)"
        )
    try:
        data = load_yaml_text(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise error(f"{what} {str(path)!r} is not UTF-8 text; save it as UTF-8 YAML") from None
    except yaml.YAMLError as e:
        fix = _DUPLICATE_FIX if isinstance(e, DuplicateKeyError) else (
            "fix the YAML syntax there (indentation, a missing ':' or closing bracket, or quote the value)"
        )
        raise error(f"{what} {str(path)!r}, {describe_yaml_error(e)}; {fix}") from None
    if data is None:
        if not allow_empty:
            raise error(f"{what} {str(path)!r} is empty (or only comments); a {what} needs {needs}")
        data = {}
    if not isinstance(data, dict):
        raise error(
            f"{what} {str(path)!r} must be a mapping of 'key: value' lines at its top level, "
            f"got a {type(data).__name__}"
        )
    return data, path


# -- dotted keys -------------------------------------------------------------------------------
def merge_dicts(base: dict, over: dict) -> dict:
    """A new dict: ``base`` with ``over`` merged in; dicts merge recursively, any other value of
    ``over`` replaces ``base``'s. Nothing is shared with the inputs (deep copies)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def set_dotted(data: dict, key: str, value: Any, error: type[Exception] = ConfigError) -> None:
    """``data[a][b] = value`` for ``key = "a.b"``, in place: the one dotted setter of run
    configs, sweeps and studies. Missing (or empty) sections on the way are created; a dict
    ``value`` merges into a dict already there (:func:`merge_dicts`), anything else replaces it
    (deep-copied). A component holding a value that is not a section raises ``error`` naming
    the key."""
    parts = key.split(".") if isinstance(key, str) else []
    if not parts or any(not p.strip() for p in parts):
        raise error(f"key {key!r} must be dotted field names such as optim.lr or model")
    parts = [p.strip() for p in parts]
    node = data
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        elif not isinstance(nxt, dict):
            section = ".".join(parts[: i + 1])
            raise error(
                f"{key}: {section} is not a section (it holds {nxt!r}); "
                f"set {section} itself, or make it a mapping first"
            )
        node = nxt
    last = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        node[last] = merge_dicts(node[last], value)
    else:
        node[last] = copy.deepcopy(value)


def apply_override(data: dict, override: str) -> None:
    """Apply ``section.field=value`` (``-o`` on the command line; the value is parsed as YAML)
    to a config dict in place, through :func:`set_dotted` (a mapping value merges)."""
    if not isinstance(override, str) or "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.field=value, e.g. optim.lr=3e-4")
    key, raw = override.split("=", 1)
    try:
        value = load_yaml_text(raw)
    except yaml.YAMLError as e:
        fix = _DUPLICATE_FIX if isinstance(e, DuplicateKeyError) else (
            f"close its brackets, or quote a plain string: {key.strip()}='\"...\"'"
        )
        raise ConfigError(
            f"override {override!r}: the value is not valid YAML ({describe_yaml_error(e)}); {fix}"
        ) from None
    try:
        set_dotted(data, key.strip(), value)
    except ConfigError as e:
        raise ConfigError(f"override {override!r}: {e}") from None
