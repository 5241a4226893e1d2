"""The product on one GPU: xatl-ds training runs under the real ``deepspeed`` launcher, timed
against a plain PyTorch loop on the same model.

    python benchmarks/gpu_trainer.py --out DIR [--work /tmp/xatl_gpu_trainer] [--peak-tflops 989]
    python benchmarks/gpu_trainer.py --out DIR --dry-run      # tiny, CPU, gloo, fp32 (< 2 min)

1. Data and source, built on the spot (no hub): a byte-level BPE trained by ``xatl-ds data
   prepare`` on the built-in corpus (``--bpe-vocab``, default 50277 like Pythia's), and a
   random pythia-160m-shaped GPT-NeoX source (12 x 768, 12 heads) saved as a native HF folder
   (safetensors) with that tokenizer. The source's vocabulary is the tokenizer's padded to a
   multiple of 128 (50304 for a full BPE, as Pythia): the trainer only needs
   ``source vocab >= dataset ids`` and matches data to source by tokenizer fingerprint
   (``xatl_ds.transfer.check_tokenizer_compat``), which the shared tokenizer satisfies.
2. (a) An XATL run, mixer ``mamba`` (the paper's), ZeRO-2, bf16, batch 4 x 2048, LIT with a
   short window and a loose threshold so the transferred weights unfreeze inside the run; it
   is killed (SIGKILL to the launcher's process group) once its mid-run checkpoint exists and
   launched again, which resumes from that checkpoint and finishes. (The trainer refuses to
   extend a finished run's budget: the config hash is part of the checkpoint.)
   (b) A distillation run (``distill.enabled``, teacher = the source), freeze policy none.
3. A plain loop in this process: the (a) model built by ``xatl_ds.train.build_model``, bf16
   weights, ``torch.optim.AdamW`` on them (no fp32 master copy, which DeepSpeed's bf16
   optimizer keeps), the trainer's clipping and loss call.

Measured from the run folders (``metrics.jsonl``, ``meta.json``): steady-state step time
(per-step differences of ``wall_time``, the first ``--skip`` steps of each launch dropped),
tokens/s, MFU (analytic FLOPs, teacher forward included for (b), / ``--peak-tflops``), peak
GPU memory (``max_memory_allocated``, recorded by the trainer), the kernel paths each launch
ran; trainer / plain-loop step time and distilled / plain step. Writes ``DIR/gpu_trainer.md``
and ``DIR/gpu_trainer.json`` after every stage, so a stage that fails or times out leaves the
earlier ones; the run folders stay under ``--work``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from benchmarks import machine_info, md_table, median  # noqa: E402

#: the full setting (GPU) and the dry run (CPU); steps are per run, ``ckpt`` the kill point
SETTINGS = {
    # an 8k BPE trains in seconds; the source's embedding is padded to Pythia's 50304 rows so the
    # model (and its LM head, a large share of the FLOPs) keeps the pythia-160m shape
    "gpu": dict(layers=12, d_model=768, heads=12, seq=2048, batch=4, bpe_vocab=8192, vocab=50304, max_chars=500_000,
                xatl_steps=32, ckpt=16, lit_window=6, distill_steps=12, plain_steps=12, skip=2, eval_batches=2,
                precision="bf16", timeout=80),
    "dry": dict(layers=2, d_model=64, heads=4, seq=64, batch=2, bpe_vocab=512, max_chars=60_000,
                xatl_steps=12, ckpt=6, lit_window=2, distill_steps=4, plain_steps=4, skip=1, eval_batches=1,
                precision="fp32", timeout=150),
}  # fmt: skip


def pad_vocab(n: int, multiple: int = 128) -> int:
    return -(-n // multiple) * multiple


def prepare_data_and_source(work: Path, s: dict) -> dict:
    """The dataset (BPE trained on the built-in corpus) and a random GPT-NeoX source with that
    tokenizer, under ``work``; returns their paths and sizes."""
    import torch

    from xatl_ds.data import PrepareConfig, load_tokenizer, prepare
    from xatl_ds.export import to_native
    from xatl_ds.models import XatlConfig, XatlForCausalLM

    t0 = time.perf_counter()
    data = work / "data"
    meta = prepare(PrepareConfig(out=data, corpus=["builtin"], vocab_size=s["bpe_vocab"], max_chars=s["max_chars"],
                                 overwrite=True))  # fmt: skip
    t_data = time.perf_counter() - t0
    tok = load_tokenizer(data)
    vocab = max(pad_vocab(len(tok)), s.get("vocab", 0))
    src = work / "source"
    shutil.rmtree(src, ignore_errors=True)
    torch.manual_seed(0)
    c = XatlConfig(family="neox", vocab_size=vocab, hidden_size=s["d_model"], num_hidden_layers=s["layers"],
                   num_attention_heads=s["heads"], mixer="attention", max_position_embeddings=max(2048, s["seq"]))  # fmt: skip
    to_native(XatlForCausalLM(c)).save_pretrained(src)
    tok.save_pretrained(src)
    return {
        "data": str(data), "source": str(src), "tokenizer_size": len(tok), "vocab": vocab,
        "train_tokens": meta["splits"]["train"]["tokens"], "prepare_s": t_data,
        "source_s": time.perf_counter() - t0 - t_data,
    }  # fmt: skip


def run_configs(work: Path, prep: dict, s: dict) -> dict:
    """The two run configs (dicts) of the check."""
    never = 10**6
    common = {
        "seed": 0, "model": {"mixer": "mamba"}, "init": {"kind": "xatl", "source": prep["source"]},
        "optim": {"lr": 6e-4, "warmup_steps": 4},
        "data": {"path": prep["data"], "seq_len": s["seq"], "batch_size": s["batch"]},
        "deepspeed": {"config": "zero2.json", "precision": s["precision"]}, "log_every": 10,
    }  # fmt: skip
    xatl = dict(common, name="xatl-mamba-lit", out_dir=str(work / "runs" / "xatl"),
                # loose LIT: the 2nd window improves by < 50% on the 1st, so everything unfreezes at step 2 * window
                freeze={"policy": "lit", "window": s["lit_window"], "threshold": 0.5, "patience": 1,
                        "rewarmup_steps": 2},
                budget={"steps": s["xatl_steps"]}, eval={"every": s["ckpt"], "batches": s["eval_batches"]},
                checkpoint={"every": s["ckpt"], "keep": 1})  # fmt: skip
    distill = dict(common, name="distill-mamba", out_dir=str(work / "runs" / "distill"), freeze={"policy": "none"},
                   distill={"enabled": True, "kl_weight": 1.0}, budget={"steps": s["distill_steps"]},
                   eval={"every": never, "batches": s["eval_batches"]}, checkpoint={"every": never, "keep": 1})  # fmt: skip
    return {"xatl": xatl, "distill": distill}


def _env(threads: int) -> dict:
    from xatl_ds.executor import train_env

    env = train_env()
    env.update(OMP_NUM_THREADS=str(threads), XATL_NO_PROGRESS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env.get("PYTHONPATH")) if p)
    return env


def launch(cfg_path: Path, log_path: Path, threads: int, *, kill_at_ckpt: str | None = None,
           timeout: float = 600) -> dict:  # fmt: skip
    """One ``deepspeed --num_gpus 1 --module xatl_ds.train --config CFG`` launch (its own
    process group). ``kill_at_ckpt``: SIGKILL the group as soon as that checkpoint tag is
    the latest. Returns the exit code, wall seconds and whether it was killed."""
    import yaml

    from xatl_ds.executor import LaunchOptions, deepspeed_command, free_port

    cmd = deepspeed_command(cfg_path, LaunchOptions(num_gpus=1, master_port=free_port()))
    out = Path(yaml.safe_load(cfg_path.read_text())["out_dir"])
    latest = out / "checkpoints" / "latest"
    t0 = time.perf_counter()
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
        p = subprocess.Popen(cmd, cwd=_REPO, env=_env(threads), stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)  # fmt: skip
        killed = False
        try:
            while p.poll() is None:
                if time.perf_counter() - t0 > timeout:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
                    return {"rc": None, "timed_out": True, "wall_s": time.perf_counter() - t0, "cmd": cmd}
                if kill_at_ckpt and latest.is_file() and latest.read_text().strip() == kill_at_ckpt:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
                    killed = True
                    break
                time.sleep(0.05)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            with _suppress():
                os.killpg(p.pid, signal.SIGKILL)  # ranks that outlived their launcher
    return {"rc": p.returncode, "killed": killed, "wall_s": time.perf_counter() - t0, "cmd": cmd}


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], (ProcessLookupError, PermissionError))


def read_rows(run_dir: Path) -> list[dict]:
    from xatl_ds.rundir import parse_metrics

    p = run_dir / "metrics.jsonl"
    return parse_metrics(p.read_text()) if p.is_file() else []


def step_stats(rows: list[dict], launch_starts: list[int], skip: int, peak_flops: float) -> dict:
    """Steady-state numbers of a run from its metrics rows: per-step seconds (differences of
    ``wall_time``; the first ``skip`` steps after each launch start dropped), tokens/s and MFU
    (student + teacher FLOPs per step)."""
    times, flops = [], []
    drop = {s + k for s in launch_starts for k in range(1, skip + 1)}
    prev = None
    for r in rows:
        if prev is not None and r["step"] == prev["step"] + 1 and r["step"] not in drop:
            times.append(r["wall_time"] - prev["wall_time"])
            fl = r["flops"] - prev["flops"] + r.get("teacher_flops_step", 0.0)
            flops.append(fl)
        prev = r
    if not times:
        return {"steps_timed": 0}
    st = median(times)
    tokens = rows[-1]["tokens"] / rows[-1]["step"]
    fl = median(flops)
    return {"steps_timed": len(times), "step_s": st, "tokens_per_s": tokens / st, "flops_per_step": fl,
            "mfu": fl / st / peak_flops, "step_s_min": min(times)}  # fmt: skip


def run_summary(run_dir: Path, rows: list[dict]) -> dict:
    meta = {}
    if (run_dir / "meta.json").is_file():
        meta = json.loads((run_dir / "meta.json").read_text())
    events = [e for r in rows for e in r.get("unfreeze", [])]
    mems = [r["max_memory_allocated"] for r in rows if "max_memory_allocated" in r]
    return {
        "steps": rows[-1]["step"] if rows else 0, "done": (run_dir / "DONE").is_file(),
        "first_loss": next((r.get("train_loss") for r in rows), None), "last_loss": rows[-1].get("train_loss") if rows else None,
        "final_val_loss": meta.get("final_val_loss"), "unfreeze_events": events,
        "kernel_paths_per_launch": [r["kernel_paths"] for r in rows if "kernel_paths" in r],
        "kernel_paths_meta": meta.get("kernel_paths"), "max_memory_allocated": max(mems) if mems else meta.get("max_memory_allocated"),
        "checkpoints": sorted(p.name for p in (run_dir / "checkpoints").glob("step*")) if (run_dir / "checkpoints").is_dir() else [],
    }  # fmt: skip


def plain_loop(cfg_dict: dict, steps: int, skip: int, precision: str, peak_flops: float) -> dict:
    """The (a) model in a bare loop in this process: forward (the trainer's call), backward,
    clip_grad_norm_, AdamW step; bf16 weights on a GPU, fp32 on CPU."""
    import torch

    from xatl_ds.config import load_run_config
    from xatl_ds.data import PackedTokens
    from xatl_ds.flops import step_flops
    from xatl_ds.models.kernels import paths_used
    from xatl_ds.train import build_model

    cfg = load_run_config(cfg_dict)
    data = PackedTokens(cfg.data.path, "train")
    model, _ = build_model(cfg, data.vocab_size)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = model.to(device=device, dtype=torch.bfloat16 if precision == "bf16" else torch.float32).train()
    o = cfg.optim
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    b, L = cfg.data.batch_size, cfg.data.seq_len
    times = []
    for step in range(steps):
        x = data.get_batch(step, 0, b, L, 0, 1, cfg.seed).to(device)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())  # the trainer reads the loss every step (a sync)
        times.append(time.perf_counter() - t0)
    st = median(times[skip:] or times)
    fl = step_flops(model.config, b, L).total
    out = {"steps": steps, "step_s": st, "tokens_per_s": b * L / st, "mfu": fl / st / peak_flops, "flops_per_step": fl,
           "kernel_paths": dict(paths_used(model), loss=getattr(model, "last_loss_path", None) or "torch"),
           "max_memory_allocated": torch.cuda.max_memory_allocated(device) if cuda else None,
           "precision": precision, "times": times}  # fmt: skip
    del model, opt, params
    if cuda:
        torch.cuda.empty_cache()
    return out


# -- report ------------------------------------------------------------------------------------
def _f(x, fmt="{:.3f}"):
    return fmt.format(x) if isinstance(x, (int, float)) else "-"


def render(res: dict) -> str:
    info, s = res.get("info", {}), res.get("setting", {})
    lines = ["# Trainer on one GPU (benchmarks/gpu_trainer.py)", "",
             f"{info.get('gpu')}, torch {info.get('torch')}, deepspeed {info.get('deepspeed')}, transformers "
             f"{info.get('transformers')}, {info.get('date')}{' — **dry run (CPU, tiny)**' if res.get('dry_run') else ''}.",
             "", f"Shape: {s.get('layers')} layers x d {s.get('d_model')}, {s.get('heads')} heads, batch {s.get('batch')} "
             f"x seq {s.get('seq')}, precision {s.get('precision')}, ZeRO-2; MFU against {res.get('peak_tflops')} TFLOP/s."]  # fmt: skip
    prep = res.get("prep")
    if prep:
        lines += ["", f"Data: BPE of {prep['tokenizer_size']} tokens trained on the built-in corpus "
                      f"({prep['train_tokens']:,} train tokens, {prep['prepare_s']:.1f} s); source vocab "
                      f"{prep['vocab']} (padded to 128, at least the setting's vocab), saved in {prep['source_s']:.1f} s."]  # fmt: skip
    runs = res.get("runs", {})
    if runs:
        rows = []
        for name, r in runs.items():
            st = r.get("stats", {})
            rows.append([name, r.get("summary", {}).get("steps", "-"), "yes" if r.get("summary", {}).get("done") else "**no**",
                         _f(st.get("step_s")), _f(st.get("tokens_per_s"), "{:,.0f}"), _f(st.get("mfu"), "{:.1%}"),
                         _f((r.get("summary", {}).get("max_memory_allocated") or 0) / 2**30 if r.get("summary", {}).get("max_memory_allocated") else None, "{:.2f}"),
                         "; ".join(str(p) for p in r.get("summary", {}).get("kernel_paths_per_launch", [])) or "-",
                         ", ".join(f"{l['what']} rc {l.get('rc')}{' killed' if l.get('killed') else ''}"
                                   f"{' TIMEOUT' if l.get('timed_out') else ''} {l['wall_s']:.0f}s" for l in r.get("launches", []))])  # fmt: skip
        lines += ["", md_table(["run", "steps", "DONE", "step s (median)", "tokens/s", "MFU", "peak mem GiB",
                                "kernel paths (per launch)", "launches"], rows)]  # fmt: skip
        x = runs.get("xatl", {}).get("summary", {})
        if x:
            ev = x.get("unfreeze_events", [])
            lines += ["", f"XATL run: unfreeze events {[(e.get('step'), e.get('rule')) for e in ev] or 'NONE'}; "
                          f"loss {_f(x.get('first_loss'))} -> {_f(x.get('last_loss'))}, final val {_f(x.get('final_val_loss'))}; "
                          f"resumed from {runs['xatl'].get('resumed_from', '-')}."]  # fmt: skip
    pl = res.get("plain")
    if pl:
        lines += ["", f"Plain loop ({pl['precision']} weights, torch AdamW, same model and batch): {pl['step_s']:.3f} s/step, "
                      f"{pl['tokens_per_s']:,.0f} tokens/s, MFU {pl['mfu']:.1%}, peak mem "
                      f"{_f((pl.get('max_memory_allocated') or 0) / 2**30 if pl.get('max_memory_allocated') else None, '{:.2f}')} GiB, "
                      f"paths {pl['kernel_paths']}."]  # fmt: skip
    rt = res.get("ratios")
    if rt:
        lines += ["", md_table(["ratio", "value"], [[k, _f(v)] for k, v in rt.items()])]
    for e in res.get("errors", []):
        lines += ["", f"**Error** in {e['stage']}: `{e['error']}`"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for gpu_trainer.md / .json")
    ap.add_argument("--work", default=None, help="data, source and run folders (default: /tmp/xatl_gpu_trainer[_dry])")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on this CPU (gloo, fp32, few steps)")
    ap.add_argument("--threads", type=int, default=None, help="OMP threads per rank (default 8 on GPU, 1 dry)")
    args = ap.parse_args(argv)
    import torch

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_trainer: CUDA is not available; use --dry-run on a CPU", file=sys.stderr)
        return 2
    s = SETTINGS["dry" if dry else "gpu"]
    threads = args.threads or (1 if dry else 8)
    peak = args.peak_tflops * 1e12
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or f"/tmp/xatl_gpu_trainer{'_dry' if dry else ''}")
    shutil.rmtree(work / "runs", ignore_errors=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    info = machine_info()
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU)"
    res: dict = {"info": info, "setting": s, "dry_run": dry, "peak_tflops": args.peak_tflops, "runs": {}, "errors": []}

    def write() -> None:
        (out / "gpu_trainer.json").write_text(json.dumps(res, indent=1, default=str))
        (out / "gpu_trainer.md").write_text(render(res))

    def stage(name, fn):
        t0 = time.perf_counter()
        try:
            return fn()
        except Exception as e:
            traceback.print_exc()
            res["errors"].append({"stage": name, "error": f"{type(e).__name__}: {str(e)[:400]}"})
            return None
        finally:
            res.setdefault("stage_s", {})[name] = time.perf_counter() - t0
            write()
            print(f"gpu_trainer: {name} done in {time.perf_counter() - t0:.1f} s", flush=True)

    import yaml

    prep = stage("prepare", lambda: prepare_data_and_source(work, s))
    if prep is None:
        return 1
    res["prep"] = prep
    cfgs = run_configs(work, prep, s)
    paths = {}
    for k, c in cfgs.items():
        paths[k] = work / f"{k}.yaml"
        paths[k].write_text(yaml.safe_dump(c, sort_keys=False))

    def xatl_run():
        r = res["runs"]["xatl"] = {"launches": [], "config": cfgs["xatl"]}
        log = work / "logs" / "xatl.log"
        tag = f"step{s['ckpt']:08d}"
        l1 = launch(paths["xatl"], log, threads, kill_at_ckpt=tag, timeout=s["timeout"])
        r["launches"].append(dict(l1, what="first"))
        write()
        rows1 = read_rows(Path(cfgs["xatl"]["out_dir"]))
        r["killed_after_step"] = rows1[-1]["step"] if rows1 else 0
        r["resumed_from"] = tag if l1.get("killed") else None
        l2 = launch(paths["xatl"], log, threads, timeout=s["timeout"])
        r["launches"].append(dict(l2, what="resume"))
        rows = read_rows(Path(cfgs["xatl"]["out_dir"]))
        r["summary"] = run_summary(Path(cfgs["xatl"]["out_dir"]), rows)
        r["stats"] = step_stats(rows, [0, s["ckpt"]], s["skip"], peak)
        if l2["rc"] != 0:
            raise RuntimeError(f"resumed launch failed (rc {l2['rc']}); log {log}:\n{_tail(log)}")
        return r

    def distill_run():
        r = res["runs"]["distill"] = {"launches": [], "config": cfgs["distill"]}
        log = work / "logs" / "distill.log"
        l1 = launch(paths["distill"], log, threads, timeout=s["timeout"])
        r["launches"].append(dict(l1, what="only"))
        rows = read_rows(Path(cfgs["distill"]["out_dir"]))
        r["summary"] = run_summary(Path(cfgs["distill"]["out_dir"]), rows)
        r["stats"] = step_stats(rows, [0], s["skip"], peak)
        if l1["rc"] != 0:
            raise RuntimeError(f"launch failed (rc {l1['rc']}); log {log}:\n{_tail(log)}")
        return r

    stage("xatl", xatl_run)
    stage("distill", distill_run)
    torch.set_num_threads(threads)
    res["plain"] = stage("plain", lambda: plain_loop(cfgs["xatl"], s["plain_steps"], s["skip"], s["precision"], peak))
    x = res["runs"].get("xatl", {}).get("stats", {})
    d = res["runs"].get("distill", {}).get("stats", {})
    p = res.get("plain") or {}
    res["ratios"] = {
        k: v for k, v in {
            "trainer / plain loop (step time)": x.get("step_s") / p["step_s"] if x.get("step_s") and p.get("step_s") else None,
            "distilled / plain trainer step": d.get("step_s") / x["step_s"] if d.get("step_s") and x.get("step_s") else None,
            "distilled trainer step / plain loop": d.get("step_s") / p["step_s"] if d.get("step_s") and p.get("step_s") else None,
        }.items() if v is not None
    }  # fmt: skip
    write()
    print(render(res))
    ok = not res["errors"] and res["runs"].get("xatl", {}).get("summary", {}).get("done")
    return 0 if ok else 1


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


if __name__ == "__main__":
    raise SystemExit(main())
