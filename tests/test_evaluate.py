"""lm-eval bridge: local tasks from a tiny prepared dataset, eval.json of a tiny XatlForCausalLM,
the lm-eval model class on Xatl and native GPT-NeoX dirs, and clear errors offline."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from xatl_ds.evaluate import EvalError, evaluate_run, resolve_tasks
from xatl_ds.tasks import LOCAL_TASKS, build_tasks


@pytest.fixture(scope="module")
def tok(tiny_dataset):
    from xatl_ds.data import load_tokenizer

    return load_tokenizer(tiny_dataset / "tokenizer")


@pytest.fixture(scope="module")
def xatl_run(tmp_path_factory, tiny_dataset, tok) -> Path:
    """A fake finished run: hf/ = a tiny random RetNet hybrid (attention in layer 1) + the
    dataset tokenizer, meta.json naming the dataset."""
    from xatl_ds.models import XatlConfig, XatlForCausalLM

    torch.manual_seed(0)
    cfg = XatlConfig(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mixer="retnet",
                     attention_layers=[1], bos_token_id=0, eos_token_id=0, pad_token_id=0)  # fmt: skip
    run = tmp_path_factory.mktemp("run") / "xatl"
    XatlForCausalLM(cfg).eval().save_pretrained(run / "hf")
    tok.save_pretrained(run / "hf")
    (run / "meta.json").write_text(json.dumps({"config": {"data": {"path": str(tiny_dataset)}}}))
    return run


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory, tok) -> Path:
    from conftest import build_tiny_source

    d = tmp_path_factory.mktemp("neox")
    build_tiny_source("neox").save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def evaluated(xatl_run):
    return evaluate_run(xatl_run, limit=6, batch_size=4)


def test_local_tasks_are_deterministic_and_held_out(tiny_dataset, tmp_path):
    a, b = build_tasks(tiny_dataset, tmp_path / "a"), build_tasks(tiny_dataset, tmp_path / "b")
    test_text = [json.loads(x)["text"] for x in (tiny_dataset / "test.jsonl").read_text().splitlines()]
    for t in LOCAL_TASKS:
        assert (a / f"{t}.jsonl").read_bytes() == (b / f"{t}.jsonl").read_bytes()
        cfg = yaml.safe_load((a / f"{t}.yaml").read_text())
        assert cfg["task"] == t and cfg["dataset_path"] == "json"
        assert Path(cfg["dataset_kwargs"]["data_files"]["test"]) == (a / f"{t}.jsonl").resolve()
    lw = [json.loads(x) for x in (a / "xatl_lastword.jsonl").read_text().splitlines()]
    assert len(lw) >= 5
    for e in lw:
        assert e["target"][0].isspace() and e["target"].strip() == e["word"] and e["word"].replace("'", "").isalpha()
        assert any(e["context"] + e["target"] in u for u in test_text)  # held-out text, verbatim
    ns = [json.loads(x) for x in (a / "xatl_nextsent.jsonl").read_text().splitlines()]
    assert len(ns) >= 5 and len({e["label"] for e in ns}) > 1  # the answer is not always first
    for e in ns:
        assert len(e["choices"]) == 4 and len(set(e["choices"])) == 4
        true = e["choices"][e["label"]]
        u = next(u for u in test_text if e["context"] in u)
        assert u.index(true, u.index(e["context"]) + len(e["context"])) > 0  # the sentence that follows
    # a second build with the same inputs reuses the folder, a changed test.jsonl is an error-free rebuild
    stamp = (a / "build.json").stat().st_mtime_ns
    assert build_tasks(tiny_dataset, a) == a and (a / "build.json").stat().st_mtime_ns == stamp


def test_eval_json_has_both_tasks_in_range(evaluated, xatl_run):
    saved = json.loads((xatl_run / "eval.json").read_text())
    assert saved == evaluated and saved["model_class"] == "XatlForCausalLM"
    assert set(saved["tasks"]) == set(LOCAL_TASKS) and saved["limit"] == 6 and saved["lm_eval_version"]
    lw, ns = saved["tasks"]["xatl_lastword"], saved["tasks"]["xatl_nextsent"]
    assert lw["n_samples"] == 6 and ns["n_samples"] == 6 and lw["version"] == 1.0
    assert 0 <= lw["metrics"]["acc"]["value"] <= 1 and lw["metrics"]["perplexity"]["value"] > 1
    for m in ("acc", "acc_norm"):
        assert 0 <= ns["metrics"][m]["value"] <= 1 and ns["metrics"][m]["stderr"] >= 0
    # same tasks and limit: skipped (file untouched)
    mtime = (xatl_run / "eval.json").stat().st_mtime_ns
    assert evaluate_run(xatl_run, limit=6) == saved and (xatl_run / "eval.json").stat().st_mtime_ns == mtime


def test_lastword_scores_match_an_unpadded_oracle(evaluated, xatl_run, tiny_dataset, tok):
    """lm-eval's batch of 4 (right-padded) gives the same perplexity and accuracy as scoring each
    example alone with the model directly."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(xatl_run / "hf").eval()
    docs = [json.loads(x) for x in (tiny_dataset / "tasks" / "xatl_lastword.jsonl").read_text().splitlines()][:6]
    lls, greedy = [], []
    for d in docs:
        whole = tok(d["context"] + d["target"])["input_ids"]
        ctx = tok(d["context"])["input_ids"]
        cont = whole[len(ctx):]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
        rows = logp[len(ctx) - 1: len(whole) - 1]
        lls.append(float(rows[torch.arange(len(cont)), torch.tensor(cont)].sum()))
        greedy.append(bool((rows.argmax(-1) == torch.tensor(cont)).all()))
    m = evaluated["tasks"]["xatl_lastword"]["metrics"]
    assert m["perplexity"]["value"] == pytest.approx(math.exp(-sum(lls) / len(lls)), rel=1e-4)
    assert m["acc"]["value"] == pytest.approx(sum(greedy) / len(greedy))


def test_lm_class_loads_xatl_and_native_neox(xatl_run, neox_dir):
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM

    cls = get_model("xatl")  # registered by importing xatl_ds.evaluate
    assert issubclass(cls, HFLM)
    a = cls(pretrained=str(xatl_run), device="cpu")  # a run dir resolves to its hf/
    assert type(a.model).__name__ == "XatlForCausalLM" and a.is_recurrent and a.tokenizer.padding_side == "right"
    b = cls(pretrained=str(neox_dir), device="cpu", batch_size=2)
    assert type(b.model).__name__ == "GPTNeoXForCausalLM" and not b.is_recurrent
    from lm_eval.api.instance import Instance

    reqs = [Instance("loglikelihood", {}, ("To be, or not", " to be"), 0),
            Instance("loglikelihood", {}, ("In the beginning God created the heaven", " and"), 1)]  # fmt: skip
    ll = b.loglikelihood(reqs, disable_tqdm=True)
    assert len(ll) == 2 and all(math.isfinite(x) and x < 0 for x, _ in ll)
    # generation: HFLM left-pads batches, which XatlForCausalLM rejects; ours goes one by one
    gen = [Instance("generate_until", {}, (ctx, {"until": ["\n\n"], "max_gen_toks": 3, "do_sample": False}), i)
           for i, ctx in enumerate(["To be", "In the beginning God created the heaven and"])]  # fmt: skip
    a.batch_size_per_gpu = 2
    with pytest.raises(ValueError, match="right padding"):
        HFLM.generate_until(a, gen, disable_tqdm=True)  # what plain HFLM would do
    outs = a.generate_until(gen, disable_tqdm=True)
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)
    with pytest.raises(EvalError, match="no model"):
        cls(pretrained=str(neox_dir.parent), device="cpu")


def test_unknown_task_offline_is_a_clear_error(xatl_run, tmp_path):
    with pytest.raises(EvalError, match=r"unknown lm-eval task.*no_such_task_xyz.*xatl_lastword"):
        evaluate_run(xatl_run, tasks="no_such_task_xyz", force=True)
    # a task whose data lives on the hub: offline (HF_HUB_OFFLINE=1 in conftest) it names the task
    inc = tmp_path / "inc"
    inc.mkdir()
    (inc / "remote.yaml").write_text(yaml.safe_dump({
        "task": "remote_only_task", "dataset_path": "no-such-org/no-such-dataset", "output_type": "loglikelihood",
        "test_split": "test", "doc_to_text": "text", "doc_to_target": "text",
    }))  # fmt: skip
    with pytest.raises(EvalError, match=r"remote_only_task.*could not load its data.*offline"):
        evaluate_run(xatl_run, tasks="remote_only_task", include_path=inc, force=True)
    assert json.loads((xatl_run / "eval.json").read_text())["requested_tasks"] == list(LOCAL_TASKS)


def test_task_aliases_and_cli(xatl_run, tmp_path, capsys):
    assert resolve_tasks("paper") == ["lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande"]
    assert resolve_tasks(None) == list(LOCAL_TASKS) and resolve_tasks("local,xatl_lastword") == list(LOCAL_TASKS)
    run = tmp_path / "copy"
    shutil.copytree(xatl_run / "hf", run / "hf")
    (run / "meta.json").write_text((xatl_run / "meta.json").read_text())
    from xatl_ds.cli import main

    assert main(["eval", str(run), "--tasks", "xatl_nextsent", "--limit", "3", "--batch-size", "3"]) == 0
    out = json.loads((run / "eval.json").read_text())
    assert list(out["tasks"]) == ["xatl_nextsent"] and out["tasks"]["xatl_nextsent"]["n_samples"] == 3
    assert "xatl_nextsent (n=3)" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "nothing")]) == 2 and "no hf/ export" in capsys.readouterr().err


def test_tqdm_disable_silences_lm_evals_bars(xatl_run, tmp_path, capfd, monkeypatch):
    """lm-eval hands tqdm an explicit ``disable=False``, which tqdm's own TQDM_DISABLE cannot
    override; the bridge honours it (XATL_NO_PROGRESS=1 sets it for long studies' logs)."""
    run = tmp_path / "copy"
    shutil.copytree(xatl_run / "hf", run / "hf")
    (run / "meta.json").write_text((xatl_run / "meta.json").read_text())
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    evaluate_run(run, tasks="xatl_nextsent", limit=3, batch_size=3, force=True)
    assert "Running loglikelihood requests" in capfd.readouterr().err, "the control: bars without the switch"
    monkeypatch.setenv("TQDM_DISABLE", "1")
    from transformers.utils import logging as hf_logging

    try:
        evaluate_run(run, tasks="xatl_nextsent", limit=3, batch_size=3, force=True)
    finally:
        hf_logging.enable_progress_bar()  # the bridge switched transformers' process-wide bar off: restore it
    err = capfd.readouterr().err
    assert "Running loglikelihood requests" not in err and "Tokenizing inputs" not in err, err[-2000:]
    assert "Loading weights" not in err, err[-2000:]
