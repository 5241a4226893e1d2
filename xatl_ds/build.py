"""A run config's model: the one path from :class:`~xatl_ds.config.RunConfig` to the
:class:`~xatl_ds.models.XatlConfig` a run trains (a scratch size, or the blocks of an XATL
source), the model itself, and its regional compilation (``train.compile``). The trainer builds
with it; the launcher's preflight builds the config alone (from the source's config.json, no
weights), so both refuse the same things.
"""
from __future__ import annotations

from typing import Any

from .config import ConfigError, RunConfig
from .sizes import get_size

__all__ = ["model_config", "build_model", "compile_blocks"]


def _mixer_options(cfg: RunConfig) -> dict:
    m = cfg.model
    return dict(d_state=m.d_state, d_conv=m.d_conv, expand=m.expand, mamba2_headdim=m.mamba2_headdim,
                mamba2_ngroups=m.mamba2_ngroups, chunk_size=m.chunk_size, kernels=m.kernels)  # fmt: skip


def model_config(cfg: RunConfig, vocab_size: int, source_config: Any = None):
    """The XatlConfig run ``cfg`` trains on data of ``vocab_size`` ids: its scratch size, or
    (``init.kind: xatl``) the blocks of ``source_config`` (the source's transformers config).
    ConfigError naming the field for what the run cannot train."""
    from .models import XatlConfig

    m = cfg.model
    try:
        if cfg.init.kind == "scratch":
            size = get_size(m.size)
            mc = XatlConfig(
                family=m.family, vocab_size=m.vocab_size or vocab_size, hidden_size=size.d_model,
                num_hidden_layers=size.n_layers, num_attention_heads=size.n_heads, mixer=m.mixer,
                attention_layers=m.attention_layers, **_mixer_options(cfg),
            )  # fmt: skip
        else:
            mc = XatlConfig.from_source(source_config, mixer=m.mixer, attention_layers=m.attention_layers,
                                        **_mixer_options(cfg))  # fmt: skip
    except ValueError as e:
        what = "model" if cfg.init.kind == "scratch" else f"model (with init.source {cfg.init.source!r})"
        raise ConfigError(f"{what}: {e}") from None
    if cfg.init.kind == "scratch":
        # the export must not claim a shorter context than the model was trained on
        mc.max_position_embeddings = max(mc.max_position_embeddings, cfg.data.seq_len)
        if mc.vocab_size < vocab_size:
            raise ConfigError(f"model.vocab_size={mc.vocab_size} is smaller than the dataset's {vocab_size}")
        return mc
    if cfg.data.seq_len > mc.max_position_embeddings:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} is longer than init.source {cfg.init.source!r} was trained for "
            f"(max_position_embeddings {mc.max_position_embeddings}); use data.seq_len <= {mc.max_position_embeddings}"
        )
    if mc.vocab_size < vocab_size:
        raise ConfigError(
            f"init.source {cfg.init.source!r} has vocab {mc.vocab_size} but the dataset at data.path uses "
            f"{vocab_size} ids: prepare the data with the source's tokenizer (xatl-ds data prepare --tokenizer SRC)"
        )
    return mc


def build_model(cfg: RunConfig, vocab_size: int):
    """Returns (model, transfer report as a dict, or None for scratch runs)."""
    import torch

    from .models import XatlForCausalLM

    torch.manual_seed(cfg.seed)
    if cfg.init.kind == "scratch":
        return XatlForCausalLM(model_config(cfg, vocab_size)), None
    from .data import dataset_tokenizer_fingerprint
    from .transfer import check_tokenizer_compat, load_source, transfer

    # before the weights load: data tokenized with another tokenizer would train silently
    warning = check_tokenizer_compat(cfg.init.source, dataset_tokenizer_fingerprint(cfg.data.path))
    src = load_source(cfg.init.source)
    model = XatlForCausalLM(model_config(cfg, vocab_size, src.model.config))
    report = transfer(src.model, model, cfg.init.components, strict=cfg.init.strict, mixer_init=cfg.init.mixer)
    if warning:
        report.warnings.append(warning)
    del src
    return model, report.to_dict()


def compile_blocks(model, **compile_kwargs) -> int:
    """Regional compilation (``train.compile``): ``torch.compile`` each block in place
    (``nn.Module.compile``: the module and its parameter names stay, so the optimizer groups,
    ZeRO's hooks and checkpoints see the same model). Compilation happens lazily, at a block's
    first call. Returns the number of blocks compiled."""
    blocks = list(model.model.layers)
    for blk in blocks:
        blk.compile(**compile_kwargs)
    return len(blocks)
