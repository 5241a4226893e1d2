"""What a transfer did: copied components, skips with reasons, the mixer initialisation per
layer, and the transferred fraction of the target's parameters."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "REPORT_FILE",
    "ComponentReport",
    "InitTensor",
    "LayerInitReport",
    "TensorCopy",
    "TransferReport",
    "transferred_parameter_names",
]

#: name of the report written beside a CLI-exported target
REPORT_FILE = "xatl_transfer.json"
EMBED_COMPONENTS = ("embed", "lm_head")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass
class TensorCopy:
    """One copied tensor: target parameter name <- source tensor (name, with a row slice for
    GPT-NeoX's fused QKV)."""

    target: str
    source: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return _numel(self.shape)


@dataclass
class ComponentReport:
    """What one component copied, plus notes (e.g. a source bias with no target slot)."""

    name: str
    tensors: list[TensorCopy] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(t.numel for t in self.tensors)


@dataclass
class InitTensor:
    """One tensor (or row slice of one) the mixer initialisation wrote.

    ``rows`` is the ``[start, stop)`` row range of the target parameter (``None``: all of
    it) and ``part`` its name in the mixer's packing (Mamba-2 ``in_proj``: ``x``, ``B``,
    ``C``); ``source`` is the source tensor it came from, ``None`` for zeros."""

    target: str
    rows: tuple[int, int] | None
    part: str | None
    source: str | None
    shape: tuple[int, ...]

    def label(self) -> str:
        """``target[part rows a:b]`` as the text report shows it."""
        if self.rows is None:
            return self.target
        return f"{self.target}[{self.part + ' ' if self.part else ''}rows {self.rows[0]}:{self.rows[1]}]"

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "rows": list(self.rows) if self.rows else None, "part": self.part,
                "source": self.source, "shape": list(self.shape)}  # fmt: skip


@dataclass
class LayerInitReport:
    """How one LCI layer's mixer was initialised (``init.mixer``)."""

    layer: int
    mixer: str
    mode: str
    tensors: list[InitTensor] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "mixer": self.mixer, "mode": self.mode,
                "tensors": [t.to_dict() for t in self.tensors], "notes": list(self.notes)}  # fmt: skip


@dataclass
class TransferReport:
    """Result of :func:`~xatl_ds.transfer.transfer`.

    ``copied`` holds the components that were transferred, ``skipped`` the requested ones
    that were not (component -> reason). Parameter totals count the target's distinct
    parameters (tied weights once); the ``*_no_embed`` numbers leave ``embed`` and
    ``lm_head`` out of numerator and denominator alike. ``mixer_layers`` says, per LCI layer,
    how its mixer was initialised; those tensors are initialisation, not transfer: they are
    not in ``copied``, not counted as transferred and not frozen. ``warnings`` collects what
    the caller should know but that is no error (e.g. a source without tokenizer files).
    """

    source: str
    source_model_type: str
    target_layer_mixers: list[str]
    requested: list[str]
    strict: bool
    copied: dict[str, ComponentReport]
    skipped: dict[str, str]
    target_params: int
    target_params_no_embed: int
    attn_out_mismatch: str = "skip"
    mixer_init: str = "random"
    mixer_layers: list[LayerInitReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def transferred_params(self) -> int:
        return sum(c.params for c in self.copied.values())

    @property
    def transferred_params_no_embed(self) -> int:
        return sum(c.params for n, c in self.copied.items() if n not in EMBED_COMPONENTS)

    @property
    def fraction(self) -> float:
        return self.transferred_params / self.target_params if self.target_params else 0.0

    @property
    def fraction_no_embed(self) -> float:
        d = self.target_params_no_embed
        return self.transferred_params_no_embed / d if d else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (the CLI's ``--json`` output and ``xatl_transfer.json``)."""
        return {
            "source": self.source,
            "source_model_type": self.source_model_type,
            "target_layer_mixers": list(self.target_layer_mixers),
            "requested": list(self.requested),
            "strict": self.strict,
            "attn_out_mismatch": self.attn_out_mismatch,
            "components": {
                n: {
                    "params": c.params,
                    "tensors": [{"target": t.target, "source": t.source, "shape": list(t.shape)} for t in c.tensors],
                    "notes": list(c.notes),
                }
                for n, c in self.copied.items()
            },
            "skipped": dict(self.skipped),
            "transferred_params": self.transferred_params,
            "target_params": self.target_params,
            "fraction": self.fraction,
            "transferred_params_no_embed": self.transferred_params_no_embed,
            "target_params_no_embed": self.target_params_no_embed,
            "fraction_no_embed": self.fraction_no_embed,
            "mixer_init": {"mode": self.mixer_init, "layers": [r.to_dict() for r in self.mixer_layers]},
            "warnings": list(self.warnings),
        }

    def format(self) -> str:
        """A human-readable table, then the mixer initialisation and any warnings."""
        mixers = self.target_layer_mixers
        lines = [
            f"transfer from {self.source} ({self.source_model_type}) into {len(mixers)} layers: "
            + ", ".join(f"{m} x{mixers.count(m)}" for m in dict.fromkeys(mixers)),
            f"{'component':<12}{'tensors':>8}{'params':>14}  status",
        ]
        for name in self.requested:
            if name in self.copied:
                c = self.copied[name]
                note = "copied" + (f" ({'; '.join(c.notes)})" if c.notes else "")
                lines.append(f"{name:<12}{len(c.tensors):>8}{c.params:>14,}  {note}")
            else:
                lines.append(f"{name:<12}{0:>8}{0:>14,}  skipped: {self.skipped.get(name, '')}")
        lines.append(
            f"transferred {self.transferred_params:,} of {self.target_params:,} target parameters "
            f"({100 * self.fraction:.1f}%); without embeddings {self.transferred_params_no_embed:,} of "
            f"{self.target_params_no_embed:,} ({100 * self.fraction_no_embed:.1f}%)"
        )
        lines.extend(self._format_mixer_init())
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)

    def _format_mixer_init(self) -> list[str]:
        if not self.mixer_layers:
            return [f"mixer init {self.mixer_init}: the target has no LCI layers"]
        if self.mixer_init == "random":
            layers = ", ".join(str(r.layer) for r in self.mixer_layers)
            return [f"mixer init random: layers {layers} keep their mixers' own initialisation"]
        lines = [f"mixer init {self.mixer_init}:"]
        for r in self.mixer_layers:
            lines.append(f"  layer {r.layer} ({r.mixer}):")
            for t in r.tensors:
                lines.append(f"    {t.label()} {tuple(t.shape)} <- {t.source if t.source else 'zeros'}")
            lines.extend(f"    note: {n}" for n in r.notes)
        return lines


def transferred_parameter_names(report: TransferReport | dict) -> set[str]:
    """Target parameter names (as ``named_parameters()`` spells them) whose values came from
    the source; accepts a report or its ``to_dict()`` (e.g. read from ``xatl_transfer.json``).
    Mixer-initialisation tensors are not among them (they are new weights)."""
    if isinstance(report, dict):
        return {t["target"] for c in report["components"].values() for t in c["tensors"]}
    return {t.target for c in report.copied.values() for t in c.tensors}
