"""Plain dicts (from YAML) into config dataclasses: :func:`from_dict` builds any dataclass
recursively, converting what YAML reads loosely (``1e18`` as a string, ``2.0`` for an int,
``a, b`` for a list of components) and refusing unknown keys and wrong types with the dotted
field name. It knows no particular config: :func:`load_run_config` hands it ``RunConfig``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import fields
from typing import Any, get_args, get_origin, get_type_hints

from .errors import ConfigError, did_you_mean


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data`` (a dict from YAML), recursively, rejecting
    unknown keys and wrong types with the dotted field name."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown field(s) {[f'{where}.{u}' if where else u for u in unknown]}{did_you_mean(unknown, names)}; "
            f"valid fields of {where or 'the run config'}: {sorted(names)}"
        )
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        path = f"{where}.{f.name}" if where else f.name
        kwargs[f.name] = _coerce(hints[f.name], data[f.name], path)
    return cls(**kwargs)


_TYPE_HINTS = {
    int: "a whole number such as 100",
    float: "a number such as 0.1 or 1e-4",
    str: "quote it if YAML reads it as something else",
    bool: "true or false",
}


def _coerce(tp: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin is not None and type(None) in args:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path) if len(inner) == 1 else value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e18 as a string
        except ValueError:
            pass
    if tp is int and isinstance(value, str):
        try:
            as_float = float(value)  # YAML reads 2e9 as a string too
        except ValueError:
            as_float = None
        if as_float is not None and as_float.is_integer():
            return int(as_float)
    if tp in (int, float, str, bool):
        ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
        if tp is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if not ok:
            raise ConfigError(f"{path}={value!r} must be of type {tp.__name__} ({_TYPE_HINTS[tp]})")
        return value
    if origin is list:
        if isinstance(value, str) and path.endswith("components"):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, str) and path.endswith("unfreeze_order"):
            return value  # FreezeConfig parses its own string form
        if not isinstance(value, list):
            raise ConfigError(f"{path}={value!r} must be a list")
        return [_coerce(args[0], v, f"{path}[{k}]") if args else v for k, v in enumerate(value)]
    return value
