"""``xatl-ds export``: native exports compute the same function, refusals say the way out,
remote-code exports load with only torch + transformers, and every export has a card."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from xatl_ds.export import NoNativeExport, export_model, export_run, native_class_name, save_model
from xatl_ds.models import XatlConfig, XatlForCausalLM

TOL = 1e-5


def tiny(seed: int = 0, **kw) -> XatlForCausalLM:
    """A random tiny model whose every tensor is perturbed (a mis-mapped one shows in the logits)."""
    base = dict(family="llama", vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, norm_eps=1e-5, mamba2_headdim=16,
                chunk_size=8, d_state=8)  # fmt: skip
    if kw.get("family") == "neox":
        base.pop("num_key_value_heads")
    base.update(kw)
    torch.manual_seed(seed)
    m = XatlForCausalLM(XatlConfig(**base)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


IDS = torch.tensor([[5, 17, 3, 88, 41, 9, 60, 2, 33, 71, 14], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])


def greedy(model, n: int = 6) -> list[int]:
    return model.generate(IDS[:1, :4], max_new_tokens=n, do_sample=False, min_new_tokens=n, pad_token_id=0)[0].tolist()


def fake_run(tmp: Path, model: XatlForCausalLM, name: str, source: Path | None = None) -> Path:
    """A finished run directory as the (old) trainer left it: hf/ holds the XATL save, plus
    meta.json, eval.json and config.yaml with numbers for the card."""
    run = tmp / name
    model.save_pretrained(run / "hf")
    cfg = {"name": name, "init": {"kind": "xatl", "source": str(source) if source else "EleutherAI/pythia-14m",
                                  "components": ["embed", "mlp"], "mixer": "random"},
           "freeze": {"policy": "lit", "unfreeze_order": [["all"]]},
           "distill": {"enabled": True, "teacher": None, "kl_weight": 1.0, "reverse_kl_weight": 0.0,
                       "ce_weight": 0.5, "temperature": 2.0}}  # fmt: skip
    meta = {"name": name, "config": cfg, "model_config": model.config.to_dict(), "steps": 40, "tokens": 123456,
            "flops": 7.25e12, "final_val_loss": 3.2109, "teacher_val_loss": 2.9876,
            "unfreeze_events": [{"step": 20, "components": ["all"]}]}  # fmt: skip
    (run / "meta.json").write_text(json.dumps(meta))
    ev = {"limit": None, "lm_eval_version": "0.4", "tasks": {"lambada_local": {"n_samples": 10, "metrics": {
        "acc": {"value": 0.4321, "stderr": 0.01}}}}}  # fmt: skip
    (run / "eval.json").write_text(json.dumps(ev))
    return run


def check_card(folder: Path, remote: bool, license: str | None = None) -> str:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n") and "library_name: transformers" in text
    assert ("trust_remote_code=True" in text) == remote
    if license:
        assert f"license: {license}" in text
    return text


# -- native ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,cls", [
    (dict(family="neox", mixer="attention", rotary_pct=0.5), "GPTNeoXForCausalLM"),
    (dict(family="llama", mixer="attention"), "LlamaForCausalLM"),
    (dict(family="llama", mixer="mamba2", attention_layers=[1], mamba2_ngroups=2, rotary_pct=0.5), "BambaForCausalLM"),
])  # fmt: skip
def test_native_export_is_exact(tmp_path, kw, cls):
    model = tiny(**kw)
    res = export_model(model, tmp_path / "out", "native")
    assert res.format == "native" and res.model_class == cls
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "auto_map" not in cfg and not list((tmp_path / "out").glob("*.py"))
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()  # no remote code
    assert type(native).__name__ == cls
    with torch.no_grad():
        diff = (native(input_ids=IDS).logits - model(input_ids=IDS).logits).abs().max().item()
    assert diff < TOL, diff
    assert greedy(native) == greedy(model)
    check_card(tmp_path / "out", remote=False)


@pytest.mark.parametrize("kw,words", [
    (dict(mixer="mamba"), ["mamba layers"]),
    (dict(mixer="retnet", attention_layers=[0]), ["retnet layers"]),
    (dict(family="neox", mixer="mamba2"), ["neox block"]),
    (dict(mixer="mamba2", norm_eps=1e-6), ["rms_norm_eps=1e-06", "eps=1e-05"]),
    (dict(mixer="mamba2", hidden_act="gelu"), ["hidden_act"]),
])  # fmt: skip
def test_native_refusal_names_the_reason_and_the_way_out(tmp_path, kw, words):
    model = tiny(**kw)
    with pytest.raises(NoNativeExport) as e:
        save_model(model, tmp_path / "x", "native")
    msg = str(e.value)
    assert "--format remote-code" in msg and all(w in msg for w in words), msg
    assert save_model(model, tmp_path / "auto", "auto").format == "remote-code"


# -- remote code in an environment without xatl_ds ----------------------------------------------
CHILD = r"""
import importlib.util, json, sys
import torch
from transformers import AutoModelForCausalLM
assert importlib.util.find_spec("xatl_ds") is None, "xatl_ds must not be importable here"
job = json.loads(open(sys.argv[1]).read())
ids = torch.tensor(job["ids"])
out = {}
for folder in job["folders"]:
    m = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(m).__module__.startswith("transformers_modules."), type(m).__module__
    with torch.no_grad():
        out[folder + ":logits"] = m(input_ids=ids).logits
    g = m.generate(ids[:1, :4], max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    out[folder + ":gen"] = g[0]
assert "xatl_ds" not in sys.modules
torch.save(out, job["result"])
"""


def clean_python(tmp: Path) -> Path:
    """A throwaway venv that sees this environment's torch and transformers but not xatl_ds:
    its .pth adds our site-packages as a plain path, so the editable install's finder (a .pth
    hook there) never runs."""
    env = tmp / "clean-env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    py = env / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "deps.pth").write_text("\n".join(sorted(ours)) + "\n")
    return py


def test_remote_code_loads_without_xatl_ds(tmp_path, tiny_tokenizer):
    lic_src = tmp_path / "src"
    lic_src.mkdir()
    (lic_src / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a source\n")
    models = {
        "mamba": tiny(1, family="neox", mixer="mamba"),
        "mamba2": tiny(2, family="neox", mixer="mamba2"),
        "retnet": tiny(3, mixer="retnet"),
        "hybrid": tiny(4, mixer="mamba", attention_layers=[1]),
    }
    folders = {}
    for name, model in models.items():
        run = fake_run(tmp_path / "runs", model, name, source=lic_src)
        if name == "hybrid":
            tiny_tokenizer.save_pretrained(run / "hf")
        out = tmp_path / "export" / name
        res = export_run(run, out, "auto")
        assert res.format == "remote-code" and (out / "modeling_xatl.py").is_file()
        assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
        card = check_card(out, remote=True, license="apache-2.0")
        for number in ("123456", "7.250e+12", "3.211", "2.988", "0.4321", "lit", "temperature 2.0", name):
            assert number in card, (number, card)
        folders[name] = str(out)
    assert (tmp_path / "export" / "hybrid" / "tokenizer.json").is_file()

    py = clean_python(tmp_path)
    job = tmp_path / "job.json"
    result = tmp_path / "result.pt"
    job.write_text(json.dumps({"ids": IDS.tolist(), "folders": list(folders.values()), "result": str(result)}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    r = subprocess.run([str(py), str(script), str(job)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(result, weights_only=True)
    for name, model in models.items():
        with torch.no_grad():
            ref = model(input_ids=IDS).logits
        diff = (got[folders[name] + ":logits"] - ref).abs().max().item()
        assert diff < TOL, (name, diff)
        assert got[folders[name] + ":gen"].tolist() == greedy(model), name

    # the same folder still loads with xatl_ds's own classes, no remote code
    again = AutoModelForCausalLM.from_pretrained(folders["hybrid"])
    assert type(again) is XatlForCausalLM


def test_native_class_name_of_configs():
    assert native_class_name(tiny(mixer="attention").config) == "LlamaForCausalLM"
    assert native_class_name(tiny(mixer="mamba2").config) == "BambaForCausalLM"


def test_cli_export(tmp_path, capsys):
    from xatl_ds.cli import main

    run = fake_run(tmp_path, tiny(mixer="retnet"), "ret")
    assert main(["export", str(run), "--out", str(tmp_path / "n"), "--format", "native"]) == 2
    assert "--format remote-code" in capsys.readouterr().err and not (tmp_path / "n").exists()
    assert main(["export", str(run), "--out", str(tmp_path / "r")]) == 0
    assert "remote-code" in capsys.readouterr().out and (tmp_path / "r" / "README.md").is_file()
    assert main(["export", str(run), "--out", str(tmp_path / "r")]) == 2  # occupied: refused without --overwrite
