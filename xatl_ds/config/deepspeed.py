"""A DeepSpeed JSON config, checked up front with DeepSpeed's own reader.

Which top-level keys DeepSpeed knows is found by running its config reader on a dict that
records what is read (:func:`deepspeed_keys`); nested keys and types are its pydantic config
models' business, whose errors are turned into messages naming the key and the fix
(:func:`validate_with_deepspeed`). :func:`check_ds_config` is the one entry: a dict, a path
or a packaged name (``zero2.json``) in, the checked dict out.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from .errors import ConfigError, did_you_mean
from .packaged import ds_config_path


#: top-level keys DeepSpeed reads only once a process group exists (not while it validates a
#: config in a launcher); every other key is known by running DeepSpeed's own config reader
DS_KEYS_READ_WITH_A_GROUP = frozenset({"sequence_parallel_size"})
#: batch fields xatl-ds fills from the run (``data.batch_size`` and the world size); a config
#: is validated with a layout of one rank (the world size is checked by the preflight)
_DS_BATCH = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}


class _ReadKeys(dict):
    """A dict that records which keys are read (``get``, ``[]``, ``in``, ``keys()`` lookups):
    what DeepSpeed's config reader reads is what DeepSpeed knows."""

    def __init__(self, data: dict, seen: set):
        super().__init__(data)
        self.seen = seen

    def get(self, key, *default):
        self.seen.add(key)
        return super().get(key, *default)

    def __getitem__(self, key):
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.seen.add(key)
        return super().__contains__(key)

    def keys(self):
        return _ReadKeysView(self)

    def __copy__(self):
        return _ReadKeys(self, self.seen)


class _ReadKeysView:
    def __init__(self, owner: _ReadKeys):
        self.owner = owner

    def __contains__(self, key):
        return key in self.owner

    def __iter__(self):
        return iter(dict.keys(self.owner))

    def __len__(self):
        return len(self.owner)


def _deepspeed_reader():
    """DeepSpeed's config reader, imported with its accelerator notice on stderr (stdout is the
    command's output)."""
    import contextlib
    import sys

    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.runtime.config import DeepSpeedConfig
    return DeepSpeedConfig


def _read_with_deepspeed(ds: dict) -> set:
    """Run DeepSpeed's reader on ``ds`` (batch fields replaced by a one-rank layout); the
    top-level keys it read. Its own errors propagate."""
    import contextlib
    import logging
    import sys

    seen: set = set()
    reader = _deepspeed_reader()
    log = logging.getLogger("DeepSpeed")
    level = log.level
    log.setLevel(logging.ERROR)  # its per-config info and warning lines are not ours to print
    try:
        with contextlib.redirect_stdout(sys.stderr):
            reader(_ReadKeys({**ds, **_DS_BATCH}, seen))
    finally:
        log.setLevel(level)
    return seen


_KNOWN: set = set()


def deepspeed_keys() -> frozenset:
    """The top-level keys DeepSpeed reads (found by running its config reader on an empty
    config) and :data:`DS_KEYS_READ_WITH_A_GROUP`."""
    if not _KNOWN:
        _KNOWN.update(_read_with_deepspeed({}) | DS_KEYS_READ_WITH_A_GROUP)
    return frozenset(_KNOWN)


def _config_models() -> dict:
    """DeepSpeed's pydantic config models by class name (for the fields of an error)."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    out, todo = {}, [DeepSpeedConfigModel]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            out.setdefault(sub.__name__, sub)
            todo.append(sub)
    return out


def _describe_deepspeed_error(err: Exception, section: str) -> str:
    """``zero_optimization.overlap_com: Extra inputs are not permitted (did you mean
    'overlap_comm'?)`` from DeepSpeed's pydantic error, else its own message."""
    errors = getattr(err, "errors", None)
    if not callable(errors):
        return f"{section}: {err}"
    model = _config_models().get(getattr(err, "title", ""), None)
    names: set = set()
    if model is not None:
        for name, f in model.model_fields.items():
            names.add(f.alias or name)
    parts = []
    for e in errors():
        loc = ".".join(str(x) for x in (section, *e.get("loc", ())))
        hint = did_you_mean([e["loc"][-1]], names) if e.get("type") == "extra_forbidden" and e.get("loc") else ""
        value = "" if e.get("type") == "extra_forbidden" else f"={e.get('input')!r}"
        parts.append(f"{loc}{value}: {e.get('msg')}{hint}")
    valid = f"; valid fields of {section}: {sorted(names)}" if names and any(
        e.get("type") == "extra_forbidden" for e in errors()) else ""  # fmt: skip
    return "; ".join(parts) + valid


def validate_with_deepspeed(ds: dict, where: str = "the DeepSpeed config") -> None:
    """Raise :class:`ConfigError` unless DeepSpeed's own config reader (its pydantic models:
    nested keys such as ``zero_optimization.overlap_comm`` included) accepts ``ds`` and reads
    every top-level key. Each section is read alone first, so an error names its section."""
    unknown = sorted(set(ds) - deepspeed_keys())
    if unknown:
        known = deepspeed_keys()
        raise ConfigError(
            f"{where} has unknown top-level key(s) {unknown}{did_you_mean(unknown, known)} "
            "(not a DeepSpeed setting, or misspelt); "
            f"valid keys: {sorted(known)}"
        )
    for section in [k for k in ds if k not in _DS_BATCH] + [None]:
        part = ds if section is None else {section: ds[section]}
        try:
            _read_with_deepspeed(part)
        except ImportError as e:  # DeepSpeed is a dependency; a broken install is named, not hidden
            raise ConfigError(f"{where}: DeepSpeed cannot be imported to check it ({e}); reinstall deepspeed") from None
        except Exception as e:  # noqa: BLE001 (pydantic, assertions and ValueErrors of DeepSpeed's reader)
            what = _describe_deepspeed_error(e, section or "(whole config)")
            raise ConfigError(f"{where}: DeepSpeed refuses {what}; fix or remove that setting "
                              "(the DeepSpeed config reference lists the valid ones)") from None  # fmt: skip


def check_ds_config(path_or_dict: str | Path | dict) -> dict:
    """A DeepSpeed config checked and returned as a dict: ``path_or_dict`` is a dict, a path,
    or a name in the packaged ds_configs (see :func:`ds_config_path`). It must be a JSON object
    with ``zero_optimization`` an object whose ``stage`` is 0..3, and DeepSpeed's own config
    reader must accept it (:func:`validate_with_deepspeed`: unknown keys at any depth, wrong
    types). Raises :class:`ConfigError` naming the file, line and column or the key, and the fix."""
    if isinstance(path_or_dict, dict):
        ds, where = copy.deepcopy(path_or_dict), "the DeepSpeed config"
    else:
        path = ds_config_path(str(path_or_dict))
        where = f"deepspeed.config {str(path)!r}"
        try:
            ds = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"{where} is not UTF-8 text; a DeepSpeed config is a JSON file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"{where} is not valid JSON: line {e.lineno}, column {e.colno}: {e.msg}; fix the syntax "
                "there (DeepSpeed configs are JSON: double quotes, no trailing commas, no comments)"
            ) from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{where} must be a JSON object ({{\"zero_optimization\": {{\"stage\": 2}}, ...}}), "
                          f"got a {type(ds).__name__}")
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{where}: zero_optimization must be an object such as {{\"stage\": 2}}, got {zero!r}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: zero_optimization.stage={stage!r} must be 0, 1, 2 or 3")
    key = json.dumps(ds, sort_keys=True, default=str)
    if key not in _VALIDATED:
        validate_with_deepspeed(ds, where)
        _VALIDATED.add(key)
    return ds


#: DeepSpeed configs already accepted in this process (the reader runs once per content)
_VALIDATED: set = set()
