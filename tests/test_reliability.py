"""Bad inputs the run layer owns: a finished run is never taken for an edited config, the report
skips (and lists) unreadable runs, `train --dry-run` names data and source problems, a study's
name and a sweep's labels stay inside their roots, and two Optuna workers never draw the same
parameters. Each case asserts the error names the file or field and that nothing was written."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from xatl_ds.cli import main
from xatl_ds.config import ConfigError, load_run_config
from xatl_ds.rundir import RunDir, parse_metrics
from xatl_ds.train import check_finished


def _cfg(tmp_path: Path, data: Path, **extra) -> dict:
    d = {"name": "r", "out_dir": str(tmp_path / "run"), "model": {"size": "micro", "mixer": "retnet"},
         "data": {"path": str(data), "seq_len": 32, "batch_size": 4}, "budget": {"steps": 3}}  # fmt: skip
    d.update(extra)
    return d


def test_finished_run_of_an_edited_config_is_an_error(tmp_path, tiny_dataset):
    cfg = load_run_config(_cfg(tmp_path, tiny_dataset))
    rd = RunDir(cfg.out_dir)
    assert check_finished(rd, cfg) is False
    rd.write_json(RunDir.META, {"config_hash": cfg.content_hash()})
    rd.mark_done()
    assert check_finished(rd, cfg) is True
    edited = load_run_config(_cfg(tmp_path, tiny_dataset, model={"size": "micro", "mixer": "mamba"}))
    with pytest.raises(ConfigError, match=r"finished run of a different config.*delete"):
        check_finished(rd, edited)
    rd.meta_path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"meta.json is not valid JSON"):
        check_finished(rd, cfg)


def test_torn_and_corrupt_metrics_lines_follow_one_rule():
    rows = parse_metrics('{"step": 1}\n{"step": 2, "val_loss": 3.0}\n{"ste')
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["step"] for r in parse_metrics('{"step": 1}\n[1, 2]\n{"step": 3}\n')] == [1], "nothing after a bad line"


def test_report_skips_and_lists_unreadable_runs(tmp_path):
    good = RunDir(tmp_path / "sweep" / "good")
    good.path.mkdir(parents=True)
    good.config.write_text(yaml.safe_dump({"name": "good", "model": {"mixer": "retnet"}, "init": {"kind": "scratch"}}))
    good.metrics.write_text(json.dumps({"step": 1, "flops": 1e9, "val_loss": 5.0}) + "\n")
    bad = RunDir(tmp_path / "sweep" / "bad")
    bad.path.mkdir(parents=True)
    bad.meta_path.write_text('{"config": ')  # a run killed while writing, or a hand edit
    assert main(["report", str(tmp_path / "sweep")]) == 0
    md = (tmp_path / "sweep" / "report.md").read_text()
    assert "Unreadable runs, left out** (1)" in md and "bad/meta.json is not valid JSON" in md
    assert "1 runs found" in md


def test_dry_run_names_data_and_source_problems(tmp_path, tiny_dataset, make_source_dir, capsys):
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump(_cfg(tmp_path, tmp_path / "missing")))
    assert main(["train", str(f), "--dry-run"]) == 2
    assert "data.path=" in capsys.readouterr().err
    # a source whose tokenizer is not the data's
    src = make_source_dir("neox")
    f.write_text(yaml.safe_dump(_cfg(tmp_path, tiny_dataset, init={"kind": "xatl", "source": str(src)})))
    assert main(["train", str(f), "--dry-run"]) == 2
    assert "init.source=" in (err := capsys.readouterr().err) and "--tokenizer" in err
    # a truncated safetensors file
    bad = tmp_path / "bad_src"
    shutil.copytree(src, bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    f.write_text(yaml.safe_dump(_cfg(tmp_path, tiny_dataset, init={"kind": "xatl", "source": str(bad)})))
    assert main(["train", str(f), "--dry-run"]) == 2
    assert "truncated" in (err := capsys.readouterr().err) and "model.safetensors" in err
    # longer sequences than the source's positions (conftest sources: 128)
    (bad / "model.safetensors").unlink()
    shutil.copy(src / "model.safetensors", bad / "model.safetensors")
    for p in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bad / p).unlink(missing_ok=True)
    long = _cfg(tmp_path, tiny_dataset, init={"kind": "xatl", "source": str(bad)})
    long["data"]["seq_len"] = 256
    f.write_text(yaml.safe_dump(long))
    assert main(["train", str(f), "--dry-run"]) == 2
    assert "max_position_embeddings 128" in capsys.readouterr().err
    assert not (tmp_path / "run").exists(), "a dry run writes nothing"


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden"])
def test_study_names_cannot_escape(tmp_path, name):
    from xatl_ds.tune import StudyError, load_study

    with pytest.raises(StudyError, match="study_name=.*not a safe name"):
        load_study({"study_name": name, "out_dir": str(tmp_path / "s"), "base": {"budget": {"steps": 1}},
                    "search_space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-3}}})  # fmt: skip
    assert not (tmp_path / "s").exists()


def test_workers_draw_independent_parameters(tmp_path):
    """Two workers seeded alike (sampler seed 0, as in sweeps/studies/lit_search.yaml) and a restarted
    worker draw different parameters; the seeds are deterministic per worker and study size."""
    import optuna

    from xatl_ds.tune import heartbeat_interval, load_study, open_study, suggest, worker_seed

    spec = load_study({"study_name": "s", "storage": f"sqlite:///{tmp_path / 's.db'}", "out_dir": str(tmp_path / "s"),
                       "base": {"budget": {"steps": 1}}, "sampler": {"type": "tpe", "seed": 0},
                       "heartbeat": {"interval": 7, "grace_period": 20, "max_retry": 1},
                       "search_space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                                        "freeze.patience": {"type": "int", "low": 1, "high": 9}}})  # fmt: skip
    drawn = []
    for wid in ("w0", "w1", "w0"):  # the third is w0 restarted: the study has grown meanwhile
        study = open_study(spec, wid)
        t = study.ask()
        drawn.append(tuple(suggest(t, spec).values()))
        study.tell(t, 1.0)
    assert len(set(drawn)) == 3, drawn
    assert worker_seed(0, "w0", 0) == worker_seed(0, "w0", 0) != worker_seed(0, "w1", 0) != worker_seed(0, "w0", 2)
    assert heartbeat_interval(open_study(spec)) == 7, "the heartbeat is seen through Optuna's cached storage"
    journal = load_study({**{k: v for k, v in spec.__dict__.items() if k in ()}, "study_name": "j",
                          "storage": f"journal:{tmp_path / 'j.log'}", "out_dir": str(tmp_path / "j"),
                          "base": {"budget": {"steps": 1}},
                          "search_space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2}}})  # fmt: skip
    assert heartbeat_interval(open_study(journal)) is None
    assert optuna.__version__
