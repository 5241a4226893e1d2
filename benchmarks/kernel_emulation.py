"""Run the mixers' CUDA-kernel call sites on a CPU, before any GPU is at hand.

The ``kernels="cuda"`` paths of the Mamba mixers call mamba-ssm and causal-conv1d with
their own layouts ((batch, channels, length) for the scan and conv, fused softplus/bias,
initial and final states). A wrong argument there would otherwise surface only on a CUDA
machine. :func:`activate` makes those call sites run here:

- mamba-ssm's SSD Triton kernels (``mamba_chunk_scan_combined``, forward and backward) run
  as written under Triton's CPU interpreter (``TRITON_INTERPRET=1``; triton >= 3.8, whose
  interpreter handles these kernels). The interpreter cannot benchmark, so each autotuned
  kernel keeps its first config, and the device queries they make are answered for CPU
  tensors.
- The CUDA extensions (``selective_scan_cuda``, ``causal_conv1d_cuda``) cannot run. Their
  Python entry points (``selective_scan_fn``, ``causal_conv1d_fn``) are replaced by the
  packages' own pure-torch reference functions behind a checker that enforces the
  extension's input contract as its C++ source checks it (dtypes, shapes, channel-last
  strides), so a call the extension would reject fails here too.
- The mixers are told the kernels apply to CPU tensors.

What this cannot catch: numerics of the CUDA kernels themselves, bf16/TF32 behaviour of real
hardware, and speed; ``benchmarks/gpu_check.py`` on a CUDA machine remains the real check.

Needs ``make emulation-deps`` (triton, einops, and the mamba-ssm / causal-conv1d sources
installed without building their CUDA extensions). Activate in a fresh process, before
anything imports triton: ``python benchmarks/gpu_check.py --emulate --out DIR``.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import sys
import types

INSTALL_HINT = "install them with `make emulation-deps` (see the Makefile for the exact pip lines)"
MIN_TRITON = (3, 8)
_STATE: dict = {}


class ContractError(RuntimeError):
    """A call the real CUDA extension would reject."""


def _req(ok: bool, fn: str, msg: str) -> None:
    if not ok:
        raise ContractError(f"{fn}: {msg}")


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("mamba-ssm", "causal-conv1d", "triton", "einops"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def check_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False) -> None:  # fmt: skip
    """``selective_scan_fn``'s contract (selective_scan.cpp's forward checks; the Python
    wrapper makes the last dimension contiguous itself, so strides are not checked)."""
    import torch

    fn, it = "selective_scan_fn", u.dtype
    _req(u.dim() == 3, fn, f"u must be (batch, dim, seqlen), got {tuple(u.shape)}")
    b, d, l = u.shape
    _req(it in (torch.float32, torch.float16, torch.bfloat16), fn, f"u dtype {it} unsupported")
    _req(A.dtype == torch.float32 and A.dim() == 2 and A.shape[0] == d, fn,
         f"A must be fp32 (dim={d}, dstate), got {A.dtype} {tuple(A.shape)}")  # fmt: skip
    n = A.shape[1]
    _req(n <= 256, fn, f"dstate {n} > 256")
    _req(delta.dtype == it and tuple(delta.shape) == (b, d, l), fn,
         f"delta must be {it} {(b, d, l)}, got {delta.dtype} {tuple(delta.shape)}")  # fmt: skip
    for name, M in (("B", B), ("C", C)):
        if M.dim() == 2:
            _req(M.dtype == torch.float32 and tuple(M.shape) == (d, n), fn, f"constant {name} must be fp32 {(d, n)}")
        else:
            shape = tuple(M.shape) if M.dim() == 4 else (M.shape[0], 1, *M.shape[1:])
            _req(M.dim() in (3, 4) and shape[0] == b and shape[2:] == (n, l) and d % shape[1] == 0, fn,
                 f"variable {name} must be (batch, dstate, seqlen) or (batch, groups, dstate, seqlen) with "
                 f"batch={b} dstate={n} seqlen={l}, got {tuple(M.shape)}")  # fmt: skip
            _req(M.dtype == it, fn, f"variable {name} must have u's dtype {it}, got {M.dtype}")
    if D is not None:
        _req(D.dtype == torch.float32 and tuple(D.shape) == (d,), fn, f"D must be fp32 ({d},), got {D.dtype} {tuple(D.shape)}")
    if delta_bias is not None:
        _req(delta_bias.dtype == torch.float32 and tuple(delta_bias.shape) == (d,), fn,
             f"delta_bias must be fp32 ({d},), got {delta_bias.dtype} {tuple(delta_bias.shape)}")  # fmt: skip
    if z is not None:
        _req(z.dtype == it and tuple(z.shape) == (b, d, l), fn, f"z must be {it} {(b, d, l)}, got {z.dtype} {tuple(z.shape)}")


def check_causal_conv1d(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                        final_states_out=None, activation=None) -> None:  # fmt: skip
    """``causal_conv1d_fn``'s contract (its wrapper plus causal_conv1d.cpp's forward checks)."""
    import torch

    fn = "causal_conv1d_fn"
    floats = (torch.float32, torch.float16, torch.bfloat16)
    _req(activation in (None, "silu", "swish"), fn, f"activation {activation!r} unsupported")
    _req(x.dim() == 3 and x.dtype in floats, fn, f"x must be float (batch, dim, seqlen), got {x.dtype} {tuple(x.shape)}")
    d = x.shape[1]
    _req(weight.dim() == 2 and weight.shape[0] == d and weight.dtype in floats, fn,
         f"weight must be (dim={d}, width), got {weight.dtype} {tuple(weight.shape)}")  # fmt: skip
    _req(2 <= weight.shape[1] <= 4, fn, f"width {weight.shape[1]} not in 2..4")
    if bias is not None:
        _req(bias.dtype == weight.dtype and tuple(bias.shape) == (d,), fn, f"bias must be {weight.dtype} ({d},)")
    if x.stride(2) != 1 and x.stride(1) != 1:  # the wrapper copies such inputs itself
        x = x.contiguous()
    if x.stride(1) == 1 and x.stride(2) > 1:  # channel-last
        _req(d % 8 == 0, fn, f"channel-last input needs dim % 8 == 0, got dim {d}")
        _req(x.stride(0) % 8 == 0 and x.stride(2) % 8 == 0, fn,
             f"channel-last input needs x.stride(0) and x.stride(2) multiples of 8, got {x.stride()}")  # fmt: skip
    _req(seq_idx is None and initial_states is None and not return_final_states and final_states_out is None, fn,
         "seq_idx / initial_states / final states are not emulated (the mixers do not use them)")  # fmt: skip


def _checked(check, ref):
    def fn(*args, **kwargs):
        check(*args, **kwargs)
        return ref(*args, **kwargs)

    return fn


def missing_extension(name: str) -> types.ModuleType:
    """A stand-in module for a CUDA extension that was not built: importing it works, using
    any of its functions raises a RuntimeError naming it."""
    mod = types.ModuleType(name)

    def __getattr__(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise RuntimeError(f"kernel emulation: {name}.{attr} is the CUDA extension, which does not exist here")

    mod.__getattr__ = __getattr__
    return mod


def activate() -> dict[str, str]:
    """Set up the emulation in this process (idempotent); returns the package versions.

    Raises RuntimeError when a package is missing or triton was imported before without
    the interpreter (then run in a fresh process)."""
    if _STATE.get("active"):
        return _STATE["versions"]
    versions = _versions()
    missing = [k for k, v in versions.items() if v is None]
    if missing:
        raise RuntimeError(f"kernel emulation needs {', '.join(missing)}; {INSTALL_HINT}")
    tv = tuple(int(p) for p in versions["triton"].split(".")[:2])
    if tv < MIN_TRITON:
        raise RuntimeError(f"kernel emulation needs triton >= {'.'.join(map(str, MIN_TRITON))} (its interpreter "
                           f"fails on mamba-ssm's kernels before), found {versions['triton']}; {INSTALL_HINT}")  # fmt: skip
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before kernel emulation was activated, so its kernels are compiled "
                           "for a GPU; activate first, in a fresh process")  # fmt: skip
    os.environ["TRITON_INTERPRET"] = "1"

    import torch

    if torch.cuda.is_available():
        raise RuntimeError("kernel emulation is for machines without CUDA; run benchmarks/gpu_check.py for real")
    for ext in ("selective_scan_cuda", "causal_conv1d_cuda"):
        sys.modules.setdefault(ext, missing_extension(ext))

    # The Triton wrappers pin the current device and size grids by SM count.
    real_device, real_props = torch.cuda.device, torch.cuda.get_device_properties

    def device(idx):
        return contextlib.nullcontext() if idx is None or getattr(idx, "type", "cuda") != "cuda" else real_device(idx)

    def get_device_properties(dev=None):
        if isinstance(dev, torch.device) and dev.type != "cuda":
            return types.SimpleNamespace(multi_processor_count=8, name="cpu (kernel emulation)")
        return real_props(dev)

    torch.cuda.device, torch.cuda.get_device_properties = device, get_device_properties

    from triton.runtime.autotuner import Autotuner

    import mamba_ssm.ops.triton.ssd_combined  # noqa: F401  (imports every SSD kernel module)

    for name, mod in list(sys.modules.items()):
        if name.startswith("mamba_ssm.ops.triton"):
            for obj in vars(mod).values():
                if isinstance(obj, Autotuner):
                    obj.configs = obj.configs[:1]  # the interpreter cannot time candidates

    ssi = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    ssi.selective_scan_fn = _checked(check_selective_scan, ssi.selective_scan_ref)
    cci = importlib.import_module("causal_conv1d.causal_conv1d_interface")

    def conv(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
             final_states_out=None, activation=None):  # fmt: skip
        check_causal_conv1d(x, weight, bias, seq_idx, initial_states, return_final_states, final_states_out, activation)
        return cci.causal_conv1d_ref(x, weight, bias, activation=activation)  # (its ref has no seq_idx)

    cci.causal_conv1d_fn = conv
    importlib.import_module("causal_conv1d").causal_conv1d_fn = conv

    # The mixers normally reserve the kernels for CUDA tensors.
    from xatl_ds.models import mamba, mamba2

    def use_kernels(mode, x, module, what):
        return mode != "torch"

    mamba.use_kernels = mamba2.use_kernels = use_kernels
    _STATE.update(active=True, versions=versions)
    return versions


# -- mamba-ssm rows under emulation (optional) ---------------------------------------------
def emulate_cuda_paths() -> dict:
    """For the optional ``cuda`` rows on a CPU: :func:`activate` (mamba-ssm's Python and Triton
    code, its CUDA extensions as contract-checked reference functions), then the path selector
    of every loaded xatl_ds module answers ``cuda`` for CPU tensors under ``kernels="cuda"`` alone: ``triton`` and ``auto`` keep their own answers,
    so no reference function can stand in for one of our kernels. Returns the versions."""
    from xatl_ds.models import kernels as K

    versions = activate()
    real_select, real_available = K.select_path, K.available

    def select_path(mode, x, what, cuda_module=None):
        if mode == "cuda" and x.device.type == "cpu":
            return "cuda" if cuda_module is not None else real_select("triton", x, what)
        return real_select(mode, x, what, cuda_module)

    def available(module):
        return K._try_import(module) is not None or real_available(module)

    def use_kernels(mode, x, module, what):
        return mode == "cuda"

    for name, mod in list(sys.modules.items()):
        if name.startswith("xatl_ds.models"):
            for attr, fn in (("select_path", select_path), ("available", available), ("use_kernels", use_kernels)):
                if hasattr(mod, attr):
                    setattr(mod, attr, fn)
    return versions


def emulation_packages_present() -> bool:
    """Whether mamba-ssm's and causal-conv1d's sources are installed (``make emulation-deps``)."""
    return all(v is not None for v in _versions().values())
