"""The folders shipped as package data: ``ds_configs/`` and ``sweeps/`` (with its
``studies/``), found in an installed wheel or in the checkout, and the lookups by name
(:func:`ds_config_path`, :func:`sweep_file_path`, :func:`study_file_path`) that let the
README's commands name ``zero2.json`` or ``quickstart`` from any directory.
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path

from .errors import ConfigError


def packaged_dir(folder: str):
    """The shipped folder ``ds_configs`` or ``sweeps`` (a directory Traversable): package data
    ``xatl_ds.<folder>`` of an installed wheel, else the checkout's top-level ``<folder>/``."""
    try:
        return importlib.resources.files(f"xatl_ds.{folder}")
    except ModuleNotFoundError:
        # A checkout on sys.path, or an editable install: setuptools' editable finder maps
        # xatl_ds.<folder> onto <checkout>/<folder> but cannot import a folder without an
        # __init__.py, so fall back to the checkout's folder itself (this file is
        # <checkout>/xatl_ds/config/packaged.py).
        here = Path(__file__).resolve().parents[2] / folder
        if here.is_dir():
            return here
        raise ConfigError(
            f"the package data xatl_ds.{folder} is missing from this install; reinstall xatl-ds"
        ) from None


def _packaged_names(folder: str, suffix: str) -> list[str]:
    return sorted(x.name for x in packaged_dir(folder).iterdir() if x.name.endswith(suffix) and x.is_file())


def _packaged_file(folder: str, name: str) -> Path | None:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    p = packaged_dir(folder).joinpath(name)
    # pip installs package data as plain files: the Traversable is a pathlib.Path
    return Path(str(p)) if p.is_file() else None


def ds_config_path(name: str) -> Path:
    """``name`` as a path when that file exists, else a file of the packaged ds_configs
    (``zero2.json``; the ``.json`` may be left out). Raises listing what is shipped."""
    p = Path(name)
    if p.is_file():
        return p
    found = None
    if not p.is_absolute():
        found = _packaged_file("ds_configs", name) or _packaged_file("ds_configs", f"{name}.json")
    if found is None:
        avail = _packaged_names("ds_configs", ".json")
        raise ConfigError(f"deepspeed.config={name!r} not found; use a path to a JSON file or one of {avail}")
    return found


#: the shipped Optuna studies: a folder of their own below sweeps/, so a sweep name never
#: finds a study file (whose keys a sweep does not have) and the other way round
STUDIES_FOLDER = "studies"


def shipped_yaml_names(kind: str = "sweep") -> list[str]:
    """Names of the shipped sweeps (``kind="sweep"``) or Optuna studies (``"study"``)."""
    d = packaged_dir("sweeps")
    if kind == "study":
        d = d.joinpath(STUDIES_FOLDER)
        if not d.is_dir():
            return []
    return sorted(x.name.removesuffix(".yaml") for x in d.iterdir() if x.name.endswith(".yaml") and x.is_file())


def _shipped_yaml(name_or_path: str | Path, kind: str) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    parents = (Path("."), Path("sweeps")) if kind == "sweep" else (
        Path("."), Path(STUDIES_FOLDER), Path("sweeps") / STUDIES_FOLDER)
    name = p.name.removesuffix(".yaml")
    if not p.is_absolute() and p.parent in parents and name in shipped_yaml_names(kind):
        d = packaged_dir("sweeps")
        d = d.joinpath(STUDIES_FOLDER) if kind == "study" else d
        return Path(str(d.joinpath(f"{name}.yaml")))  # pip installs package data as plain files
    other = "study" if kind == "sweep" else "sweep"
    hint = ""
    if not p.is_absolute() and name in shipped_yaml_names(other):
        hint = f" ({name!r} is a shipped {other}: xatl-ds {'tune' if other == 'study' else 'sweep run'} {name})"
    raise ConfigError(f"{kind} file {str(name_or_path)!r} not found{hint}; use a path to a YAML file or one of "
                      f"{shipped_yaml_names(kind)} (xatl-ds sweep list)")


def sweep_file_path(name_or_path: str | Path) -> Path:
    """``name_or_path`` as a path when that file exists, else a shipped sweep named
    ``quickstart``, ``quickstart.yaml`` or ``sweeps/quickstart.yaml`` (so the README's
    commands work from any directory). Raises listing what is shipped."""
    return _shipped_yaml(name_or_path, "sweep")


def study_file_path(name_or_path: str | Path) -> Path:
    """``name_or_path`` as a path when that file exists, else a shipped Optuna study named
    ``lit_search``, ``lit_search.yaml`` or ``sweeps/studies/lit_search.yaml``."""
    return _shipped_yaml(name_or_path, "study")
