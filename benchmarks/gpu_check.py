"""Prepared check for a CUDA machine: kernel parity and bf16 throughput / MFU per mixer.

    python benchmarks/gpu_check.py --out DIR [--peak-tflops 989] [--batch 8] [--seq 2048]

1. Parity. For every mixer with CUDA kernels (mamba: mamba-ssm selective scan +
   causal-conv1d; mamba2: mamba-ssm's SSD Triton kernels + causal-conv1d, 2 B/C groups),
   one model with ``kernels="torch"`` and one with ``kernels="cuda"`` share the same
   full-scale random weights; logits, every mixer's output, every parameter gradient, and
   cached generation (a two-piece prefill, then single-token steps) are compared in fp32
   and bf16. Error = ||a - b|| / ||b|| (norm-relative; per tensor, the worst reported).
2. Throughput. A pythia-160m-size model (12 layers, d_model 768, 12 heads, vocab 50304) per
   mixer, bf16 weights, forward + backward, timed interleaved; MFU = analytic FLOPs
   (``xatl_ds.flops.step_flops``) per second / ``--peak-tflops`` (H100 SXM bf16 dense: 989).

Writes ``DIR/gpu_check.md`` and ``DIR/gpu_check.json`` and prints the markdown. Without CUDA
it prints why and exits 0 having done nothing; without mamba-ssm it checks and times the
torch paths only and says so. Exit code 1 when a parity check fails.

``--emulate`` runs the parity section on a CPU instead, through
:mod:`benchmarks.kernel_emulation` (the SSD Triton kernels under Triton's interpreter, the
CUDA extensions' entry points as contract-checked reference functions), on a small shape
with several SSD chunks; no throughput. It checks the call sites, not the kernels' numerics.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:  # run as a plain script: make xatl_ds and benchmarks importable
    sys.path.insert(0, str(_REPO))

import torch  # noqa: E402

from benchmarks import interleaved, machine_info, md_table, median  # noqa: E402

#: name -> (mixer, attention_layers)
THROUGHPUT_MODELS = {
    "attention": ("attention", None),
    "retnet": ("retnet", None),
    "mamba": ("mamba", None),
    "mamba2": ("mamba2", None),
    "hybrid (mamba, paper)": ("mamba", "paper"),
}
#: norm-relative error bounds, (logits, gradients, generation logits)
#: (a wrong kernel call gives errors of order 1; TF32 inside Triton dots stays below the fp32 ones)
TOLERANCES = {"fp32": (5e-3, 2e-2, 5e-3), "bf16": (5e-2, 1e-1, 5e-2)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PYTHIA_160M = dict(layers=12, d_model=768, heads=12, vocab=50304)


def stub_missing_selective_scan() -> bool:
    """mamba-ssm's package import needs its selective-scan CUDA extension even for the SSD
    Triton kernels. When that extension alone is missing (say its build ran out of time),
    stand a stub in its place so Mamba-2's kernels can still be checked; any Mamba-1 kernel
    call then raises. Returns whether the stub was installed."""
    import importlib.util

    if "selective_scan_cuda" in sys.modules or importlib.util.find_spec("mamba_ssm") is None:
        return False
    try:
        import selective_scan_cuda  # noqa: F401
        return False
    except ImportError:
        from benchmarks.kernel_emulation import missing_extension

        sys.modules["selective_scan_cuda"] = missing_extension("selective_scan_cuda")
        return True


def kernel_status() -> dict:
    """Which optional CUDA packages import (and their versions)."""
    from xatl_ds.models.kernels import _try_import

    out = {}
    for mod in ("mamba_ssm", "causal_conv1d", "triton"):
        m = _try_import(mod) if torch.cuda.is_available() else None
        out[mod] = getattr(m, "__version__", "present") if m is not None else None
    return out


#: parity on a CUDA machine: parity()'s default shape, two B/C groups for Mamba-2
PARITY_SHAPE = dict(config=dict(mamba2_ngroups=2))
#: the emulated parity shape: small enough for Triton's interpreter (~45 s), several SSD
#: chunks (72 tokens, chunk 16: a partial last chunk), 4 Mamba-2 heads in 2 groups, conv
#: channels % 8 == 0
EMULATION_SHAPE = dict(layers=2, d_model=64, heads=4, vocab=256, batch=2, seq=72, new_tokens=4,
                       config=dict(chunk_size=16, mamba2_headdim=32, mamba2_ngroups=2))  # fmt: skip
#: dtypes checked per mixer. Emulated, no bf16 for the SSD Triton kernels: the interpreter
#: does not run them faithfully in bf16 (mamba-ssm's own kernel against its own reference
#: came out at relative error 2e9 in bf16, 1e-7 in fp32).
PARITY_DTYPES = {"mamba": ("fp32", "bf16"), "mamba2": ("fp32", "bf16")}
EMULATION_DTYPES = {"mamba": ("fp32", "bf16"), "mamba2": ("fp32",)}


def make_config(mixer: str, *, layers: int, d_model: int, heads: int, vocab: int, attention_layers=None,
                kernels: str = "auto", seq: int = 2048, **extra):  # fmt: skip
    from xatl_ds.models import XatlConfig

    return XatlConfig(
        family="neox", vocab_size=vocab, hidden_size=d_model, num_hidden_layers=layers, num_attention_heads=heads,
        mixer=mixer, attention_layers=attention_layers, kernels=kernels, max_position_embeddings=max(2048, seq),
        **extra,
    )  # fmt: skip


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64 (0 when both are zero)."""
    a, b = a.detach().double(), b.detach().double()
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den > 0 else num


@contextlib.contextmanager
def _recording_mixers(model):
    """Collect every mixer's output (in call order) while the block runs. Compared directly,
    because at initialisation a mixer adds little to the residual stream: a wrong mixer can
    leave the logits within tolerance."""
    outs: list[torch.Tensor] = []
    hooks = [blk.mixer.register_forward_hook(lambda mod, inp, out: outs.append(out.detach()))
             for blk in model.model.layers]  # fmt: skip
    try:
        yield outs
    finally:
        for h in hooks:
            h.remove()


def _fwd_bwd(model, ids):
    model.zero_grad(set_to_none=True)
    with _recording_mixers(model) as mixer_outs:
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), mixer_outs, grads


@torch.no_grad()
def _generate(model, ids, new_tokens: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Prefill ``ids[:, :-new_tokens]`` with a cache in two pieces (the second continues
    from the cached state: initial states for the kernels), then feed the last
    ``new_tokens`` one at a time -> (the stacked last-position logits of each call, every
    mixer output of every call)."""
    from xatl_ds.models import XatlCache

    cache = XatlCache(model.config.num_hidden_layers)
    prompt, cont = ids[:, :-new_tokens], ids[:, -new_tokens:]
    half = prompt.shape[1] // 2
    pieces = [prompt[:, :half], prompt[:, half:]] + [cont[:, t : t + 1] for t in range(new_tokens)]
    with _recording_mixers(model) as mixer_outs:
        logits = [model(input_ids=x, cache=cache, use_cache=True).logits[:, -1] for x in pieces]
    return torch.stack(logits, 1), mixer_outs


@torch.no_grad()
def _randomise(model, seed: int) -> None:
    """Full-scale random weights: at initialisation the SSM term is small next to the skip
    (D * x) and the residual stream, so a wrong scan call could hide inside the tolerances.
    Matrices ~ N(0, 1/fan_in), norms 1 + N(0, 0.2), biases and D ~ N(0, 0.2) / N(0, 1); the
    decay parameters (A_log, dt biases) keep their initialisation so the scan stays stable."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_log" or leaf == "dt_bias" or name.endswith("dt_proj.bias"):
            continue
        noise = torch.randn(p.shape, generator=g)
        if p.dim() >= 2:
            p.copy_(noise / p.shape[-1] ** 0.5)
        elif leaf == "D":
            p.copy_(noise)
        elif "norm" in name and leaf == "weight":
            p.copy_(1 + 0.2 * noise)
        else:
            p.copy_(0.2 * noise)


def _worst(pairs) -> float:
    return max(rel_err(a, b) for a, b in pairs)


def parity(mixer: str, dtype: str, device: str = "cuda", kernels_b: str = "cuda", *, layers: int = 2,
           d_model: int = 256, heads: int = 4, vocab: int = 1024, batch: int = 2, seq: int = 256,
           new_tokens: int = 4, seed: int = 0, config: dict | None = None) -> dict:  # fmt: skip
    """Compare ``kernels="torch"`` with ``kernels=kernels_b`` on the same weights: logits and
    every mixer's output, every gradient, and cached generation (logits and mixer outputs).
    ``config``: more XatlConfig fields. Returns the errors, the tolerances and ``ok``."""
    from xatl_ds.models import XatlForCausalLM

    shape = dict(layers=layers, d_model=d_model, heads=heads, vocab=vocab, seq=seq, **(config or {}))
    torch.manual_seed(seed)
    ref = XatlForCausalLM(make_config(mixer, kernels="torch", **shape))
    _randomise(ref, seed)
    fast = XatlForCausalLM(make_config(mixer, kernels=kernels_b, **shape))
    fast.load_state_dict(ref.state_dict())
    dt = DTYPES[dtype]
    ref, fast = ref.to(device=device, dtype=dt).train(), fast.to(device=device, dtype=dt).train()
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)
    lr, mr, gr = _fwd_bwd(ref, ids)
    lf, mf, gf = _fwd_bwd(fast, ids)
    if set(gr) != set(gf):
        raise AssertionError(f"{mixer}: gradient sets differ: {sorted(set(gr) ^ set(gf))}")
    grad_errs = {n: rel_err(gf[n], gr[n]) for n in gr}
    worst = max(grad_errs, key=grad_errs.get)
    ref.eval(), fast.eval()
    (glf, gmf), (glr, gmr) = _generate(fast, ids, new_tokens), _generate(ref, ids, new_tokens)
    tol = TOLERANCES[dtype]
    res = {
        "mixer": mixer, "dtype": dtype, "kernels": kernels_b, "logits_err": rel_err(lf, lr),
        "mixer_err": _worst(zip(mf, mr)), "grad_err_max": grad_errs[worst], "grad_err_worst_param": worst,
        "gen_err": max(rel_err(glf, glr), _worst(zip(gmf, gmr))), "tolerances": tol,
    }  # fmt: skip
    res["ok"] = (
        max(res["logits_err"], res["mixer_err"]) <= tol[0] and res["grad_err_max"] <= tol[1] and res["gen_err"] <= tol[2]
    )
    return res


def _cuda_timed(fn, device: str):
    def run() -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return run


def throughput(models: dict | None = None, *, device: str = "cuda", dtype: str = "bf16", batch: int = 8,
               seq: int = 2048, peak_flops: float = 989e12, repeats: int = 5, warmup: int = 2,
               layers: int = 12, d_model: int = 768, heads: int = 12, vocab: int = 50304,
               kernels: str = "auto", torch_mixers: tuple[str, ...] = (), seed: int = 0) -> list[dict]:  # fmt: skip
    """Interleaved fwd+bwd tokens/s and MFU per model (``{name: (mixer, attention_layers)}``);
    models of a mixer in ``torch_mixers`` run ``kernels="torch"``. A model that does not fit
    is reported with ``error`` instead of numbers."""
    from xatl_ds.flops import step_flops
    from xatl_ds.models import XatlForCausalLM

    models = models or THROUGHPUT_MODELS
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)
    built, rows, errors = {}, [], {}
    for name, (mixer, att) in models.items():
        try:
            torch.manual_seed(seed)
            cfg = make_config(mixer, layers=layers, d_model=d_model, heads=heads, vocab=vocab, attention_layers=att,
                              kernels="torch" if mixer in torch_mixers else kernels, seq=seq)  # fmt: skip
            m = XatlForCausalLM(cfg).to(device=device, dtype=DTYPES[dtype]).train()

            def step(m=m):
                m(input_ids=ids, labels=ids).loss.backward()
                m.zero_grad(set_to_none=True)

            step()  # fails early (OOM, missing kernel) before the interleaved rounds
            built[name] = (m, _cuda_timed(step, device))
        except Exception as e:  # report and go on with the other mixers
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    if built:
        samples = interleaved({k: v[1] for k, v in built.items()}, repeats=repeats, warmup=max(0, warmup - 1))
        ref = samples.get("attention")
        for name, ts in samples.items():
            m = built[name][0]
            s = median(ts)
            fl = step_flops(m.config, batch, seq).total
            rows.append({
                "name": name, "tokens_per_s": batch * seq / s, "step_s": s, "step_flops": fl,
                "tflops_per_s": fl / s / 1e12, "mfu": fl / s / peak_flops,
                "ratio_vs_attention": (median(ref) / s) if ref else None,
            })  # fmt: skip
    rows += [{"name": k, "error": v} for k, v in errors.items()]
    return rows


def render(info: dict, par: list[dict], thr: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "# GPU check", "",
        f"{info.get('gpu')}, torch {info['torch']} (CUDA {info.get('cuda')}), transformers {info['transformers']}, "
        f"xatl_ds {info['xatl_ds']}, {info['date']}.", "",
        "Kernels: " + ", ".join(f"{k} {v or 'MISSING'}" for k, v in info["kernels"].items()) + ".",
    ]  # fmt: skip
    if getattr(args, "emulate", False):
        lines += ["", "**Emulated on a CPU** (benchmarks/kernel_emulation.py): the SSD Triton kernels ran under "
                      "Triton's interpreter, the CUDA extensions' entry points as contract-checked reference "
                      "functions. This checks the call sites (layouts, dtypes, fused biases, states), not the "
                      "kernels' numerics or speed. The SSD kernels are checked in fp32 only: the interpreter does "
                      "not run them faithfully in bf16."]  # fmt: skip
    elif "selective_scan_cuda" in info["kernels"]:
        lines += ["", "**selective_scan_cuda was not built** (stubbed so mamba-ssm imports): no Mamba-1 kernel "
                      "parity; the mamba and hybrid throughput rows are the torch path."]  # fmt: skip
    elif not info["kernels"]["mamba_ssm"]:
        lines += ["", "**mamba-ssm is not installed: no kernel parity was checked and the throughput rows are the "
                      "torch paths.** Install with `pip install --no-build-isolation 'xatl-ds[cuda]'`."]  # fmt: skip
    lines += ["", "## Parity: kernels='torch' vs kernels='cuda', same weights", ""]
    if par:
        lines.append(md_table(
            ["mixer", "dtype", "kernels", "logits err", "mixer output err", "worst grad err (param)", "generation err",
             "tolerances", "ok"],
            [[p["mixer"], p["dtype"], p["kernels"], f"{p['logits_err']:.2e}", f"{p['mixer_err']:.2e}",
              f"{p['grad_err_max']:.2e} ({p['grad_err_worst_param']})", f"{p['gen_err']:.2e}",
              "/".join(f"{t:g}" for t in p["tolerances"]), "yes" if p["ok"] else "**NO**"]
             if "error" not in p else [p["mixer"], p["dtype"], "", "error", "", p["error"], "", "", "**NO**"] for p in par],
        ))  # fmt: skip
        lines += ["", "Errors are ||cuda - torch|| / ||torch||; mixer outputs per layer and gradients per tensor, "
                      "the worst shown; generation covers logits and mixer outputs of a two-piece prefill and "
                      "single-token steps. Tolerances: outputs / gradients / generation."]  # fmt: skip
    else:
        lines.append("Not checked (mamba-ssm missing).")
    if args.skip_throughput:
        return "\n".join(lines) + "\n"
    lines += ["", f"## Throughput: pythia-160m size (12 layers, d 768, vocab 50304), {args.dtype}, "
                  f"batch {args.batch} x seq {args.seq}, fwd+bwd, {args.repeats} interleaved repeats", ""]  # fmt: skip
    lines.append(md_table(
        ["model", "tokens/s", "vs attention", "TFLOP/s (analytic)", f"MFU (peak {args.peak_tflops:g} TFLOP/s)"],
        [[r["name"], f"{r['tokens_per_s']:,.0f}", f"{r['ratio_vs_attention']:.2f}x" if r["ratio_vs_attention"] else "-",
          f"{r['tflops_per_s']:.1f}", f"{r['mfu']:.1%}"] if "error" not in r else [r["name"], r["error"], "", "", ""]
         for r in thr],
    ))  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for gpu_check.md / gpu_check.json")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100 SXM: 989)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="throughput precision")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--emulate", action="store_true",
                   help="parity only, on this CPU, with the kernels emulated (benchmarks/kernel_emulation.py)")  # fmt: skip
    args = p.parse_args(argv)
    device, shape = "cuda", PARITY_SHAPE
    if args.emulate:
        from benchmarks import kernel_emulation

        try:
            versions = kernel_emulation.activate()
        except RuntimeError as e:
            print(f"gpu_check --emulate: {e}", file=sys.stderr)
            return 2
        device, shape, args.skip_throughput = "cpu", EMULATION_SHAPE, True
    elif not torch.cuda.is_available():
        print("gpu_check: CUDA is not available on this machine (torch.cuda.is_available() is False); nothing "
              "was checked. Run it on a CUDA machine: python benchmarks/gpu_check.py --out DIR", file=sys.stderr)  # fmt: skip
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    if args.emulate:
        kernels = {"mamba_ssm": versions["mamba-ssm"], "causal_conv1d": versions["causal-conv1d"],
                   "triton": f"{versions['triton']} (interpreter)"}  # fmt: skip
        info.update(gpu="no GPU (CPU kernel emulation)", cuda=None, kernels=kernels)
    else:
        stubbed = stub_missing_selective_scan()
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda, kernels=kernel_status())
        if stubbed:
            info["kernels"]["selective_scan_cuda"] = None  # rendered MISSING; Mamba-1 runs its torch path
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity means fp32
        torch.backends.cudnn.allow_tf32 = False
    par: list[dict] = []
    if info["kernels"]["mamba_ssm"]:
        # kernels="cuda" insists on every kernel; without causal-conv1d, "auto" still runs mamba-ssm's
        mode = "cuda" if info["kernels"]["causal_conv1d"] else "auto"
        for mixer, dtypes in (EMULATION_DTYPES if args.emulate else PARITY_DTYPES).items():
            for dt in dtypes:
                if mixer == "mamba" and "selective_scan_cuda" in info["kernels"]:
                    par.append({"mixer": mixer, "dtype": dt, "ok": False, "error": "selective_scan_cuda is not built"})
                    continue
                try:
                    par.append(parity(mixer, dt, device, kernels_b=mode, **shape))
                except Exception as e:
                    traceback.print_exc()
                    par.append({"mixer": mixer, "dtype": dt, "ok": False, "error": f"{type(e).__name__}: {e}"[:300]})
                print(f"parity {mixer} {dt}: {par[-1]}", flush=True)
    else:
        print("gpu_check: mamba-ssm is not installed: timing the torch paths only", file=sys.stderr)
    def write(thr: list[dict]) -> str:
        md = render(info, par, thr, args)
        (out / "gpu_check.md").write_text(md)
        (out / "gpu_check.json").write_text(json.dumps({"info": info, "parity": par, "throughput": thr}, indent=1,
                                                       default=str))  # fmt: skip
        return md

    md = write([])  # the parity results survive a throughput run cut short
    if not args.skip_throughput:
        no_scan = ("mamba",) if "selective_scan_cuda" in info["kernels"] else ()
        md = write(throughput(batch=args.batch, seq=args.seq, peak_flops=args.peak_tflops * 1e12,
                              repeats=args.repeats, dtype=args.dtype, torch_mixers=no_scan))  # fmt: skip
    print(md)
    return 0 if all(p["ok"] for p in par) else 1


if __name__ == "__main__":
    raise SystemExit(main())
