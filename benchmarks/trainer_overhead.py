"""The trainer under the deepspeed launcher vs a plain PyTorch loop on the same model.

Both run in their own process with the same thread count, alternating (trainer, plain,
trainer, plain, ...), and both report per-step wall times: the trainer through
``metrics.jsonl`` (differences of the cumulative ``wall_time``, which covers the optimizer
step and its bookkeeping but not evaluation or checkpoint saving), the plain loop
(forward, backward, ``clip_grad_norm_``, ``AdamW.step``) by timing itself. The first
``skip`` steps of each process (allocator warm-up) are dropped; the figure of merit is the
ratio of the median steady-state step times.

    python -m benchmarks.trainer_overhead [--mixer attention] [--steps 30] [--rounds 2]
    python -m benchmarks.trainer_overhead --plain RUN.yaml --steps N --json OUT   # the plain side
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from . import REPO, median

#: the prepared data only feeds token ids; its vocabulary is smaller than the model's so
#: preparing it is quick (model.vocab_size keeps the benchmark's 4096-row embedding)
DATA_VOCAB = 512
DATA_MAX_CHARS = 300_000


def prepare_data(work: Path) -> Path:
    """A small prepared dataset under ``work/data`` (reused when it exists)."""
    from xatl_ds.data import PrepareConfig, prepare

    out = work / "data"
    prepare(PrepareConfig(out=out, corpus=["builtin"], vocab_size=DATA_VOCAB, max_chars=DATA_MAX_CHARS))
    return out


def run_config(out_dir: Path, data: Path, steps: int, *, mixer: str = "attention", size: str = "small",
               batch: int = 8, seq: int = 256, vocab: int = 4096) -> dict:  # fmt: skip
    """A from-scratch, ZeRO 0, fp32 run config that only trains (no eval or checkpoint
    before the end)."""
    never = 10**9
    return {
        "name": f"bench-{mixer}", "out_dir": str(out_dir), "seed": 0,
        "model": {"size": size, "mixer": mixer, "vocab_size": vocab},
        "init": {"kind": "scratch"},
        "optim": {"warmup_steps": 1, "grad_clip": 1.0},
        "data": {"path": str(data), "seq_len": seq, "batch_size": batch},
        "budget": {"steps": steps}, "eval": {"every": never, "batches": 1},
        "checkpoint": {"every": never, "keep": 1},
        "deepspeed": {"config": "zero0.json", "precision": "fp32"}, "log_every": never,
    }  # fmt: skip


def _env(threads: int) -> dict:
    from xatl_ds.executor import train_env

    env = train_env()
    env.update(OMP_NUM_THREADS=str(threads), XATL_NO_PROGRESS="1", HF_HUB_OFFLINE="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache", "torch_extensions"))
    return env


def trainer_step_times(metrics_path: Path) -> list[float]:
    """Per-step wall seconds from a run's ``metrics.jsonl`` (first step: its own time)."""
    walls = [json.loads(line)["wall_time"] for line in metrics_path.read_text().splitlines() if line.strip()]
    return [b - a for a, b in zip([0.0] + walls[:-1], walls)]


def run_trainer(cfg_path: Path, threads: int, port: int, timeout: float = 900) -> tuple[list[float], float]:
    """Train ``cfg_path`` through the deepspeed launcher (1 rank); returns (step times,
    process wall seconds including start-up and export)."""
    import shutil

    import yaml

    from xatl_ds.executor import LaunchOptions, deepspeed_command

    cfg = yaml.safe_load(cfg_path.read_text())
    shutil.rmtree(cfg["out_dir"], ignore_errors=True)  # a DONE run would be skipped
    cmd = deepspeed_command(cfg_path, LaunchOptions(num_gpus=1, master_port=port))
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=_env(threads), capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"trainer failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return trainer_step_times(Path(cfg["out_dir"]) / "metrics.jsonl"), wall


def plain_loop(cfg_path: str | Path, steps: int) -> list[float]:
    """The same model, data, batch and clipping as the trainer, in a bare PyTorch loop:
    forward, backward, clip_grad_norm_, AdamW step. Returns per-step wall seconds."""
    import torch

    from xatl_ds.config import load_run_config
    from xatl_ds.data import PackedTokens
    from xatl_ds.train import build_model

    cfg = load_run_config(str(cfg_path))
    data = PackedTokens(cfg.data.path, "train")
    model, _ = build_model(cfg, data.vocab_size)
    model.train()
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr or 1e-3, betas=tuple(o.betas), eps=o.eps,
                            weight_decay=o.weight_decay)  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        x = data.get_batch(step, 0, cfg.data.batch_size, cfg.data.seq_len, 0, 1, cfg.seed)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())  # the trainer reads the loss every step too
        times.append(time.perf_counter() - t0)
    return times


def run_plain(cfg_path: Path, steps: int, threads: int, work: Path, timeout: float = 900) -> tuple[list[float], float]:
    out = work / "plain_times.json"
    cmd = [sys.executable, "-m", "benchmarks.trainer_overhead", "--plain", str(cfg_path), "--steps", str(steps),
           "--json", str(out)]  # fmt: skip
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=_env(threads), capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"plain loop failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return json.loads(out.read_text()), wall


def trainer_overhead(work: str | Path, *, mixer: str = "attention", steps: int = 25, skip: int = 5, rounds: int = 2,
                     threads: int = 2, size: str = "small", batch: int = 8, seq: int = 256, vocab: int = 4096) -> dict:  # fmt: skip
    """Alternate ``rounds`` trainer and plain-loop processes of ``steps`` steps each; drop the
    first ``skip`` steps of each. Returns median step seconds of both, their ratio
    (``trainer / plain``; 1.10 = 10% overhead), the same from the fastest steps (``ratio_best``)
    and the processes' total wall times."""
    import yaml

    if steps <= skip:
        raise ValueError(f"steps={steps} must exceed skip={skip} (the steps dropped as warm-up)")
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(work)
    cfg_path = work / f"trainer_{mixer}.yaml"
    cfg_path.write_text(yaml.safe_dump(run_config(work / f"run_{mixer}", data, steps, mixer=mixer, size=size,
                                                  batch=batch, seq=seq, vocab=vocab), sort_keys=False))  # fmt: skip
    port = 29500 + os.getpid() % 2000
    tr, pl, tr_wall, pl_wall = [], [], [], []
    for _ in range(rounds):
        t, w = run_trainer(cfg_path, threads, port)
        tr += t[skip:]
        tr_wall.append(w)
        t, w = run_plain(cfg_path, steps, threads, work)
        pl += t[skip:]
        pl_wall.append(w)
    t_med, p_med = median(tr), median(pl)
    return {
        "mixer": mixer, "size": size, "batch": batch, "seq": seq, "steps": steps, "skip": skip, "rounds": rounds,
        "threads": threads, "trainer_step_s": t_med, "plain_step_s": p_med, "ratio_trainer_vs_plain": t_med / p_med,
        "trainer_step_min": min(tr), "plain_step_min": min(pl), "ratio_best": min(tr) / min(pl),
        "trainer_process_s": tr_wall, "plain_process_s": pl_wall, "trainer_steps": tr, "plain_steps": pl,
    }  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plain", metavar="RUN_YAML", help="run only the plain loop on this config (internal)")
    p.add_argument("--json", help="with --plain: write the step times here")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--skip", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mixer", default="attention")
    p.add_argument("--work", default=os.path.join(REPO, "runs", "bench"))
    args = p.parse_args(argv)
    if args.plain:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", args.threads)))
        times = plain_loop(args.plain, args.steps)
        if args.json:
            Path(args.json).write_text(json.dumps(times))
        else:
            print(json.dumps(times))
        return 0
    r = trainer_overhead(args.work, mixer=args.mixer, steps=args.steps, skip=args.skip, rounds=args.rounds,
                         threads=args.threads)  # fmt: skip
    print(f"trainer {r['trainer_step_s']:.3f} s/step, plain {r['plain_step_s']:.3f} s/step, "
          f"ratio {r['ratio_trainer_vs_plain']:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
