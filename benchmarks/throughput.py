"""Training throughput (forward + backward) per mixer on CPU, and model FLOPs utilisation.

Every XatlForCausalLM variant and a large fp32 ``torch.mm`` (the machine's matmul rate, the
MFU denominator) are timed interleaved in one process; ratios are to the attention model.
transformers' ``MambaForCausalLM`` (its pure-torch fallback, a sequential scan) is far too
slow for the full shape, so it is timed on a shorter sequence at the same batch, interleaved
with our mamba at that same shape (its backward grows faster than linearly with the
sequence length, so the short-run ratio understates the full-shape one).

    python -m benchmarks.throughput [--repeats 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, replace

import torch

from . import interleaved, median, set_threads, timed

MIXER_VARIANTS = ("attention", "retnet", "mamba", "mamba2")


@dataclass(frozen=True)
class Shape:
    """Model and batch shape of the CPU throughput benchmark."""

    batch: int = 8
    seq: int = 256
    d_model: int = 256
    layers: int = 4
    heads: int = 8
    d_state: int = 16
    expand: int = 2
    vocab: int = 4096
    family: str = "neox"

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def xatl_config(mixer: str, shape: Shape, attention_layers=None, kernels: str = "auto"):
    """The XatlConfig of ``mixer`` at ``shape`` (``attention_layers``: e.g. ``"paper"``)."""
    from xatl_ds.models import XatlConfig

    return XatlConfig(
        family=shape.family, vocab_size=shape.vocab, hidden_size=shape.d_model, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, mixer=mixer, attention_layers=attention_layers, d_state=shape.d_state,
        expand=shape.expand, max_position_embeddings=max(2048, shape.seq), kernels=kernels,
    )  # fmt: skip


def build_xatl(mixer: str, shape: Shape, seed: int = 0, **kw):
    from xatl_ds.models import XatlForCausalLM

    torch.manual_seed(seed)
    return XatlForCausalLM(xatl_config(mixer, shape, **kw)).train()


def build_hf_mamba(shape: Shape, seed: int = 0):
    """transformers' MambaForCausalLM at the same d_model/layers/d_state/expand/vocab (its
    blocks have no MLP, so it has fewer parameters than our mamba blocks)."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    cfg = MambaConfig(
        vocab_size=shape.vocab, hidden_size=shape.d_model, state_size=shape.d_state,
        num_hidden_layers=shape.layers, expand=shape.expand, conv_kernel=4, use_mambapy=False,
    )  # fmt: skip
    return MambaForCausalLM(cfg).train()


def train_step(model: torch.nn.Module, ids: torch.Tensor) -> None:
    """One forward + backward on ``ids`` (loss = next-token cross entropy)."""
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def matmul_fn(n: int = 2048) -> tuple[callable, float]:
    """A timed ``n x n`` fp32 matmul and its FLOPs (``2 n^3``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    return timed(lambda: torch.mm(a, b, out=out)), 2.0 * n**3


def training_throughput(
    shape: Shape = Shape(),
    mixers=MIXER_VARIANTS,
    repeats: int = 5,
    warmup: int = 1,
    matmul_n: int = 2048,
    seed: int = 0,
) -> dict:
    """Interleaved fwd+bwd timing of every mixer plus a matmul. Returns ``{"shape", "matmul_flops_per_s",
    "rows": [{name, tokens_per_s, ratio_vs_attention, step_flops, mfu, seconds, *_best}]}``;
    ``mfu`` = analytic step FLOPs (``xatl_ds.flops.step_flops``) per second / matmul rate.
    Plain keys come from medians; ``*_best`` from each variant's fastest sample (on a shared
    machine step times are bimodal, contended or not: medians and minima then disagree)."""
    from xatl_ds.flops import step_flops

    if "attention" not in mixers:
        raise ValueError("mixers must include 'attention' (the reference of every ratio)")
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=torch.Generator().manual_seed(seed))
    models = {m: build_xatl(m, shape, seed) for m in mixers}
    fns = {m: timed(lambda model=model: train_step(model, ids)) for m, model in models.items()}
    mm, mm_flops = matmul_fn(matmul_n)
    fns["matmul"] = mm
    samples = interleaved(fns, repeats=repeats, warmup=warmup)
    mm_s = samples.pop("matmul")
    rate, rate_best = mm_flops / median(mm_s), mm_flops / min(mm_s)
    ref, ref_best = shape.tokens / median(samples["attention"]), shape.tokens / min(samples["attention"])
    rows = []
    for m, ts in samples.items():
        tps, best = shape.tokens / median(ts), shape.tokens / min(ts)
        fl = step_flops(models[m].config, shape.batch, shape.seq).total
        rows.append({
            "name": m, "tokens_per_s": tps, "ratio_vs_attention": tps / ref, "step_flops": fl,
            "mfu": fl / median(ts) / rate, "tokens_per_s_best": best, "ratio_vs_attention_best": best / ref_best,
            "mfu_best": fl / min(ts) / rate_best, "seconds": ts,
        })  # fmt: skip
    return {"shape": asdict(shape), "repeats": repeats, "matmul_n": matmul_n, "matmul_flops_per_s": rate,
            "matmul_flops_per_s_best": rate_best, "rows": rows}  # fmt: skip


def hf_fallback(shape: Shape = Shape(), seq: int = 64, repeats: int = 2, warmup: int = 0, seed: int = 0) -> dict:
    """transformers' MambaForCausalLM torch fallback vs our mamba, interleaved at ``shape``
    with the sequence shortened to ``seq`` (the fallback is ~150x slower than attention).
    ``warmup=0``: the fallback has nothing to warm up beyond its first step's allocations,
    which its per-token loop dwarfs."""
    short = replace(shape, seq=seq)
    ids = torch.randint(0, short.vocab, (short.batch, short.seq), generator=torch.Generator().manual_seed(seed))
    ours, hf = build_xatl("mamba", short, seed), build_hf_mamba(short, seed)
    train_step(ours, ids)  # our mamba's first call may build/load the C++ scan
    fns = {"mamba": timed(lambda: train_step(ours, ids)), "hf_mamba_fallback": timed(lambda: train_step(hf, ids))}
    s = interleaved(fns, repeats=repeats, warmup=warmup)
    ours_tps = short.tokens / median(s["mamba"])
    hf_tps = short.tokens / median(s["hf_mamba_fallback"])
    best = min(s["hf_mamba_fallback"]) / min(s["mamba"])
    return {
        "shape": asdict(short), "repeats": repeats, "mamba_tokens_per_s": ours_tps, "hf_tokens_per_s": hf_tps,
        "ratio_mamba_vs_hf": ours_tps / hf_tps, "ratio_mamba_vs_hf_best": best, "seconds": s,
        "hf_params": sum(p.numel() for p in hf.parameters()), "mamba_params": sum(p.numel() for p in ours.parameters()),
    }  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--hf-seq", type=int, default=64, help="sequence length for the HF fallback (0: skip it)")
    p.add_argument("--hf-repeats", type=int, default=2)
    args = p.parse_args(argv)
    set_threads(args.threads)
    res = {"train": training_throughput(repeats=args.repeats)}
    if args.hf_seq:
        res["hf"] = hf_fallback(seq=args.hf_seq, repeats=args.hf_repeats)
    for r in res["train"]["rows"]:
        print(f"{r['name']:<12}{r['tokens_per_s']:>10,.0f} tok/s  {r['ratio_vs_attention']:.2f}x  MFU {r['mfu']:.1%}")
    if "hf" in res:
        h = res["hf"]
        print(f"HF fallback (seq {args.hf_seq}): {h['hf_tokens_per_s']:.1f} tok/s; mamba {h['ratio_mamba_vs_hf']:.0f}x")
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "rows"} for k, v in res.items()}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
