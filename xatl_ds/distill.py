"""Distillation from a teacher and the alignment stage of the new mixers.

The trainer's teacher side (:mod:`xatl_ds.teaching`) uses four pieces from here:

* :func:`load_teacher` loads the teacher like an XATL source (``transfer.load_source``:
  safetensors only, no remote code; the dataset's tokenizer checked by fingerprint) and holds
  it as an all-attention :class:`~xatl_ds.models.XatlForCausalLM` (the identity transfer,
  exact), so its blocks are named and computed like the student's: layer ``i``'s attention
  input and output are ``model.layers[i].input_norm``'s and ``model.layers[i].mixer``'s
  outputs in both models, whatever the family.
* :class:`Teacher` runs it without gradients (eval mode, ``requires_grad`` off, the run's
  precision) on every rank. Under ZeRO-3 it is partitioned like the student: a DeepSpeed
  engine built from the run's config without an optimizer (DeepSpeed 0.19 turns that into
  ``DeepSpeedZeRoOffload``, whose forward gathers each module's parameters). ZeRO 1 and 2
  refuse an engine without optimizer and shard nothing a forward-only model has, so there
  (and at ZeRO 0) every rank holds a full copy.
* :func:`distill_loss`: ``ce_weight * CE + kl_weight * T^2 * KL(teacher || student) +
  reverse_kl_weight * T^2 * KL(student || teacher)`` on the shifted next-token
  distributions, masked like the cross-entropy (labels -100 do not count).
* The alignment stage (MOHAWK stage 2, RADLADS step 1): the teacher runs with
  :meth:`Teacher.capture`, which records every aligned layer's attention input (after the
  input norm) and output; the student then runs *through its DeepSpeed engine* (so ZeRO's
  hooks and bookkeeping see an ordinary forward and backward) inside
  :class:`MixerSubstitution`, which feeds each aligned mixer the teacher's input and keeps its
  output for :func:`alignment_loss` (mean over layers of the per-layer MSE), while the
  residual stream gets the output detached: nothing outside the mixers is back-propagated.
  :class:`AlignThenFreeze` runs the stage (fixed length, or the LIT rule on the alignment
  loss) and then hands over to the run's :class:`~xatl_ds.freeze.FreezeController`, whose
  steps count from the stage's end; its state is the checkpoint's freeze state.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field, replace
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .freeze import FreezeConfig, FreezeController, UnfreezeEvent

__all__ = [
    "AlignEnd", "AlignThenFreeze", "DistillLoss", "LoadedTeacher", "MixerSubstitution", "Teacher",
    "TeacherError", "aligned_layers", "alignment_loss", "alignment_param_names", "check_alignable", "distill_loss",
    "load_teacher", "teacher_spec",
]  # fmt: skip

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TeacherError(ValueError):
    """The teacher cannot serve this run (vocabulary, blocks); the message names the fix."""


# -- losses -------------------------------------------------------------------------------
@dataclass
class DistillLoss:
    """The distillation loss of one batch and its terms (floats, for the metrics)."""

    total: torch.Tensor
    """The weighted sum that is back-propagated (a scalar tensor)."""
    ce: float
    """Next-token cross-entropy on the data (always computed, so runs compare at equal data)."""
    kl: float | None = None
    """Mean per-token KL(teacher || student) at the temperature (None when its weight is 0)."""
    reverse_kl: float | None = None
    """Mean per-token KL(student || teacher) at the temperature (None when its weight is 0)."""

    def terms(self) -> dict[str, float]:
        """The computed terms as metrics columns (``ce_loss``, ``kl``, ``reverse_kl``)."""
        out = {"ce_loss": self.ce}
        if self.kl is not None:
            out["kl"] = self.kl
        if self.reverse_kl is not None:
            out["reverse_kl"] = self.reverse_kl
        return out


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                 kl_weight: float = 1.0, reverse_kl_weight: float = 0.0, ce_weight: float = 0.0,
                 temperature: float = 1.0) -> DistillLoss:  # fmt: skip
    """``ce_weight * CE + kl_weight * T^2 * KL(p_t || p_s) + reverse_kl_weight * T^2 * KL(p_s || p_t)``.

    ``p_s = softmax(student / T)`` and ``p_t = softmax(teacher / T)`` at positions ``0..L-2``
    predict ``labels[:, 1:]`` (the causal LM shift of ``XatlForCausalLM``'s loss); each KL is
    summed over the vocabulary and averaged over the positions whose label is not -100, the CE
    (always at T = 1) likewise. Everything is computed in float32 whatever the logits' dtype.
    """
    if student_logits.shape != teacher_logits.shape:
        raise TeacherError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ: the teacher must have the student's vocabulary size"
        )
    s = student_logits[:, :-1].float()
    y = labels[:, 1:]
    mask = (y != -100).float()
    n = mask.sum().clamp_min(1.0)
    T = float(temperature)
    total = torch.zeros((), device=s.device)
    kl = rkl = None
    ls = F.log_softmax(s / T, dim=-1) if kl_weight or reverse_kl_weight else None
    if ls is not None:
        lt = F.log_softmax(teacher_logits[:, :-1].detach().float() / T, dim=-1)
        if kl_weight:
            kl_t = ((lt.exp() * (lt - ls)).sum(-1) * mask).sum() / n
            total = total + kl_weight * T * T * kl_t
            kl = float(kl_t.detach())
        if reverse_kl_weight:
            rkl_t = ((ls.exp() * (ls - lt)).sum(-1) * mask).sum() / n
            total = total + reverse_kl_weight * T * T * rkl_t
            rkl = float(rkl_t.detach())
    # the CE reuses the student's log-probabilities at T = 1; it keeps a graph only when weighted
    with torch.set_grad_enabled(torch.is_grad_enabled() and bool(ce_weight)):
        lp = ls if ls is not None and T == 1.0 else F.log_softmax(s, dim=-1)
        ce = -(lp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask).sum() / n
    if ce_weight:
        total = total + ce_weight * ce
    return DistillLoss(total, float(ce.detach()), kl, rkl)


def alignment_loss(student_out: dict[int, torch.Tensor], teacher_out: dict[int, torch.Tensor]) -> torch.Tensor:
    """Mean over the aligned layers of ``MSE(student mixer output, teacher attention output)``
    (each MSE a mean over batch, positions and channels), in float32."""
    if not student_out or set(student_out) != set(teacher_out):
        raise RuntimeError(f"alignment: student layers {sorted(student_out)} != teacher layers {sorted(teacher_out)}")
    losses = [F.mse_loss(student_out[i].float(), teacher_out[i].detach().float()) for i in sorted(student_out)]
    return torch.stack(losses).mean()


# -- the teacher ------------------------------------------------------------------------------
def teacher_spec(cfg) -> str | None:
    """The run's teacher: ``distill.teacher``, else ``init.source`` (None for a scratch run
    without one). XATL runs always have one (their source), for the teacher recovery numbers."""
    return cfg.distill.teacher or cfg.init.source


@dataclass
class LoadedTeacher:
    """A teacher loaded for a run, before it is placed on the device."""

    model: nn.Module
    """All-attention XatlForCausalLM with the teacher's weights (fp32, eval, no grad)."""
    spec: str
    """Where it came from (directory or hub name)."""
    warning: str | None = None
    """Tokenizer check warning (the teacher ships no tokenizer files), else None."""

    @property
    def config(self):
        return self.model.config


def load_teacher(spec: str, data_path: str, vocab_size: int | None = None) -> LoadedTeacher:
    """Load teacher ``spec`` as an XATL source is loaded, check that it shares the dataset's
    tokenizer (a mismatch raises ``TokenizerMismatchError``) and, when ``vocab_size`` (the
    student's) is given, its vocabulary, and return it as an all-attention XatlForCausalLM."""
    from .data import dataset_tokenizer_fingerprint
    from .models import XatlConfig, XatlForCausalLM
    from .transfer import check_tokenizer_compat, load_source, transfer

    warning = check_tokenizer_compat(spec, dataset_tokenizer_fingerprint(data_path))
    src = load_source(spec)
    config = XatlConfig.from_source(src.model.config, mixer="attention", attention_layers="all")
    if vocab_size is not None and config.vocab_size != vocab_size:
        raise TeacherError(
            f"teacher {spec!r} has vocabulary {config.vocab_size} but the student has {vocab_size}: their "
            "next-token distributions cannot be compared; use a teacher with the student's tokenizer and vocabulary"
        )
    model = XatlForCausalLM(config)
    transfer(src.model, model)  # every tensor: the identity (tested exact per family)
    del src
    model.eval().requires_grad_(False)
    return LoadedTeacher(model, spec, warning)


class Teacher:
    """A teacher placed for training: on the device, in the run's precision, without
    gradients, partitioned under ZeRO-3 (see the module docstring)."""

    def __init__(self, loaded: LoadedTeacher, device: torch.device, precision: str, zero_stage: int,
                 ds_config: dict | None = None):  # fmt: skip
        self.spec, self.config = loaded.spec, loaded.config
        self.warning = loaded.warning
        model = loaded.model.eval().requires_grad_(False)
        self.n_params = sum(p.numel() for p in model.parameters())
        dtype = _DTYPES[precision]
        self.zero3 = zero_stage == 3
        if self.zero3:
            import deepspeed

            ds = {k: v for k, v in (ds_config or {}).items() if k not in ("optimizer", "scheduler")}
            self.engine, _, _, _ = deepspeed.initialize(model=model, config=ds)
            self.engine.eval()
            self.module = self.engine.module
            self._forward = self.engine
            # what this rank holds: its partition of every tensor
            self.local_params = sum(int(p.ds_tensor.numel()) for p in self.module.parameters())
        else:
            # parameters only, as DeepSpeed casts the student: buffers (rotary) stay fp32
            self.engine = None
            self.module = model.to(device)
            for p in self.module.parameters():
                p.data = p.data.to(dtype)
            self._forward = self.module
            self.local_params = self.n_params

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        """The teacher's logits (every position, or the last ``logits_to_keep``)."""
        return self._forward(input_ids=input_ids, logits_to_keep=logits_to_keep).logits

    @torch.no_grad()
    def attention_io(self, input_ids: torch.Tensor, layers: Iterable[int]) -> tuple[dict, dict]:
        """``(inputs, outputs)`` of the attention of each of ``layers``: the input norm's
        output and the attention's output, ``{layer: (batch, seq, hidden)}``. The LM head runs
        on one position only (its logits are not needed)."""
        with _capture(self.module, layers) as (inputs, outputs):
            self._forward(input_ids=input_ids, logits_to_keep=1)
        return inputs, outputs


@contextlib.contextmanager
def _capture(model: nn.Module, layers: Iterable[int]):
    """Forward hooks recording ``model.layers[i].input_norm`` and ``.mixer`` outputs."""
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    handles = []
    blocks = model.model.layers
    for i in layers:
        handles.append(blocks[i].input_norm.register_forward_hook(_store(inputs, i)))
        handles.append(blocks[i].mixer.register_forward_hook(_store(outputs, i)))
    try:
        yield inputs, outputs
    finally:
        for h in handles:
            h.remove()


def _store(into: dict, i: int):
    def hook(module, args, output):
        into[i] = output.detach()

    return hook


# -- the alignment stage ------------------------------------------------------------------------
def aligned_layers(config) -> list[int]:
    """The layers the stage aligns: every layer whose mixer is not attention."""
    return [i for i, kind in enumerate(config.layer_mixers) if kind != "attention"]


def alignment_param_names(param_names: Iterable[str], config) -> set[str]:
    """The parameters that train in the alignment stage: those of the aligned mixers (their
    own tensors and the output projection, transferred or not); everything else is frozen."""
    prefixes = tuple(f"model.layers.{i}.mixer." for i in aligned_layers(config))
    return {n for n in param_names if n.startswith(prefixes)}


def check_alignable(student_config, teacher_config, spec: str) -> None:
    """TeacherError unless layer ``i`` of the teacher is the attention the student's layer ``i``
    replaced: the same number of blocks, width and family, and something to align."""
    s, t = student_config, teacher_config
    if not aligned_layers(s):
        raise TeacherError("align.enabled, but every layer of the student is attention: there is no new mixer to align")
    fields = ("family", "num_hidden_layers", "hidden_size")
    diff = {f: (getattr(s, f), getattr(t, f)) for f in fields if getattr(s, f) != getattr(t, f)}
    if diff:
        raise TeacherError(
            f"align.enabled needs a teacher with the student's blocks, but teacher {spec!r} differs in "
            + ", ".join(f"{k} (student {a}, teacher {b})" for k, (a, b) in diff.items())
            + ": leave distill.teacher unset (the source is the default teacher) or give the source"
        )


class MixerSubstitution:
    """While active, each aligned mixer of ``model`` computes on ``inputs[i]`` (the teacher's
    attention input) instead of its own block's input; its output is kept in ``outputs[i]``
    and goes on into the block detached, so the loss reaches only the mixers' parameters."""

    def __init__(self, model: nn.Module, inputs: dict[int, torch.Tensor]):
        self.model, self.inputs = model, inputs
        self.outputs: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> "MixerSubstitution":
        blocks = self.model.model.layers
        for i in self.inputs:
            mixer = blocks[i].mixer
            self._handles.append(mixer.register_forward_pre_hook(self._feed(i)))
            self._handles.append(mixer.register_forward_hook(self._keep(i)))
        return self

    def __exit__(self, *exc) -> bool:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def _feed(self, i: int):
        def hook(module, args):
            x = self.inputs[i]
            return (x.to(args[0].dtype),) + tuple(args[1:])

        return hook

    def _keep(self, i: int):
        def hook(module, args, output):
            self.outputs[i] = output
            return output.detach()

        return hook


@dataclass
class AlignEnd:
    """The end of the alignment stage (a metrics event and a meta.json field)."""

    step: int
    """The first step of end-to-end training (= the number of alignment steps)."""
    rule: str
    """``steps`` (its length was reached) or ``lit`` (the alignment loss stopped improving)."""
    align_loss: float
    """The alignment loss of the stage's last step."""
    spent_flops: float
    """FLOPs the budget had counted by then (the main schedule's progress starts there)."""
    window_losses: list[float] = field(default_factory=list)
    """``lit``: mean alignment loss of each window."""

    def to_dict(self) -> dict:
        return asdict(self)


_ALIGN_STATE_VERSION = 1
#: the LIT rule is freeze.py's: a one-stage controller whose "release" ends the stage (the
#: component name only labels that stage)
_LIT_LABEL = "attention"


class AlignThenFreeze:
    """The alignment stage, then the run's freeze controller with its steps counted from
    the stage's end. It stands in for :class:`~xatl_ds.freeze.FreezeController` in the
    trainer (``lr_scale``, ``update``, ``stage``, ``events``, ``state_dict``) and reports
    events in run steps."""

    def __init__(self, align_cfg, freeze: FreezeController):
        self.cfg, self.freeze = align_cfg, freeze
        self.lit: FreezeController | None = None
        if align_cfg.until == "lit":
            rule = FreezeConfig(policy="lit", unfreeze_order=[[_LIT_LABEL]], threshold=align_cfg.threshold,
                                patience=align_cfg.patience, window=align_cfg.window, rewarmup_steps=0)  # fmt: skip
            self.lit = FreezeController(rule, {_LIT_LABEL})
        self.end: AlignEnd | None = None

    # -- the stage -----------------------------------------------------------------------
    def aligning(self, step: int) -> bool:
        """Whether ``step`` belongs to the alignment stage."""
        return self.end is None or step < self.end.step

    def update_align(self, step: int, loss: float, spent_flops: float) -> AlignEnd | None:
        """Feed the alignment loss of ``step``; returns the stage's end when this step ends it
        (end-to-end training starts at ``step + 1``). ``spent_flops``: the budget's count
        after the step (the main schedule's progress starts from it)."""
        if not self.aligning(step):
            raise RuntimeError(f"update_align(step={step}) after the stage ended at step {self.end.step}")
        fired = self.lit.update(step, loss) if self.lit is not None else []
        if not fired and step + 1 < self.cfg.steps:
            return None
        windows = [h["loss"] for h in self.lit.history] if self.lit is not None else []
        self.end = AlignEnd(step + 1, "lit" if fired else "steps", float(loss), float(spent_flops), windows)
        return self.end

    def main_start(self) -> tuple[int, float]:
        """(first step, budget FLOPs spent before it) of end-to-end training."""
        return (self.end.step, self.end.spent_flops) if self.end is not None else (0, 0.0)

    # -- the FreezeController interface, shifted ---------------------------------------------
    def lr_scale(self, stage_idx: int, step: int) -> float:
        if self.aligning(step):
            self.freeze.lr_scale(stage_idx, 0)  # refuses an unknown stage index
            return 0.0
        return self.freeze.lr_scale(stage_idx, step - self.end.step)

    def update(self, step: int, loss: float, new_param_norm: float | None = None) -> list[UnfreezeEvent]:
        if self.aligning(step):
            raise RuntimeError(f"update(step={step}) during the alignment stage; use update_align")
        return [self._shift(e) for e in self.freeze.update(step - self.end.step, loss, new_param_norm)]

    @property
    def stage(self) -> int:
        return self.freeze.stage

    @property
    def events(self) -> list[UnfreezeEvent]:
        return [self._shift(e) for e in self.freeze.events]

    def _shift(self, e: UnfreezeEvent) -> UnfreezeEvent:
        return replace(e, step=e.step + self.end.step, trigger_step=e.trigger_step + self.end.step)

    def state_dict(self) -> dict:
        """The freeze controller's state, the LIT rule's and the stage's end (plain types)."""
        return {
            "align_version": _ALIGN_STATE_VERSION, "freeze": self.freeze.state_dict(),
            "lit": self.lit.state_dict() if self.lit is not None else None,
            "end": self.end.to_dict() if self.end is not None else None,
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("align_version") != _ALIGN_STATE_VERSION:
            raise ValueError(
                "the checkpoint's freeze state has no alignment stage (or another version): it was saved "
                "by a run without align.enabled; resume with the same config"
            )
        self.freeze.load_state_dict(state["freeze"])
        if self.lit is not None:
            self.lit.load_state_dict(state["lit"])
        self.end = AlignEnd(**state["end"]) if state["end"] is not None else None
