"""The model card (README.md with YAML metadata) of an exported model.

Everything it states comes from the model config and, when the export comes from a run,
the run directory (:class:`~xatl_ds.rundir.RunDir`: meta.json, eval.json, config.yaml);
a number the run does not have is left out, never guessed.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from ..rundir import RunDir

__all__ = ["model_card", "source_license", "write_card"]


def _front_matter(text: str) -> dict:
    """The YAML header of a model card ({} when there is none)."""
    m = re.match(r"\A---\s*\n(.*?)\n---\s*\n", text, flags=re.S)
    if not m:
        return {}
    import yaml

    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def source_license(source: str | None) -> str | None:
    """The license a source's model card declares: a local folder's README.md, or a hub id's
    card already in the local Hugging Face cache (never downloaded). None when unknown."""
    if not source:
        return None
    card = Path(source) / "README.md"
    if not card.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(source, "README.md")
        except Exception:  # not a repo id, no cache: unknown
            hit = None
        card = Path(hit) if isinstance(hit, str) else None
    if card is None or not card.is_file():
        return None
    lic = _front_matter(card.read_text(encoding="utf-8", errors="replace")).get("license")
    return str(lic) if lic else None


def _num(x: Any, fmt: str = ".4g") -> str | None:
    return format(float(x), fmt) if isinstance(x, (int, float)) and math.isfinite(float(x)) else None


def _runs_of(mixers: list[str]) -> str:
    """``mamba2 x3, attention (layer 3), mamba2 x4`` style per-layer summary."""
    out, i = [], 0
    while i < len(mixers):
        j = i
        while j + 1 < len(mixers) and mixers[j + 1] == mixers[i]:
            j += 1
        out.append(f"{i}" + (f"-{j}" if j > i else "") + f": {mixers[i]}")
        i = j + 1
    return ", ".join(out)


def _eval_rows(ev: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    for task, r in sorted((ev.get("tasks") or {}).items()):
        for metric, v in (r.get("metrics") or {}).items():
            val = _num(v.get("value") if isinstance(v, dict) else v)
            if val is not None:
                se = _num(v.get("stderr")) if isinstance(v, dict) else None
                rows.append((task, metric, val, se or ""))
    return rows


def _teacher_eval(teacher: str | None) -> dict:
    """eval.json of a teacher that is a local run's hf/ export ({} otherwise)."""
    if not teacher:
        return {}
    p = Path(teacher)
    rd = RunDir(p.parent if p.name == RunDir.HF else p)
    try:
        return rd.eval() if rd.eval_path.is_file() else {}
    except (OSError, ValueError):
        return {}


def model_card(config: Any, *, export_format: str, model_class: str, run: RunDir | None = None,
               license: str | None = None) -> str:  # fmt: skip
    """The README.md text for a model with XatlConfig ``config`` exported as ``model_class``
    (``export_format`` native or remote-code), with ``run``'s numbers when given."""
    meta = run.meta() if run is not None and run.meta_path.is_file() else {}
    cfg = run.read_config() if run is not None else {}
    init = cfg.get("init") or {}
    source = init.get("source") if init.get("kind", "scratch") != "scratch" else None
    lic = license or source_license(source)
    mixers = list(config.layer_mixers)
    kinds = sorted(set(mixers))
    name = meta.get("name") or cfg.get("name") or "xatl-model"
    hybrid = len(kinds) > 1

    tags = ["xatl", "cross-architecture-transfer", *kinds, *(["hybrid"] if hybrid else []), config.family]
    fm = ["---"]
    if lic:
        fm.append(f"license: {lic}")
    fm += ["library_name: transformers", "pipeline_tag: text-generation", "tags:"]
    fm += [f"- {t}" for t in dict.fromkeys(tags)]
    if source and not Path(source).exists():  # a hub id
        fm += ["base_model:", f"- {source}"]
    fm.append("---")

    md = [f"# {name}", ""]
    arch = " + ".join(kinds)
    if source:
        md += [f"An XATL (cross-architecture transfer) model: the weights it shares with its source Transformer "
               f"`{source}` (components: {', '.join(init.get('components') or [])}) were copied into a "
               f"{config.family}-family {arch} model and trained further.", ""]  # fmt: skip
    else:
        md += [f"A {config.family}-family {arch} model trained from scratch with xatl-ds.", ""]
    how = ("native transformers class, no remote code" if export_format == "native"
           else "remote code shipped in this folder: load with trust_remote_code=True")  # fmt: skip
    md += ["## Architecture", "",
           f"- export: `{model_class}` ({how})",
           f"- family: {config.family} blocks (norms, MLP, residual layout of the source)",
           f"- layers: {config.num_hidden_layers}, hidden size {config.hidden_size}, vocab {config.vocab_size}, "
           f"{config.num_attention_heads} heads ({config.num_key_value_heads} KV)",
           f"- mixers per layer: {_runs_of(mixers)}"]  # fmt: skip
    if "mamba" in kinds or "mamba2" in kinds:
        extra = f", head dim {config.mamba2_headdim}, groups {config.mamba2_ngroups}" if "mamba2" in kinds else ""
        md.append(f"- SSM: d_state {config.d_state}, d_conv {config.d_conv}, expand {config.expand}{extra}")
    if "retnet" in kinds:
        md.append(f"- retention heads: {config.retnet_heads}")
    md.append("")

    if cfg:
        fr, di, al = cfg.get("freeze") or {}, cfg.get("distill") or {}, cfg.get("align") or {}
        init_line = f"- init: {init.get('kind', 'scratch')}"
        if source:
            init_line += f" from `{source}`, new mixer weights: {init.get('mixer', 'random')}"
        freeze_line = f"- freeze policy: {fr.get('policy', 'none')}"
        if fr.get("policy") not in (None, "none", "frozen"):
            freeze_line += f", unfreeze order {fr.get('unfreeze_order')}"
        md += ["## Recipe", "", init_line, freeze_line]
        if di.get("enabled"):
            md.append(f"- distillation from `{di.get('teacher') or source}`: KL weight {di.get('kl_weight')}, "
                      f"reverse KL {di.get('reverse_kl_weight')}, CE {di.get('ce_weight')}, "
                      f"temperature {di.get('temperature')}")  # fmt: skip
        else:
            md.append("- distillation: none (next-token cross-entropy)")
        if al.get("enabled"):
            md.append(f"- alignment stage: mixers matched to the teacher's attention outputs "
                      f"(until {al.get('until')}, at most {al.get('steps')} steps)")  # fmt: skip
        events = meta.get("unfreeze_events") or []
        if events:
            stages = [f"step {e.get('step')}: {', '.join(e.get('components') or [])}" for e in events]
            md.append("- unfreezing: " + "; ".join(stages))
        md.append("")

    if meta:
        rows = [("steps", meta.get("steps")), ("tokens", meta.get("tokens")),
                ("training FLOPs", _num(meta.get("flops"), ".3e")),
                ("validation loss", _num(meta.get("final_val_loss"))), ("precision", meta.get("precision")),
                ("ranks", meta.get("world_size"))]  # fmt: skip
        if meta.get("teacher_val_loss") is not None:
            rows += [("teacher validation loss (same batches)", _num(meta.get("teacher_val_loss")))]
            gap = (meta.get("final_val_loss") or math.nan) - meta["teacher_val_loss"]
            rows += [("gap to teacher", _num(gap))]
        md += ["## Training", "", "| | |", "|---|---|"]
        md += [f"| {k} | {v} |" for k, v in rows if v is not None]
        md.append("")

    ev = run.eval() if run is not None and run.eval_path.is_file() else {}
    rows = _eval_rows(ev)
    if rows:
        t_ev = _teacher_eval((cfg.get("distill") or {}).get("teacher") or source)
        t_vals = {(t, m): v for t, m, v, _ in _eval_rows(t_ev)}
        head = "| task | metric | value | stderr |" + (" teacher | retained |" if t_vals else "")
        md += ["## Benchmarks", "", f"lm-eval {ev.get('lm_eval_version', '')}, limit {ev.get('limit')}.", "", head,
               "|---|---|---|---|" + ("---|---|" if t_vals else "")]  # fmt: skip
        for t, m, v, se in rows:
            line = f"| {t} | {m} | {v} | {se} |"
            if t_vals:
                tv = t_vals.get((t, m))
                kept = _num(float(v) / float(tv), ".3f") if tv and float(tv) != 0 else None
                line += f" {tv or ''} | {kept or ''} |"
            md.append(line)
        md.append("")

    remote = export_format != "native"
    md += ["## Usage", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
           'path = "PATH_OR_REPO_OF_THIS_FOLDER"',
           f"model = AutoModelForCausalLM.from_pretrained(path{', trust_remote_code=True' if remote else ''})",
           "tok = AutoTokenizer.from_pretrained(path)",
           'ids = tok("The capital of France is", return_tensors="pt").input_ids',
           "print(tok.decode(model.generate(ids, max_new_tokens=20)[0]))", "```", ""]  # fmt: skip
    if remote:
        md += ["The modeling code in this folder (generated from xatl-ds, Apache-2.0) needs only torch and "
               "transformers and runs pure-torch paths; with xatl-ds installed, `import xatl_ds` and load without "
               "`trust_remote_code` to get its fast kernels. Recurrent mixers need right padding.", ""]  # fmt: skip
    md += ["## License", ""]
    if lic:
        md.append(f"{lic}, the license of the source `{source}`, whose weights this model contains." if source
                  else f"{lic}.")  # fmt: skip
    elif source:
        md.append(f"This model contains weights of `{source}`; its license applies (xatl-ds could not read it: "
                  "check the source's model card).")  # fmt: skip
    else:
        md.append("Not stated: set it before publishing.")
    md.append("")
    return "\n".join(fm) + "\n\n" + "\n".join(md)


def write_card(out_dir: str | Path, run: RunDir | None = None, *, export_format: str | None = None,
               model_class: str | None = None) -> Path:  # fmt: skip
    """Write ``out_dir/README.md`` for the model saved there (format and class read from its
    config.json when not given)."""
    out = Path(out_dir)
    cfg = json.loads((out / "config.json").read_text())
    arch = (cfg.get("architectures") or ["XatlForCausalLM"])[0]
    fmt = export_format or ("native" if cfg.get("model_type") != "xatl" else "remote-code")
    if run is not None and run.meta_path.is_file() and run.meta().get("model_config"):
        xcfg = _xatl_config(run.meta()["model_config"])
    elif cfg.get("model_type") == "xatl":
        xcfg = _xatl_config(cfg)
    else:
        raise ValueError(f"{out} holds a {cfg.get('model_type')} model without its run's meta.json; no card")
    path = out / "README.md"
    path.write_text(model_card(xcfg, export_format=fmt, model_class=model_class or arch, run=run), encoding="utf-8")
    return path


def _xatl_config(d: dict) -> Any:
    from ..models import XatlConfig

    d = {k: v for k, v in d.items() if k not in ("auto_map", "architectures", "model_type", "transformers_version")}
    return XatlConfig(**d)
