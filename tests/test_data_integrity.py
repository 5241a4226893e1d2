"""Data hardening: --overwrite replaces only datasets prepare wrote, shards are checked against
meta.json when loaded (sha256 once per file identity, id range), and check_fits catches a
seq_len the splits cannot hold before training starts.

Every dataset here is a copy of one tiny prepared set (a few thousand characters of the
builtin corpus, a 300-token BPE), so the file runs in seconds.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from xatl_ds import data as D
from xatl_ds.data import DataError, PackedTokens, PrepareConfig, loader, prepare
from xatl_ds.data.layout import is_prepared_dataset, sha256_file

TINY = dict(max_chars=3000, vocab_size=300, val_frac=0.1, test_frac=0.1, unit_chars=512)


def cli_main(argv: list[str]) -> int:
    from xatl_ds.cli import main

    return main(["data", *argv])


def _cfg(out: Path, **kw) -> PrepareConfig:
    return PrepareConfig(out=out, **{**TINY, **kw})


@pytest.fixture(scope="module")
def tiny_ds(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("integrity") / "tiny"
    prepare(_cfg(out))
    return out


@pytest.fixture
def ds_copy(tiny_ds, tmp_path) -> Path:
    """A private copy (new inodes, so nothing verified for the original carries over)."""
    dst = tmp_path / "copy"
    shutil.copytree(tiny_ds, dst)
    return dst


def _rewrite_meta(ds: Path, **changes) -> None:
    meta = json.loads((ds / "meta.json").read_text())
    meta.update(changes)
    (ds / "meta.json").write_text(json.dumps(meta))


def _bump_mtime(path: Path) -> None:
    # timestamps can be coarser than a test is fast: make "the file changed" unambiguous
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


# ---------------------------------------------------------------------------------------------
# --overwrite replaces only a dataset that prepare wrote


def test_overwrite_refuses_a_file_and_keeps_it(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("my notes")
    for overwrite in (False, True):
        with pytest.raises(DataError, match="not a dataset prepared by xatl-ds") as e:
            prepare(_cfg(target, overwrite=overwrite))
        assert "is a file" in str(e.value) and "--overwrite" not in str(e.value)
        assert target.read_text() == "my notes"
    # the CLI says the same (exit 2) and does not suggest --overwrite either
    argv = ["prepare", "--out", str(target), "--max-chars", "3000", "--vocab-size", "300", "--overwrite"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "not a dataset prepared by xatl-ds" in err and "--overwrite" not in err
    assert target.read_text() == "my notes"
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]  # no temp dir left behind


def test_overwrite_refuses_a_foreign_folder_and_keeps_its_files(tmp_path):
    folder = tmp_path / "results"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "keep.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="non-empty directory without a meta.json") as e:
        prepare(_cfg(folder, overwrite=True))
    assert "--overwrite" not in str(e.value)
    assert (folder / "sub" / "keep.csv").read_text() == "a,b\n1,2\n"
    # a meta.json that prepare did not write does not make it a dataset
    (folder / "meta.json").write_text(json.dumps({"model": "mine"}))
    assert not is_prepared_dataset(folder)
    with pytest.raises(DataError, match="was not written by xatl-ds data prepare"):
        prepare(_cfg(folder, overwrite=True))
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="not a dataset prepared by xatl-ds"):
        prepare(_cfg(folder, overwrite=True))
    assert sorted(p.name for p in folder.rglob("*")) == ["keep.csv", "meta.json", "sub"]
    assert sorted(os.listdir(tmp_path)) == ["results"]


def test_overwrite_replaces_a_real_dataset_and_an_empty_dir_is_used(ds_copy, tmp_path):
    old = D.read_meta(ds_copy)
    assert old["format"] == "xatl-ds/packed-tokens" and is_prepared_dataset(ds_copy)
    (ds_copy / "stale.txt").write_text("belongs to the old dataset")
    new = prepare(_cfg(ds_copy, seed=99, overwrite=True))
    assert new["seed"] == 99 and new["shards_sha256"] != old["shards_sha256"]
    assert D.read_meta(ds_copy)["seed"] == 99 and not (ds_copy / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]  # old copy and temp dir are gone
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare(_cfg(empty))["shards_sha256"] == old["shards_sha256"]


def test_dataset_without_the_marker_still_counts_as_one(ds_copy):
    """Datasets prepared before meta.json carried "format" are still recognised (and replaced)."""
    meta = json.loads((ds_copy / "meta.json").read_text())
    del meta["format"]
    (ds_copy / "meta.json").write_text(json.dumps(meta))
    assert is_prepared_dataset(ds_copy)
    assert prepare(_cfg(ds_copy, seed=5, overwrite=True))["seed"] == 5


# ---------------------------------------------------------------------------------------------
# shards are verified against meta.json when loaded


def test_flipped_byte_is_caught_with_the_file_and_the_fix(ds_copy):
    shard = ds_copy / "train.bin"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError) as e:
        PackedTokens(ds_copy, "train")
    msg = str(e.value)
    assert str(shard) in msg and "content_sha256" in msg and "--overwrite" in msg
    PackedTokens(ds_copy, "val")  # the other split is intact and still loads


def test_truncated_shard_is_caught(ds_copy):
    shard = ds_copy / "val.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated") as e:
        PackedTokens(ds_copy, "train")  # every load checks every shard's size
    assert str(shard) in str(e.value) and "--overwrite" in str(e.value)


def test_sha256_is_read_once_per_file_identity(ds_copy, monkeypatch):
    scans: list[str] = []
    real_scan = loader._scan

    def counting(path, dtype):
        scans.append(Path(path).name)
        return real_scan(path, dtype)

    monkeypatch.setattr(loader, "_scan", counting)
    first = PackedTokens(ds_copy, "train")
    assert scans == ["train.bin"] and first.check.sha256 == sha256_file(ds_copy / "train.bin")
    stamp = ds_copy / ".train.bin.verified.json"
    assert json.loads(stamp.read_text())["sha256"] == D.read_meta(ds_copy)["content_sha256"]["train.bin"]
    PackedTokens(ds_copy, "train")
    loader._checked.clear()  # a new process: only the stamp remembers
    PackedTokens(ds_copy, "train")
    assert scans == ["train.bin"]
    # rewriting the file (same size) invalidates the stamp: the change is found
    shard = ds_copy / "train.bin"
    raw = bytearray(shard.read_bytes())
    raw[0] ^= 0x01
    shard.write_bytes(bytes(raw))
    _bump_mtime(shard)
    with pytest.raises(DataError, match="corrupted or was modified"):
        PackedTokens(ds_copy, "train")
    assert scans == ["train.bin", "train.bin"]
    # a corrupt stamp is ignored (checked again), never trusted
    raw[0] ^= 0x01
    shard.write_bytes(bytes(raw))
    _bump_mtime(shard)
    stamp.write_text("{oops")
    loader._checked.clear()
    assert PackedTokens(ds_copy, "train").check.max_id < 300
    assert scans == ["train.bin"] * 3


def test_read_only_dataset_dir_still_loads(ds_copy, monkeypatch):
    def no_write(*a, **k):
        raise PermissionError("read-only file system")

    stamp = ds_copy / ".val.bin.verified.json"
    copied = stamp.read_text()  # prepare's stamp, copied along: names the original's inode
    monkeypatch.setattr(loader.os, "replace", no_write)
    data = PackedTokens(ds_copy, "val")
    assert len(data) == D.read_meta(ds_copy)["splits"]["val"]["tokens"] > 0
    assert data.check.inode == (ds_copy / "val.bin").stat().st_ino != json.loads(copied)["inode"]
    assert stamp.read_text() == copied and not list(ds_copy.glob("*.tmp-*"))  # nothing half-written


def test_prepare_stamps_its_shards_and_repairs_them_with_overwrite(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    prepare(_cfg(out))
    good = (out / "train.bin").read_bytes()

    def no_scan(*a, **k):
        raise AssertionError("a freshly prepared shard was read in full again")

    monkeypatch.setattr(loader, "_scan", no_scan)
    assert PackedTokens(out, "train").check.sha256 == sha256_file(out / "train.bin")
    monkeypatch.undo()
    raw = bytearray(good)
    raw[3] ^= 0x10
    (out / "train.bin").write_bytes(bytes(raw))
    _bump_mtime(out / "train.bin")
    # a rerun with the same inputs does not call the damaged dataset up to date
    with pytest.raises(DataError, match="corrupted or was modified.*--overwrite"):
        prepare(_cfg(out))
    # ... and the advised fix works: the same arguments with --overwrite rebuild it
    prepare(_cfg(out, overwrite=True))
    assert (out / "train.bin").read_bytes() == good
    loader._checked.clear()
    PackedTokens(out, "train")


def test_ids_beyond_vocab_are_caught_at_load(ds_copy):
    shard = ds_copy / "train.bin"
    tokens = np.fromfile(shard, dtype=np.uint16)
    tokens[7] = 301  # vocab_size is 300: id 301 has no embedding row
    tokens.tofile(shard)
    # make the checksum agree, so only the range check can catch it
    meta = D.read_meta(ds_copy)
    _rewrite_meta(ds_copy, content_sha256={**meta["content_sha256"], "train.bin": sha256_file(shard)})
    with pytest.raises(DataError) as e:
        PackedTokens(ds_copy, "train")
    msg = str(e.value)
    assert str(shard) in msg and "token id 301" in msg and "vocab_size=300" in msg
    assert PackedTokens(ds_copy, "val").check.max_id < 300


def test_tokenizer_that_under_reports_its_vocab_fails_at_prepare(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # 4 tokens, but one has id 500: len(tok) == 4 would size an embedding too small
    vocab = {D.EOS_TOKEN: 0, "[UNK]": 1, "alpha": 2, "beta": 500}
    wl = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=wl, eos_token=D.EOS_TOKEN, unk_token="[UNK]")
    tok.save_pretrained(tmp_path / "tok")
    src = tmp_path / "ab.txt"
    src.write_text("\n\n".join(f"alpha beta alpha {i}" for i in range(80)))
    with pytest.raises(DataError, match=r"id 500 >= its reported size len\(tokenizer\)=4"):
        prepare(_cfg(tmp_path / "ds", corpus=[str(src)], tokenizer=str(tmp_path / "tok"), max_chars=None))
    assert not (tmp_path / "ds").exists()


# ---------------------------------------------------------------------------------------------
# check_fits: a seq_len the data cannot hold fails before training, not at the first eval


def test_check_fits_names_the_numbers_and_the_fix(tiny_ds, caplog):
    val, train = PackedTokens(tiny_ds, "val"), PackedTokens(tiny_ds, "train")
    n_val = len(val)
    assert 8 < n_val < len(train)
    with pytest.raises(DataError) as e:
        val.check_fits(n_val + 1, eval_batches=4, micro=2)
    msg = str(e.value)
    assert f"holds {n_val} tokens" in msg and f"data.seq_len={n_val + 1}" in msg
    assert f"<= {n_val}" in msg and "--val-frac" in msg
    with pytest.raises(DataError, match="the train split holds"):
        train.check_fits(len(train) + 1)
    assert train.check_fits(8) == len(train) // 8
    # fits, but val holds fewer windows than one evaluation asks for: usable, logged
    with caplog.at_level(logging.WARNING, logger="xatl_ds.data"):
        covered = val.check_fits(n_val // 2, eval_batches=4, micro=2)
    assert covered == 2 and "covers 2" in caplog.text
    assert val.check_fits(4, eval_batches=1, micro=2) == 2
    with pytest.raises(DataError, match="micro"):
        val.check_fits(4, micro=0)
