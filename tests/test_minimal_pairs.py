"""The xatl_minpairs local task: deterministic minimal pairs cut from held-out sentences, real
sentence always gold, a random model at chance, a bigram model of the held-out text above it,
and lm-eval scoring each choice as a whole sentence after the prefix token."""
from __future__ import annotations

import gzip
import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from xatl_ds.data import BUILTIN_CORPUS_DIR
from xatl_ds.tasks import LOCAL_TASKS, build_tasks

WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    """A dataset dir holding only test.jsonl: 12k characters from the middle of each shipped
    book, cut into units at blank lines (the builder needs nothing else)."""
    d = tmp_path_factory.mktemp("heldout")
    units = []
    for f in sorted(BUILTIN_CORPUS_DIR.glob("*.txt.gz")):
        text = gzip.open(f, "rt", encoding="utf-8").read()
        part = text[len(text) // 2: len(text) // 2 + 12_000]
        part = part[part.index("\n\n") + 2:]  # start at a paragraph
        unit = ""
        for para in part.split("\n\n"):
            unit += para + "\n\n"
            if len(unit) > 2000:
                units.append({"text": unit.strip(), "source": f.name})
                unit = ""
    (d / "test.jsonl").write_text("".join(json.dumps(u) + "\n" for u in units))
    return d


@pytest.fixture(scope="module")
def tasks_dir(heldout) -> Path:
    return build_tasks(heldout)


def load(tasks_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (tasks_dir / "xatl_minpairs.jsonl").read_text().splitlines()]


def test_builder_is_deterministic_and_every_pair_is_minimal(heldout, tasks_dir, tmp_path):
    assert "xatl_minpairs" in LOCAL_TASKS and LOCAL_TASKS[:2] == ("xatl_lastword", "xatl_nextsent")
    again = build_tasks(heldout, tmp_path / "again")
    assert (again / "xatl_minpairs.jsonl").read_bytes() == (tasks_dir / "xatl_minpairs.jsonl").read_bytes()
    cfg = yaml.safe_load((tasks_dir / "xatl_minpairs.yaml").read_text())
    assert cfg["output_type"] == "multiple_choice" and cfg["target_delimiter"] == ""
    assert Path(cfg["dataset_kwargs"]["data_files"]["test"]) == (tasks_dir / "xatl_minpairs.jsonl").resolve()
    test_text = [json.loads(x)["text"] for x in (heldout / "test.jsonl").read_text().splitlines()]
    ex = load(tasks_dir)
    assert len(ex) >= 150 and {e["kind"] for e in ex} == {"swap", "replace"}
    assert 0.3 < sum(e["label"] for e in ex) / len(ex) < 0.7  # the real sentence is not always first
    for e in ex:
        real, fake = e["choices"][e["label"]], e["choices"][1 - e["label"]]
        assert e["context"] == "" and real == e["sentence"] and fake != real and len(fake) == len(real)
        assert any(real in u for u in test_text) and not any(fake in u for u in test_text)
        wr, wf = WORD.findall(real), WORD.findall(fake)
        diff = [i for i, (a, b) in enumerate(zip(wr, wf)) if a != b]
        assert len(wr) == len(wf) >= 6
        if e["kind"] == "swap":  # two adjacent words trade places, nothing else moves
            i, j = diff if len(diff) == 2 else (0, 0)
            assert len(diff) == 2 and j == i + 1 and (wr[i], wr[j]) == (wf[j], wf[i])
        else:  # one lowercase word replaced by another of the same length
            assert len(diff) == 1 and wf[diff[0]].islower() and len(wf[diff[0]]) == len(wr[diff[0]])


def _scores(ex: list[dict], test_text: list[str]):
    """Unigram and add-one bigram log-probabilities (counted on the held-out text itself) of
    each example's real and perturbed sentence."""
    words = [w.lower() for t in test_text for w in WORD.findall(t)]
    uni, bi = Counter(words), Counter(zip(words, words[1:]))
    V, N = len(uni), len(words)

    def unigram(s):
        return sum(math.log(uni[w.lower()] / N) for w in WORD.findall(s))

    def bigram(s):
        ws = [w.lower() for w in WORD.findall(s)]
        return sum(math.log((bi[(a, b)] + 1) / (uni[a] + V)) for a, b in zip(ws, ws[1:]))

    out = []
    for e in ex:
        real, fake = e["choices"][e["label"]], e["choices"][1 - e["label"]]
        out.append((e["kind"], unigram(real) - unigram(fake), bigram(real) - bigram(fake)))
    return out


def test_the_task_is_passable_by_word_order_not_by_word_frequency(heldout, tasks_dir):
    test_text = [json.loads(x)["text"] for x in (heldout / "test.jsonl").read_text().splitlines()]
    s = _scores(load(tasks_dir), test_text)
    # a bigram model of the held-out text prefers the real sentence almost always
    assert sum(d_bi > 0 for _, _, d_bi in s) / len(s) > 0.85
    # a unigram model cannot tell a swap (same words) and is near chance on replacements
    assert all(abs(d_uni) < 1e-9 for k, d_uni, _ in s if k == "swap")
    rep = [d_uni for k, d_uni, _ in s if k == "replace"]
    unigram_acc = sum(1.0 if d > 1e-9 else 0.5 if d > -1e-9 else 0.0 for d in rep) / len(rep)  # ties: a coin
    assert len(rep) >= 50 and 0.35 < unigram_acc < 0.65  # frequency-blind same-length words: ~0.75


@pytest.fixture(scope="module")
def random_run(tmp_path_factory, tiny_dataset) -> Path:
    """A tiny random XatlForCausalLM export with the tiny dataset's tokenizer (it memorised nothing)."""
    from xatl_ds.data import load_tokenizer
    from xatl_ds.models import XatlConfig, XatlForCausalLM

    torch.manual_seed(0)
    cfg = XatlConfig(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mixer="retnet",
                     attention_layers=[1], bos_token_id=0, eos_token_id=0, pad_token_id=0)  # fmt: skip
    run = tmp_path_factory.mktemp("run") / "random"
    XatlForCausalLM(cfg).eval().save_pretrained(run / "hf")
    load_tokenizer(tiny_dataset / "tokenizer").save_pretrained(run / "hf")
    return run


def test_random_model_is_at_chance_and_choices_are_scored_as_whole_sentences(random_run, heldout, tasks_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xatl_ds.evaluate import evaluate_run

    n = 160
    out = evaluate_run(random_run, tasks="xatl_minpairs", data_dir=heldout, limit=n, batch_size=16)
    m = out["tasks"]["xatl_minpairs"]
    acc, se = m["metrics"]["acc"]["value"], m["metrics"]["acc"]["stderr"]
    assert m["n_samples"] == n and 0 < se < 0.06
    assert abs(acc - 0.5) < 0.15  # chance, within ~4 standard errors
    # oracle: each choice's full log-likelihood after the prefix token (BOS = EOS here), no batching
    model = AutoModelForCausalLM.from_pretrained(random_run / "hf").eval()
    tok = AutoTokenizer.from_pretrained(random_run / "hf")
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    right = 0
    for e in load(tasks_dir)[:n]:
        lls = []
        for c in e["choices"]:
            ids = [prefix] + tok(c, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            lls.append(float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum()))
        right += int(max(range(2), key=lambda i: lls[i]) == e["label"])
    assert acc == pytest.approx(right / n)
