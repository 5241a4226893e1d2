"""The run config: one model trained under one setting. Typed, documented, validated.

A run config is a YAML file of the sections in :mod:`.sections`; every field carries a
docstring (it becomes the configuration reference in the README). :func:`load_run_config`
validates everything before any work starts and names the offending field in its error.

One module per job, each importing only those listed above it:

- ``errors``: :class:`ConfigError` and the did-you-mean hint of its messages;
- ``packaged``: the folders shipped as package data (:func:`packaged_dir`) and the lookups
  by name (:func:`ds_config_path`, :func:`sweep_file_path`, :func:`study_file_path`);
- ``yaml_io``: the strict YAML reader every config reader shares (:func:`read_yaml_source`:
  duplicate keys and syntax errors named with file, line and column), the one dict merge rule
  (:func:`merge_dicts`), dotted-key setter (:func:`set_dotted`) and ``-o`` override
  (:func:`apply_override`);
- ``deepspeed``: the DeepSpeed JSON check, by DeepSpeed's own reader (:func:`check_ds_config`,
  :func:`validate_with_deepspeed`);
- ``rules``: every check of a run config (:data:`NUMBER_RULES`, choices, cross-field rules);
- ``sections``: the dataclasses and :class:`RunConfig` (serialisation, content hash, steps);
- ``coerce``: plain dicts into dataclasses with named errors (``from_dict``);
- ``loading``: :func:`load_run_config`, the one way a run config comes in.

This package re-exports the names the rest of xatl-ds imports; the others are imported from
their module.
"""
from __future__ import annotations

from ..docstrings import field_docs  # re-exported for the reference (xatl_ds/reference.py)
from .deepspeed import check_ds_config, validate_with_deepspeed
from .errors import ConfigError
from .loading import load_run_config
from .packaged import ds_config_path, packaged_dir, shipped_yaml_names, study_file_path, sweep_file_path
from .rules import NUMBER_RULES
from .sections import AlignSection, RunConfig
from .yaml_io import apply_override, merge_dicts, read_yaml_source, set_dotted

__all__ = [
    "NUMBER_RULES", "AlignSection", "ConfigError", "RunConfig", "apply_override", "check_ds_config",
    "ds_config_path", "field_docs", "load_run_config", "merge_dicts", "packaged_dir", "read_yaml_source",
    "set_dotted", "shipped_yaml_names", "study_file_path", "sweep_file_path", "validate_with_deepspeed",
]
