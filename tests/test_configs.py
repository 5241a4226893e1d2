"""Configs cannot go stale: the README reference matches the dataclasses, every shipped
DeepSpeed JSON is one the trainer can fill, and the run config round-trips through YAML."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from xatl_ds.config import ConfigError, RunConfig, load_run_config
from xatl_ds.reference import reference_markdown
from xatl_ds.train import build_ds_config

REPO = Path(__file__).resolve().parent.parent


def test_readme_reference_is_current():
    readme = (REPO / "README.md").read_text()
    assert reference_markdown() in readme, "run: python -m xatl_ds.reference --write README.md"


def test_reference_documents_every_field():
    ref = reference_markdown()
    for name in ("budget.flops", "freeze.threshold", "freeze.unfreeze_order", "deepspeed.precision", "init.components"):
        row = next(line for line in ref.splitlines() if line.startswith(f"| `{name}`"))
        assert len(row.split("|")[3].strip()) > 10, row


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ds_configs_fill(path, precision):
    cfg = load_run_config({"deepspeed": {"config": path.name}, "data": {"batch_size": 8, "micro_batch_size": 2}})
    ds = build_ds_config(cfg, world=2, precision=precision)
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2
    assert ("bf16" in ds) == (precision == "bf16")
    assert "auto" not in json.dumps(ds)
    assert "scheduler" not in ds and "optimizer" not in ds


def test_yaml_round_trip_and_hash(tmp_path):
    cfg = load_run_config({"model": {"mixer": "retnet"}, "budget": {"steps": None, "flops": "1e12"}})
    assert cfg.budget.flops == 1e12
    p = tmp_path / "r.yaml"
    p.write_text(cfg.to_yaml())
    again = load_run_config(p)
    assert again == cfg and again.content_hash() == cfg.content_hash()
    renamed = load_run_config(p, ["name=other", "out_dir=elsewhere"])
    assert renamed.content_hash() == cfg.content_hash()
    assert load_run_config(p, ["seed=1"]).content_hash() != cfg.content_hash()


def test_batch_layout_errors():
    cfg = load_run_config({"data": {"batch_size": 6}})
    assert cfg.batch_layout(2) == (3, 1)
    with pytest.raises(ConfigError, match="not divisible by the 4 ranks"):
        cfg.batch_layout(4)
    with pytest.raises(ConfigError, match="micro_batch_size=4 does not divide"):
        load_run_config({"data": {"batch_size": 6, "micro_batch_size": 4}}).batch_layout(1)


def test_defaults_are_valid():
    assert RunConfig().validate() is not None
