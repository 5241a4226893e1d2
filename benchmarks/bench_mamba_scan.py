"""Training throughput of XatlForCausalLM with the Mamba-1 mixer vs attention on CPU.

Plain script: ``python benchmarks/bench_mamba_scan.py [--threads 2] [--repeats 5] [--ref]``.
Runs fwd+bwd (loss on random tokens) of each variant in turn, interleaved over repeats in one
process so machine noise hits all variants alike, and prints tokens/s (median) and the ratio
to attention. Variants: attention; mamba with the C++ scan (``cpp``); mamba with the torch
loop + hand-written backward (``torch``); ``--ref`` adds the autograd-through-the-loop oracle
(very slow, timed once).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(mixer: str, impl: str, args) -> torch.nn.Module:
    from xatl_ds.models import XatlConfig, XatlForCausalLM

    torch.manual_seed(0)
    cfg = XatlConfig(
        family="neox", vocab_size=args.vocab, hidden_size=args.d_model, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, mixer=mixer, d_state=args.d_state, expand=args.expand, kernels="torch",
    )  # fmt: skip
    model = XatlForCausalLM(cfg).train()
    for m in model.modules():
        if hasattr(m, "cpu_impl"):
            m.cpu_impl = impl
    return model


def step(model, ids) -> tuple[float, float]:
    """One fwd+bwd: (wall seconds, process CPU seconds; the latter is less sensitive to other
    jobs on a shared machine, but counts OpenMP spin-waits)."""
    t0, c0 = time.perf_counter(), time.process_time()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--expand", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--ref", action="store_true", help="also time the autograd oracle once (slow)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from xatl_ds.models.mamba import cpp_available

    t0 = time.perf_counter()
    have_cpp = cpp_available()
    print(f"C++ kernel available: {have_cpp} (load/build {time.perf_counter() - t0:.1f}s)")
    variants = {"attention": ("attention", "auto"), "mamba[cpp]": ("mamba", "cpp"), "mamba[torch]": ("mamba", "torch")}
    if not have_cpp:
        del variants["mamba[cpp]"]
    models = {k: build(m, impl, args) for k, (m, impl) in variants.items()}
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in models}
    for k, m in models.items():  # warm-up
        step(m, ids)
    for _ in range(args.repeats):
        for k, m in models.items():
            times[k].append(step(m, ids))
    if args.ref:
        times["mamba[ref]"] = [step(build("mamba", "ref", args), ids)]

    ntok = args.batch * args.seq
    base = ntok / statistics.median(t for t, _ in times["attention"])
    print(
        f"batch {args.batch} x seq {args.seq}, d_model {args.d_model}, {args.layers} layers, d_state "
        f"{args.d_state}, expand {args.expand}, vocab {args.vocab}, fwd+bwd, {args.threads} threads, "
        f"{args.repeats} interleaved repeats"
    )
    print(f"{'variant':<14}{'tok/s (median)':>16}{'min s/step':>12}{'cpu s/step':>12}{'vs attention':>14}")
    for k, ts in times.items():
        wall = [t for t, _ in ts]
        tps = ntok / statistics.median(wall)
        cpu = statistics.median(c for _, c in ts)
        print(f"{k:<14}{tps:>16,.0f}{min(wall):>12.3f}{cpu:>12.3f}{tps / base:>13.2f}x")


if __name__ == "__main__":
    main()
