"""Data pipeline: prepare (determinism, reruns, held-out test, dtypes, inputs) and loading.

Every prepare here reads a small prefix of the builtin corpus (``max_chars``) or a generated
local corpus and trains a tiny BPE, so the whole file stays well under a minute on 2 cores.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from xatl_ds import data as D
from xatl_ds.data import DataError, PackedTokens, PrepareConfig, packing, prepare
from xatl_ds.data.layout import sha256_file

SMALL = dict(max_chars=12_000, vocab_size=400, val_frac=0.1, test_frac=0.1, unit_chars=1024)
FILES = ("train.bin", "val.bin", "test.jsonl")


def cli_main(argv: list[str]) -> int:
    from xatl_ds.cli import main

    return main(["data", *argv])


def _cfg(out: Path, **kw) -> PrepareConfig:
    return PrepareConfig(out=out, **{**SMALL, **kw})


@pytest.fixture(scope="module")
def small_ds(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "small"
    prepare(_cfg(out))
    return out


_WORDS = "alpha beta gamma delta epsilon zeta theta iota kappa lambda sigma omega river stone cloud light".split()


def _paragraphs(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(_WORDS) for _ in range(rng.randint(20, 60))).capitalize() + "."
        for _ in range(n)
    ]


def _decoded(ds: Path, split: str) -> str:
    tok = D.load_tokenizer(ds)
    return tok.decode(np.fromfile(ds / f"{split}.bin", dtype=D.read_meta(ds)["dtype"]).tolist())


# ---------------------------------------------------------------------------------------------
# units and splits


def test_split_units_lossless_bounded_and_paragraph_aligned():
    paras = _paragraphs(0, 40) + ["x" * 300]  # one paragraph longer than a unit: hard/space cut
    text = "\n\n".join(paras) + "\n"
    units = D.split_units(text, 256)
    assert "".join(units) == text
    assert all(0 < len(u) <= 256 for u in units)
    # every cut that could fall on a paragraph break does: units start at a paragraph start
    starts = {text.index(p) for p in paras}
    pos = 0
    for u in units[:-3]:
        pos += len(u)
        assert pos in starts or text[pos - 1] in " \n" or pos > text.index("x" * 300)


def test_config_validation_names_the_flag(tmp_path):
    with pytest.raises(DataError, match="--val-frac"):
        prepare(PrepareConfig(out=tmp_path / "x", val_frac=1.5))
    with pytest.raises(DataError, match="--vocab-size"):
        prepare(PrepareConfig(out=tmp_path / "x", vocab_size=10))
    with pytest.raises(DataError, match="neither 'builtin'"):
        prepare(PrepareConfig(out=tmp_path / "x", corpus=[str(tmp_path / "missing.txt")]))


def test_token_dtype_threshold():
    assert D.token_dtype(4096) == np.uint16
    assert D.token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert D.token_dtype(65537) == np.uint32
    assert D.token_dtype(151_000) == np.uint32


# ---------------------------------------------------------------------------------------------
# prepare on the builtin corpus


def test_meta_and_layout(small_ds):
    meta = D.read_meta(small_ds)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 400 and meta["eos_token_id"] == 0
    assert [s["name"] for s in meta["sources"]] == [f"builtin/{f}" for f in D.BUILTIN_FILES]
    for s in meta["sources"]:
        assert s["chars"] == SMALL["max_chars"]
        assert s["sha256"] == sha256_file(D.BUILTIN_CORPUS_DIR / s["name"].split("/")[1])
    for split in ("train", "val"):
        size = (small_ds / f"{split}.bin").stat().st_size
        assert size == 2 * meta["splits"][split]["tokens"] > 0
    assert meta["splits"]["test"]["units"] > 0
    assert meta["content_sha256"]["train.bin"] == sha256_file(small_ds / "train.bin")
    assert not list(small_ds.parent.glob(".small.tmp-*"))  # no temp dir left behind
    # every run of train ends with EOS, and EOS appears nowhere else
    tokens = np.fromfile(small_ds / "train.bin", dtype=np.uint16)
    assert tokens[-1] == 0 and int((tokens == 0).sum()) == meta["splits"]["train"]["runs"]


def test_prepare_is_deterministic(small_ds, tmp_path):
    meta2 = prepare(_cfg(tmp_path / "again"))
    for name in FILES:
        assert (small_ds / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    assert (small_ds / "tokenizer" / "tokenizer.json").read_bytes() == (
        tmp_path / "again" / "tokenizer" / "tokenizer.json"
    ).read_bytes()
    assert meta2 == D.read_meta(small_ds)


def test_rerun_is_a_noop_and_changed_inputs_error(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    meta = prepare(_cfg(out, max_chars=4000))
    before = {n: (out / n).stat().st_mtime_ns for n in FILES}

    def boom(*a, **k):
        raise AssertionError("rebuilt although the inputs did not change")

    monkeypatch.setattr(packing, "_build", boom)
    assert prepare(_cfg(out, max_chars=4000)) == meta
    assert {n: (out / n).stat().st_mtime_ns for n in FILES} == before
    with pytest.raises(DataError, match="--overwrite"):
        prepare(_cfg(out, max_chars=4000, seed=7))
    monkeypatch.undo()
    meta7 = prepare(_cfg(out, max_chars=4000, seed=7, overwrite=True))
    assert meta7["seed"] == 7 and meta7["shards_sha256"] != meta["shards_sha256"]
    assert D.read_meta(out)["seed"] == 7


def test_changed_file_content_is_detected(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("\n\n".join(_paragraphs(1, 60)))
    out = tmp_path / "ds"
    cfg = dict(corpus=[str(src)], max_chars=None)
    prepare(_cfg(out, **cfg))
    src.write_text("\n\n".join(_paragraphs(2, 60)))
    with pytest.raises(DataError, match="different inputs"):
        prepare(_cfg(out, **cfg))


def test_interrupted_prepare_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    out = tmp_path / "ds"

    def killed(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(packing._ShardWriter, "close", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare(_cfg(out, max_chars=3000))
    assert not out.exists() and not list(tmp_path.iterdir())
    # a temp dir of a process that died (no cleanup) is removed by the next prepare
    stale = tmp_path / ".ds.tmp-999999999"
    (stale / "tokenizer").mkdir(parents=True)
    monkeypatch.undo()
    prepare(_cfg(out, max_chars=3000))
    assert not stale.exists() and (out / "meta.json").is_file()
    (out / "val.bin").write_bytes(b"\0\0")  # truncated behind our back
    with pytest.raises(DataError, match="truncated"):
        PackedTokens(out, "val")


def test_no_test_text_in_train(small_ds):
    train, val = _decoded(small_ds, "train"), _decoded(small_ds, "val")
    units = [json.loads(line) for line in (small_ds / "test.jsonl").read_text().splitlines()]
    assert len(units) == D.read_meta(small_ds)["splits"]["test"]["units"] > 0
    for u in units:
        assert u["text"] and u["text"] not in train and u["text"] not in val
        assert u["source"].startswith("builtin/")
    # the decoded train stream is the original text (lossless BPE): a known opening line is there
    assert "Emma Woodhouse, handsome, clever, and rich" in train or any(
        "Emma Woodhouse" in u["text"] for u in units
    )


def test_tokenizer_round_trip_with_autotokenizer(small_ds):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_ds / "tokenizer")
    assert tok.eos_token == D.EOS_TOKEN and tok.eos_token_id == 0 and len(tok) == 400
    s = "Thou shalt not pass -- naïve café, 3.14 ☃\n\n  indented"
    ids = tok(s, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == s
    # the shard holds exactly what this tokenizer produces for the opening of the stream
    tokens = np.fromfile(small_ds / "train.bin", dtype=np.uint16)
    first_run = tokens[: int(np.flatnonzero(tokens == 0)[0])]
    assert tok(tok.decode(first_run.tolist()), add_special_tokens=False)["input_ids"][:50] == first_run[:50].tolist()


# ---------------------------------------------------------------------------------------------
# local inputs, external tokenizer, HF offline


def _write_local_corpus(root: Path) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir()
    txt = root / "a.txt"
    txt.write_text("\n\n".join(_paragraphs(10, 40)), encoding="utf-8")
    jsonl = root / "b.jsonl"
    jsonl.write_text("".join(json.dumps({"text": p, "id": i}) + "\n" for i, p in enumerate(_paragraphs(11, 40))))
    parquet = root / "c.parquet"
    pq.write_table(pa.table({"text": _paragraphs(12, 40), "n": list(range(40))}), parquet)
    return {"txt": txt, "jsonl": jsonl, "parquet": parquet}


def test_local_txt_jsonl_parquet_inputs(tmp_path):
    files = _write_local_corpus(tmp_path / "corpus")
    meta = prepare(_cfg(tmp_path / "dir", corpus=[str(tmp_path / "corpus")], max_chars=None, vocab_size=300))
    assert [s["name"] for s in meta["sources"]] == ["a.txt", "b.jsonl", "c.parquet"]
    assert [s["documents"] for s in meta["sources"]] == [1, 40, 40]
    train = _decoded(tmp_path / "dir", "train")
    # each input contributes text (prefix of its first paragraph, unless that landed in val/test)
    for seed in (10, 11, 12):
        paras = _paragraphs(seed, 40)
        assert sum(p in train for p in paras) > 20
    # the same files given one by one make the same dataset as the directory
    meta2 = prepare(_cfg(tmp_path / "files", corpus=[str(files[k]) for k in ("txt", "jsonl", "parquet")],
                         max_chars=None, vocab_size=300))  # fmt: skip
    assert meta2["shards_sha256"] == meta["shards_sha256"]


def test_local_input_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "hello"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: no field 'text'.*--text-field"):
        prepare(_cfg(tmp_path / "o", corpus=[str(bad)]))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="no column 'text'"):
        prepare(_cfg(tmp_path / "o", corpus=[str(tmp_path / "bad.parquet")]))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported type"):
        prepare(_cfg(tmp_path / "o", corpus=[str(tmp_path / "x.csv")]))


def test_hf_offline_gives_a_clear_error(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as e:
        prepare(PrepareConfig(out=tmp_path / "o", corpus=["hf:xatl-test/not-cached:cfg"]))
    msg = str(e.value)
    assert "cannot fetch the Hugging Face dataset 'xatl-test/not-cached' (config 'cfg')" in msg
    assert "local files" in msg and "--corpus" in msg
    assert not (tmp_path / "o").exists()


def test_external_tokenizer_with_large_vocab_uses_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # word-level vocab of 70k where every real word sits above 65535
    vocab = {D.EOS_TOKEN: 0, "[UNK]": 1}
    vocab.update({f"filler{i}": i for i in range(2, 70_000)})
    words = sorted(set(" ".join(_paragraphs(20, 30)).replace(".", " .").split()))
    vocab.update({w: 70_000 + i for i, w in enumerate(words)})
    wl = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=wl, eos_token=D.EOS_TOKEN, unk_token="[UNK]").save_pretrained(
        tmp_path / "tok"
    )
    src = tmp_path / "w.txt"
    src.write_text("\n\n".join(p.replace(".", " .") for p in _paragraphs(20, 30)))
    meta = prepare(_cfg(tmp_path / "ds", corpus=[str(src)], tokenizer=str(tmp_path / "tok"), max_chars=None))
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_000 + len(words)
    assert meta["tokenizer_source"] == str(tmp_path / "tok") and meta["bpe"] is None
    tokens = np.fromfile(tmp_path / "ds" / "train.bin", dtype=np.uint32)
    assert tokens.size == meta["splits"]["train"]["tokens"] and tokens.max() >= 70_000
    assert set(np.unique(tokens).tolist()) <= {0} | set(range(70_000, 70_000 + len(words)))
    batch = PackedTokens(tmp_path / "ds").get_batch(0, 0, 2, 16)
    assert batch.dtype == torch.int64 and int(batch.max()) >= 70_000


# ---------------------------------------------------------------------------------------------
# loading for training


def _window_ids(data: PackedTokens, batch: torch.Tensor, seq_len: int) -> list[int]:
    """Recover window indices from a batch (every window of the small set is distinct)."""
    table = {
        tuple(np.asarray(data.tokens[w * seq_len : (w + 1) * seq_len]).tolist()): w
        for w in range(data.num_windows(seq_len))
    }
    assert len(table) == data.num_windows(seq_len)
    return [table[tuple(row.tolist())] for row in batch]


def test_get_batch_is_a_pure_function(small_ds):
    a, b = PackedTokens(small_ds), PackedTokens(small_ds)
    x = a.get_batch(5, 1, 4, 32, rank=1, world_size=2, seed=3, grad_accum=2)
    a.get_batch(0, 0, 4, 32)  # other calls in between do not matter
    assert x.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x, b.get_batch(5, 1, 4, 32, rank=1, world_size=2, seed=3, grad_accum=2))
    assert not torch.equal(x, a.get_batch(5, 1, 4, 32, rank=1, world_size=2, seed=4, grad_accum=2))
    # rows are contiguous slices of the packed stream on the window grid
    w = _window_ids(a, x, 32)
    for row, j in zip(x, w):
        assert torch.equal(row, torch.from_numpy(a.tokens[j * 32 : (j + 1) * 32].astype(np.int64)))
    with pytest.raises(DataError, match="grad_accum"):
        a.get_batch(0, 1, 4, 32)
    with pytest.raises(DataError, match="rank"):
        a.get_batch(0, 0, 4, 32, rank=2, world_size=2)


def test_get_batch_ranks_disjoint_epochs_cover_and_reshuffle(small_ds):
    data = PackedTokens(small_ds)
    L, B, W, GA = 64, 3, 2, 2
    n = data.num_windows(L)
    per_step = B * W * GA
    steps = n // per_step
    assert steps >= 3
    seen: list[int] = []
    for step in range(steps):
        step_ids = {}
        for micro in range(GA):
            for rank in range(W):
                batch = data.get_batch(step, micro, B, L, rank, W, 0, grad_accum=GA)
                step_ids[(micro, rank)] = _window_ids(data, batch, L)
        flat = [w for ids in step_ids.values() for w in ids]
        assert len(set(flat)) == len(flat)  # ranks and micro-steps never share a window
        # the same global batch split as 1 rank x 4 micro-steps holds the same windows
        alt = [
            w for m in range(W * GA)
            for w in _window_ids(data, data.get_batch(step, m, B, L, 0, 1, 0, grad_accum=W * GA), L)
        ]
        assert sorted(alt) == sorted(flat)
        seen += flat
    assert len(set(seen)) == len(seen) == steps * per_step  # one epoch: no window twice
    # the next epoch visits windows in another order
    epoch0 = [w for s in range(2) for w in _window_ids(data, data.get_batch(s, 0, n // 4, L, 0, 1, 0), L)]
    epoch1 = [w for s in range(4, 6) for w in _window_ids(data, data.get_batch(s, 0, n // 4, L, 0, 1, 0), L)]
    assert epoch0 != epoch1


def test_eval_batches_fixed_and_sharded(small_ds):
    val = PackedTokens(small_ds, "val")
    L = 16
    full = list(val.iter_eval_batches(4, L, max_batches=3))
    assert [b.shape for b in full] == [(4, L)] * 3 and val.eval_windows(4, L, 3) == 12
    assert all(torch.equal(x, y) for x, y in zip(full, val.iter_eval_batches(4, L, max_batches=3)))
    expect = torch.cat(full)
    assert torch.equal(expect, torch.from_numpy(np.asarray(val.tokens[: 12 * L], dtype=np.int64)).view(12, L))
    shards = [torch.cat(list(val.iter_eval_batches(4, L, 3, rank=r, world_size=2))) for r in range(2)]
    assert torch.equal(shards[0], expect[0::2]) and torch.equal(shards[1], expect[1::2])
    everything = torch.cat(list(val.iter_eval_batches(8, L)))
    assert everything.shape[0] == val.num_windows(L)
    # sums and counts from ranks combine to the single-process mean
    assert D.global_mean_loss(6.0, 4) == pytest.approx(1.5)


def test_packed_tokens_errors(small_ds, tmp_path):
    with pytest.raises(DataError, match="test.jsonl"):
        PackedTokens(small_ds, "test")
    with pytest.raises(DataError, match="data prepare"):
        PackedTokens(tmp_path)
    with pytest.raises(DataError, match="seq_len"):
        PackedTokens(small_ds, "val").get_batch(0, 0, 1, 10**9)


def test_cli_prepare_and_info(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["prepare", "--out", str(out), "--max-chars", "3000", "--vocab-size", "300",
            "--val-frac", "0.1", "--test-frac", "0.1", "--corpus", "builtin"]  # fmt: skip
    assert cli_main(argv) == 0
    assert "train" in capsys.readouterr().out and (out / "meta.json").is_file()
    assert cli_main(["info", str(out)]) == 0
    assert "builtin/kjv.txt.gz" in capsys.readouterr().out
    assert cli_main([*argv, "--seed", "9"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["cli"]
