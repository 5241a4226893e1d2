"""The trainer: one run config -> one trained model, under the ``deepspeed`` launcher.

    deepspeed --num_gpus N --module xatl_ds.train --config RUN.yaml
    python -m xatl_ds.train --config RUN.yaml            # one process

Order of work: validate the config (nothing starts on a bad one) -> build the model
(scratch, or XATL transfer from a source) -> freeze plan -> DeepSpeed engine -> resume
from the last checkpoint if any -> train -> export (HF format, consolidated from ZeRO-3),
``meta.json`` and ``DONE``. With ``train.compile`` every block is compiled in place
(:func:`compile_blocks`, regional ``torch.compile``) before the engine is built. Each launch
records in ``metrics.jsonl`` which mixer implementations ran (``kernel_paths``, first row of
the launch) and, on CUDA, ``max_memory_allocated`` every step; ``meta.json`` keeps both.

Freezing under ZeRO. DeepSpeed fixes the optimizer's parameter set at ``initialize``, so
every parameter enters the optimizer, one parameter group per unfreeze stage. A frozen
stage has lr 0 (AdamW then leaves it bit-identical: the update and the decoupled decay are
both scaled by lr) *and* ``requires_grad=False`` after ``initialize`` (so autograd skips
its weight gradients, they stay out of the clipping norm, and the step costs less).
Unfreezing sets ``requires_grad`` back and ramps the group's lr. Tests prove at ZeRO 0-3
that frozen tensors stay bit-identical and move once released.

Teachers (:mod:`xatl_ds.distill`). With ``distill`` the loss of a step is the distillation
loss against a teacher running beside the engine (no gradients, the run's precision,
partitioned under ZeRO-3); with ``align`` the run starts with the alignment stage, in which
only the new mixers' parameter groups have a learning rate (the aligned mixers' parameters
get groups of their own for that) and the freeze controller is not fed: its steps, the main
schedule's warmup and cosine count from the stage's end. The teacher's forward FLOPs are a
column of their own (``teacher_flops``), and its validation loss is measured on the run's
validation batches for every run that has a teacher (XATL runs: the source).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from .build import build_model  # noqa: F401  (the trainer's model; re-exported for callers)
from .config import ConfigError, RunConfig, load_run_config
from .preflight import PreflightError, build_ds_config, check_run_dir, recorded_hash, resolve_precision  # noqa: F401
from .rundir import RunDir, RunLocked
from .safe_load import CheckpointError
from .sizes import get_size


# -- process set-up --------------------------------------------------------------------
def _setup_threads() -> None:
    """One rank per core on CPU: without this, 2 ranks on 2 cores run ~10x slower."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if "OMP_NUM_THREADS" not in os.environ:
        n = max(1, (os.cpu_count() or 1) // max(1, local_world))
        os.environ["OMP_NUM_THREADS"] = str(n)
        torch.set_num_threads(n)


SHM_DIR = Path("/dev/shm")


def release_shm_workspace(rank: int) -> None:
    """Unlink this rank's name of DeepSpeed's CPU allreduce workspace.

    DeepSpeed's CPU backend maps a ~67 MB shared-memory segment per rank,
    ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``, and never unlinks it:
    with a free port per launch every run would leave its segments behind, and a sweep fills
    /dev/shm (which is RAM). Once every rank has mapped every segment (the barrier: DeepSpeed's
    init returns only after its rank opened all of them) the names can go; the mappings live on
    until the processes exit, however they exit."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port or not SHM_DIR.is_dir():
        return
    torch.distributed.barrier()
    for p in SHM_DIR.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"):
        p.unlink(missing_ok=True)


def init_distributed() -> tuple[int, int, torch.device]:
    """Start torch.distributed through DeepSpeed (gloo on CPU, NCCL on CUDA)."""
    import deepspeed

    if "RANK" not in os.environ:  # plain `python -m xatl_ds.train`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        from .executor import free_port

        os.environ.setdefault("MASTER_PORT", str(free_port()))
    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        release_shm_workspace(rank)
        device = torch.device("cpu")
    return rank, world, device


# -- model ------------------------------------------------------------------------------
def compile_blocks(model, **compile_kwargs) -> int:
    """Regional compilation (``train.compile``): ``torch.compile`` each block in place
    (``nn.Module.compile``: the module and its parameter names stay, so the optimizer groups,
    ZeRO's hooks and checkpoints see the same model). Compilation happens lazily, at a block's
    first call. Returns the number of blocks compiled."""
    blocks = list(model.model.layers)
    for blk in blocks:
        blk.compile(**compile_kwargs)
    return len(blocks)


def param_groups(model, stage_of: dict[str, int], weight_decay: float,
                 aligned: frozenset[str] = frozenset()) -> tuple[list[dict], list[int], list[bool]]:  # fmt: skip
    """One AdamW group per (stage, decay?, aligned?) triple; returns the groups, each group's
    stage and whether it holds parameters of the alignment stage (``aligned`` names: they
    train while everything else has lr 0, so they need groups of their own)."""
    buckets: dict[tuple[int, bool, bool], list] = {}
    for name, p in model.named_parameters():
        decay = p.dim() >= 2 and "embed_tokens" not in name and "A_log" not in name
        buckets.setdefault((stage_of[name], decay, name in aligned), []).append(p)
    groups, stages, align = [], [], []
    for (stage, decay, in_align), params in sorted(buckets.items()):
        groups.append({"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": 0.0})
        stages.append(stage)
        align.append(in_align)
    return groups, stages, align


def lr_at(cfg: RunConfig, peak: float, step: int, progress: float) -> float:
    """Main schedule: linear warmup over steps, then cosine over run progress to the floor."""
    o = cfg.optim
    if step < o.warmup_steps:
        return peak * (step + 1) / o.warmup_steps
    p = min(1.0, max(0.0, progress))
    floor = peak * o.min_lr_ratio
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * p))


# -- the run ----------------------------------------------------------------------------
class Trainer:
    """State and loop of one run (see the module docstring)."""

    def __init__(self, cfg: RunConfig, rank: int, world: int, device: torch.device):
        from .data import PackedTokens
        from .freeze import TRAINABLE, FreezeController, param_stage_map
        from .models.components import components_of

        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.out = Path(cfg.out_dir)
        self.rundir = RunDir(cfg.out_dir)
        self.train_data = PackedTokens(cfg.data.path, "train")
        self.val_data = PackedTokens(cfg.data.path, "val")
        self.val_data.check_fits(cfg.data.seq_len, cfg.eval.batches, 1)  # not only at the first evaluation
        self.micro, self.gas = cfg.batch_layout(world)
        self.precision = resolve_precision(cfg, device.type)

        model, self.transfer_report = build_model(cfg, self.train_data.vocab_size)
        self.model_config = model.config
        present = (
            {c for c, v in self.transfer_report["components"].items() if v["tensors"]} if self.transfer_report else set()
        )
        self.ctrl = FreezeController(cfg.freeze, present)
        # the alignment stage comes first; the freeze controller counts its steps from its end
        self.align_ctrl = None
        self.align_names: frozenset[str] = frozenset()
        if cfg.align.enabled:
            from .distill import AlignThenFreeze, alignment_param_names

            self.align_ctrl = self.ctrl = AlignThenFreeze(cfg.align, self.ctrl)
            self.align_names = frozenset(alignment_param_names((n for n, _ in model.named_parameters()), model.config))
        comp = components_of(model)
        self.stage_of = param_stage_map(comp, cfg.freeze, present)
        self.names_by_stage: dict[int, list[str]] = {}
        for n, s in self.stage_of.items():
            self.names_by_stage.setdefault(s, []).append(n)
        self.TRAINABLE = TRAINABLE
        self.new_param_names = [n for n, c in comp.items() if self.stage_of[n] == TRAINABLE]
        size_lr = get_size(cfg.model.size).lr if cfg.init.kind == "scratch" else None
        self.peak_lr = cfg.optim.lr or size_lr or 3e-4
        groups, self.group_stages, self.group_aligned = param_groups(model, self.stage_of, cfg.optim.weight_decay,
                                                                     self.align_names)  # fmt: skip
        opt = torch.optim.AdamW(groups, lr=self.peak_lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        if cfg.train.compile:  # before initialize: the engine wraps the module as it then is
            compile_blocks(model)

        import deepspeed

        ds_cfg = build_ds_config(cfg, world, self.precision)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
        self.zero_stage = self.engine.zero_optimization_stage()
        self.params = dict(self.engine.module.named_parameters())
        self.teacher = None  # the distillation / alignment teacher (distill.Teacher)
        self.teacher_val_loss: float | None = None
        if cfg.distill.enabled or cfg.align.enabled:
            self.teacher = self._place_teacher(self._load_teacher(), ds_cfg)

        # counters restored on resume
        self.step = 0
        self.tokens = 0
        self.flops = 0.0
        self.teacher_flops = 0.0  # derived from the step (teacher_flops_at), not saved
        self.wall = 0.0
        self.last_val: float | None = None
        self._flops_cache: dict[frozenset, float] = {}
        self.kernel_paths: dict[str, str] | None = None  # models.kernels.paths_used after this launch's 1st step

    # -- the teacher (distill.Teacher) -------------------------------------------------
    def _load_teacher(self):
        """The run's teacher, loaded and checked against the student and the data."""
        from .distill import TeacherError, check_alignable, load_teacher, teacher_spec

        spec = teacher_spec(self.cfg)
        try:
            loaded = load_teacher(spec, self.cfg.data.path, self.model_config.vocab_size)
            if self.cfg.align.enabled:
                check_alignable(self.model_config, loaded.config, spec)
        except TeacherError as e:
            raise ConfigError(f"distill.teacher: {e}") from None
        if self.cfg.data.seq_len > loaded.config.max_position_embeddings:
            raise ConfigError(
                f"data.seq_len={self.cfg.data.seq_len} is longer than teacher {spec!r} was trained for "
                f"(max_position_embeddings {loaded.config.max_position_embeddings}); lower data.seq_len"
            )
        return loaded

    def _place_teacher(self, loaded, ds_cfg: dict | None):
        from .distill import Teacher

        return Teacher(loaded, self.device, self.precision, self.zero_stage if ds_cfg else 0, ds_cfg)

    def teacher_phase_flops(self) -> tuple[int, int]:
        """Analytic FLOPs of one teacher forward per step ``(alignment stage, end-to-end)``:
        the blocks with the LM head on one position while aligning, the whole forward when
        distilling, 0 when the teacher does not run (or there is none)."""
        if self.teacher is None:
            return 0, 0
        from .flops import forward_flops

        c, b, L = self.teacher.config, self.cfg.data.batch_size, self.cfg.data.seq_len
        align = forward_flops(c, b, L, head_positions=1) if self.align_ctrl is not None else 0
        return align, forward_flops(c, b, L) if self.cfg.distill.enabled else 0

    def teacher_flops_at(self, steps_done: int) -> float:
        """Cumulative teacher FLOPs after ``steps_done`` steps, in closed form (each phase
        costs the same every step), so a resumed run counts exactly what an uninterrupted one
        does without saving anything."""
        per_align, per_main = self.teacher_phase_flops()
        end = self.align_ctrl.end if self.align_ctrl is not None else None
        n_align = 0 if self.align_ctrl is None else steps_done if end is None else min(steps_done, end.step)
        return float(n_align * per_align + (steps_done - n_align) * per_main)

    # -- freezing ----------------------------------------------------------------
    def aligning(self, step: int) -> bool:
        """Whether ``step`` is a step of the alignment stage."""
        return self.align_ctrl is not None and self.align_ctrl.aligning(step)

    def frozen_stages(self, step: int) -> set[int]:
        """Stages whose lr multiplier is exactly 0 at ``step`` (never released, or not yet)."""
        return {s for s in self.names_by_stage if s != self.TRAINABLE and self.ctrl.lr_scale(s, step) == 0.0}

    def apply_freeze(self, step: int) -> None:
        """requires_grad follows the controller (lr 0 alone would still compute weight grads);
        in the alignment stage only the aligned mixers' parameters train."""
        if self.aligning(step):
            for n, p in self.params.items():
                p.requires_grad_(n in self.align_names)
            return
        frozen = self.frozen_stages(step)
        for s, names in self.names_by_stage.items():
            for n in names:
                self.params[n].requires_grad_(s not in frozen)

    def frozen_param_names(self, step: int) -> frozenset:
        if self.aligning(step):
            return frozenset(n for n in self.params if n not in self.align_names)
        frozen = self.frozen_stages(step)
        return frozenset(n for s in frozen for n in self.names_by_stage[s])

    def step_flops(self, step: int) -> float:
        from .flops import alignment_step_flops, step_flops

        if self.aligning(step):
            if "align" not in self._flops_cache:
                self._flops_cache["align"] = float(
                    alignment_step_flops(self.model_config, self.cfg.data.batch_size, self.cfg.data.seq_len)
                )
            return self._flops_cache["align"]
        key = self.frozen_param_names(step)
        if key not in self._flops_cache:
            fc = step_flops(self.model_config, self.cfg.data.batch_size, self.cfg.data.seq_len, key,
                            frozen_weight_grads=False)  # fmt: skip
            self._flops_cache[key] = float(fc.total)
        return self._flops_cache[key]

    def trainable_params(self, step: int) -> int:
        frozen = self.frozen_param_names(step)
        return sum(_numel(p) for n, p in self.params.items() if n not in frozen)

    # -- budget --------------------------------------------------------------------
    def total_steps(self) -> int | None:
        return self.cfg.total_steps()  # None for a FLOP budget: it ends when reached

    def spent_flops(self) -> float:
        """What ``budget.flops`` counts: the student's FLOPs, plus the teacher's unless
        ``distill.count_teacher_in_budget`` is off."""
        return self.flops + (self.teacher_flops if self.cfg.distill.count_teacher_in_budget else 0.0)

    def progress(self, step: int) -> float:
        """Progress of the main schedule, which starts after the alignment stage."""
        start, spent_before = self.align_ctrl.main_start() if self.align_ctrl is not None else (0, 0.0)
        total = self.total_steps()
        if total is not None:
            return (step - start) / max(1, total - start)
        remaining = float(self.cfg.budget.flops) - spent_before
        return (self.spent_flops() - spent_before) / remaining if remaining > 0 else 1.0

    def finished(self) -> bool:
        total = self.total_steps()
        if total is not None:
            return self.step >= total
        return self.spent_flops() >= float(self.cfg.budget.flops)

    def align_lr(self, step: int) -> float:
        """The alignment stage's learning rate: ``align.lr`` (default: the peak lr), constant
        after a linear warmup of ``align.warmup_steps``."""
        a = self.cfg.align
        peak = a.lr or self.peak_lr
        return peak * (step + 1) / a.warmup_steps if step < a.warmup_steps else peak

    # -- checkpoints -------------------------------------------------------------------
    def ckpt_dir(self) -> Path:
        return self.rundir.checkpoints

    def save_checkpoint(self) -> None:
        tag = f"step{self.step:08d}"
        state = {
            "step": self.step, "tokens": self.tokens, "flops": self.flops, "wall": self.wall,
            "last_val": self.last_val, "freeze": self.ctrl.state_dict(), "config_hash": self.cfg.content_hash(),
        }  # fmt: skip
        self.engine.save_checkpoint(str(self.ckpt_dir()), tag=tag, client_state={"xatl": state})
        torch.distributed.barrier()
        if self.rank == 0:
            tags = sorted(p.name for p in self.ckpt_dir().glob("step*") if p.is_dir())
            for old in tags[: -self.cfg.checkpoint.keep]:
                shutil.rmtree(self.ckpt_dir() / old, ignore_errors=True)
        torch.distributed.barrier()

    def maybe_resume(self) -> bool:
        from .checkpoint import load_for_resume

        # DeepSpeed's own loader unpickles with weights_only=False: a copied run folder could
        # execute code. load_for_resume reads every file weights_only=True (CheckpointError if not).
        loaded = load_for_resume(self.engine, self.ckpt_dir())
        if loaded is None:
            return False
        st = loaded[1]["xatl"]
        if st["config_hash"] != self.cfg.content_hash():
            raise ConfigError(
                f"{self.out} holds checkpoints of a different run config (hash {st['config_hash']} != "
                f"{self.cfg.content_hash()}); use another out_dir or delete {self.ckpt_dir()}"
            )
        self.step, self.tokens, self.flops, self.wall = st["step"], st["tokens"], st["flops"], st["wall"]
        self.last_val = st["last_val"]
        self.ctrl.load_state_dict(st["freeze"])
        if self.rank == 0:
            self.rundir.truncate_metrics(self.step)
        return True

    # -- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model=None) -> float:
        """Validation loss of the student, or of ``model`` (a teacher's forward: engine or
        module, already in eval mode) on the very same batches."""
        from .data import global_mean_loss

        eng = self.engine if model is None else model
        eng.eval()
        batches = list(self.val_data.iter_eval_batches(self.micro, self.cfg.data.seq_len, self.cfg.eval.batches,
                                                       self.rank, self.world))  # fmt: skip
        # ZeRO-3 gathers parameters collectively: every rank must run the same number of
        # forwards, so ranks with fewer batches run dummies that count for nothing.
        n = torch.tensor([len(batches)], dtype=torch.int64, device=self._comm_device())
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
        loss_sum, count = 0.0, 0
        for i in range(int(n.item())):
            real = i < len(batches)
            x = (batches[i] if real else batches[0] if batches else torch.zeros(1, 2, dtype=torch.long)).to(self.device)
            out = eng(input_ids=x, labels=x)
            if real:
                k = x.shape[0] * (x.shape[1] - 1)
                loss_sum += float(out.loss) * k
                count += k
        if model is None:
            eng.train()
        return global_mean_loss(loss_sum, count, device=self._comm_device())

    def evaluate_teacher(self) -> float | None:
        """The teacher's validation loss (teacher recovery), for XATL and distilled runs; None
        when the run has no teacher. A teacher that does not train with the run (plain XATL)
        is loaded for this alone, replicated on every rank, and freed again."""
        from .distill import teacher_spec

        if self.teacher is not None:
            return self.evaluate(self.teacher.module)
        if teacher_spec(self.cfg) is None:
            return None
        teacher = self._place_teacher(self._load_teacher(), None)
        try:
            return self.evaluate(teacher.module)
        finally:
            del teacher

    def _comm_device(self):
        return self.device if self.device.type == "cuda" else None

    def new_param_norm(self) -> float:
        """Mean L2 norm of the new (non-transferred) weight tensors (the weight_norm rule)."""
        params = [self.params[n] for n in self.new_param_names]
        with _gathered(params, self.zero_stage):
            norms = [float(p.detach().float().norm()) for p in params]
        return sum(norms) / max(1, len(norms))

    # -- the loop ----------------------------------------------------------------------------
    def train(self) -> None:
        cfg = self.cfg
        resumed = self.maybe_resume()
        self.teacher_flops = self.teacher_flops_at(self.step)
        if self.rank == 0 and not resumed:
            self.rundir.start_metrics()
        # teacher recovery: the teacher's loss on the same validation batches (every start:
        # it goes into meta.json, and into the first metrics row)
        self.teacher_val_loss = self.evaluate_teacher()
        from .monitor import open_metrics  # metrics.jsonl, mirrored to TensorBoard / W&B (cfg.log)

        metrics = open_metrics(self.rundir, cfg, self.step) if self.rank == 0 else None
        bar = _progress(self, resumed)
        comm = self._comm_device()
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        need_norm = cfg.freeze.policy == "weight_norm"
        self.engine.train()
        self.apply_freeze(self.step)
        try:
            while not self.finished():
                step, t0 = self.step, time.perf_counter()
                aligning = self.aligning(step)
                phase = self.phase(step)
                lrs = {}
                if aligning:  # only the aligned mixers' groups train
                    for g, stage, al in zip(self.optimizer.param_groups, self.group_stages, self.group_aligned):
                        g["lr"] = self.align_lr(step) if al else 0.0
                        lrs["align" if al else str(stage)] = g["lr"]
                else:
                    start = self.align_ctrl.main_start()[0] if self.align_ctrl is not None else 0
                    base_lr = lr_at(cfg, self.peak_lr, step - start, self.progress(step))
                    for g, stage in zip(self.optimizer.param_groups, self.group_stages):
                        g["lr"] = base_lr * (1.0 if stage == self.TRAINABLE else self.ctrl.lr_scale(stage, step))
                        lrs[str(stage)] = g["lr"]
                step_flops = self.step_flops(step)
                teacher_step = self.teacher_phase_flops()[0 if aligning else 1]
                trainable = self.trainable_params(step)
                sums = None  # per-step sums: the loss, then the distillation terms
                for micro in range(self.gas):
                    x = self.train_data.get_batch(step, micro, self.micro, cfg.data.seq_len, self.rank, self.world,
                                                  cfg.seed, grad_accum=self.gas).to(self.device)  # fmt: skip
                    loss, terms = self.batch_loss(x, phase)
                    self.engine.backward(loss)
                    self.engine.step()
                    vals = [float(loss.detach()), *terms.values()]
                    sums = vals if sums is None else [a + b for a, b in zip(sums, vals)]
                # every rank feeds the same global loss to the freeze rule, so decisions agree
                lt = torch.tensor([v / self.gas for v in sums], dtype=torch.float64, device=comm)
                torch.distributed.all_reduce(lt)
                train_loss, *term_vals = (float(v) / self.world for v in lt.tolist())
                if not math.isfinite(train_loss):
                    raise FloatingPointError(f"training loss is {train_loss} at step {step}; lower optim.lr")
                norm = self.new_param_norm() if need_norm and not aligning else None
                events = [] if aligning else self.ctrl.update(step, train_loss, norm)
                self.step += 1
                self.tokens += tokens_per_step
                self.flops += step_flops
                self.teacher_flops = self.teacher_flops_at(self.step)
                self.wall += time.perf_counter() - t0
                # the freeze controller's steps start after the stage: it is not fed before
                ended = self.align_ctrl.update_align(step, train_loss, self.spent_flops()) if aligning else None
                if events or ended:
                    self.apply_freeze(self.step)
                row = {
                    "step": self.step, "tokens": self.tokens, "train_loss": train_loss, "lr": lrs,
                    "trainable_params": trainable, "freeze_stage": self.ctrl.stage, "flops": self.flops,
                    "wall_time": self.wall, "tokens_per_s": tokens_per_step / max(1e-9, time.perf_counter() - t0),
                }  # fmt: skip
                if aligning:  # the alignment MSE is no language-model loss: its own column
                    row["align_loss"] = row.pop("train_loss")
                row.update(zip(terms, term_vals))
                if self.teacher is not None:
                    row["teacher_flops"] = self.teacher_flops
                    row["teacher_flops_step"] = float(teacher_step)
                if self.step == 1 and self.teacher_val_loss is not None:
                    row["teacher_val_loss"] = self.teacher_val_loss
                if self.kernel_paths is None:  # once per launch: which mixer implementations ran
                    from .models.kernels import paths_used

                    self.kernel_paths = row["kernel_paths"] = paths_used(self.engine.module)
                if self.device.type == "cuda":  # peak since the process started (weights, optimizer, activations)
                    row["max_memory_allocated"] = torch.cuda.max_memory_allocated(self.device)
                if ended:
                    row["align_end"] = ended.to_dict()
                if events:
                    row["unfreeze"] = [e.to_dict() for e in events]
                if norm is not None:
                    row["new_param_norm"] = norm
                if self.step % cfg.eval.every == 0 or self.finished():
                    self.last_val = self.evaluate()
                    row["val_loss"] = self.last_val
                if metrics:
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                if bar is not None:
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or events or ended or "val_loss" in row:
                        bar.set_postfix(_postfix(row, self.last_val), refresh=False)
                    if ended:
                        bar.write(f"[{cfg.name}] step {ended.step}: alignment stage ended ({ended.rule}, "
                                  f"align loss {ended.align_loss:.4g})")  # fmt: skip
                    for e in events:
                        bar.write(f"[{cfg.name}] step {e.step}: unfreeze stage {e.stage} {list(e.components)} ({e.rule})")
                if self.step % cfg.checkpoint.every == 0 and not self.finished():
                    self.save_checkpoint()
        finally:
            if metrics:
                metrics.close()
            if bar is not None:
                bar.close()
        self.save_checkpoint()
        self.export()

    def phase(self, step: int) -> str:
        """What ``step`` optimizes: ``align`` (the alignment stage), ``distill`` or ``ce``."""
        return "align" if self.aligning(step) else "distill" if self.cfg.distill.enabled else "ce"

    def batch_loss(self, x: torch.Tensor, phase: str) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to back-propagate for micro-batch ``x`` in ``phase`` (see :meth:`phase`)
        and its extra metrics terms (the distillation loss's CE and KL values)."""
        if phase == "align":
            return self._alignment_loss(x), {}
        if phase == "distill":
            d = self._distill_loss(x)
            return d.total, d.terms()
        return self.engine(input_ids=x, labels=x).loss, {}

    def _distill_loss(self, x: torch.Tensor):
        """The distillation loss of micro-batch ``x`` (distill.distill_loss)."""
        from .distill import distill_loss

        d = self.cfg.distill
        teacher_logits = self.teacher.logits(x)
        student_logits = self.engine(input_ids=x).logits
        return distill_loss(student_logits, teacher_logits, x, kl_weight=d.kl_weight,
                            reverse_kl_weight=d.reverse_kl_weight, ce_weight=d.ce_weight,
                            temperature=d.temperature)  # fmt: skip

    def _alignment_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The alignment loss of micro-batch ``x``: the student runs through its engine (ZeRO's
        hooks see an ordinary forward), its aligned mixers fed the teacher's attention inputs."""
        from .distill import MixerSubstitution, aligned_layers, alignment_loss

        inputs, targets = self.teacher.attention_io(x, aligned_layers(self.model_config))
        with MixerSubstitution(self.engine.module, inputs) as sub:
            self.engine(input_ids=x, logits_to_keep=1)
        return alignment_loss(sub.outputs, targets)

    # -- export ------------------------------------------------------------------------------
    def _teacher_meta(self) -> dict:
        """The run metadata's teacher fields: teacher recovery numbers, FLOPs, the stage's end."""
        from .distill import teacher_spec

        end = self.align_ctrl.end if self.align_ctrl is not None else None
        return {
            "teacher": teacher_spec(self.cfg), "teacher_val_loss": self.teacher_val_loss,
            "teacher_flops": self.teacher_flops, "teacher_params": self.teacher.n_params if self.teacher else None,
            "teacher_params_per_rank": self.teacher.local_params if self.teacher else None,
            "teacher_warning": self.teacher.warning if self.teacher else None,
            "budget_flops": self.spent_flops(), "align_end": end.to_dict() if end is not None else None,
        }  # fmt: skip

    def export(self) -> None:
        """HF-format model (consolidated from ZeRO shards) + tokenizer, meta.json, DONE."""
        from .data import load_tokenizer

        params = list(self.engine.module.parameters())
        with _gathered(params, self.zero_stage):
            if self.rank == 0:
                state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in self.engine.module.state_dict().items()}
        if self.rank == 0:
            from .export import save_model
            from .export.card import write_card
            from .models import XatlForCausalLM

            hf = self.rundir.hf
            tmp = hf.with_name(hf.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            model = XatlForCausalLM(self.model_config)
            model.load_state_dict(state)
            # native where a transformers class computes the same function (an all-attention run is
            # then a source model like any hub one), else the XATL save plus its own code (remote code)
            export_format = save_model(model, tmp, "auto").format
            tok_dir = Path(self.cfg.data.path) / "tokenizer"
            if tok_dir.is_dir():
                load_tokenizer(tok_dir).save_pretrained(tmp)
            shutil.rmtree(hf, ignore_errors=True)
            tmp.rename(hf)
            meta = {
                "name": self.cfg.name, "config": self.cfg.to_dict(), "config_hash": self.cfg.content_hash(),
                "model_config": self.model_config.to_dict(), "steps": self.step, "tokens": self.tokens,
                "flops": self.flops, "wall_time": self.wall, "final_val_loss": self.last_val,
                "unfreeze_events": [e.to_dict() for e in self.ctrl.events], "transfer": self.transfer_report,
                "world_size": self.world, "zero_stage": self.zero_stage, "precision": self.precision,
                "export_format": export_format, "versions": _versions(),
                "kernel_paths": self.kernel_paths, "compile": self.cfg.train.compile,
                "max_memory_allocated": torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None,
            }  # fmt: skip
            meta.update(self._teacher_meta())
            self.rundir.write_json(RunDir.META, meta)
            write_card(hf, self.rundir)  # the model card reads the run's numbers from meta.json
            self.rundir.mark_done()
        torch.distributed.barrier()


# -- helpers -------------------------------------------------------------------------------
def _numel(p) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


class _gathered:
    """ZeRO-3 parameter gathering (no-op below stage 3)."""

    def __init__(self, params, stage: int):
        self.ctx = None
        if stage == 3:
            import deepspeed

            self.ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def __enter__(self):
        if self.ctx:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx:
            return self.ctx.__exit__(*exc)
        return False


def _progress(tr: Trainer, resumed: bool):
    if tr.rank != 0:
        return None
    from tqdm import tqdm

    total = tr.total_steps()
    desc = f"{tr.cfg.name}" + (" (resumed)" if resumed else "")
    # TQDM_DISABLE=1 (tqdm's own variable) turns the bar off; XATL_NO_PROGRESS=1 is still honoured
    legacy = {"disable": True} if os.environ.get("XATL_NO_PROGRESS") == "1" else {}
    return tqdm(total=total, initial=tr.step, desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0,
                **legacy)  # fmt: skip


def _postfix(row: dict, val: float | None) -> dict:
    loss = ("loss", row["train_loss"]) if "train_loss" in row else ("align", row["align_loss"])
    d = {loss[0]: f"{loss[1]:.3f}", "tok/s": f"{row['tokens_per_s']:.0f}", "stage": row["freeze_stage"]}
    if val is not None:
        d["val"] = f"{val:.3f}"
    return d


def _versions() -> dict:
    import deepspeed
    import transformers

    from . import __version__

    return {"xatl_ds": __version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="xatl_ds.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="run config YAML")
    ap.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. -o budget.steps=100 (repeatable)")  # fmt: skip
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.override)  # nothing starts on a bad config
    except ConfigError as e:
        print(f"xatl_ds.train: bad config: {e}", file=sys.stderr)
        return 2
    rd = RunDir(cfg.out_dir)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        finished = check_finished(rd, cfg)
    except ConfigError as e:
        print(f"xatl_ds.train: {e}", file=sys.stderr)
        return 2
    if finished:
        if rank0:
            print(f"[{cfg.name}] already finished ({rd.done_path}); nothing to do")
        return 0
    from .executor import watch_owner

    watch_owner()  # this rank ends when whoever launched the run is gone
    lock = None
    if rank0:
        try:
            lock = rd.acquire_lock()  # released by the kernel if this process dies
        except RunLocked as e:
            print(f"xatl_ds.train: {e}", file=sys.stderr)
            return 3
    _setup_threads()
    rank, world, device = init_distributed()
    try:
        cfg.batch_layout(world)
        trainer = Trainer(cfg, rank, world, device)
        if rank == 0:
            rd.path.mkdir(parents=True, exist_ok=True)
            rd.config.write_text(cfg.to_yaml())
            if trainer.transfer_report:
                rd.write_json(RunDir.TRANSFER, trainer.transfer_report)
        trainer.train()
    except ConfigError as e:
        print(f"xatl_ds.train: bad config: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"xatl_ds.train: {e}", file=sys.stderr)
        return 4
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if lock is not None:
            lock.release()
    return 0


def check_finished(rd: RunDir, cfg: RunConfig) -> bool:
    """Whether ``rd`` holds this config's finished run. A finished run of a *different*
    config (edited since) is a ConfigError: its results would be taken for this one's
    (:func:`xatl_ds.preflight.check_run_dir`, which the launcher ran already)."""
    if Path(rd.path) != Path(cfg.out_dir):
        from dataclasses import replace

        cfg = replace(cfg, out_dir=str(rd.path))
    try:
        return check_run_dir(cfg)
    except PreflightError as e:
        raise ConfigError(str(e)) from None


if __name__ == "__main__":
    sys.exit(main())
