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

Teachers (:mod:`xatl_ds.teaching`: the trainer asks its :class:`~xatl_ds.teaching.Teaching`).
With ``distill`` the loss of a step is the distillation loss against a teacher running beside
the engine; with ``align`` the run starts with the alignment stage, in which only the aligned
mixers' parameter groups (groups of their own) have a learning rate and the freeze controller
is not fed: its steps, the main schedule's warmup and cosine count from the stage's end. The
teacher's FLOPs are a column of their own (``teacher_flops``), and its validation loss is
measured on the run's validation batches for every run that has a teacher (XATL: the source).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

# build_model, compile_blocks, check_finished, build_ds_config, recorded_hash: also importable from
# here (tests and benchmarks call them, and patch compile_blocks, through this module)
from .build import build_model, compile_blocks  # noqa: F401
from .checkpoint import load_for_resume, save_checkpoint
from .config import ConfigError, RunConfig, load_run_config
from .optim import lr_at, param_groups
from .preflight import build_ds_config, check_finished, recorded_hash, resolve_precision  # noqa: F401
from .process_setup import init_distributed, setup_threads, versions
from .rundir import RunDir, RunLocked
from .safe_load import CheckpointError
from .sizes import get_size
from .teaching import Teaching


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
        size_lr = get_size(cfg.model.size).lr if cfg.init.kind == "scratch" else None
        self.peak_lr = cfg.optim.lr or size_lr or 3e-4
        # the teacher and the alignment stage; with align the stage comes first and the freeze
        # controller counts its steps from the stage's end (teaching.controller stands in for it)
        freeze = FreezeController(cfg.freeze, present)
        self.teaching = Teaching(cfg, model.config, (n for n, _ in model.named_parameters()), freeze, device,
                                 self.precision, self.peak_lr)  # fmt: skip
        self.ctrl = self.teaching.controller
        self.align_names = self.teaching.align_names
        comp = components_of(model)
        self.stage_of = param_stage_map(comp, cfg.freeze, present)
        self.names_by_stage: dict[int, list[str]] = {}
        for n, s in self.stage_of.items():
            self.names_by_stage.setdefault(s, []).append(n)
        self.TRAINABLE = TRAINABLE
        self.new_param_names = [n for n, c in comp.items() if self.stage_of[n] == TRAINABLE]
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
        self.teaching.place(self.zero_stage, ds_cfg)  # the teacher beside the engine (distill / align)

        # counters restored on resume
        self.step = 0
        self.tokens = 0
        self.flops = 0.0
        self.wall = 0.0
        self.last_val: float | None = None
        self._flops_cache: dict[frozenset, float] = {}
        self.kernel_paths: dict[str, str] | None = None  # models.kernels.paths_used after this launch's 1st step

    # -- freezing ----------------------------------------------------------------
    def frozen_stages(self, step: int) -> set[int]:
        """Stages whose lr multiplier is exactly 0 at ``step`` (never released, or not yet)."""
        return {s for s in self.names_by_stage if s != self.TRAINABLE and self.ctrl.lr_scale(s, step) == 0.0}

    def apply_freeze(self, step: int) -> None:
        """requires_grad follows the controller (lr 0 alone would still compute weight grads);
        in the alignment stage only the aligned mixers' parameters train."""
        if self.teaching.aligning(step):
            for n, p in self.params.items():
                p.requires_grad_(n in self.align_names)
            return
        frozen = self.frozen_stages(step)
        for s, names in self.names_by_stage.items():
            for n in names:
                self.params[n].requires_grad_(s not in frozen)

    def frozen_param_names(self, step: int) -> frozenset:
        if self.teaching.aligning(step):
            return frozenset(n for n in self.params if n not in self.align_names)
        frozen = self.frozen_stages(step)
        return frozenset(n for s in frozen for n in self.names_by_stage[s])

    def step_flops(self, step: int) -> float:
        from .flops import alignment_step_flops, step_flops

        if self.teaching.aligning(step):
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
        return self.flops + (self.teaching.flops if self.cfg.distill.count_teacher_in_budget else 0.0)

    def progress(self, step: int) -> float:
        """Progress of the main schedule, which starts after the alignment stage."""
        start, spent_before = self.teaching.main_start()
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

    # -- checkpoints -------------------------------------------------------------------
    def ckpt_dir(self) -> Path:
        return self.rundir.checkpoints

    def save_checkpoint(self) -> None:
        # the counters a resumed run continues from (teacher FLOPs follow from the step)
        state = {
            "step": self.step, "tokens": self.tokens, "flops": self.flops, "wall": self.wall,
            "last_val": self.last_val, "freeze": self.ctrl.state_dict(), "config_hash": self.cfg.content_hash(),
        }  # fmt: skip
        save_checkpoint(self.engine, self.ckpt_dir(), self.step, {"xatl": state}, self.cfg.checkpoint.keep, self.rank)

    def maybe_resume(self) -> bool:
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
        self.teaching.count_to(self.step)
        if self.rank == 0 and not resumed:
            self.rundir.start_metrics()
        # teacher recovery: the teacher's loss on the same validation batches (every start:
        # it goes into meta.json, and into the first metrics row)
        self.teaching.evaluate(self.evaluate)
        from .monitor import bar_postfix, open_metrics, progress_bar  # metrics.jsonl, mirrored (cfg.log)

        metrics = open_metrics(self.rundir, cfg, self.step) if self.rank == 0 else None
        bar = progress_bar(cfg.name, self.total_steps(), self.step, resumed) if self.rank == 0 else None
        comm = self._comm_device()
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        need_norm = cfg.freeze.policy == "weight_norm"
        self.engine.train()
        self.apply_freeze(self.step)
        try:
            while not self.finished():
                step, t0 = self.step, time.perf_counter()
                phase = self.teaching.phase(step)
                aligning = phase == "align"
                lrs = {}
                if aligning:  # only the aligned mixers' groups train
                    for g, stage, al in zip(self.optimizer.param_groups, self.group_stages, self.group_aligned):
                        g["lr"] = self.teaching.align_lr(step) if al else 0.0
                        lrs["align" if al else str(stage)] = g["lr"]
                else:
                    start = self.teaching.main_start()[0]
                    base_lr = lr_at(cfg, self.peak_lr, step - start, self.progress(step))
                    for g, stage in zip(self.optimizer.param_groups, self.group_stages):
                        g["lr"] = base_lr * (1.0 if stage == self.TRAINABLE else self.ctrl.lr_scale(stage, step))
                        lrs[str(stage)] = g["lr"]
                step_flops = self.step_flops(step)
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
                self.teaching.count_to(self.step)
                self.wall += time.perf_counter() - t0
                # the freeze controller's steps start after the stage: it is not fed before
                ended = self.teaching.update_align(step, train_loss, self.spent_flops()) if aligning else None
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
                row.update(self.teaching.metrics(self.step, aligning))
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
                        bar.set_postfix(bar_postfix(row, self.last_val), refresh=False)
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

    def batch_loss(self, x: torch.Tensor, phase: str) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to back-propagate for micro-batch ``x`` in ``phase``
        (:meth:`~xatl_ds.teaching.Teaching.phase`) and its extra metrics terms (the
        distillation loss's CE and KL values)."""
        if phase == "ce":
            return self.engine(input_ids=x, labels=x).loss, {}
        return self.teaching.loss(self.engine, x, phase)

    # -- export ------------------------------------------------------------------------------
    def export(self) -> None:
        """HF-format model (consolidated from ZeRO shards) + tokenizer, meta.json, DONE."""
        from .data import load_tokenizer

        params = list(self.engine.module.parameters())
        with _gathered(params, self.zero_stage):
            if self.rank == 0:
                state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in self.engine.module.state_dict().items()}
        if self.rank == 0:
            from .export import save_model_in_place
            from .export.card import write_card
            from .models import XatlForCausalLM

            model = XatlForCausalLM(self.model_config)
            model.load_state_dict(state)
            tok_dir = Path(self.cfg.data.path) / "tokenizer"
            tok = load_tokenizer(tok_dir) if tok_dir.is_dir() else None
            # native where a transformers class computes the same function (an all-attention run is
            # then a source model like any hub one), else the XATL save plus its own code (remote code)
            export_format = save_model_in_place(model, self.rundir.hf, "auto", tokenizer=tok).format
            meta = {
                "name": self.cfg.name, "config": RunDir.CONFIG, "config_hash": self.cfg.content_hash(),
                "model_config": self.model_config.to_dict(), "steps": self.step, "tokens": self.tokens,
                "flops": self.flops, "wall_time": self.wall, "final_val_loss": self.last_val,
                "unfreeze_events": [e.to_dict() for e in self.ctrl.events], "transfer": self.transfer_report,
                "world_size": self.world, "zero_stage": self.zero_stage, "precision": self.precision,
                "export_format": export_format, "versions": versions(),
                "kernel_paths": self.kernel_paths, "compile": self.cfg.train.compile,
                "max_memory_allocated": torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None,
            }  # fmt: skip
            meta.update(self.teaching.meta(budget_flops=self.spent_flops()))
            self.rundir.write_json(RunDir.META, meta)
            write_card(self.rundir.hf, self.rundir)  # the model card reads the run's numbers from meta.json
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
    setup_threads()
    rank, world, device = init_distributed()
    try:
        cfg.batch_layout(world)
        trainer = Trainer(cfg, rank, world, device)
        if rank == 0:
            rd.path.mkdir(parents=True, exist_ok=True)
            if not rd.config.is_file() or rd.config.read_text() != cfg.to_yaml():  # a scheduler wrote it already
                rd.config.write_text(cfg.to_yaml())
            mc = trainer.model_config  # what analysis reads, before any step
            rd.write_json(RunDir.MODEL, {**mc.to_dict(), "layer_mixers": list(mc.layer_mixers)})
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


if __name__ == "__main__":
    sys.exit(main())
