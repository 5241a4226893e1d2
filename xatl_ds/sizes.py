"""Named model sizes: Pythia's table plus tiny CPU sizes.

Each size fixes the block shape (layers, width, heads) and a default peak learning rate, so
a sweep can name ``size: pythia-160m`` and get the paper's dimensions.

:func:`non_embedding_params` is the one count of a model's non-embedding parameters (the
``N`` of scaling laws), used by the size-trend analysis; it reads the matmul weights from
:func:`xatl_ds.flops.matmul_params`, so it follows every mixer the FLOP counter knows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class Size:
    """One named block shape."""

    n_layers: int
    d_model: int
    n_heads: int
    lr: float
    #: informative only (what the name refers to)
    note: str = ""


SIZES: dict[str, Size] = {
    # CPU sizes: tests, the quickstart, benchmarks and the CPU scaling ladder (sweeps/cpu_ladder.yaml:
    # mini, tiny, small span 15x in non-embedding parameters; 4 layers each, so the paper hybrid
    # keeps attention in exactly one layer of four)
    "micro": Size(2, 64, 4, 1e-3, "unit tests"),
    "mini": Size(4, 64, 4, 1e-3, "CPU ladder, smallest"),
    "tiny": Size(4, 128, 4, 1e-3, "quickstart; CPU ladder"),
    "small": Size(4, 256, 8, 1e-3, "CPU benchmark shape; CPU ladder"),
    # Pythia (Biderman et al. 2023), GPT-NeoX blocks
    "pythia-14m": Size(6, 128, 4, 1e-3),
    "pythia-31m": Size(6, 256, 8, 1e-3),
    "pythia-70m": Size(6, 512, 8, 1e-3),
    "pythia-160m": Size(12, 768, 12, 6e-4),
    "pythia-410m": Size(24, 1024, 16, 3e-4),
    "pythia-1b": Size(16, 2048, 8, 3e-4),
}

#: the Pythia sizes, smallest first (what a size trend is extrapolated to)
PYTHIA_SIZES = tuple(k for k in SIZES if k.startswith("pythia-"))


def get_size(name: str) -> Size:
    try:
        return SIZES[name]
    except KeyError:
        raise ValueError(f"model.size={name!r} is unknown; choose one of {sorted(SIZES)}") from None


def non_embedding_params(config: Any) -> int:
    """Non-embedding parameters of a model (Kaplan et al.'s ``N``): the weights of every
    matmul except the LM head (:func:`xatl_ds.flops.matmul_params`); the embedding lookup,
    norms, biases and the few elementwise SSM tensors (conv1d, A, D) are left out, as in the
    ``12 * layers * d_model**2`` rule. ``config``: an :class:`~xatl_ds.models.XatlConfig`
    or its ``to_dict()`` (a run's ``meta.json`` ``model_config``)."""
    from .flops import matmul_params
    from .models import XatlConfig

    if isinstance(config, Mapping):
        d = dict(config)
        mixers = d.pop("layer_mixers", None)  # derived by XatlConfig; given alone, it names mixer and layers
        if mixers and "mixer" not in d:
            kinds = [m for m in mixers if m != "attention"]
            d["mixer"] = kinds[0] if kinds else "attention"
            d["attention_layers"] = [i for i, m in enumerate(mixers) if m == "attention"] if kinds else "none"
        config = XatlConfig.from_dict(d)
    return int(sum(v for k, v in matmul_params(config).items() if k != "lm_head"))


def size_config(name: str, mixer: str = "attention", attention_layers: Any = "none", family: str = "neox",
                vocab_size: int = 4096, **mixer_options: Any):  # fmt: skip
    """The :class:`~xatl_ds.models.XatlConfig` of size ``name`` with this mixer (how a scratch
    run of that size is built); ``mixer_options``: d_state, expand, ... (model defaults)."""
    from .models import XatlConfig

    s = get_size(name)
    return XatlConfig(family=family, vocab_size=vocab_size, hidden_size=s.d_model, num_hidden_layers=s.n_layers,
                      num_attention_heads=s.n_heads, mixer=mixer, attention_layers=attention_layers,
                      **mixer_options)  # fmt: skip
