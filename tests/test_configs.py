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


# -- every numeric field has a checked range ---------------------------------------------------
def _numeric_fields():
    """(dotted name, type) of every int / float / optional int or float field of the run config."""
    import dataclasses
    import typing

    out = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp, name = hints[f.name], prefix + f.name
            if dataclasses.is_dataclass(tp):
                walk(tp, name + ".")
                continue
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            base = args[0] if len(args) == 1 and type(None) in typing.get_args(tp) else tp
            if base in (int, float):
                out.append((name, base))

    walk(RunConfig, "")
    return out


def test_every_numeric_field_has_a_rule():
    from xatl_ds.config import NUMBER_RULES

    # freeze.* ranges belong to FreezeConfig.validate (xatl_ds/freeze_plan.py)
    missing = [n for n, _ in _numeric_fields() if not n.startswith("freeze.") and n not in NUMBER_RULES]
    assert not missing, f"add a NumberRule to xatl_ds.config.NUMBER_RULES for {missing}"
    assert set(NUMBER_RULES) <= {n for n, _ in _numeric_fields()}, "a rule names no field"
    assert len(_numeric_fields()) >= 28


@pytest.mark.parametrize("name", [n for n, _ in _numeric_fields()])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1e30])
def test_every_numeric_field_refuses_nonfinite_and_negative(name, bad):
    from xatl_ds.config import set_dotted

    data = {"budget": {"steps": None, "tokens": None, "flops": None}}
    kind = name.split(".")[-1] if name.startswith("budget.") else "steps"
    data["budget"][kind] = 10**6  # exactly one budget set, so the bad one is what fails
    set_dotted(data, name, bad)
    with pytest.raises(ConfigError) as err:
        load_run_config(data)
    assert f"{name}=" in str(err.value) and "must be" in str(err.value), str(err.value)


# -- ds_configs/ and sweeps/ ship as package data ------------------------------------------------
def test_every_package_is_listed_in_pyproject():
    tomllib = pytest.importorskip("tomllib")
    from setuptools import find_namespace_packages

    st = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = st["package-dir"]
    found = {p for p in find_namespace_packages(where=str(REPO), include=["xatl_ds*", "analysis*"])
             if "__pycache__" not in p}  # fmt: skip
    assert found | set(mapped) == set(st["packages"]), "pyproject.toml [tool.setuptools] packages is stale"
    from xatl_ds.config import packaged_dir

    for pkg, folder in mapped.items():
        shipped = {f.name for pat in st["package-data"][pkg] for f in (REPO / folder).glob(pat)}
        assert shipped, f"{pkg} ships nothing"
        assert shipped <= {x.name for x in packaged_dir(folder).iterdir()}


def test_packaged_lookups(tmp_path, monkeypatch):
    from xatl_ds.config import ds_config_path, sweep_file_path

    zero2 = (REPO / "ds_configs" / "zero2.json").read_text()
    assert ds_config_path("zero2.json").read_text() == zero2 == ds_config_path("zero2").read_text()
    quick = (REPO / "sweeps" / "quickstart.yaml").read_text()
    monkeypatch.chdir(tmp_path)  # found from any directory, not only the checkout
    for name in ("quickstart", "quickstart.yaml", "sweeps/quickstart.yaml"):
        assert sweep_file_path(name).read_text() == quick, name
    own = tmp_path / "quickstart.yaml"
    own.write_text("name: mine\n")
    assert sweep_file_path("quickstart.yaml") == Path("quickstart.yaml"), "an existing path wins"
    assert sweep_file_path(own) == own and ds_config_path(str(own)) == own
    with pytest.raises(ConfigError, match=r"sweep file 'nope' not found; .* one of \[.*'quickstart'.*\]"):
        sweep_file_path("nope")
    with pytest.raises(ConfigError, match=r"sweep file 'elsewhere/quickstart.yaml' not found"):
        sweep_file_path("elsewhere/quickstart.yaml")
    with pytest.raises(ConfigError, match=r"deepspeed.config='zero9' not found; .*one of \[.*'zero3_offload.json'\]"):
        ds_config_path("zero9")


# -- one dotted setter -------------------------------------------------------------------------------
def test_set_dotted_merges_dicts_and_replaces_the_rest():
    from xatl_ds.config import merge_dicts, set_dotted

    d = {"model": {"size": "tiny", "mixer": "mamba"}, "init": {"components": ["mlp", "embed"]}, "data": None}
    set_dotted(d, "model", {"mixer": "retnet"})  # a dict merges
    assert d["model"] == {"size": "tiny", "mixer": "retnet"}
    set_dotted(d, "init.components", ["mlp"])  # a list replaces
    assert d["init"]["components"] == ["mlp"]
    set_dotted(d, "data.path", "x")  # an empty section is filled
    set_dotted(d, "optim.lr", 0.1)  # a missing one is created
    assert d["data"] == {"path": "x"} and d["optim"] == {"lr": 0.1}
    value = {"a": {"b": [1]}}
    set_dotted(d, "extra", value)
    value["a"]["b"].append(2)
    assert d["extra"] == {"a": {"b": [1]}}, "the value is deep-copied"
    set_dotted(d, "extra", {"a": {"c": 3}})
    assert d["extra"] == {"a": {"b": [1], "c": 3}}, "merges recursively"
    with pytest.raises(ConfigError, match=r"^model\.size\.x: model\.size is not a section \(it holds 'tiny'\)"):
        set_dotted(d, "model.size.x", 1)

    class CallerError(ValueError):
        pass

    with pytest.raises(CallerError, match="optim.lr.y: optim.lr is not a section"):
        set_dotted(d, "optim.lr.y", 1, error=CallerError)
    a, b = {"x": {"y": [1]}, "k": 1}, {"x": {"z": 2}, "k": {"new": 1}}
    m = merge_dicts(a, b)
    assert m == {"x": {"y": [1], "z": 2}, "k": {"new": 1}}
    m["x"]["y"].append(5)
    assert a == {"x": {"y": [1]}, "k": 1} and b == {"x": {"z": 2}, "k": {"new": 1}}


def test_apply_override_uses_the_dotted_setter():
    from xatl_ds.config import apply_override

    d = {"model": {"size": "micro", "mixer": "mamba"}}
    apply_override(d, "model={mixer: retnet}")  # merges, like a sweep axis value
    apply_override(d, " optim.lr = 1e-3")
    apply_override(d, "init.components=[mlp, embed]")
    assert d == {"model": {"size": "micro", "mixer": "retnet"}, "optim": {"lr": "1e-3"},
                 "init": {"components": ["mlp", "embed"]}}  # fmt: skip
    cfg = load_run_config(d, ["model.attention_layers=[1]", "optim.lr=2e-3"])
    assert cfg.model.mixer == "retnet" and cfg.model.size == "micro" and cfg.optim.lr == 2e-3
    assert cfg.model.attention_layers == [1]
