"""A dry run means "this will start": every input a launched rank or the launcher would refuse
is refused by ``xatl-ds train --dry-run`` / ``xatl-ds sweep run --dry-run`` first, with exit
code 2, a message naming the field, file or option and the fix, no traceback, nothing written
and no process started.

One table of cases, each a run config (plus ``-o`` overrides and launch options) on the tiny
dataset; this node is made a CPU node without GPUs (``cuda_devices`` -> 0) so the cases do not
depend on the machine.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

import xatl_ds.preflight as preflight_mod
from xatl_ds.cli import main
from xatl_ds.config import load_run_config
from xatl_ds.rundir import RunDir


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory, tiny_dataset):
    from conftest import build_tiny_source

    path = tmp_path_factory.mktemp("src")
    build_tiny_source("neox").save_pretrained(path)  # no tokenizer files: the data's is assumed (a warning)
    return path


@pytest.fixture
def cpu_node(monkeypatch):
    """No GPUs on this node, a CPU without fp16 in DeepSpeed (most CPUs: DeepSpeed's CPU
    accelerator says fp16 only where AVX512-FP16/AMX is present), and no launch may start."""
    import xatl_ds.executor as executor

    monkeypatch.setattr(preflight_mod, "cuda_devices", lambda: 0)
    monkeypatch.setattr("xatl_ds.sweep.cuda_devices", lambda: 0)
    monkeypatch.setattr(type(_cpu_accelerator()), "is_fp16_supported", lambda self: False)

    def refuse(*a, **k):
        raise AssertionError("a launch started")

    monkeypatch.setattr(executor.Launch, "start", refuse)
    monkeypatch.setattr(executor, "run_foreground", refuse)


def base(tmp: Path, dataset: Path, **over) -> dict:
    cfg = {"name": "r", "out_dir": str(tmp / "out"), "model": {"size": "micro", "mixer": "retnet"},
           "data": {"path": str(dataset), "seq_len": 32, "batch_size": 4}, "budget": {"steps": 4},
           "eval": {"every": 2, "batches": 2}}  # fmt: skip
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def xatl(src) -> dict:
    return {"init": {"kind": "xatl", "source": str(src)}}


def finished_of(**edit):
    """The run folder holds a finished run of the config before ``edit`` (an extended run)."""
    def prepare(tmp, data, cfg):
        old = load_run_config(base(tmp, data))
        rd = RunDir(old.out_dir)
        rd.write_json(RunDir.META, {"config_hash": old.content_hash()})
        rd.mark_done()
        cfg.update(base(tmp, data, **edit))
    return prepare


def checkpoints_of_other(tmp, data, cfg):
    old = load_run_config(base(tmp, data, optim={"lr": 1e-3}))
    rd = RunDir(old.out_dir)
    rd.checkpoints.mkdir(parents=True)
    (rd.checkpoints / "latest").write_text("step00000002")
    rd.config.write_text(old.to_yaml())


def ds_file(text):
    def prepare(tmp, data, cfg):
        (tmp / "ds.json").write_text(text)
        cfg["deepspeed"] = {"config": str(tmp / "ds.json")}
    return prepare


def hostfile(text):
    def prepare(tmp, data, cfg):
        (tmp / "hosts").write_text(text)
    return prepare


def pickle_source(tmp, data, cfg):
    src = tmp / "pickled"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}))
    (src / "pytorch_model.bin").write_bytes(b"not loaded")
    cfg.update(base(tmp, data, **xatl(src)))


def _cpu_accelerator():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def test_fp16_on_a_cpu_follows_deepspeeds_accelerator(tmp_path, tiny_dataset, monkeypatch):
    """Where DeepSpeed's CPU accelerator supports fp16 (CPUs with AVX512-FP16/AMX, such as the
    project's own machine), a launch trains in fp16, so the preflight must accept it; elsewhere
    it is refused (the CASES above)."""
    cfg = load_run_config(base(tmp_path, tiny_dataset, deepspeed={"precision": "fp16"}))
    acc = type(_cpu_accelerator())
    monkeypatch.setattr(acc, "is_fp16_supported", lambda self: True)
    assert preflight_mod.check_precision(cfg, gpus=0) == "fp16"
    monkeypatch.setattr(acc, "is_fp16_supported", lambda self: False)
    with pytest.raises(preflight_mod.PreflightError, match="does not support fp16 on this machine"):
        preflight_mod.check_precision(cfg, gpus=0)


# id, config sections (SRC: the tiny source), prepare(tmp, data, cfg) or None, CLI extra args, regexes
CASES = [
    ("source-missing", xatl("{tmp}/nope"), None, [], [r"init\.source='.*nope'", "does not exist", "save_pretrained"]),
    ("source-placeholder", xatl("@source"), None, [], [r"init\.source='@source' is a placeholder", "sweeps and studies"]),
    ("source-pickle-only", {}, pickle_source, [], [r"init\.source=.*pickled", "only pickle weights", "never loads"]),
    ("source-too-few-layers", {**xatl("SRC"), "model": {"mixer": "retnet", "attention_layers": [7]}}, None, [],
     [r"model \(with init\.source", r"7"]),
    ("source-seq-len", {**xatl("SRC"), "data": {"seq_len": 256}}, None, [], [r"data\.seq_len=256 is longer", "<= 128"]),
    ("teacher-missing", {**xatl("SRC"), "distill": {"enabled": True, "teacher": "{tmp}/no-teacher"}}, None, [],
     [r"distill\.teacher='.*no-teacher'", "does not exist"]),
    ("teacher-not-alignable", {"align": {"enabled": True, "steps": 2}, **xatl("SRC"),
                               "distill": {"teacher": "SRC_LLAMA"}}, None, [],
     [r"align\.enabled needs a teacher with the student's blocks", "family"]),
    ("scratch-vocab-small", {"model": {"vocab_size": 10}}, None, [], [r"model\.vocab_size=10 is smaller than the dataset's"]),
    ("fp16-on-cpu", {"deepspeed": {"precision": "fp16"}}, None, [], [r"deepspeed\.precision='fp16'", "does not support fp16",
                                                                      "fp32"]),
    ("world-vs-batch", {}, None, ["--num-gpus", "3"], [r"data\.batch_size=4 is not divisible by the 3 ranks", "multiple"]),
    ("world-vs-micro", {"data": {"micro_batch_size": 4}}, None, ["--num-gpus", "2"],
     [r"data\.micro_batch_size=4 does not divide the per-rank batch 2"]),
    ("num-gpus-zero", {}, None, ["--num-gpus", "0"], [r"--num-gpus 0: a run needs at least one", "omit --num-gpus"]),
    ("num-nodes-without-hostfile", {}, None, ["--num-nodes", "2"], [r"--num-nodes 2 needs --hostfile"]),
    ("hostfile-missing", {}, None, ["--hostfile", "{tmp}/nohosts"], [r"--hostfile '.*nohosts' does not exist", "slots=N"]),
    ("hostfile-malformed", {}, hostfile("node1 gpus=4\n"), ["--hostfile", "{tmp}/hosts"],
     [r"--hostfile '.*hosts', line 1: 'node1 gpus=4' is not 'HOST slots=N'"]),
    ("hostfile-too-few-nodes", {}, hostfile("node1 slots=2\n"), ["--hostfile", "{tmp}/hosts", "--num-nodes", "2"],
     [r"--num-nodes 2, but --hostfile .* names 1 host"]),
    ("launcher-not-installed", {}, hostfile("node1 slots=2\nnode2 slots=2\n"),
     ["--hostfile", "{tmp}/hosts", "--launcher", "slurm"], [r"--launcher slurm runs 'srun', which is not installed"]),
    ("ds-nested-typo", {}, ds_file('{"zero_optimization": {"stage": 2, "overlap_com": true}}'), [],
     [r"zero_optimization\.overlap_com", r"did you mean 'overlap_comm'\?", "fix or remove"]),
    ("ds-nested-type", {}, ds_file('{"zero_optimization": {"stage": 2, "reduce_bucket_size": "big"}}'), [],
     [r"zero_optimization\.reduce_bucket_size='big'", "integer"]),
    ("finished-run-extended", {}, finished_of(budget={"steps": 8}), [],
     [r"holds a finished run of a different config", "extending a budget", "another out_dir"]),
    ("checkpoints-of-other-config", {}, checkpoints_of_other, [],
     [r"holds checkpoints of a different run config", "would not resume", "delete"]),
    ("data-missing", {"data": {"path": "{tmp}/no-data"}}, None, [], [r"data\.path='.*no-data'"]),
]


def _fill(obj, subs: dict):
    if isinstance(obj, dict):
        return {k: _fill(v, subs) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fill(v, subs) for v in obj]
    if isinstance(obj, str):
        if obj in subs:
            return subs[obj]
        return obj.replace("{tmp}", subs["{tmp}"])
    return obj


@pytest.fixture(scope="module")
def llama_source(tmp_path_factory):
    from conftest import build_tiny_source

    path = tmp_path_factory.mktemp("llama")
    build_tiny_source("llama").save_pretrained(path)
    return path


@pytest.mark.parametrize("sections, prepare, extra, needles", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_dry_run_refuses_what_a_launch_would(tmp_path, tiny_dataset, source_dir, llama_source, cpu_node, capsys,
                                             sections, prepare, extra, needles):  # fmt: skip
    subs = {"{tmp}": str(tmp_path), "SRC": str(source_dir), "SRC_LLAMA": str(llama_source)}
    cfg = base(tmp_path, tiny_dataset, **_fill(sections, subs))
    if prepare is not None:
        prepare(tmp_path, tiny_dataset, cfg)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc = main(["train", str(path), "--dry-run", *_fill(extra, subs)])
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert "Traceback" not in err and out == ""
    assert err.startswith("xatl-ds train: bad config: ")
    for needle in needles:
        assert re.search(needle, err), f"{needle!r} not in {err!r}"
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert after == sorted([*before, Path("run.yaml")]), "a refused dry run writes nothing"


def test_table_covers_the_issue():
    ids = {c[0] for c in CASES}
    assert {"source-missing", "fp16-on-cpu", "world-vs-batch", "num-gpus-zero", "hostfile-missing", "ds-nested-typo",
            "finished-run-extended"} <= ids  # fmt: skip
    assert len(ids) == len(CASES)


def test_good_config_passes_and_prints_the_command(tmp_path, tiny_dataset, source_dir, cpu_node, capsys):
    cfg = base(tmp_path, tiny_dataset, **xatl(source_dir), distill={"enabled": True})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--dry-run", "--num-gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"--num_gpus 2 --master_port \d+ --module xatl_ds.train --config \S+run.yaml$", out.strip()), out
    assert not (tmp_path / "out").exists()
    # a finished run of this very config passes (the trainer says "nothing to do")
    c = load_run_config(path)
    rd = RunDir(c.out_dir)
    rd.write_json(RunDir.META, {"config_hash": c.content_hash()})
    rd.mark_done()
    assert main(["train", str(path), "--dry-run"]) == 0


def test_bf16_needs_a_recent_gpu(tmp_path, tiny_dataset, monkeypatch):
    from xatl_ds.preflight import PreflightError, check_precision

    cfg = load_run_config(base(tmp_path, tiny_dataset, deepspeed={"precision": "auto"}))
    monkeypatch.setattr(preflight_mod, "_gpu_compute_capability", lambda: 7.0)
    with pytest.raises(PreflightError, match=r"bf16, which needs a GPU of compute capability 8\.0.*7\.0"):
        check_precision(cfg, gpus=1)
    monkeypatch.setattr(preflight_mod, "_gpu_compute_capability", lambda: 9.0)
    assert check_precision(cfg, gpus=1) == "bf16"
    assert check_precision(cfg, gpus=0) == "fp32"


def test_launch_world_sizes(tmp_path):
    from xatl_ds.executor import LaunchOptions
    from xatl_ds.preflight import PreflightError, check_launch

    assert check_launch(LaunchOptions(), gpus=0) == 1
    assert check_launch(LaunchOptions(), gpus=4) == 4
    assert check_launch(LaunchOptions(num_gpus=2), gpus=0) == 2
    assert check_launch(LaunchOptions(include="localhost:1,3"), gpus=4) == 2
    with pytest.raises(PreflightError, match=r"--num-gpus 8, but this node has 4 GPUs"):
        check_launch(LaunchOptions(num_gpus=8), gpus=4)
    with pytest.raises(PreflightError, match=r"--include 'localhost:5' names device\(s\) \['5'\]"):
        check_launch(LaunchOptions(include="localhost:5"), gpus=4)
    hosts = tmp_path / "hosts"
    hosts.write_text("# two nodes\nlocalhost slots=2\n")
    assert check_launch(LaunchOptions(hostfile=str(hosts)), gpus=0) == 2


SWEEP = """
name: sw
out_dir: {out}
source:
  name: src
  model: {{size: micro, mixer: attention}}
  budget: {{steps: 4}}
base:
  model: {{size: micro, mixer: retnet}}
  init: {{source: "{ref}"}}
  data: {{path: {data}, seq_len: 32, batch_size: 4}}
  budget: {{steps: 4}}
  eval: {{every: 2, batches: 2}}
axes:
  init:
    - {{label: scratch, init.kind: scratch}}
    - {{label: xatl, init.kind: xatl}}
"""


@pytest.mark.parametrize("ref, extra, needles", [
    pytest.param("@sourc", [], [r"run xatl: init\.source='@sourc' is not a placeholder", "'@source'"], id="source-typo"),
    pytest.param("@source", ["--num-gpus", "0"], [r"--num-gpus 0"], id="num-gpus-zero"),
    pytest.param("@source", ["--num-gpus", "3"], [r"data\.batch_size=4 is not divisible by the 3 ranks"], id="world"),
    pytest.param("@source", ["--hostfile", "/nonexistent/hosts"], [r"--hostfile '/nonexistent/hosts' does not exist"],
                 id="hostfile"),
])  # fmt: skip
def test_sweep_dry_run_refuses(tmp_path, tiny_dataset, cpu_node, capsys, ref, extra, needles):
    f = tmp_path / "sw.yaml"
    f.write_text(SWEEP.format(out=tmp_path / "sw", ref=ref, data=tiny_dataset))
    rc = main(["sweep", "run", str(f), "--dry-run", *extra])
    out, err = capsys.readouterr()
    assert rc == 2 and "Traceback" not in err, (out, err)
    for needle in needles:
        assert re.search(needle, err), f"{needle!r} not in {err!r}"
    assert not (tmp_path / "sw").exists()


def test_sweep_dry_run_passes(tmp_path, tiny_dataset, cpu_node, capsys):
    f = tmp_path / "sw.yaml"
    f.write_text(SWEEP.format(out=tmp_path / "sw", ref="@source", data=tiny_dataset))
    assert main(["sweep", "run", str(f), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("--module xatl_ds.train") == 3
    assert not (tmp_path / "sw").exists()
