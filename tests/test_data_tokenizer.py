"""Tokenizer fingerprints: equal for the same tokenizer wherever it is saved and reloaded,
different for another vocabulary, and readable from a prepared dataset's meta.json."""
from __future__ import annotations

import json
import random
import shutil

import pytest

from xatl_ds import data as D
from xatl_ds.data import PrepareConfig, dataset_tokenizer_fingerprint, load_tokenizer, prepare, tokenizer_fingerprint
from xatl_ds.data.tokenizer import train_bpe

_WORDS = "alpha beta gamma delta epsilon zeta theta iota kappa lambda sigma omega river stone cloud light".split()


def _texts(seed: int, n: int = 200) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(_texts(0), 300)


def test_same_tokenizer_saved_and_reloaded_has_the_same_fingerprint(bpe, tmp_path):
    fp = tokenizer_fingerprint(bpe)
    assert len(fp) == 64 and int(fp, 16) >= 0
    bpe.save_pretrained(tmp_path / "a")
    again = load_tokenizer(tmp_path / "a")
    assert tokenizer_fingerprint(again) == fp
    # file paths do not enter it: a copy elsewhere, saved once more, is the same tokenizer
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")
    again.save_pretrained(tmp_path / "c")
    assert tokenizer_fingerprint(load_tokenizer(tmp_path / "elsewhere" / "b")) == fp
    assert tokenizer_fingerprint(load_tokenizer(tmp_path / "c")) == fp


def test_class_based_tokenizer_round_trips(bpe, tmp_path):
    """Pythia's tokenizer class, built from the same vocab/merges: stable through two saves."""
    from transformers import GPTNeoXTokenizer

    model = json.loads(bpe.backend_tokenizer.to_str())["model"]
    neox = GPTNeoXTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]],
                            eos_token=D.EOS_TOKEN, unk_token=D.EOS_TOKEN)  # fmt: skip
    neox.save_pretrained(tmp_path / "a")
    once = load_tokenizer(tmp_path / "a")
    once.save_pretrained(tmp_path / "b")
    assert type(once).__name__ == "GPTNeoXTokenizer"
    assert tokenizer_fingerprint(neox) == tokenizer_fingerprint(once) == tokenizer_fingerprint(load_tokenizer(tmp_path / "b"))


def test_different_tokenizers_differ(bpe):
    fp = tokenizer_fingerprint(bpe)
    assert tokenizer_fingerprint(train_bpe(_texts(0), 280)) != fp  # another vocab size
    assert tokenizer_fingerprint(train_bpe(_texts(1), 300)) != fp  # same size, other merges
    assert tokenizer_fingerprint(train_bpe(_texts(0), 300)) == fp  # training is deterministic
    from tokenizers import normalizers

    other = train_bpe(_texts(0), 300)
    other.backend_tokenizer.normalizer = normalizers.Lowercase()  # same vocab, other normalisation
    assert tokenizer_fingerprint(other) != fp


def test_dataset_fingerprint_from_meta_matches_its_tokenizer(tmp_path):
    ds = tmp_path / "ds"
    prepare(PrepareConfig(out=ds, max_chars=3000, vocab_size=300, val_frac=0.1, test_frac=0.1, unit_chars=512))
    meta = D.read_meta(ds)
    fp = tokenizer_fingerprint(load_tokenizer(ds))
    assert meta["tokenizer_fingerprint"] == fp == dataset_tokenizer_fingerprint(ds)
    # an external tokenizer: the dataset's fingerprint is the source tokenizer's own
    load_tokenizer(ds).save_pretrained(tmp_path / "tok")
    ext = tmp_path / "ext"
    prepare(PrepareConfig(out=ext, tokenizer=str(tmp_path / "tok"), max_chars=3000, val_frac=0.1, test_frac=0.1,
                          unit_chars=512))  # fmt: skip
    assert dataset_tokenizer_fingerprint(ext) == tokenizer_fingerprint(load_tokenizer(tmp_path / "tok")) == fp
    # a dataset prepared before meta.json recorded it: computed from DIR/tokenizer/
    for key in ("tokenizer_fingerprint", "tokenizer_fingerprint_version"):
        meta.pop(key)
    (ds / "meta.json").write_text(json.dumps(meta))
    assert dataset_tokenizer_fingerprint(ds) == fp
    with pytest.raises(D.DataError, match="not a prepared dataset"):
        dataset_tokenizer_fingerprint(tmp_path / "missing")
