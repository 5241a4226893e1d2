"""Analytic training FLOPs per optimizer step, aware of what is frozen.

Computed from an :class:`~xatl_ds.models.XatlConfig` alone (no model is built), so it works
for every mixer on any machine and for sizes that do not fit in memory.

Conventions (one FLOP = one multiply or one add; a multiply-add is 2):

* **Linear** ``in -> out`` over ``T = batch * seq_len`` tokens: forward ``2 T in out``;
  backward input-gradient the same; weight-gradient the same. Biases, norms, activations,
  residual adds, gates, softmax, rotary and the loss are elementwise and not counted (the
  usual convention, e.g. Kaplan et al. / Chinchilla).
* **Embedding** lookup and its scatter-add gradient: 0 FLOPs. A tied LM head is counted as a
  Linear whose weight is the embedding.
* **Attention scores**: ``Q K^T`` and ``A V`` are dense ``2 B H L^2 head_dim`` each; causal
  masking is *not* halved (what SDPA's math path and ``FlopCounterMode`` count). Backward:
  one product of the same size per operand that needs a gradient (so 2x forward).
* **RetNet** (as :class:`~xatl_ds.models.retnet.RetNetMixer` trains): parallel form up to
  ``RetNetMixer.parallel_max_len`` tokens (like attention scores plus the decay-mask
  product, ``B H L^2``); beyond, the chunkwise form with chunks of ``chunk_size``:
  intra-chunk scores/decay/values, per-chunk ``K^T V`` states, a sequential state hand-off
  (``2 dk dv`` per chunk and head) and the queries' read of the state. The score
  normalisation (row sums) is not counted.
* **Mamba-1** selective scan: ``7`` elementwise FLOPs per (token, d_inner, d_state) forward
  (``dt*A`` and its exp, ``(dt x) B``, the state update multiply-add, the ``C``
  multiply-add), backward ``2x`` that (the A/D parameter gradients included). Depthwise
  causal conv1d: ``2 T C k`` forward, the same for the input- and the weight-gradient.
* **Mamba-2** SSD, chunked with ``Q = min(chunk_size, seq_len)`` (a last partial chunk is
  padded and counted as full): per chunk ``C B^T`` per *group* (``2 Q^2 N``), the decay
  mask per head (``exp``, ``x dt``, ``x CB``: ``3 Q^2``), ``M x`` (``2 Q^2 P``), the chunk end
  state (``2 Q P N``), a sequential state hand-off (``2 P N``) and the state's contribution
  to the outputs (``2 Q N P``). Backward: 2x for every part. (The torch path hands states on
  with one ``(chunks+1)^2`` matmul instead; that term is small either way.)
* **Frozen weights** (``frozen_params``): with ``frozen_weight_grads=False`` (what the
  trainer does: a frozen stage has lr 0 *and* ``requires_grad=False``) their weight
  gradients are dropped, and so are input gradients nobody needs: autograd only
  back-propagates into activations that depend on a parameter that needs a gradient (e.g.
  with a frozen embedding and first block, that block's backward disappears; a frozen
  weight whose bias still trains keeps its output in the graph). ``True`` counts a step as if
  frozen tensors still had gradients computed (an lr-0-only scheme; for comparisons).
* **Teachers and the alignment stage**: :func:`forward_flops` counts a forward alone (a
  distillation teacher's cost per step, the LM head optionally on fewer positions) and
  :func:`alignment_step_flops` a step of the alignment stage, both from the same parts.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable

from .models.components import COMPONENTS, NEW
from .models.configuration import XatlConfig

#: elementwise FLOPs per (token, d_inner, d_state) of the Mamba-1 recurrence, forward
SCAN_FWD_FLOPS = 7
#: backward of the recurrences (Mamba-1 scan, SSD elementwise parts) relative to forward
RECURRENCE_BWD_FACTOR = 2
#: FLOPs per (chunk, head, Q, Q) entry of the SSD decay mask: exp, x dt, x C B^T
SSD_DECAY_FLOPS = 3

_DEFAULT_OUT_PROJ = {"attention": "o_proj", "retnet": "o_proj", "mamba": "out_proj", "mamba2": "out_proj"}


@dataclass(frozen=True)
class PartFlops:
    """FLOPs of one piece of the step. ``kind``: linear, attention, retention, conv, scan,
    ssd; ``matmul`` tells products (what ``FlopCounterMode`` sees) from elementwise work."""

    name: str
    kind: str
    matmul: bool
    forward: int
    backward: int
    weight_grads: int
    component: str | None = None
    param: str | None = None

    @property
    def total(self) -> int:
        return self.forward + self.backward + self.weight_grads


@dataclass
class FlopCount:
    """FLOPs of one training step (forward + backward) of ``batch x seq_len`` tokens."""

    batch: int
    seq_len: int
    parts: list[PartFlops] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def forward(self) -> int:
        return sum(p.forward for p in self.parts)

    @property
    def backward(self) -> int:
        """Input (activation) gradients, and the scans' whole backward."""
        return sum(p.backward for p in self.parts)

    @property
    def weight_grads(self) -> int:
        """Gradients of Linear and conv weights."""
        return sum(p.weight_grads for p in self.parts)

    @property
    def total(self) -> int:
        return self.forward + self.backward + self.weight_grads

    @property
    def per_token(self) -> float:
        return self.total / self.tokens

    def by_kind(self) -> dict[str, int]:
        """Total FLOPs per kind of part (linear, attention, retention, conv, scan, ssd)."""
        out: dict[str, int] = {}
        for p in self.parts:
            out[p.kind] = out.get(p.kind, 0) + p.total
        return out

    def by_component(self) -> dict[str, int]:
        """Total Linear FLOPs per transfer component (``new`` for the mixers' own weights)."""
        out: dict[str, int] = {}
        for p in self.parts:
            if p.kind == "linear":
                out[p.component] = out.get(p.component, 0) + p.total
        return out

    def matmul_total(self) -> int:
        """FLOPs of all products (Linear layers and activation-activation matmuls)."""
        return sum(p.total for p in self.parts if p.matmul)

    def breakdown(self) -> dict[str, dict[str, int]]:
        """``{part name: {forward, backward, weight_grads, total}}``."""
        return {
            p.name: {"forward": p.forward, "backward": p.backward, "weight_grads": p.weight_grads, "total": p.total}
            for p in self.parts
        }

    def to_dict(self) -> dict:
        return {
            "batch": self.batch,
            "seq_len": self.seq_len,
            "forward": self.forward,
            "backward": self.backward,
            "weight_grads": self.weight_grads,
            "total": self.total,
            "by_kind": self.by_kind(),
            "parts": [asdict(p) for p in self.parts],
        }


class _Graph:
    """Records parts in forward order and tracks which activations need a gradient."""

    def __init__(self, config: XatlConfig, batch: int, seq_len: int, frozen: frozenset[str], frozen_weight_grads: bool):
        self.config, self.B, self.L, self.T = config, batch, seq_len, batch * seq_len
        self.frozen, self.fwg = frozen, frozen_weight_grads
        self.rg: dict[str, bool] = {"ids": False}
        self.parts: list[PartFlops] = []

    def needs_grad(self, names: Iterable[str]) -> bool:
        """Whether autograd computes this parameter's gradient (``names``: the parameter
        name, its component and any alias; frozen if any of them is)."""
        return self.fwg or not any(n in self.frozen for n in names)

    def node(self, out: str, inputs: Iterable[str], params: Iterable[tuple[str, ...]] = ()) -> str:
        """A zero-FLOP op (norm, add, gate, activation)."""
        self.rg[out] = any(self.rg[i] for i in inputs) or any(self.needs_grad(p) for p in params)
        return out

    def linear(self, name: str, comp: str, inp: str, n_in: int, n_out: int, bias: bool = False,
               param: str | None = None, aliases: tuple[str, ...] = (), kind: str = "linear",
               flops: int | None = None) -> str:
        """A Linear (or, with ``kind="conv"``, a depthwise conv) ``name``; its bias adds no
        counted FLOPs but, when it trains, makes the output need a gradient."""
        param = param or f"{name}.weight"
        f = 2 * self.T * n_in * n_out if flops is None else flops
        g = self.needs_grad((param, comp, *aliases))
        self.parts.append(PartFlops(name, kind, kind == "linear", f, f if self.rg[inp] else 0, f if g else 0, comp, param))
        self.rg[name] = self.rg[inp] or g or (bias and self.needs_grad((f"{name}.bias", comp)))
        return name

    def product(self, name: str, kind: str, a: str, b: str, f: int) -> str:
        """A matmul of two activations: each operand's gradient is one more product."""
        bwd = (f if self.rg[a] else 0) + (f if self.rg[b] else 0)
        self.parts.append(PartFlops(name, kind, True, f, bwd, 0))
        self.rg[name] = self.rg[a] or self.rg[b]
        return name

    def elementwise(self, name: str, kind: str, inputs: Iterable[str], f: int, bwd_factor: int,
                    params: Iterable[tuple[str, ...]] = ()) -> str:
        inputs = list(inputs)
        need = any(self.rg[i] for i in inputs) or any(self.needs_grad(p) for p in params)
        self.parts.append(PartFlops(name, kind, False, f, bwd_factor * f if need else 0, 0))
        self.rg[name] = need
        return name


def _out_proj_name(kind: str) -> str:
    try:
        from .models.modeling import mixer_class

        return mixer_class(kind).out_proj_name
    except Exception:  # mixer module not importable here: the documented default name
        return _DEFAULT_OUT_PROJ[kind]


def _retnet_parallel_max_len() -> int:
    try:
        from .models.retnet import RetNetMixer

        return int(RetNetMixer.parallel_max_len)
    except Exception:
        return 128


def _mixer_linear_comp(kind: str, proj: str) -> str:
    if kind == "attention":
        return "attention"
    return "attn_out" if proj == _out_proj_name(kind) else NEW


def _attention(g: _Graph, p: str, a: str) -> str:
    c = g.config
    d, H, Kv, hd = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    b = c.attention_bias
    q = g.linear(f"{p}.q_proj", "attention", a, d, H * hd, b)
    k = g.linear(f"{p}.k_proj", "attention", a, d, Kv * hd, b)
    v = g.linear(f"{p}.v_proj", "attention", a, d, Kv * hd, b)
    f = 2 * g.B * H * g.L * g.L * hd
    s = g.product(f"{p}.scores", "attention", q, k, f)
    y = g.product(f"{p}.attn_v", "attention", g.node(f"{p}.softmax", [s]), v, f)
    return g.linear(f"{p}.o_proj", "attention", y, H * hd, d, b)


def _retnet(g: _Graph, p: str, a: str) -> str:
    c = g.config
    d, H = c.hidden_size, c.retnet_heads
    dh, B, L = d // H, g.B, g.L
    q, k, v, gate = (g.linear(f"{p}.{n}_proj", NEW, a, d, d) for n in "qkvg")
    if L <= _retnet_parallel_max_len():
        s = g.product(f"{p}.scores", "retention", q, k, 2 * B * L * L * d)
        s = g.elementwise(f"{p}.decay", "retention", [s], B * H * L * L, 1)  # constant mask
        y = g.product(f"{p}.attn_v", "retention", s, v, 2 * B * L * L * d)
    else:
        C = max(1, min(c.chunk_size, L))
        n = -(-L // C)
        bh = B * H * n
        s = g.product(f"{p}.scores", "retention", q, k, 2 * bh * C * C * dh)
        s = g.elementwise(f"{p}.decay", "retention", [s], bh * C * C, 1)
        y = g.product(f"{p}.attn_v", "retention", s, v, 2 * bh * C * C * dh)
        kv = g.product(f"{p}.chunk_states", "retention", k, v, 2 * bh * C * dh * dh)
        st = g.elementwise(f"{p}.state_passing", "retention", [kv], 2 * bh * dh * dh, 1)
        y2 = g.product(f"{p}.state_out", "retention", q, st, 2 * bh * C * dh * dh)
        y = g.node(f"{p}.retention", [y, y2])
    y = g.node(f"{p}.gated", [y, gate], [(f"{p}.norm.weight", NEW), (f"{p}.norm.bias", NEW)])
    o = _out_proj_name("retnet")
    return g.linear(f"{p}.{o}", _mixer_linear_comp("retnet", o), y, d, d, c.attention_bias)


def _mamba(g: _Graph, p: str, a: str) -> str:
    c = g.config
    d, D, N, R, k = c.hidden_size, c.d_inner, c.d_state, c.dt_rank_value, c.d_conv
    pb = c.mamba_proj_bias
    xz = g.linear(f"{p}.in_proj", NEW, a, d, 2 * D, pb)
    xc = g.linear(f"{p}.conv1d", NEW, xz, 0, 0, c.mamba_conv_bias, kind="conv", flops=2 * g.T * D * k)
    dbc = g.linear(f"{p}.x_proj", NEW, xc, D, R + 2 * N)
    dt = g.linear(f"{p}.dt_proj", NEW, dbc, R, D, True)
    f = SCAN_FWD_FLOPS * g.T * D * N
    y = g.elementwise(f"{p}.scan", "scan", [xc, dt, dbc, xz], f, RECURRENCE_BWD_FACTOR,
                      [(f"{p}.A_log", NEW), (f"{p}.D", NEW)])
    o = _out_proj_name("mamba")
    return g.linear(f"{p}.{o}", _mixer_linear_comp("mamba", o), y, D, d, pb)


def mamba2_dims(config: XatlConfig) -> tuple[int, int]:
    """``(nheads, conv channels)`` of a Mamba-2 mixer; ValueError if the shapes do not fit."""
    D, P, G = config.d_inner, config.mamba2_headdim, config.mamba2_ngroups
    if P < 1 or D % P:
        raise ValueError(
            f"mamba2_headdim={P} must divide d_inner=expand*hidden_size={D}; choose a divisor of {D}"
        )
    H = D // P
    if G < 1 or H % G:
        raise ValueError(f"mamba2_ngroups={G} must divide the number of heads d_inner/mamba2_headdim={H}")
    return H, D + 2 * G * config.d_state


def _mamba2(g: _Graph, p: str, a: str) -> str:
    c = g.config
    d, D, N, P, G, k = c.hidden_size, c.d_inner, c.d_state, c.mamba2_headdim, c.mamba2_ngroups, c.d_conv
    H, conv_ch = mamba2_dims(c)
    pb = c.mamba_proj_bias
    zx = g.linear(f"{p}.in_proj", NEW, a, d, 2 * D + 2 * G * N + H, pb)
    xbc = g.linear(f"{p}.conv1d", NEW, zx, 0, 0, c.mamba_conv_bias, kind="conv", flops=2 * g.T * conv_ch * k)
    Q = max(1, min(c.chunk_size, g.L))
    n = -(-g.L // Q)
    bgn, bhn = g.B * G * n, g.B * H * n
    ssd_params = [(f"{p}.A_log", NEW), (f"{p}.dt_bias", NEW)]
    cb = g.product(f"{p}.ssd.cb", "ssd", xbc, xbc, 2 * bgn * Q * Q * N)
    m = g.elementwise(f"{p}.ssd.decay", "ssd", [zx, cb], SSD_DECAY_FLOPS * bhn * Q * Q, RECURRENCE_BWD_FACTOR, ssd_params)
    y = g.product(f"{p}.ssd.intra", "ssd", m, xbc, 2 * bhn * Q * Q * P)
    st = g.product(f"{p}.ssd.chunk_states", "ssd", xbc, zx, 2 * bhn * Q * P * N)
    st = g.elementwise(f"{p}.ssd.state_passing", "ssd", [st, zx], 2 * bhn * P * N, RECURRENCE_BWD_FACTOR, ssd_params)
    y2 = g.product(f"{p}.ssd.state_out", "ssd", xbc, st, 2 * bhn * Q * N * P)
    y = g.node(f"{p}.gated_norm", [y, y2, zx], [(f"{p}.D", NEW), (f"{p}.norm.weight", NEW)])
    o = _out_proj_name("mamba2")
    return g.linear(f"{p}.{o}", _mixer_linear_comp("mamba2", o), y, D, d, pb)


_MIXERS = {"attention": _attention, "retnet": _retnet, "mamba": _mamba, "mamba2": _mamba2}


def _norm_params(config: XatlConfig, prefix: str, comp: str) -> list[tuple[str, ...]]:
    names = [f"{prefix}.weight"] + ([f"{prefix}.bias"] if config.family == "neox" else [])
    return [(n, comp) for n in names]


def _mlp(g: _Graph, p: str, x: str) -> str:
    c = g.config
    d, I = c.hidden_size, c.intermediate_size
    b = c.mlp_bias
    up = g.linear(f"{p}.up_proj", "mlp", x, d, I, b)
    if c.family == "llama":
        up = g.node(f"{p}.act", [g.linear(f"{p}.gate_proj", "mlp", x, d, I, b), up])
    return g.linear(f"{p}.down_proj", "mlp", up, I, d, b)


def _check_frozen(config: XatlConfig, frozen: Iterable[str]) -> frozenset[str]:
    frozen = frozenset(frozen)
    n = config.num_hidden_layers
    for name in frozen:
        if name in COMPONENTS:
            continue
        ok = name.startswith(("model.embed_tokens.", "lm_head.", "model.norm."))
        if name.startswith("model.layers."):
            idx = name.split(".")[2]
            ok = idx.isdigit() and int(idx) < n
        if not ok:
            raise ValueError(
                f"frozen_params entry {name!r} is neither a component {COMPONENTS} nor a parameter "
                f"name of this {n}-layer model (e.g. 'model.layers.0.mlp.up_proj.weight')"
            )
    return frozen


def step_flops(
    config: XatlConfig,
    batch: int,
    seq_len: int,
    frozen_params: Iterable[str] = frozenset(),
    frozen_weight_grads: bool = True,
) -> FlopCount:
    """Analytic FLOPs of one training step (forward and backward) of ``batch`` sequences of
    ``seq_len`` tokens (see the module docstring for every convention).

    Args:
        config: the model's configuration (mixers need not be importable).
        batch, seq_len: sequences per step (all ranks, all micro-batches) and their length.
        frozen_params: parameter names (``model.layers.0.mlp.up_proj.weight``) and/or whole
            components (``mlp``, ``embed``, ...; e.g. ``FreezeController.frozen_components()``).
        frozen_weight_grads: whether the training mechanism still computes gradients of
            frozen weights: True with lr=0 parameter groups (this project's trainer), False
            when frozen tensors have ``requires_grad=False``.
    """
    for nm, v in (("batch", batch), ("seq_len", seq_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{nm}={v!r} must be an integer >= 1")
    if config.mixer == "mamba2" or "mamba2" in config.layer_mixers:
        mamba2_dims(config)
    g = _Graph(config, batch, seq_len, _check_frozen(config, frozen_params), bool(frozen_weight_grads))
    d, V = config.hidden_size, config.vocab_size
    embed = "model.embed_tokens.weight"
    x = g.node("model.embed_tokens", ["ids"], [(embed, "embed")])
    for i, kind in enumerate(config.layer_mixers):
        p = f"model.layers.{i}"
        a = g.node(f"{p}.input_norm", [x], _norm_params(config, f"{p}.input_norm", "norms"))
        m = _MIXERS[kind](g, f"{p}.mixer", a)
        if config.use_parallel_residual:  # x + mixer(ln1(x)) + mlp(ln2(x))
            f = _mlp(g, f"{p}.mlp", g.node(f"{p}.mlp_norm", [x], _norm_params(config, f"{p}.mlp_norm", "norms")))
            x = g.node(f"{p}.out", [x, m, f])
        else:
            h = g.node(f"{p}.residual", [x, m])
            f = _mlp(g, f"{p}.mlp", g.node(f"{p}.mlp_norm", [h], _norm_params(config, f"{p}.mlp_norm", "norms")))
            x = g.node(f"{p}.out", [h, f])
    h = g.node("model.norm", [x], _norm_params(config, "model.norm", "final_norm"))
    if config.tie_word_embeddings:
        g.linear("lm_head", "lm_head", h, d, V, param=embed, aliases=("lm_head.weight", "embed"))
    else:
        g.linear("lm_head", "lm_head", h, d, V, param="lm_head.weight")
    return FlopCount(batch, seq_len, g.parts)


def matmul_params(config: XatlConfig) -> dict[str, int]:
    """Weights that take part in Linear matmuls, per component (``new`` = mixers' own):
    the ``N`` of ``6N`` (LM head included, embedding lookup and norms excluded; a tied head
    counts once, under ``lm_head``)."""
    out: dict[str, int] = {}
    for p in step_flops(config, 1, 1).parts:
        if p.kind == "linear":
            out[p.component] = out.get(p.component, 0) + p.forward // 2
    return out


def flops_per_token_6N(config: XatlConfig) -> int:
    """The standard ``6 N`` training FLOPs per token, ``N`` = :func:`matmul_params` total
    (no attention/scan terms): a sanity cross-check for :func:`step_flops`."""
    return 6 * sum(matmul_params(config).values())


# -- distillation and alignment (forward-only and per-mixer counts) ------------------------
def forward_flops(config: XatlConfig, batch: int, seq_len: int, head_positions: int | None = None) -> int:
    """FLOPs of one forward pass (no backward) over ``batch x seq_len`` tokens: what a
    distillation teacher costs per step, about a third of :func:`step_flops`' total.

    ``head_positions``: the LM head runs on only that many positions per sequence
    (``logits_to_keep``), as in the alignment stage, which needs hidden states, not logits.
    """
    parts = step_flops(config, batch, seq_len).parts
    total = sum(p.forward for p in parts)
    if head_positions is not None:
        k = head_positions
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= seq_len:
            raise ValueError(f"head_positions={head_positions!r} must be an integer in [1, seq_len={seq_len}]")
        head = next(p for p in parts if p.name == "lm_head")
        total += head.forward * head_positions // seq_len - head.forward
    return total


def alignment_step_flops(config: XatlConfig, batch: int, seq_len: int) -> int:
    """FLOPs of one alignment-stage step of the student (:mod:`xatl_ds.distill`): its whole
    forward, with the LM head on one position per sequence (the blocks run as usual, each
    non-attention mixer fed the teacher's input), plus the backward of every non-attention
    mixer alone. A mixer's input is the teacher's hidden state, which needs no gradient, so
    its first projection has no input gradient; nothing outside the mixers is
    back-propagated (the mixers' outputs leave the residual stream detached)."""
    fwd = forward_flops(config, batch, seq_len, head_positions=1)
    g = _Graph(config, batch, seq_len, frozenset(), True)
    for i, kind in enumerate(config.layer_mixers):
        if kind == "attention":
            continue
        p = f"model.layers.{i}"
        g.rg[f"{p}.teacher_input"] = False
        _MIXERS[kind](g, f"{p}.mixer", f"{p}.teacher_input")
    return fwd + sum(p.backward + p.weight_grads for p in g.parts)
