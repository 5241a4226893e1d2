"""Data at scale: ``hf:`` datasets are streamed (a local folder of parquet files here, no hub),
tokenization runs in worker processes without changing a byte of the output, and with a given
tokenizer the corpus is read once, at the thresholds pass 1 would have chosen."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from xatl_ds.data import PrepareConfig, prepare
from xatl_ds.data import packing

WORDS = ("the quick brown fox jumps over the lazy dog while seven wizards quietly box "
         "jovial frogs near a calm river under grey winter skies").split()  # fmt: skip


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        paras = [" ".join(rng.choice(WORDS, size=rng.integers(20, 80))) + "." for _ in range(rng.integers(1, 6))]
        out.append("\n\n".join(paras))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_tokenizer):
    """A local HF-style dataset folder (two parquet shards with a 'text' and an 'id' column),
    the same documents as one jsonl file, and a saved tokenizer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("stream")
    docs = _docs(600)
    ds = root / "my_dataset"
    (ds / "data").mkdir(parents=True)
    for k, part in enumerate((docs[:300], docs[300:])):
        pq.write_table(pa.table({"text": part, "id": list(range(len(part)))}), ds / "data" / f"train-{k}.parquet")
    jl = root / "docs.jsonl"
    jl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = root / "tok"
    tiny_tokenizer.save_pretrained(tok)
    return {"hf": f"hf:{ds}", "jsonl": str(jl), "tok": str(tok), "docs": docs}


def _shards(out: Path) -> dict[str, bytes]:
    return {n: (out / n).read_bytes() for n in ("train.bin", "val.bin")}


def test_hf_folder_is_streamed_and_matches_local_files(tmp_path, corpus):
    from datasets import IterableDataset

    from xatl_ds.data.corpus import resolve_sources

    (src,) = resolve_sources([corpus["hf"]], "train")
    assert isinstance(src.dataset, IterableDataset), "hf: datasets are streamed, not loaded whole"
    assert list(src.documents("text")) == corpus["docs"]
    a = prepare(PrepareConfig(out=tmp_path / "hf", corpus=[corpus["hf"]], tokenizer=corpus["tok"], val_frac=0.05,
                              test_frac=0.05, num_proc=1))  # fmt: skip
    b = prepare(PrepareConfig(out=tmp_path / "jl", corpus=[corpus["jsonl"]], tokenizer=corpus["tok"], val_frac=0.05,
                              test_frac=0.05, num_proc=1))  # fmt: skip
    assert _shards(tmp_path / "hf") == _shards(tmp_path / "jl"), "the same documents give the same shards"
    assert a["splits"]["train"]["tokens"] > 10_000 and a["sources"][0]["documents"] == 600
    assert a["sources"][0]["name"] == corpus["hf"] and a["sources"][0]["sha256"]
    # a rerun is a no-op (the folder's content hash is the source's fingerprint) ...
    again = prepare(PrepareConfig(out=tmp_path / "hf", corpus=[corpus["hf"]], tokenizer=corpus["tok"],
                                  val_frac=0.05, test_frac=0.05, num_proc=1))  # fmt: skip
    assert again["input_fingerprint"] == a["input_fingerprint"]
    # ... and --max-chars stops reading the stream early
    short = prepare(PrepareConfig(out=tmp_path / "short", corpus=[corpus["hf"]], tokenizer=corpus["tok"],
                                  max_chars=20_000, num_proc=1))  # fmt: skip
    assert short["sources"][0]["chars"] <= 20_000


def test_worker_processes_do_not_change_a_byte(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(packing, "_ENCODE_BATCH_CHARS", 20_000)  # many batches from a small corpus
    started = []
    real = packing._Encoder.start_pool
    monkeypatch.setattr(packing._Encoder, "start_pool", lambda self: started.append(self.num_proc) or real(self))
    outs = {}
    for n in (1, 3):
        out = tmp_path / f"p{n}"
        prepare(PrepareConfig(out=out, corpus=[corpus["hf"]], tokenizer=corpus["tok"], num_proc=n))
        outs[n] = {**_shards(out), "test.jsonl": (out / "test.jsonl").read_bytes()}
    assert 3 in started, "the pool ran"
    assert outs[1] == outs[3]


def test_one_pass_uses_the_thresholds_pass_one_would(tmp_path, corpus, monkeypatch):
    from xatl_ds.data.corpus import resolve_sources
    from xatl_ds.data.split import iter_units, thresholds

    cfg = PrepareConfig(out=tmp_path / "o", corpus=[corpus["jsonl"]], tokenizer=corpus["tok"], num_proc=1)
    reads = []
    real = packing.iter_units
    monkeypatch.setattr(packing, "iter_units", lambda *a: reads.append(1) or real(*a))
    meta = prepare(cfg)
    assert len(reads) == 1, "a given tokenizer: the corpus is read once"
    hashes = np.array([u.h_split for u in iter_units(resolve_sources(cfg.corpus, "train"), cfg)], dtype=np.uint64)
    thr = thresholds(hashes, cfg)
    assert meta["split_thresholds"] == {"test": str(thr.test), "val": str(thr.val)}
    # a corpus too small for the nominal thresholds is read again and still fills every split
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text("".join(json.dumps({"text": d.split(".")[0]}) + "\n" for d in corpus["docs"][:6]))  # 6 units
    reads.clear()
    small = prepare(PrepareConfig(out=tmp_path / "t", corpus=[str(tiny)], tokenizer=corpus["tok"], num_proc=1))
    assert len(reads) == 3 and small["splits"]["val"]["units"] > 0 and small["splits"]["test"]["units"] > 0


def test_cli_prepares_an_hf_folder_in_parallel(tmp_path, corpus, capsys):
    from xatl_ds.cli import main

    out = tmp_path / "cli"
    assert main(["data", "prepare", "--out", str(out), "--corpus", corpus["hf"], "--tokenizer", corpus["tok"],
                 "--num-proc", "2"]) == 0  # fmt: skip
    assert "train" in capsys.readouterr().out and (out / "train.bin").stat().st_size > 0
    assert main(["data", "prepare", "--out", str(out), "--num-proc", "0"]) == 2
    assert "--num-proc" in capsys.readouterr().err
