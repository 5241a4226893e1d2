"""Step-time overhead of distillation over plain training, in one trainer.

One process builds one :class:`xatl_ds.train.Trainer` (1 rank, ZeRO 0, fp32) whose run
distils from its source, a teacher of the student's size: by default the student is the
source's all-attention copy, so a distilled step costs one extra forward of the same model,
about a third of a forward + backward (``xatl_ds.flops.forward_flops``: exactly a third for
attention). The same batch is then trained alternately as a plain step (next-token CE:
forward, backward, DeepSpeed step) and as a distilled step (teacher forward without
gradients, student forward, KL loss, backward, step), both through the trainer's own
``batch_loss``, interleaved (``benchmarks.interleaved``, medians). Figure of merit: the
ratio of the median step times, beside the analytic FLOP ratio.

    python -m benchmarks.distill_overhead [--steps 12] [--mixer attention|mamba2] [--write]

``--write`` puts the result into benchmarks/RESULTS.md (its own section, replaced in place).
"""
from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from . import REPO, interleaved, machine_info, md_table, median, set_threads, timed

SECTION = "## Distillation overhead"


def make_source(work: Path, size: str, vocab: int, seq: int) -> Path:
    """A random all-attention GPT-NeoX source of named ``size``, saved (native format) under
    ``work/source_<size>`` and reused."""
    import torch

    from xatl_ds.export import to_native
    from xatl_ds.models import XatlConfig, XatlForCausalLM
    from xatl_ds.sizes import get_size

    out = work / f"source_{size}"
    if (out / "config.json").is_file():
        return out
    s = get_size(size)
    torch.manual_seed(0)
    c = XatlConfig(family="neox", vocab_size=vocab, hidden_size=s.d_model, num_hidden_layers=s.n_layers,
                   num_attention_heads=s.n_heads, mixer="attention",
                   max_position_embeddings=max(2048, seq))  # fmt: skip
    to_native(XatlForCausalLM(c)).save_pretrained(out)
    return out


def distill_overhead(work: str | Path, *, size: str = "small", mixer: str = "attention", batch: int = 8,
                     seq: int = 256, vocab: int = 4096, steps: int = 12, threads: int = 1) -> dict:  # fmt: skip
    """Median seconds of a plain and a distilled step of the same student on the same batch,
    ``steps`` of each interleaved after one warm-up each; their ratio and the FLOP ratio."""
    set_threads(threads)
    import torch

    from xatl_ds.config import load_run_config
    from xatl_ds.flops import forward_flops, step_flops
    from xatl_ds.train import Trainer, init_distributed

    from .trainer_overhead import prepare_data

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    data, source = prepare_data(work), make_source(work, size, vocab, seq)
    cfg = load_run_config({
        "name": "distill-bench", "out_dir": str(work / "distill_run"), "seed": 0,
        "model": {"mixer": mixer, "attention_layers": "paper" if mixer != "attention" else "all",
                  "mamba2_headdim": 32, "chunk_size": 64},
        "init": {"kind": "xatl", "source": str(source)}, "freeze": {"policy": "none"},
        "distill": {"enabled": True, "kl_weight": 1.0},
        "optim": {"warmup_steps": 1, "grad_clip": 1.0},
        "data": {"path": str(data), "seq_len": seq, "batch_size": batch},
        "budget": {"steps": 10**6}, "deepspeed": {"config": "zero0.json", "precision": "fp32"},
    })  # fmt: skip
    rank, world, device = init_distributed()
    tr = Trainer(cfg, rank, world, device)
    tr.engine.train()
    tr.apply_freeze(0)
    x = tr.train_data.get_batch(0, 0, batch, seq, 0, 1, 0)

    def step(phase: str):
        def run():
            loss, _ = tr.batch_loss(x, phase)
            tr.engine.backward(loss)
            tr.engine.step()
            float(loss.detach())  # the trainer reads the loss every step too

        return timed(run)

    teacher = timed(lambda: tr.teaching.teacher.logits(x))  # the extra forward alone
    samples = interleaved({"plain": step("ce"), "distill": step("distill"), "teacher": teacher}, repeats=steps,
                          warmup=1)  # fmt: skip
    plain_f = step_flops(tr.model_config, batch, seq).total
    teacher_f = forward_flops(tr.teaching.teacher.config, batch, seq)
    torch.distributed.destroy_process_group()
    p, d = median(samples["plain"]), median(samples["distill"])
    return {
        "size": size, "mixer": mixer, "batch": batch, "seq": seq, "vocab": vocab, "steps": steps, "threads": threads,
        "student_params": sum(q.numel() for q in tr.engine.module.parameters()),
        "teacher_params": tr.teaching.teacher.n_params,
        "plain_step_s": p, "distill_step_s": d, "ratio": d / p, "teacher_forward_s": median(samples["teacher"]),
        "plain_best_s": min(samples["plain"]), "distill_best_s": min(samples["distill"]),
        "ratio_best": min(samples["distill"]) / min(samples["plain"]),
        "flop_ratio": (plain_f + teacher_f) / plain_f, "samples": samples,
    }  # fmt: skip


def results_section(r: dict, info: dict) -> str:
    """The RESULTS.md section for result ``r`` on machine ``info``."""
    rows = [
        ["plain (next-token CE)", f"{r['plain_step_s']:.3f}", "1 (reference)", f"{r['plain_best_s']:.3f}", "1", "1"],
        ["distilled (teacher forward + KL)", f"{r['distill_step_s']:.3f}", f"{r['ratio']:.3f}",
         f"{r['distill_best_s']:.3f}", f"{r['ratio_best']:.3f}", f"{r['flop_ratio']:.3f}"],
        ["teacher forward alone", f"{r['teacher_forward_s']:.3f}", f"{r['teacher_forward_s'] / r['plain_step_s']:.3f}",
         f"{min(r['samples']['teacher']):.3f}", f"{min(r['samples']['teacher']) / r['plain_best_s']:.3f}",
         f"{r['flop_ratio'] - 1:.3f}"],
    ]  # fmt: skip
    return "\n".join([
        SECTION, "",
        f"`python -m benchmarks.distill_overhead` — one trainer (1 rank, ZeRO 0, fp32, {r['threads']} "
        f"thread{'s' if r['threads'] != 1 else ''}) "
        f"distilling from its source, a teacher of the student's size (student: `{r['mixer']}` from a random "
        f"size-`{r['size']}` GPT-NeoX source, {r['student_params'] / 1e6:.1f}M parameters; teacher "
        f"{r['teacher_params'] / 1e6:.1f}M), batch {r['batch']} x seq {r['seq']}, vocab {r['vocab']}. The same batch "
        f"trained as a plain step and as a distilled step, {r['steps']} of each interleaved after one warm-up, "
        "through the trainer's own `batch_loss` + DeepSpeed backward/step. Expected: about 1.33x (a teacher "
        "forward is a third of a forward + backward; analytic FLOP ratio in the last column). The teacher's "
        "forward is also timed alone; what a distilled step takes beyond plain step + teacher forward "
        f"({r['distill_step_s'] - r['plain_step_s'] - r['teacher_forward_s']:.3f} s in medians) is the KL over "
        "the vocabulary (two log-softmaxes and their backward) and the extra logits, not separated further. "
        "**Reference: the plain step.**", "",
        f"- Machine: {info['cpu']}, nproc {info['cores']}; date {info['date']}; load average at start "
        f"{' / '.join(f'{v:.2f}' for v in info['load_average'] or ())}", "",
        md_table(["step", "median s", "ratio", "fastest s", "ratio (fastest)", "FLOP ratio"], rows), "",
    ])  # fmt: skip


def write_results(section: str, path: Path) -> None:
    """Replace (or append) the section in RESULTS.md; other sections are left alone."""
    text = path.read_text() if path.is_file() else "# xatl-ds benchmarks (CPU)\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--size", default="small")
    ap.add_argument("--mixer", default="attention")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--json", help="also write the result (step samples included) to this file")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--work", default=os.path.join(REPO, "runs", "bench"))
    ap.add_argument("--write", action="store_true", help="write the section into benchmarks/RESULTS.md")
    a = ap.parse_args(argv)
    info = machine_info()
    r = distill_overhead(a.work, size=a.size, mixer=a.mixer, batch=a.batch, seq=a.seq, steps=a.steps,
                         threads=a.threads)  # fmt: skip
    print(json.dumps({k: v for k, v in r.items() if k != "samples"}, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))
    if a.write:
        write_results(results_section(r, info), Path(REPO) / "benchmarks" / "RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
