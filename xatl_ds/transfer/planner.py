"""The transfer plan: which target tensor gets which source tensor, per component.

Components (:data:`~xatl_ds.models.components.COMPONENTS`, see
:func:`xatl_ds.models.components.component_of`):

``embed``       token embedding
``lm_head``     output projection (tied targets share it with ``embed``)
``final_norm``  the norm after the last block
``norms``       both per-layer norms (before the mixer and before the MLP)
``mlp``         every MLP weight and bias
``attn_out``    the source's attention output projection W_O (GPT-NeoX ``attention.dense``,
                Llama ``self_attn.o_proj``) into each LCI layer's mixer output projection
                (``getattr(mixer, mixer.out_proj_name)``), where the shapes match
``attention``   every attention weight (Q, K, V, O) of the target's attention layers
                (hybrids); GPT-NeoX's fused ``query_key_value`` is split per head

Strictness rule. A mismatch (shape, a layer or tensor one side lacks) in a requested
component raises :class:`~xatl_ds.transfer.errors.TransferError` naming the tensor and both
shapes; with ``strict=False`` the whole component is skipped instead and the reason
reported. ``attn_out_mismatch`` decides the one case the paper's default set needs:
``"skip"`` reports an ``attn_out`` whose shapes cannot match (Mamba/Mamba-2 with
``d_inner != d_model``) as a skip, ``"error"`` raises. Left at ``None`` it is ``"skip"``
exactly when the requested set is the default set (all components, however it was passed),
``"error"`` when components were chosen. A component with nothing to copy into
(``attn_out`` without LCI layers, ``attention`` without attention layers, ``attn_out`` under
``init.mixer: zero_out``) is always a skip with a reason, never an error. A source W_O bias
whose target out projection has no bias is not copied (a note in the report says so).

Planning reads and checks everything (mixer initialisation included) before the copier
writes anything, so an error leaves the target untouched.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ..families import SourceTensor, SourceTensors, adapter_for_source, source_family
from ..models import XatlConfig, XatlForCausalLM
from ..models.components import COMPONENTS, components_of
from .errors import TransferError
from .mixer_init import LayerInitPlan, plan_mixer_init
from .report import EMBED_COMPONENTS

__all__ = [
    "ATTN_OUT_MISMATCH",
    "DEFAULT_COMPONENTS",
    "ComponentPlan",
    "Pairing",
    "TransferPlan",
    "plan_transfer",
    "resolve_attn_out_mismatch",
    "resolve_components",
]

#: what a transfer copies when ``components`` is not given (the paper's set: all)
DEFAULT_COMPONENTS: tuple[str, ...] = COMPONENTS
#: the values of ``attn_out_mismatch``
ATTN_OUT_MISMATCH = ("skip", "error")
LAYERED = ("norms", "mlp", "attn_out", "attention")


@dataclass
class Pairing:
    """Target parameter ``target`` (tensor ``param``) <- source tensor ``source`` (``value``)."""

    target: str
    param: torch.Tensor
    source: str
    value: torch.Tensor


@dataclass
class ComponentPlan:
    """The pairings of one component, plus the mismatches found while pairing and notes."""

    name: str
    pairs: list[Pairing] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, target: str, param: torch.Tensor, src: SourceTensor | None) -> None:
        if src is None:
            self.problems.append(f"target tensor {target} {tuple(param.shape)} has no counterpart in the source")
        elif src.tensor.shape != param.shape:
            self.problems.append(
                f"shape mismatch: target {target} has shape {tuple(param.shape)} but source {src.name} "
                f"has shape {tuple(src.tensor.shape)}"
            )
        else:
            self.pairs.append(Pairing(target, param, src.name, src.tensor))

    def summary(self) -> str:
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        return self.problems[0] + more


@dataclass
class TransferPlan:
    """Everything the copier needs: ready components, skips with reasons, mixer writes, and
    the facts the report states."""

    source: str
    source_model_type: str
    layer_mixers: list[str]
    requested: list[str]
    strict: bool
    attn_out_mismatch: str
    mixer_init: str
    ready: dict[str, ComponentPlan]
    skipped: dict[str, str]
    mixer_layers: list[LayerInitPlan]
    target_params: int
    target_params_no_embed: int


def resolve_components(components: Sequence[str] | str | None) -> list[str]:
    """Requested components in canonical order without duplicates; ``None`` means
    :data:`DEFAULT_COMPONENTS`, a string is a comma list. TransferError for unknown names."""
    if components is None:
        return list(DEFAULT_COMPONENTS)
    wanted = [c.strip() for c in components.split(",") if c.strip()] if isinstance(components, str) else list(components)
    bad = [c for c in wanted if c not in COMPONENTS]
    if bad:
        raise TransferError(f"unknown transfer component(s) {bad}; valid components: {list(COMPONENTS)}")
    return [c for c in COMPONENTS if c in wanted]


def resolve_attn_out_mismatch(value: str | None, requested: Sequence[str]) -> str:
    """``value``, or for ``None`` the default: ``"skip"`` for the default component set,
    ``"error"`` for a chosen one (see the module docstring)."""
    if value is None:
        return "skip" if set(requested) == set(DEFAULT_COMPONENTS) else "error"
    if value not in ATTN_OUT_MISMATCH:
        raise TransferError(f"attn_out_mismatch={value!r} is unknown; choose one of {list(ATTN_OUT_MISMATCH)}")
    return value


class _Planner:
    """Pairs target and source tensors component by component (one instance per transfer)."""

    def __init__(self, target: XatlForCausalLM, src: SourceTensors, requested: list[str], mixer_init: str):
        self.target = target
        self.cfg: XatlConfig = target.config
        self.glob, self.layers = src.globals, src.layers
        self.requested = requested
        self.mixer_init = mixer_init
        self.params = dict(target.named_parameters())  # tied weights once
        self.comp_of = components_of(target)
        self.mixers = self.cfg.layer_mixers

    def layer_count_problem(self, plan: ComponentPlan) -> None:
        if len(self.layers) != self.cfg.num_hidden_layers:
            plan.problems.append(f"the target has {self.cfg.num_hidden_layers} layers but the source has {len(self.layers)}")

    def plan(self, comp: str) -> ComponentPlan | str:
        """The plan of ``comp``, or the reason it has nothing to copy into."""
        if comp == "lm_head":
            return self.lm_head()
        if comp == "attn_out":
            return self.attn_out()
        if comp == "attention" and "attention" not in self.mixers:
            return "the target has no attention layers: no attention weights to fill"
        return self.generic(comp)

    def generic(self, comp: str) -> ComponentPlan:
        """Every target parameter of ``comp`` paired with the source tensor of the same name,
        plus the source tensors of that component the target lacks (e.g. a bias)."""
        plan = ComponentPlan(comp)
        if comp in LAYERED:
            self.layer_count_problem(plan)
        seen: set[int] = set()
        for name, c in self.comp_of.items():
            if c != comp:
                continue
            if name.startswith("model.layers."):
                i_str, rel = name[len("model.layers."):].split(".", 1)
                i = int(i_str)
                if i >= len(self.layers):
                    continue  # reported above
                seen.add(i)
                plan.add(name, self.params[name], self.layers[i].get(rel))
            else:
                plan.add(name, self.params[name], self.glob.get(name))
        for i in sorted(seen):
            for rel, src in self.layers[i].items():
                if _block_component(rel) == comp and f"model.layers.{i}.{rel}" not in self.params:
                    plan.problems.append(f"source tensor {src.name} {tuple(src.tensor.shape)} has no counterpart in the target")
        if comp == "final_norm":
            for key, src in self.glob.items():
                if key.startswith("model.norm.") and key not in self.params:
                    plan.problems.append(f"source tensor {src.name} {tuple(src.tensor.shape)} has no counterpart in the target")
        return plan

    def lm_head(self) -> ComponentPlan | str:
        t = self.target
        plan = ComponentPlan("lm_head")
        if t.get_output_embeddings().weight is not t.get_input_embeddings().weight:
            plan.add("lm_head.weight", self.params["lm_head.weight"], self.glob.get("lm_head.weight"))
            return plan
        if "embed" in self.requested:
            return "the target ties lm_head to model.embed_tokens.weight, which embed transferred"
        # tied target, lm_head alone: the source's output embedding fills the shared tensor
        plan.add("model.embed_tokens.weight", self.params["model.embed_tokens.weight"], self.glob.get("lm_head.weight"))
        plan.notes.append("the target ties lm_head to the embedding: the source's lm_head filled the shared tensor")
        return plan

    def attn_out(self) -> ComponentPlan | str:
        lci = [i for i, m in enumerate(self.mixers) if m != "attention"]
        if not lci:
            return "the target has no LCI layers (every layer is attention): no out projection to fill"
        if self.mixer_init == "zero_out":
            return "init.mixer=zero_out zeroes every LCI out projection (zero_out takes precedence over attn_out)"
        plan = ComponentPlan("attn_out")
        self.layer_count_problem(plan)
        for i in (i for i in lci if i < len(self.layers)):
            mixer = self.target.model.layers[i].mixer
            oname = type(mixer).out_proj_name
            out = getattr(mixer, oname)
            prefix = f"model.layers.{i}.mixer.{oname}"
            plan.add(f"{prefix}.weight", out.weight, self.layers[i].get("mixer.o_proj.weight"))
            sb, tb = self.layers[i].get("mixer.o_proj.bias"), out.bias
            if sb is not None and tb is not None:
                plan.add(f"{prefix}.bias", tb, sb)
            elif sb is not None or tb is not None:
                note = (
                    f"source W_O bias not copied: the {self.mixers[i]} {oname} has no bias"
                    if sb is not None
                    else f"the {self.mixers[i]} {oname} bias keeps its initial value: the source W_O has no bias"
                )
                if note not in plan.notes:
                    plan.notes.append(note)
        return plan

    def totals(self) -> tuple[int, int]:
        total = sum(p.numel() for p in self.params.values())
        no_embed = sum(p.numel() for n, p in self.params.items() if self.comp_of[n] not in EMBED_COMPONENTS)
        return total, no_embed


def _block_component(rel: str) -> str:
    """Component of a block-relative name as an attention layer spells it."""
    part = rel.split(".", 1)[0]
    if part in ("input_norm", "mlp_norm"):
        return "norms"
    if part == "mlp":
        return "mlp"
    return "attention"


def plan_transfer(
    source_model: nn.Module,
    target_model: XatlForCausalLM,
    components: Sequence[str] | str | None = None,
    *,
    strict: bool = True,
    attn_out_mismatch: str | None = None,
    mixer_init: str = "random",
) -> TransferPlan:
    """Check and pair everything a transfer will write (see the module docstring for the
    rules); raises TransferError (MixerInitError for ``mixer_init``) before any write."""
    requested = resolve_components(components)
    mismatch = resolve_attn_out_mismatch(attn_out_mismatch, requested)
    if not isinstance(target_model, XatlForCausalLM):
        raise TypeError(f"target_model must be an XatlForCausalLM, got {type(target_model).__name__}")
    src_config = getattr(source_model, "config", None)
    src_family = source_family(src_config)
    tcfg: XatlConfig = target_model.config
    if tcfg.family != src_family:
        raise TransferError(
            f"source family {src_family!r} ({src_config.model_type}) does not match the target's "
            f"family={tcfg.family!r}; build the target with XatlConfig.from_source(source.config, ...)"
        )
    src = adapter_for_source(src_config).source_tensors(source_model)
    planner = _Planner(target_model, src, requested, mixer_init)
    ready: dict[str, ComponentPlan] = {}
    skipped: dict[str, str] = {}
    for comp in requested:
        plan = planner.plan(comp)
        if isinstance(plan, str):
            skipped[comp] = plan
        elif not plan.problems:
            ready[comp] = plan
        elif not strict or (comp == "attn_out" and mismatch == "skip"):
            skipped[comp] = plan.summary()
        else:
            raise TransferError(
                f"cannot transfer component {comp!r}: {plan.summary()}; drop {comp!r} from "
                "components or pass strict=False (--no-strict) to skip it"
            )
    mixer_layers = plan_mixer_init(mixer_init, target_model, src.layers, out_proj_component="attn_out" in ready)
    total, no_embed = planner.totals()
    return TransferPlan(
        source=str(getattr(src_config, "_name_or_path", "") or type(source_model).__name__),
        source_model_type=src_config.model_type,
        layer_mixers=list(tcfg.layer_mixers),
        requested=requested,
        strict=strict,
        attn_out_mismatch=mismatch,
        mixer_init=mixer_init,
        ready=ready,
        skipped=skipped,
        mixer_layers=mixer_layers,
        target_params=total,
        target_params_no_embed=no_embed,
    )
