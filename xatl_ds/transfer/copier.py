"""Execute a :class:`~xatl_ds.transfer.planner.TransferPlan`, and :func:`transfer`, which plans
and copies in one call."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..models import XatlForCausalLM
from .planner import TransferPlan, plan_transfer
from .report import ComponentReport, InitTensor, LayerInitReport, TensorCopy, TransferReport

__all__ = ["copy_plan", "transfer"]


def copy_plan(plan: TransferPlan) -> TransferReport:
    """Write every planned tensor (components first, then the mixer initialisation) and report.

    Copies are exact (bit equal when dtypes agree) and keep each target tensor's dtype and
    device; ``requires_grad`` is left alone."""
    copied: dict[str, ComponentReport] = {}
    layers: list[LayerInitReport] = []
    with torch.no_grad():
        for comp, cp in plan.ready.items():
            rep = ComponentReport(comp, notes=list(cp.notes))
            for p in cp.pairs:
                p.param.copy_(p.value.detach().to(device=p.param.device, dtype=p.param.dtype))
                rep.tensors.append(TensorCopy(p.target, p.source, tuple(p.param.shape)))
            copied[comp] = rep
        for lp in plan.mixer_layers:
            rep = LayerInitReport(lp.layer, lp.mixer, lp.mode, notes=list(lp.notes))
            for w in lp.writes:
                dst = w.param if w.rows is None else w.param[w.rows[0] : w.rows[1]]
                if w.value is None:
                    dst.zero_()
                else:
                    dst.copy_(w.value.detach().to(device=dst.device, dtype=dst.dtype))
                rep.tensors.append(InitTensor(w.target, w.rows, w.part, w.source, w.shape))
            layers.append(rep)
    return TransferReport(
        source=plan.source,
        source_model_type=plan.source_model_type,
        target_layer_mixers=list(plan.layer_mixers),
        requested=list(plan.requested),
        strict=plan.strict,
        copied=copied,
        skipped=dict(plan.skipped),
        target_params=plan.target_params,
        target_params_no_embed=plan.target_params_no_embed,
        attn_out_mismatch=plan.attn_out_mismatch,
        mixer_init=plan.mixer_init,
        mixer_layers=layers,
    )


def transfer(
    source_model: nn.Module,
    target_model: XatlForCausalLM,
    components: Sequence[str] | str | None = None,
    strict: bool = True,
    *,
    attn_out_mismatch: str | None = None,
    mixer_init: str = "random",
) -> TransferReport:
    """Copy the source's shared tensors into ``target_model`` in place, by component, then
    initialise the LCI mixers as ``mixer_init`` says.

    ``components``: names from :data:`~xatl_ds.models.components.COMPONENTS` (a list or a
    comma string); ``None`` means all of them (the paper's set), exactly like passing that
    list. ``strict`` and ``attn_out_mismatch`` (``"skip"``/``"error"``; ``None``: ``"skip"``
    for the default set, ``"error"`` otherwise) decide what a mismatch does, see
    :mod:`xatl_ds.transfer.planner`. ``mixer_init``: ``random`` (the paper), ``zero_out`` or
    ``attention``, see :mod:`xatl_ds.transfer.mixer_init`. Nothing is written unless every
    check passes. Freezing is the caller's business
    (:func:`~xatl_ds.transfer.report.transferred_parameter_names`).
    """
    plan = plan_transfer(
        source_model, target_model, components, strict=strict, attn_out_mismatch=attn_out_mismatch, mixer_init=mixer_init
    )
    return copy_plan(plan)
