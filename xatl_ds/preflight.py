"""Checks a launcher makes before it starts a run: what would otherwise fail only inside a
launched rank (after the launcher, DeepSpeed and the model are up) fails here, with the file
or field and the fix. ``xatl-ds train --dry-run`` and ``xatl-ds sweep run --dry-run`` run them.

- the DeepSpeed config parses and is a DeepSpeed config;
- the dataset exists, its shards match meta.json, and ``data.seq_len`` fits its splits;
- an XATL source that exists already: its weights load safely and its tokenizer is the data's.

A source that a sweep trains first cannot be checked yet (it is checked when its run starts).
"""
from __future__ import annotations

from pathlib import Path

from .config import ConfigError, RunConfig, check_ds_config, ds_config_path

__all__ = ["PreflightError", "preflight"]


class PreflightError(ValueError):
    """A run would fail once launched; the message names the file or field and the fix."""


def preflight(cfg: RunConfig, *, world_size: int | None = None, check_source: bool = True) -> None:
    """Raise :class:`PreflightError` for the first problem found (see the module docstring)."""
    try:
        check_ds_config(ds_config_path(cfg.deepspeed.config))
        if world_size:
            cfg.batch_layout(world_size)
    except ConfigError as e:
        raise PreflightError(str(e)) from None
    _check_data(cfg)
    if check_source and cfg.init.kind == "xatl" and cfg.init.source and Path(cfg.init.source).exists():
        _check_source(cfg)


def _check_data(cfg: RunConfig) -> None:
    from .data import DataError, PackedTokens

    try:
        for split in ("train", "val"):
            tokens = PackedTokens(cfg.data.path, split)
            tokens.check_fits(cfg.data.seq_len, cfg.eval.batches if split == "val" else 1, 1)
    except DataError as e:
        raise PreflightError(f"data.path={cfg.data.path!r}: {e}") from None


def _check_source(cfg: RunConfig) -> None:
    import json

    from .data import DataError, dataset_tokenizer_fingerprint
    from .transfer import TransferError, check_source_files, check_tokenizer_compat

    src = Path(cfg.init.source)
    try:
        check_source_files(src)
        check_tokenizer_compat(src, dataset_tokenizer_fingerprint(cfg.data.path))
    except (TransferError, DataError) as e:
        raise PreflightError(f"init.source={cfg.init.source!r}: {e}") from None
    limit = json.loads((src / "config.json").read_text()).get("max_position_embeddings")
    if limit and cfg.data.seq_len > int(limit):
        raise PreflightError(f"data.seq_len={cfg.data.seq_len} is longer than init.source {cfg.init.source!r} was "
                             f"trained for (max_position_embeddings {limit}); use data.seq_len <= {limit}")  # fmt: skip
