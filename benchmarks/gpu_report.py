"""The markdown report of :mod:`benchmarks.gpu_check`: parity and throughput tables."""
from __future__ import annotations

from benchmarks import md_table


# -- tables ------------------------------------------------------------------------------------
def _fmt_paths(p: dict | None) -> str:
    return ", ".join(f"{k}: {v}" for k, v in (p or {}).items()) or "none recorded"


def _parity_table(par: list[dict]) -> str:
    rows = []
    for p in par:
        if "loss_err" not in p:
            rows.append([p["mixer"], p["dtype"], p.get("kernels", ""), "error", "", "", p.get("error", ""), "", "", "",
                         "**NO**"])  # fmt: skip
            continue
        rows.append([
            p["mixer"], p["dtype"], p["kernels"], f"{p['loss_err']:.2e}", f"{p['logits_err']:.2e}",
            f"{p['mixer_err']:.2e}", f"{p['grad_err_max']:.2e} ({p['grad_err_worst_param']})", f"{p['gen_err']:.2e}",
            _fmt_paths(p["paths"]), "/".join(f"{t:g}" for t in p["tolerances"]),
            "yes" if p["ok"] else ("**NO** (path)" if not p.get("path_ok", True) else "**NO**"),
        ])  # fmt: skip
    return md_table(["mixer", "dtype", "kernels", "loss err", "logits err", "mixer output err",
                     "worst grad err (param)", "generation err", "paths ran (fast model)", "tolerances", "ok"],
                    rows)  # fmt: skip


def _gb(x) -> str:
    return f"{x / 2**30:.2f}" if isinstance(x, (int, float)) else "-"


def _throughput_table(thr: list[dict], peak: float) -> str:
    return md_table(
        ["model", "compiled", "tokens/s", "vs attention", "TFLOP/s (analytic)", f"MFU (peak {peak:g} TFLOP/s)",
         "peak mem GiB", "first step s", "paths ran"],
        [[r["name"], "yes" if r.get("compiled") else "no", f"{r['tokens_per_s']:,.0f}",
          f"{r['ratio_vs_attention']:.2f}x" if r.get("ratio_vs_attention") else "-", f"{r['tflops_per_s']:.1f}",
          f"{r['mfu']:.1%}", _gb(r.get("peak_mem_bytes")), f"{r.get('first_step_s', 0):.1f}", _fmt_paths(r.get("paths"))]
         if "error" not in r else [r["name"], "yes" if r.get("compiled") else "no", r["error"], "", "", "", "", "", ""]
         for r in thr],
    )  # fmt: skip


def render(info: dict, res: dict) -> str:
    """The markdown of a result dict ``{"parity": [...], "cuda_parity": [...], "throughput":
    [...], "compile": [...], "settings": {...}}`` (missing sections: not run)."""
    st = res.get("settings", {})
    lines = [
        "# GPU check", "",
        f"{info.get('gpu')}, torch {info.get('torch')} (CUDA {info.get('cuda')}), transformers "
        f"{info.get('transformers')}, xatl_ds {info.get('xatl_ds')}, {info.get('date')}.", "",
        "Kernel packages: " + ", ".join(f"{k} {v or 'missing'}" for k, v in info.get("kernels", {}).items()) + ".",
    ]  # fmt: skip
    if st.get("emulate"):
        lines += ["", "**Emulated on a CPU**: the Triton kernels ran under Triton's interpreter on a tiny shape. This "
                      "checks what the kernels compute (indexing, masks, chunk boundaries, states, dtypes of the "
                      "accumulators), not bf16 tensor-core rounding, compilation for a real GPU, or speed: the "
                      "throughput rows time the interpreter."]  # fmt: skip
    if "parity" in res:
        lines += ["", "## Parity: kernels='torch' vs kernels='triton', same weights", "", _parity_table(res["parity"]),
                  "", "Errors are ||fast - torch|| / ||torch||; mixer outputs per layer and gradients per tensor, "
                      "the worst shown; the loss is the training call's (the fused cross-entropy where the fast model "
                      "took it, `loss` in the paths); generation covers logits and mixer outputs of a two-piece "
                      "prefill and single-token steps. Tolerances: outputs / gradients / generation. A row passes "
                      "only if every mixer of the fast model ran the asked-for path."]  # fmt: skip
    if res.get("cuda_parity") is not None:
        lines += ["", "## Optional: kernels='torch' vs kernels='cuda' (mamba-ssm / causal-conv1d)", ""]
        lines.append(_parity_table(res["cuda_parity"]) if res["cuda_parity"] else
                     "Not run: mamba-ssm does not import here (it is optional).")  # fmt: skip
        if st.get("emulate") and res["cuda_parity"]:
            lines += ["", "Emulated (benchmarks/kernel_emulation.py): mamba-ssm's SSD Triton kernels under the "
                          "interpreter, its CUDA extensions' entry points as contract-checked reference functions: "
                          "the call sites are checked, not those kernels."]  # fmt: skip
    if "throughput" in res:
        s = st.get("throughput", {})
        lines += ["", f"## Throughput: {s.get('shape', '')}, {s.get('dtype')}, batch {s.get('batch')} x seq "
                      f"{s.get('seq')}, fwd+bwd, {s.get('repeats')} interleaved repeats", "",
                  _throughput_table(res["throughput"] + res.get("compile", []), s.get("peak_tflops", 0)), "",
                  "Peak mem: the most memory allocated while the model was built and ran its first step, above what "
                  "was allocated before (other models' weights). First step: build, JIT / compile and one step."]  # fmt: skip
    return "\n".join(lines) + "\n"
