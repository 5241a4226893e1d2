"""Prepared check for a CUDA machine: kernel parity, then bf16 throughput / MFU per mixer.

    python benchmarks/gpu_check.py --out DIR [--skip-parity | --skip-throughput] [--compile]
                                   [--peak-tflops 989] [--batch 4] [--seq 2048]
    python benchmarks/gpu_check.py --emulate --out DIR     # the same on a CPU, tiny shapes

1. Parity. For mamba, mamba2 and retnet, one model with ``kernels="torch"`` and one with
   ``kernels="triton"`` (the project's Triton kernels, :mod:`xatl_ds.models.gpu`) share the
   same full-scale random weights; the loss, every mixer's output, the logits, every
   parameter gradient and cached generation (a two-piece prefill, then single-token steps)
   are compared in fp32 and bf16. Error = ||a - b|| / ||b|| (norm-relative; per tensor, the
   worst reported). Each row records which path each model ran
   (:func:`xatl_ds.models.kernels.paths_used`); a row whose fast model did not run its
   Triton path fails, so a fallback can never pass for a kernel. Where mamba-ssm imports,
   optional ``kernels="cuda"`` rows for mamba / mamba2 follow.
2. Throughput. A pythia-160m-shaped model (12 layers, d_model 768, 12 heads, vocab 50304)
   per mixer, bf16 weights, forward + backward (the fused loss where the Triton path runs),
   timed interleaved: tokens/s, ratio to attention, MFU = analytic FLOPs
   (``xatl_ds.flops.step_flops``) per second / ``--peak-tflops`` (H100 / H200 dense bf16:
   989), the peak memory the model added, and the paths that ran. ``--compile`` adds rows of
   the same models with every block under ``torch.compile`` (``xatl_ds.train.compile_blocks``,
   the trainer's ``train.compile``). A model that fails (missing kernel, OOM) is a row with
   its error; ``--time-budget`` skips models once it is spent.

Writes ``DIR/gpu_check.md`` and ``DIR/gpu_check.json`` after every section (a later section
that dies leaves the earlier ones written; with ``--append`` a run adds its sections to the
JSON already there) and prints the markdown. Without CUDA (and without ``--emulate``) it
prints why and exits 0 having done nothing. Exit code 1 when a parity row fails.

``--emulate`` runs on this CPU: the Triton kernels under Triton's interpreter
(``TRITON_INTERPRET=1``, set here before anything imports triton) on a tiny shape with
several chunks and a partial last chunk, and a tiny throughput section (it times the
interpreter: the numbers only show the harness runs). Where mamba-ssm / causal-conv1d's
sources are installed (``make emulation-deps``), the ``cuda`` rows run their call sites
through :mod:`benchmarks.kernel_emulation` (the SSD Triton kernels of mamba-ssm under the
interpreter, the CUDA extensions' entry points as contract-checked reference functions).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:  # run as a plain script: make xatl_ds and benchmarks importable
    sys.path.insert(0, str(_REPO))

if "--emulate" in sys.argv[1:]:  # the interpreter must be on before anything imports triton
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from benchmarks import interleaved, machine_info, median  # noqa: E402
from benchmarks.gpu_report import render  # noqa: E402
from benchmarks.kernel_emulation import emulate_cuda_paths, emulation_packages_present  # noqa: E402

#: name -> (mixer, attention_layers)
THROUGHPUT_MODELS = {
    "attention": ("attention", None),
    "retnet": ("retnet", None),
    "mamba": ("mamba", None),
    "mamba2": ("mamba2", None),
    "hybrid (mamba + paper attention)": ("mamba", "paper"),
}
#: the models timed again under --compile (compiling costs ~20-40 s per model on a GPU)
COMPILE_MODELS = ("attention", "mamba")
#: norm-relative error bounds, (outputs, gradients, generation)
#: (a wrong kernel gives errors of order 1; TF32 inside Triton dots stays below the fp32 ones)
TOLERANCES = {"fp32": (5e-3, 2e-2, 5e-3), "bf16": (5e-2, 1e-1, 5e-2)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PYTHIA_160M = dict(layers=12, d_model=768, heads=12, vocab=50304)
#: the mixers with Triton kernels, and the dtypes their parity is checked in
PARITY_MIXERS = ("mamba", "mamba2", "retnet")
PARITY_DTYPES = ("fp32", "bf16")
#: the mixers with mamba-ssm / causal-conv1d CUDA paths (optional rows)
CUDA_MIXERS = ("mamba", "mamba2")
#: parity on a CUDA machine: 256 tokens in chunks of 64 (several chunks), Mamba-2 in 2 B/C groups
PARITY_SHAPE = dict(config=dict(mamba2_ngroups=2))
#: the emulated parity shape: small for Triton's interpreter, several chunks (72 tokens, chunk
#: 16: the last one partial), 4 Mamba-2 heads in 2 groups, conv channels % 8 == 0
EMULATION_SHAPE = dict(layers=2, d_model=64, heads=4, vocab=256, batch=2, seq=72, new_tokens=4,
                       config=dict(chunk_size=16, mamba2_headdim=32, mamba2_ngroups=2))  # fmt: skip
#: Mamba's selective scan walks time inside each program: under the interpreter it is ~20x
#: slower than the chunked kernels, so its rows get a smaller shape (still 3 chunks of 16, the
#: last partial, and 2 channel blocks)
EMULATION_OVERRIDES = {"mamba": dict(layers=1, d_model=32, batch=1, seq=40, config=dict(d_state=8))}
#: emulated dtypes: the interpreter computes bf16 dots through numpy in fp32, so bf16 rows check
#: the kernels' casts and accumulation dtypes, not bf16 tensor-core rounding
EMULATION_DTYPES = ("fp32", "bf16")
#: the emulated throughput shape (the interpreter is ~1000x slower than a GPU)
EMULATION_THROUGHPUT = dict(layers=1, d_model=32, heads=4, vocab=128, batch=1, seq=32,
                            config=dict(chunk_size=16, mamba2_headdim=16, d_state=8))  # fmt: skip


def kernel_status() -> dict:
    """Which kernel packages import (and their versions); mamba-ssm / causal-conv1d are optional."""
    from xatl_ds.models.kernels import _try_import

    out = {}
    for mod in ("triton", "mamba_ssm", "causal_conv1d"):
        m = _try_import(mod) if torch.cuda.is_available() or mod == "triton" else None
        out[mod] = getattr(m, "__version__", "present") if m is not None else None
    return out


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


def _paths(model) -> dict:
    from xatl_ds.models.kernels import paths_used

    return paths_used(model)


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
    """The training step's own call (the fused loss where the Triton path takes it), then the
    logits in a separate no-grad forward (the fused loss never materialises them)."""
    model.zero_grad(set_to_none=True)
    with _recording_mixers(model) as mixer_outs:
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    paths = dict(_paths(model), loss=getattr(model, "last_loss_path", None) or "torch")
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        logits = model(input_ids=ids, return_logits=True).logits.detach()
    return out.loss.detach(), logits, mixer_outs, grads, paths


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
    (D * x) and the residual stream, so a wrong scan could hide inside the tolerances.
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
    errs = [rel_err(a, b) for a, b in pairs]
    return max(errs) if errs else float("nan")


def _ran(paths: dict, want: str) -> bool:
    """Whether every mixer that recorded a path ran ``want`` (and at least one did)."""
    mixers = {k: v for k, v in paths.items() if k != "loss"}
    return bool(mixers) and all(v == want for v in mixers.values())


def parity(mixer: str, dtype: str, device: str = "cuda", kernels_b: str = "triton", *, layers: int = 2,
           d_model: int = 256, heads: int = 4, vocab: int = 1024, batch: int = 2, seq: int = 256,
           new_tokens: int = 4, seed: int = 0, config: dict | None = None) -> dict:  # fmt: skip
    """Compare ``kernels="torch"`` with ``kernels=kernels_b`` on the same weights: the loss,
    logits, every mixer's output, every gradient, and cached generation (logits and mixer
    outputs). ``config``: more XatlConfig fields. Returns the errors, the tolerances, the
    paths each model ran and ``ok`` (within tolerance *and* the fast model ran ``kernels_b``'s
    path; always true-to-path for ``kernels_b="torch"``, the harness's self-check)."""
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
    loss_r, lr, mr, gr, paths_r = _fwd_bwd(ref, ids)
    loss_f, lf, mf, gf, paths_f = _fwd_bwd(fast, ids)
    if set(gr) != set(gf):
        raise AssertionError(f"{mixer}: gradient sets differ: {sorted(set(gr) ^ set(gf))}")
    grad_errs = {n: rel_err(gf[n], gr[n]) for n in gr}
    worst = max(grad_errs, key=grad_errs.get)
    ref.eval(), fast.eval()
    (glf, gmf), (glr, gmr) = _generate(fast, ids, new_tokens), _generate(ref, ids, new_tokens)
    tol = TOLERANCES[dtype]
    want = "torch" if kernels_b == "torch" else kernels_b
    res = {
        "mixer": mixer, "dtype": dtype, "kernels": kernels_b, "loss_err": rel_err(loss_f, loss_r),
        "logits_err": rel_err(lf, lr), "mixer_err": _worst(zip(mf, mr)), "grad_err_max": grad_errs[worst],
        "grad_err_worst_param": worst, "gen_err": max(rel_err(glf, glr), _worst(zip(gmf, gmr))), "tolerances": tol,
        "paths": paths_f, "paths_ref": paths_r, "gen_paths": _paths(fast),
    }  # fmt: skip
    res["path_ok"] = _ran(paths_f, want) and _ran(paths_r, "torch")
    res["ok"] = res["path_ok"] and (
        max(res["loss_err"], res["logits_err"], res["mixer_err"]) <= tol[0] and res["grad_err_max"] <= tol[1]
        and res["gen_err"] <= tol[2]
    )  # fmt: skip
    if not res["path_ok"]:
        res["error"] = f"the {kernels_b} path did not run: fast {paths_f}, reference {paths_r}"
    return res


def _error_row(e: BaseException) -> str:
    msg = str(e).splitlines()[0][:240] if str(e) else ""
    return f"{type(e).__name__}: {msg}"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _cuda_timed(fn, device: str):
    def run() -> float:
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t0

    return run


def throughput(models: dict | None = None, *, device: str = "cuda", dtype: str = "bf16", batch: int = 4,
               seq: int = 2048, peak_flops: float = 989e12, repeats: int = 5, warmup: int = 2,
               layers: int = 12, d_model: int = 768, heads: int = 12, vocab: int = 50304,
               kernels: str = "auto", compile: bool = False, time_budget: float | None = None,
               config: dict | None = None, seed: int = 0) -> list[dict]:  # fmt: skip
    """Interleaved fwd+bwd tokens/s, MFU, peak memory and kernel paths per model
    (``{name: (mixer, attention_layers)}``). ``compile``: every block under torch.compile
    (the trainer's ``train.compile``; the compile happens in the first, untimed step). A model
    that fails, or that would start after ``time_budget`` seconds, is reported with
    ``error`` instead of numbers."""
    from xatl_ds.flops import step_flops
    from xatl_ds.models import XatlForCausalLM

    models = models or THROUGHPUT_MODELS
    cuda = device.startswith("cuda")
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)
    built, rows, errors, extra = {}, [], {}, {}
    t_start = time.perf_counter()
    for name, (mixer, att) in models.items():
        if time_budget is not None and time.perf_counter() - t_start > time_budget:
            errors[name] = f"skipped: the time budget ({time_budget:g} s) was spent"
            continue
        t0 = time.perf_counter()
        try:
            torch.manual_seed(seed)
            cfg = make_config(mixer, layers=layers, d_model=d_model, heads=heads, vocab=vocab, attention_layers=att,
                              kernels=kernels, seq=seq, **(config or {}))  # fmt: skip
            if cuda:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            m = XatlForCausalLM(cfg).to(device=device, dtype=DTYPES[dtype]).train()
            if compile:
                from xatl_ds.train import compile_blocks

                compile_blocks(m)

            def step(m=m):
                m(input_ids=ids, labels=ids).loss.backward()
                m.zero_grad(set_to_none=True)

            step()  # fails early (OOM, missing kernel), JIT-compiles, before the interleaved rounds
            _sync(device)
            extra[name] = {
                "paths": dict(_paths(m), loss=getattr(m, "last_loss_path", None) or "torch"),
                "first_step_s": time.perf_counter() - t0,
                "peak_mem_bytes": torch.cuda.max_memory_allocated() - base if cuda else None,
            }  # fmt: skip
            built[name] = (m, _cuda_timed(step, device))
        except Exception as e:  # report and go on with the other models
            traceback.print_exc()
            errors[name] = _error_row(e)
            if cuda:
                torch.cuda.empty_cache()
    if built:
        samples = interleaved({k: v[1] for k, v in built.items()}, repeats=repeats, warmup=max(0, warmup - 1))
        ref = samples.get("attention")
        for name, ts in samples.items():
            m = built[name][0]
            s = median(ts)
            fl = step_flops(m.config, batch, seq).total
            rows.append({
                "name": name, "compiled": compile, "tokens_per_s": batch * seq / s, "step_s": s, "step_flops": fl,
                "tflops_per_s": fl / s / 1e12, "mfu": fl / s / peak_flops,
                "ratio_vs_attention": (median(ref) / s) if ref else None, **extra[name],
            })  # fmt: skip
    rows += [{"name": k, "compiled": compile, "error": v} for k, v in errors.items()]
    for m, _ in built.values():
        del m
    built.clear()
    if cuda:
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for gpu_check.md / gpu_check.json")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100/H200: 989)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="throughput precision")
    p.add_argument("--skip-parity", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--compile", action="store_true", help="also time the models of --compile-models compiled")
    p.add_argument("--compile-models", default=",".join(COMPILE_MODELS))
    p.add_argument("--models", default=",".join(THROUGHPUT_MODELS), help="throughput models (names)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds after which no further model is built")
    p.add_argument("--no-cuda-rows", action="store_true", help="skip the optional mamba-ssm rows")
    p.add_argument("--append", action="store_true", help="keep the sections of an earlier run in --out's JSON")
    p.add_argument("--emulate", action="store_true",
                   help="on this CPU: the Triton kernels under Triton's interpreter, tiny shapes")  # fmt: skip
    args = p.parse_args(argv)
    if args.emulate:
        os.environ["TRITON_INTERPRET"] = "1"  # (main() called in-process: before triton's import)
        if torch.cuda.is_available():
            print("gpu_check --emulate is for machines without CUDA; run without it", file=sys.stderr)
            return 2
        device, shape = "cpu", EMULATION_SHAPE
    elif not torch.cuda.is_available():
        print("gpu_check: CUDA is not available on this machine (torch.cuda.is_available() is False); nothing "
              "was checked. Run it on a CUDA machine, or with --emulate here.", file=sys.stderr)  # fmt: skip
        return 0
    else:
        device, shape = "cuda", PARITY_SHAPE
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity means fp32 (re-enabled for throughput)
        torch.backends.cudnn.allow_tf32 = False
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    info.update(gpu=torch.cuda.get_device_name(0) if device == "cuda" else "no GPU (CPU, Triton interpreter)",
                cuda=torch.version.cuda, kernels=kernel_status())  # fmt: skip
    jpath = out / "gpu_check.json"
    res: dict = {}
    if args.append and jpath.is_file():
        res = json.loads(jpath.read_text()).get("results", {})
    res["settings"] = dict(res.get("settings", {}), emulate=args.emulate, device=device)

    def write() -> str:
        md = render(info, res)
        (out / "gpu_check.md").write_text(md)
        jpath.write_text(json.dumps({"info": info, "results": res}, indent=1, default=str))
        return md

    failed = False
    if not args.skip_parity:
        res["parity"] = []
        dtypes = EMULATION_DTYPES if args.emulate else PARITY_DTYPES
        for mixer in PARITY_MIXERS:
            for dt in dtypes:
                t0 = time.perf_counter()
                try:
                    sh = dict(shape, **EMULATION_OVERRIDES.get(mixer, {})) if args.emulate else shape
                    sh["config"] = dict(shape.get("config", {}), **sh.get("config", {}))
                    row = parity(mixer, dt, device, kernels_b="triton", **sh)
                except Exception as e:  # a missing or broken kernel is a failed row, not a crash
                    traceback.print_exc()
                    row = {"mixer": mixer, "dtype": dt, "kernels": "triton", "ok": False, "error": _error_row(e)}
                row["seconds"] = time.perf_counter() - t0
                res["parity"].append(row)
                print(f"parity {mixer} {dt} triton: ok={row['ok']} ({row['seconds']:.1f} s) "
                      f"{ {k: v for k, v in row.items() if k.endswith('_err') or k in ('paths', 'error')} }", flush=True)
                write()
        failed |= not all(r["ok"] for r in res["parity"])
        # optional: mamba-ssm's CUDA kernels (emulated call sites on a CPU)
        res["cuda_parity"] = []
        have_cuda_pkgs = info["kernels"]["mamba_ssm"] is not None
        if not args.no_cuda_rows and args.emulate and emulation_packages_present():
            try:
                v = emulate_cuda_paths()
                info["kernels"].update(mamba_ssm=f"{v['mamba-ssm']} (emulated)", causal_conv1d=f"{v['causal-conv1d']} (emulated)")
                have_cuda_pkgs = True
            except RuntimeError as e:
                print(f"gpu_check: no emulated cuda rows: {e}", file=sys.stderr)
        if have_cuda_pkgs and not args.no_cuda_rows:
            for mixer in CUDA_MIXERS:
                for dt in ("fp32",) if args.emulate else PARITY_DTYPES:
                    try:
                        row = parity(mixer, dt, device, kernels_b="cuda", **shape)
                    except Exception as e:
                        traceback.print_exc()
                        row = {"mixer": mixer, "dtype": dt, "kernels": "cuda", "ok": False, "error": _error_row(e)}
                    res["cuda_parity"].append(row)
                    print(f"parity {mixer} {dt} cuda: ok={row['ok']}", flush=True)
                    write()
        write()
    md = write()
    if not args.skip_throughput:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        if args.emulate:
            s = EMULATION_THROUGHPUT
            kw = dict(layers=s["layers"], d_model=s["d_model"], heads=s["heads"], vocab=s["vocab"], config=s["config"])
            batch, seq, dtype, kernels = s["batch"], s["seq"], "fp32", "triton"
            shape_txt = f"tiny ({s['layers']} layers, d {s['d_model']}, vocab {s['vocab']}; interpreter)"
        else:
            kw, batch, seq, dtype, kernels = dict(PYTHIA_160M), args.batch, args.seq, args.dtype, "auto"
            shape_txt = "pythia-160m shape (12 layers, d 768, 12 heads, vocab 50304)"
        names = [n.strip() for n in args.models.split(",") if n.strip()]
        if args.emulate and args.models == p.get_default("models"):  # the tiny shape has too few layers for 'paper'
            names = [n for n in names if THROUGHPUT_MODELS[n][1] is None]
            args.repeats = min(args.repeats, 2)
        models = {n: THROUGHPUT_MODELS[n] for n in names}
        res["settings"]["throughput"] = dict(shape=shape_txt, dtype=dtype, batch=batch, seq=seq, repeats=args.repeats,
                                             peak_tflops=args.peak_tflops, kernels=kernels)  # fmt: skip
        common = dict(device=device, dtype=dtype, batch=batch, seq=seq, peak_flops=args.peak_tflops * 1e12,
                      repeats=args.repeats, kernels=kernels, **kw)  # fmt: skip
        t0 = time.perf_counter()
        res["throughput"] = throughput(models, time_budget=args.time_budget, **common)
        md = write()
        if args.compile:
            spent = time.perf_counter() - t0
            left = None if args.time_budget is None else max(0.0, args.time_budget - spent)
            cm = {n: THROUGHPUT_MODELS[n] for n in args.compile_models.split(",") if n.strip()}
            res["compile"] = throughput(cm, compile=True, time_budget=left, **common)
            md = write()
    print(md)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
