"""Bad inputs fail before anything starts, with an error that names the field (or file, line
and column) and says what to write instead.

One table: each case runs one bad input and lists regexes that must all be in the message
(the field, then the fix). The YAML and JSON cases write a small file under ``tmp_path``.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from xatl_ds.config import ConfigError, RunConfig, check_ds_config, load_run_config, read_yaml_source

NAN, INF = float("nan"), float("inf")
XATL = {"init": {"kind": "xatl", "source": "some/source"}}


class CallerError(ValueError):
    """Stands for a caller's own error class (SweepError, StudyError) given to read_yaml_source."""


def cfg(*overrides: str, **sections):
    """Load a run config dict (plus ``-o`` overrides)."""
    return lambda tmp: load_run_config(dict(sections), list(overrides))


def cfg_file(text: str | bytes, name: str = "cfg.yaml"):
    """Write ``text`` to a run config file and load it."""
    def go(tmp: Path):
        p = tmp / name
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        load_run_config(p)
    return go


def other_file(text: str, what: str):
    """A sweep / study file read through read_yaml_source with the caller's error class."""
    def go(tmp: Path):
        p = tmp / "other.yaml"
        p.write_text(text)
        read_yaml_source(p, what, CallerError)
    go.error = CallerError
    return go


def ds_file(text: str):
    """A run config whose deepspeed.config is a file holding ``text``."""
    def go(tmp: Path):
        p = tmp / "bad.json"
        p.write_text(text)
        load_run_config({"deepspeed": {"config": str(p)}})
    return go


def direct(**fields):
    """A RunConfig built in code (no YAML coercion) and validated."""
    return lambda tmp: RunConfig(**fields).validate()


FLOPS = {"steps": None, "flops": 1e12}
CASES = [
    # -- numbers: finiteness and range --------------------------------------------------------
    ("flops-inf", cfg(budget={"steps": None, "flops": "inf"}), [r"budget\.flops=inf", r"finite number > 0", "e.g. 2.0e12"]),
    ("flops-1e400", cfg(budget={"steps": None, "flops": "1e400"}), [r"budget\.flops=inf", r"finite number > 0"]),
    ("flops-zero", cfg(budget={"steps": None, "flops": 0}), [r"budget\.flops=0\.0", r"> 0"]),
    ("steps-zero", cfg(budget={"steps": 0}), [r"budget\.steps=0", r"integer >= 1"]),
    ("tokens-negative", cfg(budget={"steps": None, "tokens": -5}), [r"budget\.tokens=-5", r"integer >= 1"]),
    ("grad-clip-nan", cfg(optim={"grad_clip": NAN}), [r"optim\.grad_clip=nan", r">= 0", "0 = off"]),
    ("grad-clip-negative", cfg(optim={"grad_clip": -1}), [r"optim\.grad_clip=-1\.0", "0 = off"]),
    ("eps-zero", cfg(optim={"eps": 0}), [r"optim\.eps=0\.0", r"> 0", "e.g. 1e-8"]),
    ("eps-nan", cfg(optim={"eps": NAN}), [r"optim\.eps=nan", "e.g. 1e-8"]),
    ("weight-decay-nan", cfg(optim={"weight_decay": NAN}), [r"^optim\.weight_decay=nan", r">= 0", "0 = off"]),
    ("weight-decay-negative", cfg(optim={"weight_decay": -0.1}), [r"optim\.weight_decay=-0\.1", "0 = off"]),
    ("seed-negative", cfg(seed=-1), [r"^seed=-1", "non-negative integer"]),
    ("seed-fraction", cfg(seed=1.5), [r"seed=1\.5 must be of type int", "whole number"]),
    ("seed-bool", direct(seed=True), [r"seed=True", "non-negative integer"]),
    ("lr-zero", cfg(optim={"lr": 0}), [r"optim\.lr=0\.0", r"> 0", "e.g. 3e-4"]),
    ("lr-nan", cfg(optim={"lr": NAN}), [r"optim\.lr=nan", "size table"]),
    ("betas-one", cfg(optim={"betas": [0.9, 1.0]}), [r"optim\.betas=\[0\.9, 1\.0\]", r"in \[0, 1\)", r"e\.g\. \[0\.9, 0\.95\]"]),
    ("betas-short", cfg(optim={"betas": [0.9]}), [r"optim\.betas=\[0\.9\]", "two numbers"]),
    ("betas-nan", cfg(optim={"betas": [NAN, 0.95]}), [r"optim\.betas=\[nan, 0\.95\]", "two numbers"]),
    ("min-lr-ratio-high", cfg(optim={"min_lr_ratio": 1.5}), [r"optim\.min_lr_ratio=1\.5", r"in \[0, 1\]", "cosine floor"]),
    ("min-lr-ratio-nan", cfg(optim={"min_lr_ratio": NAN}), [r"optim\.min_lr_ratio=nan", r"\[0, 1\]"]),
    ("warmup-negative", cfg(optim={"warmup_steps": -1}), [r"optim\.warmup_steps=-1", r"integer >= 0", "0 = no warmup"]),
    ("batch-zero", cfg(data={"batch_size": 0}), [r"data\.batch_size=0", r"integer >= 1", "e.g. 16"]),
    ("seq-len-negative", cfg(data={"seq_len": -3}), [r"data\.seq_len=-3", r"integer >= 1"]),
    ("micro-zero", cfg(data={"micro_batch_size": 0}), [r"data\.micro_batch_size=0", "omit it"]),
    ("micro-not-divisor", cfg(data={"batch_size": 16, "micro_batch_size": 5}),
     [r"data\.micro_batch_size=5 does not divide data\.batch_size=16", "divisor"]),
    ("eval-every-zero", cfg(eval={"every": 0}), [r"eval\.every=0", r"integer >= 1"]),
    ("eval-batches-negative", cfg(eval={"batches": -1}), [r"eval\.batches=-1", r"integer >= 1"]),
    ("checkpoint-every-zero", cfg(checkpoint={"every": 0}), [r"checkpoint\.every=0", r"integer >= 1"]),
    ("checkpoint-keep-zero", cfg(checkpoint={"keep": 0}), [r"checkpoint\.keep=0", r"integer >= 1"]),
    ("log-every-zero", cfg(log_every=0), [r"log_every=0", r"integer >= 1"]),
    ("freeze-threshold-nan", cfg(freeze={"threshold": NAN}), [r"freeze\.threshold=nan", "finite number > 0"]),
    ("freeze-window-zero", cfg(freeze={"window": 0}), [r"freeze\.window=0", r"integer >= 1"]),
    ("freeze-patience-zero", cfg(freeze={"patience": 0}), [r"freeze\.patience=0", r"integer >= 1"]),
    ("freeze-rewarmup-negative", cfg(freeze={"rewarmup_steps": -1}), [r"freeze\.rewarmup_steps=-1", r"integer >= 0"]),
    ("d-state-zero", cfg(model={"d_state": 0}), [r"model\.d_state=0", "e.g. 16"]),
    ("expand-negative", cfg(model={"expand": -1}), [r"model\.expand=-1", "e.g. 2"]),
    ("vocab-zero", cfg(model={"vocab_size": 0}), [r"model\.vocab_size=0", "tokenizer"]),
    ("chunk-size-nan", cfg(model={"chunk_size": NAN}), [r"model\.chunk_size=nan must be of type int", "whole number"]),
    # -- settings that would silently do nothing --------------------------------------------
    ("freeze-steps-past-steps", cfg(**XATL, freeze={"policy": "fixed", "steps": [250]}, budget={"steps": 200}),
     [r"freeze\.steps\[0\]=250", r"200 steps from budget\.steps", "never unfreeze", "below 200"]),
    ("freeze-steps-past-tokens",
     cfg(**XATL, freeze={"policy": "fixed", "unfreeze_order": [["mlp"], ["all"]], "steps": [2, 10]},
         data={"batch_size": 4, "seq_len": 8}, budget={"steps": None, "tokens": 320}),
     [r"freeze\.steps\[1\]=10", r"10 steps from budget\.tokens", "longer budget"]),
    ("empty-name", cfg(name=""), [r"^name=''", "non-empty string"]),
    ("empty-data-path", cfg(data={"path": " "}), [r"data\.path=' '", "non-empty string"]),
    ("xatl-no-components", cfg(init={"kind": "xatl", "source": "s", "components": []}),
     [r"init\.components is empty", "init.kind: scratch"]),
    ("xatl-component-twice", cfg(init={"kind": "xatl", "source": "s", "components": ["mlp", "mlp"]}),
     [r"init\.components names \['mlp'\] more than once", "once"]),
    # -- YAML files ----------------------------------------------------------------------------
    ("run-file-empty", cfg_file(""), [r"run config '.*cfg\.yaml' is empty", "needs at least one field"]),
    ("run-file-comments-only", cfg_file("# nothing here\n\n# still nothing\n"), [r"cfg\.yaml' is empty \(or only comments\)", "model: {size: tiny}"]),
    ("run-file-duplicate-key", cfg_file("optim:\n  lr: 0.001\n  lr: 0.002\n"),
     [r"cfg\.yaml', line 3, column 3: duplicate key 'lr' \(first at line 2\)", "keep one of them"]),
    ("run-file-duplicate-section", cfg_file("model: {size: tiny}\nseed: 1\nmodel: {size: micro}\n"),
     [r"line 3, column 1: duplicate key 'model' \(first at line 1\)", "keep one"]),
    ("run-file-syntax", cfg_file("model:\n  size: tiny\n  mixer: [mamba\nseed: 1\n"),
     [r"cfg\.yaml', line \d+, column \d+: ", "fix the YAML syntax there"]),
    ("run-file-bad-indent", cfg_file("model:\n  size: tiny\n mixer: mamba\n"),
     [r"cfg\.yaml', line 3, column 2: ", "indentation"]),
    ("run-file-list", cfg_file("- model\n- seed\n"), [r"cfg\.yaml' must be a mapping", "got a list"]),
    ("run-file-not-utf8", cfg_file(b"name: \xff\xfe\n"), [r"cfg\.yaml' is not UTF-8", "save it as UTF-8"]),
    ("run-file-missing", lambda tmp: load_run_config(tmp / "nope.yaml"),
     [r"run config '.*nope\.yaml' does not exist", "check the path"]),
    ("run-file-unknown-field", cfg_file("optim:\n  lrr: 0.1\n"), [r"optim\.lrr", r"did you mean 'lr'\?", "valid fields of optim"]),
    # -- YAML through the caller's error class ------------------------------------------------
    ("sweep-file-empty", other_file("# a sweep\n", "sweep file"), [r"sweep file '.*other\.yaml' is empty", "needs at least one setting"]),
    ("sweep-file-duplicate", other_file("base:\n  seed: 1\naxes:\n  seed: [1]\n  seed: [2]\n", "sweep file"),
     [r"line 5, column 3: duplicate key 'seed' \(first at line 4\)", "keep one"]),
    ("study-file-syntax", other_file("search_space: {optim.lr: {type: float\n", "study file"),
     [r"study file '.*other\.yaml', line 2, column 1: ", "fix the YAML syntax"]),
    ("study-file-scalar", other_file("just text\n", "study file"), [r"study file .* must be a mapping", "got a str"]),
    # -- overrides (-o key=value) ----------------------------------------------------------------
    ("override-syntax", cfg("model.attention_layers=[1,"),
     [r"override 'model\.attention_layers=\[1,': the value is not valid YAML \(line 1, column 4", "close its brackets"]),
    ("override-duplicate", cfg("model={size: tiny, size: micro}"), [r"duplicate key 'size'", "keep one"]),
    ("override-not-a-section", cfg("optim.lr.x=1", optim={"lr": 0.1}),
     [r"override 'optim\.lr\.x=1': optim\.lr\.x: optim\.lr is not a section \(it holds 0\.1\)", "set optim.lr itself"]),
    ("override-no-equals", cfg("seed"), [r"override 'seed' must look like section\.field=value", "e.g. optim.lr=3e-4"]),
    ("override-empty-part", cfg("optim..lr=1"), [r"key 'optim\.\.lr' must be dotted field names", "such as optim.lr"]),
    ("override-bad-value", cfg("optim.eps=-1"), [r"optim\.eps=-1\.0", "e.g. 1e-8"]),
    # -- DeepSpeed JSON ------------------------------------------------------------------------
    ("ds-not-json", ds_file('{\n  "train_batch_size": 8,\n  "zero_optimization": {"stage": 2,}\n}\n'),
     [r"deepspeed\.config '.*bad\.json' is not valid JSON: line 3, column \d+", "no trailing commas"]),
    ("ds-yaml-not-json", ds_file("zero_optimization:\n  stage: 2\n"), [r"bad\.json' is not valid JSON: line 1, column 1", "double quotes"]),
    ("ds-list", ds_file("[1, 2]"), [r"bad\.json' must be a JSON object", "got a list"]),
    ("ds-unknown-key", ds_file('{"zero_optimisation": {"stage": 2}}'),
     [r"unknown top-level key\(s\) \['zero_optimisation'\] \(did you mean 'zero_optimization'\?\)", r"valid keys: \[.*'zero_optimization'"]),
    ("ds-not-deepspeed", ds_file('{"model": "gpt2", "lr": 0.1}'), [r"unknown top-level key\(s\) \['lr', 'model'\]", "valid keys"]),
    ("ds-stage-4", ds_file('{"zero_optimization": {"stage": 4}}'), [r"zero_optimization\.stage=4", "0, 1, 2 or 3"]),
    ("ds-stage-string", ds_file('{"zero_optimization": {"stage": "2"}}'), [r"zero_optimization\.stage='2'", "0, 1, 2 or 3"]),
    ("ds-zero-not-object", ds_file('{"zero_optimization": 2}'), [r"zero_optimization must be an object", r'\{"stage": 2\}']),
    ("ds-dict-unknown", lambda tmp: check_ds_config({"gradient_clip": 1.0}),
     [r"the DeepSpeed config has unknown top-level key\(s\) \['gradient_clip'\]", "gradient_clipping"]),
    ("ds-missing", cfg(deepspeed={"config": "zero9.json"}),
     [r"deepspeed\.config='zero9\.json' not found", r"one of \[.*'zero2\.json'"]),
]


@pytest.mark.parametrize("run, needles", [pytest.param(r, n, id=i) for i, r, n in CASES])
def test_bad_input_names_field_and_fix(tmp_path, run, needles):
    expected = getattr(run, "error", ConfigError)
    with pytest.raises(Exception) as err:
        run(tmp_path)
    msg = str(err.value)
    assert type(err.value) is expected, f"{err.typename} instead of {expected.__name__}: {msg}"
    for needle in needles:
        assert re.search(needle, msg), f"{needle!r} not in {msg!r}"


def test_table_is_large_and_ids_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("what", ["sweep file", "study file"])
def test_caller_error_class_is_used(tmp_path, what):
    p = tmp_path / "x.yaml"
    p.write_text("a: 1\na: 2\n")
    with pytest.raises(CallerError, match=f"{what} .*line 2, column 1: duplicate key 'a'"):
        read_yaml_source(p, what, CallerError)
    p.write_text("")
    with pytest.raises(CallerError, match="is empty"):
        read_yaml_source(p, what, CallerError)
    assert read_yaml_source(p, what, CallerError, allow_empty=True) == ({}, p)


def test_kernels_cuda_refused_without_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"model\.kernels='cuda' needs CUDA.*use kernels: auto"):
        load_run_config({"model": {"kernels": "cuda"}})
    # a run meant for another host validates without the machine check
    assert load_run_config({"model": {"kernels": "cuda"}}, machine_checks=False).model.kernels == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert load_run_config({"model": {"kernels": "cuda"}}).model.kernels == "cuda"


def test_what_stays_valid(tmp_path):
    """The checks refuse only what is wrong: these are all accepted."""
    # a FLOP budget cannot bound freeze.steps up front (documented on budget.flops)
    c = load_run_config({**XATL, "freeze": {"policy": "fixed", "steps": [10**6]}, "budget": FLOPS})
    assert c.total_steps() is None and c.freeze.steps == [10**6]
    # the last step of a step budget may still unfreeze; scratch runs ignore freeze settings
    assert load_run_config({**XATL, "freeze": {"policy": "fixed", "steps": [199]}}).total_steps() == 200
    assert load_run_config({"freeze": {"policy": "fixed", "steps": [500]}}).init.kind == "scratch"
    # YAML reads 2e9 as a string: int and float fields take it
    c = load_run_config({"budget": {"steps": None, "tokens": "2e9"}, "optim": {"lr": "3e-4"}})
    assert c.budget.tokens == 2_000_000_000 and c.optim.lr == 3e-4
    assert c.total_steps() == math.ceil(2e9 / (16 * 256))
    # zero values where 0 means "off"
    c = load_run_config({"optim": {"grad_clip": 0, "weight_decay": 0, "warmup_steps": 0, "min_lr_ratio": 0}})
    assert c.optim.grad_clip == 0.0
    # merge keys may be overridden explicitly (not a duplicate)
    p = tmp_path / "merge.yaml"
    p.write_text("base: &b {seq_len: 64, batch_size: 8}\ndata:\n  <<: *b\n  batch_size: 4\n")
    data, _ = read_yaml_source(p, "file")
    assert data["data"] == {"seq_len": 64, "batch_size": 4}
    # a file with one setting is not empty
    p.write_text("# comment\nseed: 3\n")
    assert load_run_config(p).seed == 3


def test_yaml_reader_constructs_no_objects(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("seed: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match=r"evil\.yaml', line 1, column 7: .*python/object/apply"):
        load_run_config(p)


def test_shipped_ds_configs_pass_the_check():
    from xatl_ds.config import packaged_dir

    names = sorted(x.name for x in packaged_dir("ds_configs").iterdir() if x.name.endswith(".json"))
    assert "zero2.json" in names
    for name in names:
        ds = check_ds_config(name)
        assert ds["zero_optimization"]["stage"] in (0, 1, 2, 3)
        assert ds == json.loads((Path(__file__).resolve().parent.parent / "ds_configs" / name).read_text())
