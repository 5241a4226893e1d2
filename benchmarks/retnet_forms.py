"""RetNet training: the parallel form against the chunkwise form, per sequence length.

``python benchmarks/retnet_forms.py [--threads 2] [--chunk 64]``; a section of ``make bench``.
``RetNetMixer.parallel_max_len`` switches training from the parallel form (O(L^2) per head)
to the chunkwise one; this times one mixer, fwd+bwd, both forms interleaved in one process,
at a fixed number of tokens per step (batch x length), and prints chunkwise / parallel step
time per length (> 1: the parallel form is faster) with the peak extra memory the parallel
form's (B, H, L, L) scores need.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import torch  # noqa: E402

from benchmarks import interleaved, md_table, median, set_threads  # noqa: E402


def retnet_forms(lengths=(128, 256, 512, 1024, 2048), *, tokens: int = 4096, d_model: int = 256, heads: int = 8,
                 chunk: int = 64, repeats: int = 5) -> dict:  # fmt: skip
    """Per length: median fwd+bwd seconds of one RetNet mixer in each form, at
    ``max(1, tokens // length)`` sequences a step; ``ratio`` = chunkwise / parallel time."""
    import time

    from xatl_ds.models import XatlConfig
    from xatl_ds.models.retnet import RetNetMixer

    cfg = XatlConfig(family="neox", hidden_size=d_model, num_attention_heads=heads, num_hidden_layers=1,
                     vocab_size=64, mixer="retnet", chunk_size=chunk)  # fmt: skip
    torch.manual_seed(0)
    mixer = RetNetMixer(cfg, 0).train()
    rows = []
    for L in lengths:
        B = max(1, tokens // L)
        x = torch.randn(B, L, d_model, requires_grad=True)

        def timed(limit: int):
            def run() -> float:
                mixer.parallel_max_len = limit
                t0 = time.perf_counter()
                mixer(x).square().mean().backward()
                dt = time.perf_counter() - t0
                mixer.zero_grad(set_to_none=True)
                x.grad = None
                return dt

            return run

        s = interleaved({"parallel": timed(L), "chunkwise": timed(0)}, repeats=repeats)
        par, chk = median(s["parallel"]), median(s["chunkwise"])
        rows.append({"length": L, "batch": B, "parallel_s": par, "chunkwise_s": chk, "ratio": chk / par,
                     "scores_mib": B * heads * L * L * 4 / 2**20})  # fmt: skip
    return {"rows": rows, "chunk": chunk, "d_model": d_model, "heads": heads, "tokens": tokens,
            "parallel_max_len": RetNetMixer.parallel_max_len}  # fmt: skip


def render(res: dict) -> str:
    return md_table(
        ["length", "batch", "parallel tok/s", "chunkwise tok/s", "chunkwise / parallel time", "one (B,H,L,L) fp32 MiB"],
        [[r["length"], r["batch"], f"{r['batch'] * r['length'] / r['parallel_s']:,.0f}",
          f"{r['batch'] * r['length'] / r['chunkwise_s']:,.0f}", f"{r['ratio']:.2f}", f"{r['scores_mib']:,.0f}"]
         for r in res["rows"]],
    )  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tokens", type=int, default=4096, help="batch x length per step")
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--chunk", type=int, default=64, help="config.chunk_size of the chunkwise form")
    args = p.parse_args(argv)
    set_threads(args.threads)
    res = retnet_forms(args.lengths, tokens=args.tokens, d_model=args.d_model, heads=args.heads, chunk=args.chunk,
                       repeats=args.repeats)  # fmt: skip
    print(render(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
