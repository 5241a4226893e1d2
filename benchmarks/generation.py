"""Cached greedy generation: per-token decode latency and cache memory vs context length.

For each context length every model prefills a random prompt of that length (one call,
untimed), then all models decode ``new_tokens`` greedy tokens round-robin (model A one
token, model B one token, ...), so machine load hits each alike; the per-token latency is
the median over those steps. The linear-cost mixers keep a fixed-size state, attention a
KV cache that grows with the context.

    python -m benchmarks.generation [--contexts 512,1024,2048,4096,8192] [--new-tokens 32]
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from . import median, set_threads
from .throughput import Shape, build_xatl

#: name -> (mixer, attention_layers); "hybrid" is the paper's layout (attention in layers
#: 1 and n_layers // 2 - 1; with 4 layers that is layer 1 alone)
GEN_MODELS = {
    "attention": ("attention", None),
    "mamba": ("mamba", None),
    "retnet": ("retnet", None),
    "mamba2": ("mamba2", None),
    "hybrid": ("mamba", "paper"),
}
CONTEXTS = (512, 1024, 2048, 4096, 8192)


@torch.inference_mode()
def prefill(model, ids: torch.Tensor):
    """Run the prompt through the model with a fresh cache; returns (cache, next token)."""
    from xatl_ds.models import XatlCache

    cache = XatlCache(model.config.num_hidden_layers)
    logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits
    return cache, logits[:, -1].argmax(-1, keepdim=True)


@torch.inference_mode()
def decode_step(model, cache, tok: torch.Tensor) -> torch.Tensor:
    """One cached greedy step; returns the next token."""
    logits = model(input_ids=tok, cache=cache, use_cache=True, logits_to_keep=1).logits
    return logits[:, -1].argmax(-1, keepdim=True)


def generation_bench(
    shape: Shape = Shape(),
    models=tuple(GEN_MODELS),
    contexts=CONTEXTS,
    new_tokens: int = 32,
    warmup_tokens: int = 2,
    seed: int = 0,
) -> dict:
    """Per-token decode latency (median, seconds) and cache bytes after the prefill, per
    model and context. Returns ``{"rows": [{model, context, token_s, cache_bytes,
    prefill_s}], "ratios_at_max": {model: attention latency / model latency}}``."""
    unknown = set(models) - set(GEN_MODELS)
    if unknown or "attention" not in models:
        raise ValueError(f"models must include 'attention' and come from {sorted(GEN_MODELS)}; got {list(models)}")
    shape = replace(shape, batch=1, seq=max(contexts) + new_tokens + warmup_tokens)
    built = {}
    for name in models:
        mixer, att = GEN_MODELS[name]
        built[name] = build_xatl(mixer, shape, seed, attention_layers=att).eval()
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for ctx in contexts:
        ids = torch.randint(0, shape.vocab, (1, ctx), generator=gen)
        state = {}
        for name, m in built.items():
            t0 = time.perf_counter()
            cache, tok = prefill(m, ids)
            state[name] = [cache, tok, time.perf_counter() - t0, cache.memory_bytes()]
        lat: dict[str, list[float]] = {k: [] for k in built}
        for i in range(warmup_tokens + new_tokens):
            for name, m in built.items():
                st = state[name]
                t0 = time.perf_counter()
                st[1] = decode_step(m, st[0], st[1])
                if i >= warmup_tokens:
                    lat[name].append(time.perf_counter() - t0)
        for name in built:
            cache, _, pre_s, mem = state[name]
            rows.append({
                "model": name, "context": ctx, "token_s": median(lat[name]), "cache_bytes": mem,
                "cache_bytes_end": cache.memory_bytes(), "prefill_s": pre_s,
            })  # fmt: skip
        del state
    top = max(contexts)
    at = {r["model"]: r for r in rows if r["context"] == top}
    ratios = {k: at["attention"]["token_s"] / r["token_s"] for k, r in at.items()}
    mem_ratios = {k: at["attention"]["cache_bytes"] / max(1, r["cache_bytes"]) for k, r in at.items()}
    return {"shape": {**shape.__dict__, "seq": None}, "new_tokens": new_tokens, "contexts": list(contexts),
            "rows": rows, "ratios_at_max": ratios, "cache_ratios_at_max": mem_ratios}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args(argv)
    set_threads(args.threads)
    res = generation_bench(contexts=[int(c) for c in args.contexts.split(",")], new_tokens=args.new_tokens)
    for r in res["rows"]:
        print(f"{r['model']:<10}{r['context']:>6}  {r['token_s'] * 1e3:8.2f} ms/token  {r['cache_bytes'] / 2**20:8.2f} MiB"
              f"  prefill {r['prefill_s']:.2f}s")  # fmt: skip
    print("attention / model latency at", max(res["contexts"]), {k: round(v, 2) for k, v in res["ratios_at_max"].items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
