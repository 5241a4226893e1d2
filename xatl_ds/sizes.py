"""Named model sizes: Pythia's table plus tiny CPU sizes.

Each size fixes the block shape (layers, width, heads) and a default peak learning rate, so
a sweep can name ``size: pythia-160m`` and get the paper's dimensions.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Size:
    n_layers: int
    d_model: int
    n_heads: int
    lr: float
    #: informative only (what the name refers to)
    note: str = ""


SIZES: dict[str, Size] = {
    # CPU sizes: tests, the quickstart, benchmarks
    "micro": Size(2, 64, 4, 1e-3, "unit tests"),
    "tiny": Size(4, 128, 4, 1e-3, "quickstart"),
    "small": Size(4, 256, 8, 1e-3, "CPU benchmark shape"),
    # Pythia (Biderman et al. 2023), GPT-NeoX blocks
    "pythia-14m": Size(6, 128, 4, 1e-3),
    "pythia-31m": Size(6, 256, 8, 1e-3),
    "pythia-70m": Size(6, 512, 8, 1e-3),
    "pythia-160m": Size(12, 768, 12, 6e-4),
    "pythia-410m": Size(24, 1024, 16, 3e-4),
    "pythia-1b": Size(16, 2048, 8, 3e-4),
}


def get_size(name: str) -> Size:
    try:
        return SIZES[name]
    except KeyError:
        raise ValueError(f"model.size={name!r} is unknown; choose one of {sorted(SIZES)}") from None
