"""How the new (LCI) mixers start: ``init.mixer`` / ``--mixer-init``.

``random``     the mixer's own initialisation, as in the paper (nothing is written).
``zero_out``   each LCI mixer's output projection (``getattr(mixer, mixer.out_proj_name)``,
               weight and bias) starts at zero: the residual contribution of every new mixer
               is 0, so the target starts as the source with those mixers removed. It takes
               precedence over the ``attn_out`` component, which would write W_O into the same
               projection: with ``zero_out``, ``attn_out`` is skipped with that reason.
``attention``  initialise each LCI mixer from the attention it replaces (MambaInLlama's
               ``init_with_kqvo``): W_O -> the output projection and

               * Mamba-2: V -> ``x``, K -> ``B``, Q -> ``C`` (row slices of ``in_proj``, which
                 packs ``[z, x, B, C, dt]``). Exact where the head layout allows it, so it is
                 required: ``d_inner = num_attention_heads * head_dim`` (``expand`` 1),
                 ``mamba2_headdim = head_dim``, ``d_state = head_dim`` and
                 ``mamba2_ngroups = num_attention_heads`` (each head needs its own C <- its Q).
                 Grouped-query sources repeat each K/V head over its query heads, as attention
                 does. With the decay at 1, an identity conv, D = 0 and the gated norm taken
                 out, the mixer computes causal linear attention with these Q/K/V (SiLU as the
                 feature map, since the conv's SiLU stays): tests/test_mixer_init.py proves it.
               * RetNet: Q/K/V/O -> ``q_proj``/``k_proj``/``v_proj``/``o_proj``; needs
                 ``retnet_heads = num_attention_heads``. K/V repeated per group likewise.
               * Mamba-1 has no meaningful map (its B and C are computed from the conv output
                 by ``x_proj``, shared by all channels): a :class:`MixerInitError` names the
                 alternatives.

               ``z``, ``dt``, ``conv1d``, ``A_log``, ``D``, the norms and gates keep their
               initialisation. The output projection is written even when the ``attn_out``
               component copies the same W_O (a note says so; the component then freezes it).
               Source Q/K/V biases go into ``in_proj``'s bias where it has one, else a note.

Only LCI layers are touched; hybrid attention layers get their weights from the
``attention`` component. Mixer initialisation errors do not depend on ``strict``: the mode was
asked for explicitly, and a partial application would be a silently different model.
``random`` uses no RNG, so a transfer with it is bit-identical to one without this step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..families import SourceTensor
from .errors import MixerInitError

__all__ = ["MIXER_INITS", "InitWrite", "LayerInitPlan", "attention_map_mixers", "plan_mixer_init"]

#: the values of ``init.mixer`` / ``--mixer-init``
MIXER_INITS: tuple[str, ...] = ("random", "zero_out", "attention")


@dataclass
class InitWrite:
    """One write: ``value`` (``None``: zeros) into rows ``rows`` (``None``: all) of ``param``."""

    target: str
    param: torch.Tensor
    rows: tuple[int, int] | None
    part: str | None
    source: str | None
    value: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, ...]:
        if self.rows is None:
            return tuple(self.param.shape)
        return (self.rows[1] - self.rows[0], *self.param.shape[1:])


@dataclass
class LayerInitPlan:
    """What the mixer initialisation writes into one LCI layer."""

    layer: int
    mixer: str
    mode: str
    writes: list[InitWrite] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Attention:
    """One source layer's attention, as the maps need it; K/V already repeated to one head per
    query head (GQA), names saying so."""

    heads: int
    head_dim: int
    q: SourceTensor
    k: SourceTensor
    v: SourceTensor
    o: SourceTensor
    q_bias: SourceTensor | None
    k_bias: SourceTensor | None
    v_bias: SourceTensor | None
    o_bias: SourceTensor | None


def _repeat_heads(t: SourceTensor, kv_heads: int, heads: int) -> SourceTensor:
    """Repeat each of ``kv_heads`` row blocks over its ``heads // kv_heads`` query heads (head
    ``h`` reads KV head ``h // rep``, as attention's repeat_interleave)."""
    if kv_heads == heads:
        return t
    rep = heads // kv_heads
    x = t.tensor
    out = x.reshape(kv_heads, x.shape[0] // kv_heads, *x.shape[1:]).repeat_interleave(rep, dim=0)
    return SourceTensor(f"{t.name} (each of {kv_heads} kv heads repeated x{rep})", out.reshape(-1, *x.shape[1:]))


def _source_attention(layer: int, src: dict[str, SourceTensor], heads: int, kv_heads: int, head_dim: int) -> _Attention:
    missing = [f"mixer.{p}_proj.weight" for p in "qkvo" if f"mixer.{p}_proj.weight" not in src]
    if missing:
        raise MixerInitError(f"init.mixer=attention: source layer {layer} has no attention tensor(s) {missing}")

    def get(p: str, attr: str) -> SourceTensor | None:
        return src.get(f"mixer.{p}_proj.{attr}")

    def kv(p: str, attr: str) -> SourceTensor | None:
        t = get(p, attr)
        return None if t is None else _repeat_heads(t, kv_heads, heads)

    return _Attention(
        heads, head_dim,
        q=get("q", "weight"), k=kv("k", "weight"), v=kv("v", "weight"), o=get("o", "weight"),
        q_bias=get("q", "bias"), k_bias=kv("k", "bias"), v_bias=kv("v", "bias"), o_bias=get("o", "bias"),
    )  # fmt: skip


def _check_shape(write: InitWrite) -> None:
    if write.value is not None and tuple(write.value.shape) != write.shape:
        raise MixerInitError(
            f"init.mixer=attention: {write.target}"
            + (f"[{write.part} rows {write.rows[0]}:{write.rows[1]}]" if write.rows else "")
            + f" has shape {write.shape} but source {write.source} has shape {tuple(write.value.shape)}"
        )


def _out_proj_writes(prefix: str, out: nn.Linear, att: _Attention, notes: list[str]) -> list[InitWrite]:
    name = prefix.rsplit(".", 1)[-1]
    writes = [InitWrite(f"{prefix}.weight", out.weight, None, None, att.o.name, att.o.tensor)]
    if att.o_bias is not None and out.bias is not None:
        writes.append(InitWrite(f"{prefix}.bias", out.bias, None, None, att.o_bias.name, att.o_bias.tensor))
    elif att.o_bias is not None:
        notes.append(f"source W_O bias not copied: {name} has no bias")
    return writes


def _map_mamba2(i: int, mixer: nn.Module, att: _Attention) -> LayerInitPlan:
    H, hd = att.heads, att.head_dim
    problems = []
    if mixer.d_inner != H * hd:
        problems.append(
            f"d_inner = expand * hidden_size = {mixer.d_inner} must equal num_attention_heads * head_dim = "
            f"{H * hd} (x <- V): set expand so that expand * hidden_size = {H * hd} (model.expand / --expand)"
        )
    if mixer.headdim != hd:
        problems.append(f"mamba2_headdim = {mixer.headdim} must equal the attention head_dim = {hd} (model.mamba2_headdim / --mamba2-headdim)")
    if mixer.d_state != hd:
        problems.append(f"d_state = {mixer.d_state} must equal the attention head_dim = {hd} (B <- K, C <- Q) (model.d_state / --d-state)")
    if mixer.ngroups != H:
        problems.append(
            f"mamba2_ngroups = {mixer.ngroups} must equal num_attention_heads = {H}: each head needs its own "
            "C <- its Q (--mamba2-ngroups; XatlConfig.mamba2_ngroups)"
        )
    if problems:
        raise MixerInitError(
            f"init.mixer=attention cannot map layer {i}'s attention into Mamba-2: " + "; ".join(problems)
            + ". Or use init.mixer zero_out or random"
        )
    prefix = f"model.layers.{i}.mixer"
    di, gn = mixer.d_inner, mixer.ngroups * mixer.d_state
    slices = {"x": (di, 2 * di), "B": (2 * di, 2 * di + gn), "C": (2 * di + gn, 2 * di + 2 * gn)}
    sources = {"x": (att.v, att.v_bias), "B": (att.k, att.k_bias), "C": (att.q, att.q_bias)}
    plan = LayerInitPlan(i, "mamba2", "attention")
    inp = mixer.in_proj
    for part, rows in slices.items():
        w, b = sources[part]
        plan.writes.append(InitWrite(f"{prefix}.in_proj.weight", inp.weight, rows, part, w.name, w.tensor))
        if b is not None and inp.bias is not None:
            plan.writes.append(InitWrite(f"{prefix}.in_proj.bias", inp.bias, rows, part, b.name, b.tensor))
    if inp.bias is None and any(b is not None for _, b in sources.values()):
        plan.notes.append("source Q/K/V biases not copied: in_proj has no bias (mamba_proj_bias=False)")
    plan.writes += _out_proj_writes(f"{prefix}.out_proj", mixer.out_proj, att, plan.notes)
    plan.notes.append("z (gate), dt, conv1d, A_log, D and the gated norm keep their initialisation")
    return plan


def _map_retnet(i: int, mixer: nn.Module, att: _Attention) -> LayerInitPlan:
    if mixer.n_heads != att.heads or mixer.head_dim != att.head_dim:
        raise MixerInitError(
            f"init.mixer=attention cannot map layer {i}'s attention into RetNet: retnet_heads = {mixer.n_heads} "
            f"must equal num_attention_heads = {att.heads} (so both head dims are {att.head_dim}); set "
            "XatlConfig.retnet_heads (it defaults to num_attention_heads), or use init.mixer zero_out or random"
        )
    prefix = f"model.layers.{i}.mixer"
    plan = LayerInitPlan(i, "retnet", "attention")
    for p, src in (("q", att.q), ("k", att.k), ("v", att.v)):
        proj = getattr(mixer, f"{p}_proj")
        plan.writes.append(InitWrite(f"{prefix}.{p}_proj.weight", proj.weight, None, None, src.name, src.tensor))
    if any(b is not None for b in (att.q_bias, att.k_bias, att.v_bias)):
        plan.notes.append("source Q/K/V biases not copied: RetNet's q/k/v projections have no bias")
    plan.writes += _out_proj_writes(f"{prefix}.o_proj", mixer.o_proj, att, plan.notes)
    plan.notes.append("g_proj (gate) and the group norm keep their initialisation")
    return plan


def _no_map(kind: str) -> Callable[[int, nn.Module, _Attention], LayerInitPlan]:
    def fail(i: int, mixer: nn.Module, att: _Attention) -> LayerInitPlan:
        raise MixerInitError(
            f"init.mixer=attention has no meaningful map into {kind} (layer {i}): its B and C are computed "
            "from the conv output by x_proj and shared by every channel, so there is nowhere to put "
            f"per-head Q and K. Use init.mixer zero_out or random, or mixer mamba2 / retnet "
            f"(which support attention: {', '.join(attention_map_mixers())})"
        )

    return fail


# mixer name -> its attention map; a mixer not listed here has no map
_ATTENTION_MAPS: dict[str, Callable[[int, nn.Module, _Attention], LayerInitPlan]] = {
    "mamba2": _map_mamba2,
    "retnet": _map_retnet,
}


def attention_map_mixers() -> list[str]:
    """The mixers ``init.mixer: attention`` can initialise."""
    return sorted(_ATTENTION_MAPS)


def plan_mixer_init(
    mode: str,
    target_model: nn.Module,
    source_layers: list[dict[str, SourceTensor]],
    *,
    out_proj_component: bool = False,
) -> list[LayerInitPlan]:
    """The writes of ``mode`` (one of :data:`MIXER_INITS`) into every LCI layer of
    ``target_model``; ``source_layers`` are the source's block tensors under target names
    (:meth:`~xatl_ds.families.FamilyAdapter.source_tensors`). ``out_proj_component``: the
    ``attn_out`` component also copies W_O into the output projections (a note says so).
    Raises :class:`MixerInitError` before anything is written."""
    if mode not in MIXER_INITS:
        raise MixerInitError(f"unknown mixer init {mode!r}; choose one of {list(MIXER_INITS)}")
    cfg = target_model.config
    plans: list[LayerInitPlan] = []
    for i, kind in enumerate(cfg.layer_mixers):
        if kind == "attention":
            continue
        mixer = target_model.model.layers[i].mixer
        if mode == "random":
            plans.append(LayerInitPlan(i, kind, mode))
            continue
        if mode == "zero_out":
            oname = type(mixer).out_proj_name
            out = getattr(mixer, oname)
            plan = LayerInitPlan(i, kind, mode)
            for attr in ("weight", "bias"):
                p = getattr(out, attr, None)
                if p is not None:
                    plan.writes.append(InitWrite(f"model.layers.{i}.mixer.{oname}.{attr}", p, None, None, None, None))
            plans.append(plan)
            continue
        if i >= len(source_layers):
            raise MixerInitError(f"init.mixer=attention: the target has {cfg.num_hidden_layers} layers but the source has {len(source_layers)}")
        att = _source_attention(i, source_layers[i], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        plan = _ATTENTION_MAPS.get(kind, _no_map(kind))(i, mixer, att)
        for w in plan.writes:
            _check_shape(w)
        if out_proj_component:
            plan.notes.append("the output projection is also the attn_out component (same W_O; frozen with it)")
        plans.append(plan)
    return plans
