"""The one way a run config comes in: :func:`load_run_config` reads the YAML (or takes a
dict), applies ``-o`` overrides, builds :class:`RunConfig` and validates it, so every
command refuses a bad config the same way before any work starts.
"""
from __future__ import annotations

import json
from pathlib import Path

from .coerce import from_dict
from .sections import RunConfig
from .yaml_io import apply_override, read_yaml_source


def load_run_config(source: str | Path | dict, overrides: list[str] | None = None,
                    machine_checks: bool = True) -> RunConfig:
    """Read (:func:`read_yaml_source`), apply ``a.b=value`` overrides (:func:`apply_override`),
    build and validate (``machine_checks``: see :meth:`RunConfig.validate`)."""
    data, _ = read_yaml_source(
        source, "run config",
        needs="at least one field, e.g. 'model: {size: tiny}': write the fields that differ from the "
        "defaults (the README's run config reference lists them)",
    )
    for ov in overrides or []:
        apply_override(data, ov)
    data = json.loads(json.dumps(data, default=str))  # plain types (a YAML date becomes a string)
    return from_dict(RunConfig, data).validate(machine_checks=machine_checks)
