"""The teacher's side of a run: one :class:`Teaching` per trainer.

It owns everything that needs the teacher or the alignment stage (the pieces themselves are
:mod:`xatl_ds.distill`'s): loading the teacher and placing it beside the engine, the alignment
stage's controller, parameters and learning rate, what a step optimizes (:meth:`Teaching.phase`),
the distillation and alignment losses of a batch, the teacher's FLOPs, its validation loss
(teacher recovery), and the teacher's columns of ``metrics.jsonl`` and fields of ``meta.json``.
The trainer asks it and never touches the teacher itself.

Every run has one, and a run without ``distill`` and ``align`` pays nothing for it: no teacher
is placed, its FLOPs are 0 and the freeze controller is used as it is. Such a run with a source
(plain XATL) only loads the source once per start, replicated, to measure the teacher's
validation loss, and frees it again.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from .config import ConfigError, RunConfig
from .distill import (
    AlignEnd, AlignThenFreeze, DistillLoss, LoadedTeacher, MixerSubstitution, Teacher, TeacherError, aligned_layers,
    alignment_loss, alignment_param_names, check_alignable, distill_loss, load_teacher, teacher_spec,
)  # fmt: skip
from .flops import forward_flops
from .freeze import FreezeController

__all__ = ["Teaching"]


class Teaching:
    """The teacher and the alignment stage of one run (see the module docstring).

    ``freeze`` is the run's freeze controller; :attr:`controller` is what the trainer drives
    instead: with ``align`` the stage first (:class:`~xatl_ds.distill.AlignThenFreeze`, whose
    state is the checkpoint's freeze state), else ``freeze`` itself. The teacher itself comes
    with :meth:`place`, once the student's engine exists."""

    def __init__(self, cfg: RunConfig, student_config: Any, param_names: Iterable[str], freeze: FreezeController,
                 device: torch.device, precision: str, peak_lr: float):  # fmt: skip
        self.cfg, self.student_config = cfg, student_config
        self.device, self.precision, self.peak_lr = device, precision, peak_lr
        self.align_ctrl: AlignThenFreeze | None = None
        self.align_names: frozenset[str] = frozenset()
        """The parameters that train in the alignment stage (their own optimizer groups)."""
        if cfg.align.enabled:
            self.align_ctrl = AlignThenFreeze(cfg.align, freeze)
            self.align_names = frozenset(alignment_param_names(param_names, student_config))
        self.controller: FreezeController | AlignThenFreeze = freeze if self.align_ctrl is None else self.align_ctrl
        self.teacher: Teacher | None = None  # placed by place() for distill / align
        self.val_loss: float | None = None  # the teacher's validation loss, measured by evaluate()
        self.flops = 0.0  # cumulative teacher FLOPs, derived from the step (count_to), never saved

    # -- the teacher ---------------------------------------------------------------------------
    def place(self, zero_stage: int, ds_config: dict) -> None:
        """With ``distill`` or ``align``: load the teacher and place it for training (the run's
        precision, partitioned like the student under ZeRO-3); else nothing."""
        if self.cfg.distill.enabled or self.cfg.align.enabled:
            self.teacher = self._placed(self._load(), zero_stage, ds_config)

    def _load(self) -> LoadedTeacher:
        """The run's teacher, loaded and checked against the student and the data."""
        spec = teacher_spec(self.cfg)
        try:
            loaded = load_teacher(spec, self.cfg.data.path, self.student_config.vocab_size)
            if self.cfg.align.enabled:
                check_alignable(self.student_config, loaded.config, spec)
        except TeacherError as e:
            raise ConfigError(f"distill.teacher: {e}") from None
        if self.cfg.data.seq_len > loaded.config.max_position_embeddings:
            raise ConfigError(
                f"data.seq_len={self.cfg.data.seq_len} is longer than teacher {spec!r} was trained for "
                f"(max_position_embeddings {loaded.config.max_position_embeddings}); lower data.seq_len"
            )
        return loaded

    def _placed(self, loaded: LoadedTeacher, zero_stage: int, ds_config: dict | None) -> Teacher:
        # without a DeepSpeed config (teacher recovery alone) the teacher is replicated: ZeRO 0
        return Teacher(loaded, self.device, self.precision, zero_stage if ds_config else 0, ds_config)

    def evaluate(self, evaluate: Callable[[nn.Module], float]) -> float | None:
        """The teacher's validation loss (teacher recovery) through the trainer's ``evaluate``
        (the student's very batches), kept in :attr:`val_loss`; None when the run has no
        teacher. A teacher that does not train with the run (plain XATL) is loaded for this
        alone, replicated on every rank, and freed again."""
        if self.teacher is not None:
            self.val_loss = evaluate(self.teacher.module)
        elif teacher_spec(self.cfg) is None:
            self.val_loss = None
        else:
            teacher = self._placed(self._load(), 0, None)
            try:
                self.val_loss = evaluate(teacher.module)
            finally:
                del teacher
        return self.val_loss

    # -- the alignment stage --------------------------------------------------------------------
    def aligning(self, step: int) -> bool:
        """Whether ``step`` is a step of the alignment stage."""
        return self.align_ctrl is not None and self.align_ctrl.aligning(step)

    def phase(self, step: int) -> str:
        """What ``step`` optimizes: ``align`` (the alignment stage's MSE), ``distill`` (the
        distillation loss) or ``ce`` (next-token cross-entropy, no teacher)."""
        return "align" if self.aligning(step) else "distill" if self.cfg.distill.enabled else "ce"

    def align_lr(self, step: int) -> float:
        """The alignment stage's learning rate: ``align.lr`` (default: the peak lr), constant
        after a linear warmup of ``align.warmup_steps``."""
        a = self.cfg.align
        peak = a.lr or self.peak_lr
        return peak * (step + 1) / a.warmup_steps if step < a.warmup_steps else peak

    def update_align(self, step: int, loss: float, spent_flops: float) -> AlignEnd | None:
        """Feed the alignment loss of ``step`` (a step of the stage); the stage's end when this
        step ends it (see :meth:`~xatl_ds.distill.AlignThenFreeze.update_align`)."""
        return self.align_ctrl.update_align(step, loss, spent_flops)

    def main_start(self) -> tuple[int, float]:
        """(first step, budget FLOPs spent before it) of end-to-end training: the main
        schedule's warmup and cosine count from there."""
        return self.align_ctrl.main_start() if self.align_ctrl is not None else (0, 0.0)

    # -- losses -----------------------------------------------------------------------------------
    def loss(self, engine: Any, x: torch.Tensor, phase: str) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of micro-batch ``x`` in phase ``align`` or ``distill``, and its extra
        metrics terms (the distillation loss's CE and KL values)."""
        if phase == "align":
            return self.alignment_loss(engine, x), {}
        d = self.distill_loss(engine, x)
        return d.total, d.terms()

    def distill_loss(self, engine: Any, x: torch.Tensor) -> DistillLoss:
        """The distillation loss of micro-batch ``x`` (:func:`~xatl_ds.distill.distill_loss`),
        the student running through ``engine``."""
        d = self.cfg.distill
        teacher_logits = self.teacher.logits(x)
        student_logits = engine(input_ids=x).logits
        return distill_loss(student_logits, teacher_logits, x, kl_weight=d.kl_weight,
                            reverse_kl_weight=d.reverse_kl_weight, ce_weight=d.ce_weight,
                            temperature=d.temperature)  # fmt: skip

    def alignment_loss(self, engine: Any, x: torch.Tensor) -> torch.Tensor:
        """The alignment loss of micro-batch ``x``: the student runs through ``engine`` (ZeRO's
        hooks see an ordinary forward), its aligned mixers fed the teacher's attention inputs."""
        inputs, targets = self.teacher.attention_io(x, aligned_layers(self.student_config))
        with MixerSubstitution(engine.module, inputs) as sub:
            engine(input_ids=x, logits_to_keep=1)
        return alignment_loss(sub.outputs, targets)

    # -- FLOPs ------------------------------------------------------------------------------------
    def phase_flops(self) -> tuple[int, int]:
        """Analytic FLOPs of one teacher forward per step ``(alignment stage, end-to-end)``:
        the blocks with the LM head on one position while aligning, the whole forward when
        distilling, 0 when the teacher does not run (or there is none)."""
        if self.teacher is None:
            return 0, 0
        c, b, L = self.teacher.config, self.cfg.data.batch_size, self.cfg.data.seq_len
        align = forward_flops(c, b, L, head_positions=1) if self.align_ctrl is not None else 0
        return align, forward_flops(c, b, L) if self.cfg.distill.enabled else 0

    def flops_at(self, steps_done: int) -> float:
        """Cumulative teacher FLOPs after ``steps_done`` steps, in closed form (each phase
        costs the same every step), so a resumed run counts exactly what an uninterrupted one
        does without saving anything."""
        per_align, per_main = self.phase_flops()
        end = self.align_ctrl.end if self.align_ctrl is not None else None
        n_align = 0 if self.align_ctrl is None else steps_done if end is None else min(steps_done, end.step)
        return float(n_align * per_align + (steps_done - n_align) * per_main)

    def count_to(self, steps_done: int) -> float:
        """Set :attr:`flops` to the teacher's FLOPs after ``steps_done`` steps; returns them."""
        self.flops = self.flops_at(steps_done)
        return self.flops

    # -- records ----------------------------------------------------------------------------------
    def metrics(self, steps_done: int, aligned: bool) -> dict:
        """The teacher's columns of the metrics row after step ``steps_done`` (``aligned``:
        whether that step was one of the alignment stage): its FLOPs so far and of the step
        when it runs, its validation loss in the first row."""
        row: dict = {}
        if self.teacher is not None:
            row["teacher_flops"] = self.flops
            row["teacher_flops_step"] = float(self.phase_flops()[0 if aligned else 1])
        if steps_done == 1 and self.val_loss is not None:
            row["teacher_val_loss"] = self.val_loss
        return row

    def meta(self, budget_flops: float) -> dict:
        """The run metadata's teacher fields: teacher recovery numbers, FLOPs, the stage's end.
        ``budget_flops`` (what the budget counted, teacher included or not) keeps its place
        among them in meta.json."""
        end = self.align_ctrl.end if self.align_ctrl is not None else None
        t = self.teacher
        return {
            "teacher": teacher_spec(self.cfg), "teacher_val_loss": self.val_loss, "teacher_flops": self.flops,
            "teacher_params": t.n_params if t else None, "teacher_params_per_rank": t.local_params if t else None,
            "teacher_warning": t.warning if t else None, "budget_flops": budget_flops,
            "align_end": end.to_dict() if end is not None else None,
        }  # fmt: skip
