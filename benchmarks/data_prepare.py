"""Throughput of ``xatl-ds data prepare`` on a streamed ``hf:`` dataset, per tokenizer process count.

A local HF-style dataset folder (parquet shards with a ``text`` column, documents made from the
built-in corpus's paragraphs in a seeded shuffle, so no unit repeats) is prepared through the
``hf:`` path, i.e. streamed, with a given tokenizer (a byte-level BPE trained once on a sample),
so the corpus is read once. Each prepare runs in a fresh process (its peak RSS is the memory
figure: it should stay flat as the corpus grows) and the process counts are interleaved
(1, N, 1, N, ...). Figure of merit: tokens written per second (train + val), and its ratio to
one process.

    python -m benchmarks.data_prepare [--mb 48] [--procs 1,2] [--repeats 2] [--write]

``--write`` puts the result into benchmarks/RESULTS.md (its own section, replaced in place).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import REPO, machine_info, md_table, median

SECTION = "## Data preparation (streamed hf: dataset, tokenizer processes)"


def make_corpus(root: Path, mb: float, seed: int = 0) -> Path:
    """A dataset folder of ~``mb`` MB of text in parquet shards of ~16 MB."""
    import gzip
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    from xatl_ds.data import BUILTIN_CORPUS_DIR, BUILTIN_FILES

    paras = []
    for f in BUILTIN_FILES:
        text = gzip.open(BUILTIN_CORPUS_DIR / f, "rt", encoding="utf-8").read()
        paras += [p.strip() for p in text.split("\n\n") if len(p.strip()) > 40]
    rng = random.Random(seed)
    ds = root / "corpus"
    (ds / "data").mkdir(parents=True)
    target, size, shard, docs, k = int(mb * 1e6), 0, 0, [], 0
    while size < target:
        doc = "\n\n".join(rng.choice(paras) for _ in range(rng.randint(3, 30)))
        doc = f"[{k}] {doc}"  # distinct documents, so the split sees distinct units
        k += 1
        docs.append(doc)
        size += len(doc)
        shard += len(doc)
        if shard >= 16e6 or size >= target:
            pq.write_table(pa.table({"text": docs}), ds / "data" / f"train-{len(list((ds / 'data').iterdir())):05d}.parquet")
            docs, shard = [], 0
    return ds


def make_tokenizer(root: Path, vocab: int) -> Path:
    from xatl_ds.data import BUILTIN_CORPUS_DIR, BUILTIN_FILES
    from xatl_ds.data.tokenizer import train_bpe

    import gzip

    text = gzip.open(BUILTIN_CORPUS_DIR / BUILTIN_FILES[0], "rt", encoding="utf-8").read()
    tok = train_bpe([text[i:i + 4096] for i in range(0, len(text), 4096)], vocab)
    path = root / "tokenizer"
    tok.save_pretrained(path)
    return path


def one(dataset: str, tokenizer: str, out: str, procs: int, max_chars: int | None = None) -> dict:
    """One prepare in this process: wall seconds, tokens, peak RSS (this process and workers)."""
    import resource

    from xatl_ds.data import PrepareConfig, prepare

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    meta = prepare(PrepareConfig(out=out, corpus=[f"hf:{dataset}"], tokenizer=tokenizer, num_proc=procs,
                                 max_chars=max_chars))  # fmt: skip
    wall = time.perf_counter() - t0
    tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    chars = sum(s["chars"] for s in meta["sources"])
    rss = {w: resource.getrusage(getattr(resource, f"RUSAGE_{w.upper()}")).ru_maxrss / 1024 for w in ("self", "children")}
    return {"procs": procs, "wall_s": wall, "tokens": tokens, "chars": chars, "tokens_per_s": tokens / wall,
            "rss_mb": rss["self"], "worker_rss_mb": rss["children"], "shards": meta["shards_sha256"]}  # fmt: skip


def run(mb: float, procs: list[int], repeats: int, vocab: int, work: Path) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ds, tok = make_corpus(work, mb), make_tokenizer(work, vocab)
    data_mb = sum(f.stat().st_size for f in (ds / "data").iterdir()) / 1e6
    samples: dict[int, list[dict]] = {p: [] for p in procs}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for _ in range(repeats):
        for p in procs:
            cmd = [sys.executable, "-m", "benchmarks.data_prepare", "--one", str(ds), str(tok), str(work / "out"), str(p)]
            r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True)
            samples[p].append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(f"[data_prepare] procs {p}: {samples[p][-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
    same = len({s["shards"] for v in samples.values() for s in v}) == 1
    # memory against corpus size: one process on a quarter of the corpus (--max-chars cuts the stream)
    cmd = [sys.executable, "-m", "benchmarks.data_prepare", "--one", str(ds), str(tok), str(work / "out"), "1",
           "--max-chars", str(int(mb * 1e6 / 4))]  # fmt: skip
    quarter = json.loads(subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                                        check=True).stdout.strip().splitlines()[-1])  # fmt: skip
    return {"mb": mb, "parquet_mb": data_mb, "vocab": vocab, "samples": samples, "identical_shards": same,
            "quarter": quarter}  # fmt: skip


def results_section(r: dict, info: dict) -> str:
    base = median([s["tokens_per_s"] for s in r["samples"][min(r["samples"])]])
    rows = []
    for p, ss in r["samples"].items():
        tps = median([s["tokens_per_s"] for s in ss])
        rows.append([p, f"{median([s['wall_s'] for s in ss]):.1f}", f"{tps:,.0f}", f"{tps / base:.2f}x",
                     f"{max(s['tokens_per_s'] for s in ss):,.0f}", f"{max(s['rss_mb'] for s in ss):,.0f}",
                     f"{max(s['worker_rss_mb'] for s in ss):,.0f}"])  # fmt: skip
    s0 = r["samples"][min(r["samples"])][0]
    load = info.get("load_average") or ()
    return "\n".join([
        SECTION, "",
        "`python -m benchmarks.data_prepare --write` — `xatl-ds data prepare --corpus hf:DIR --tokenizer TOK "
        f"--num-proc N` on a local HF-style dataset folder ({r['parquet_mb']:.0f} MB of parquet, {s0['chars'] / 1e6:.0f}M "
        f"characters of built-in-corpus paragraphs in seeded random documents), streamed (`datasets` streaming mode), "
        f"with a given byte-level BPE (vocab {r['vocab']}), so the corpus is read once; each prepare in a fresh "
        f"process, process counts interleaved, {len(r['samples'][min(r['samples'])])} repeats (medians). "
        f"tokens/s = train + val tokens written ({s0['tokens']:,}) / wall time of `prepare` (reading, splitting, "
        "hashing, tokenizing, writing, checksums). Peak RSS: the main process, and the largest worker. "
        f"Shards identical for every process count: {'yes' if r['identical_shards'] else 'NO'}. "
        "**Reference: one process.**", "",
        f"- Machine: {info['cpu']}, nproc {info['cores']}; date {info['date']}; load average at start "
        + " / ".join(f"{x:.2f}" for x in load), "",
        md_table(["processes", "wall s", "tokens/s", "vs 1 process", "best tokens/s", "peak RSS MB (main)",
                  "peak RSS MB (worker)"], rows),  # fmt: skip
        "",
        f"Memory against corpus size: one process on a quarter of the corpus ({r['quarter']['chars'] / 1e6:.0f}M "
        f"characters) peaks at {r['quarter']['rss_mb']:,.0f} MB, on all of it at "
        f"{max(s['rss_mb'] for s in r['samples'][min(r['samples'])]):,.0f} MB: the corpus is streamed, what the "
        "process holds is the libraries (torch, transformers, datasets: most of it) and a few ~2M-character "
        "batches. On a shared machine the process counts compete with other jobs for the cores, so the speed-up "
        "column is a lower bound of what idle cores give.",
        "",
    ])


def write_results(section: str, path: Path) -> None:
    """Replace (or append) the section in RESULTS.md; other sections are left alone."""
    text = path.read_text() if path.is_file() else "# xatl-ds benchmarks (CPU)\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=48.0, help="characters of text, in millions (default 48)")
    ap.add_argument("--procs", default=None, help="comma list of process counts (default: 1 and nproc)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--work", default=os.path.join(REPO, "runs", "bench", "data_prepare"))
    ap.add_argument("--json", help="also write the result to this file")
    ap.add_argument("--write", action="store_true", help="write the section into benchmarks/RESULTS.md")
    ap.add_argument("--one", nargs=4, metavar=("DATASET", "TOKENIZER", "OUT", "PROCS"), help=argparse.SUPPRESS)
    ap.add_argument("--max-chars", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.one[0], a.one[1], a.one[2], int(a.one[3]), a.max_chars)))
        return 0
    procs = [int(x) for x in a.procs.split(",")] if a.procs else sorted({1, os.cpu_count() or 1})
    info = machine_info()
    r = run(a.mb, procs, a.repeats, a.vocab, Path(a.work))
    section = results_section(r, info)
    print(section)
    if a.json:
        Path(a.json).write_text(json.dumps({"info": info, **r}, indent=1))
    if a.write:
        write_results(section, Path(REPO) / "benchmarks" / "RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
