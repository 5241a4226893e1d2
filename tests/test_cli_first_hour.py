"""The first hour with xatl-ds: --version, `sweep list`, shipped studies found by name (and kept
apart from sweeps), dry-run commands that run as printed, the example run config for one's own
model and text, where a finished run's outputs are, no DeepSpeed op compiled at a launch, and a
closed stdout pipe ending quietly."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, train_env
from xatl_ds.cli import main

XATL_DS = str(Path(sys.executable).parent / "xatl-ds")


def test_version(capsys):
    from xatl_ds import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"xatl-ds {__version__}"


def test_sweep_list_keeps_sweeps_and_studies_apart(capsys):
    assert main(["sweep", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    i = out.index("studies (xatl-ds tune NAME)")
    assert out[0] == "sweeps (xatl-ds sweep run NAME)"
    sweeps = [x.split()[0] for x in out[1:i]]
    studies = [x.split()[0] for x in out[i + 1:]]
    assert sweeps == sorted(p.stem for p in (REPO / "sweeps").glob("*.yaml")) and "smoke" in sweeps
    assert studies == sorted(p.stem for p in (REPO / "sweeps" / "studies").glob("*.yaml"))
    assert "lit_search" in studies and "lit_search" not in sweeps
    assert all(len(x.split()) > 2 for x in out if x.startswith("  ")), "every entry has its summary"


@pytest.mark.parametrize("value, expected", [("1", "1"), (None, None)])
def test_no_progress_switch_also_silences_library_bars(capsys, monkeypatch, value, expected):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    if value is None:
        monkeypatch.delenv("XATL_NO_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("XATL_NO_PROGRESS", value)
    assert main(["sweep", "list"]) == 0
    assert os.environ.get("TQDM_DISABLE") == expected  # tqdm's switch (the lm-eval bridge honours it)
    assert os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == expected  # transformers' weight-loading bar


def test_studies_by_name_and_not_as_sweeps(capsys, tmp_path, monkeypatch):
    from xatl_ds.config import ConfigError, study_file_path, sweep_file_path
    from xatl_ds.tune import load_study

    monkeypatch.chdir(tmp_path)  # names resolve from anywhere
    for name in ("lit_search", "lit_search.yaml", "sweeps/studies/lit_search.yaml", "studies/lit_search.yaml"):
        assert study_file_path(name) == study_file_path("lit_search"), name
    assert load_study(study_file_path("ladder_lit_mini")).study_name == "ladder_lit_mini"
    with pytest.raises(ConfigError, match="'lit_search' is a shipped study: xatl-ds tune lit_search"):
        sweep_file_path("lit_search")
    assert main(["sweep", "run", "lit_search", "--dry-run"]) == 2
    assert "is a shipped study" in capsys.readouterr().err
    assert main(["tune", "smoke"]) == 2
    err = capsys.readouterr().err
    assert "'smoke' is a shipped sweep: xatl-ds sweep run smoke" in err and "lit_search" in err


def _sweep_file(tmp_path: Path, data: Path) -> Path:
    f = tmp_path / "sw.yaml"
    f.write_text(yaml.safe_dump({
        "name": "first", "out_dir": str(tmp_path / "sw"),
        "source": {"model": {"size": "micro"}, "budget": {"steps": 2}},
        "base": {"model": {"size": "micro", "mixer": "retnet"}, "init": {"source": "@source"},
                 "data": {"path": str(data), "seq_len": 32, "batch_size": 4}, "budget": {"steps": 2},
                 "eval": {"every": 2, "batches": 1}, "deepspeed": {"config": "zero0.json"}},
        "axes": {"init": [{"label": "scratch", "init.kind": "scratch"}, {"label": "xatl", "init.kind": "xatl"}]},
    }))  # fmt: skip
    return f


def test_dry_run_commands_run_as_printed(tmp_path, tiny_dataset, capsys):
    from xatl_ds.process_setup import DS_CPU_OP

    f = _sweep_file(tmp_path, tiny_dataset)
    assert main(["sweep", "run", str(f), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    cmds = [shlex.split(x) for x in lines if not x.startswith("#")]
    assert len(cmds) == 3 and not (tmp_path / "sw").exists(), "a dry run writes nothing under the sweep root"
    for c in cmds:
        assert Path(c[-1]).is_file() and c[-2] == "--config"
    ports = [c[c.index("--master_port") + 1] for c in cmds]
    assert len(set(ports)) == 3, "each printed command has its own free port, not DeepSpeed's shared 29500"
    # the first (the source) exactly as printed, through the launcher, in a fresh extension cache:
    # a CPU rank compiles nothing of DeepSpeed's (its inference-only op is skipped)
    env = dict(train_env(), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    r = subprocess.run(cmds[0], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "sw" / "runs").iterdir()) == [Path(cmds[0][-1]).stem]
    assert not (tmp_path / "ext" / DS_CPU_OP).exists()


def test_closed_stdout_pipe_ends_quietly(tmp_path, tiny_dataset):
    f = _sweep_file(tmp_path, tiny_dataset)
    r = subprocess.run(f"{shlex.quote(XATL_DS)} sweep run {shlex.quote(str(f))} --dry-run | head -1", shell=True,
                       cwd=tmp_path, env=train_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.stdout.startswith("# dry run") and r.stdout.count("\n") == 1
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


def test_example_run_config_for_own_model_and_text(tmp_path, make_source_dir, capsys):
    """docs/examples/my_model.yaml with a local source folder and a text file prepared with
    its tokenizer passes --dry-run (and names its placeholder paths when left as they are)."""
    from xatl_ds.data import PrepareConfig, prepare

    example = REPO / "docs" / "examples" / "my_model.yaml"
    src = make_source_dir("neox")
    text = tmp_path / "my_text.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(2000)))
    data = tmp_path / "mytext"
    prepare(PrepareConfig(out=data, corpus=[str(text)], tokenizer=str(src), val_frac=0.1))
    ov = ["-o", f"init.source={src}", "-o", f"data.path={data}", "-o", "data.seq_len=32",
          "-o", f"out_dir={tmp_path / 'run'}"]  # fmt: skip
    assert main(["train", str(example), *ov, "--dry-run"]) == 0, capsys.readouterr().err
    assert "xatl_ds.train" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()
    assert main(["train", str(example), "--dry-run"]) == 2  # the placeholders: named, nothing started
    err = capsys.readouterr().err
    assert "runs/data/mytext" in err or "/models/pythia-160m" in err, err


def test_train_ends_by_naming_its_outputs(tmp_path, capsys):
    from xatl_ds.cli_launch import _print_outputs
    from xatl_ds.config import load_run_config

    out = tmp_path / "run"
    out.mkdir()
    (out / "DONE").write_text("")
    _print_outputs(load_run_config({"name": "r", "out_dir": str(out)}))
    text = capsys.readouterr().out
    for what in ("hf", "README.md", "metrics.jsonl", "tensorboard --logdir", "meta.json", "xatl-ds eval"):
        assert what in text, what


def test_readme_leads_with_the_smoke_sweep():
    readme = (REPO / "README.md").read_text()
    first_block = readme.split("```bash", 1)[1].split("```", 1)[0]
    assert "xatl-ds sweep run smoke" in first_block and "data prepare --out runs/data/smoke" in first_block
    assert readme.index("sweep run smoke") < readme.index("make quickstart")
    assert os.path.isfile(REPO / "docs" / "examples" / "my_model.yaml") and "docs/examples/my_model.yaml" in readme
