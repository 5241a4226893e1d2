"""Mamba-1 mixer (selective SSM) with three interchangeable paths for the selective scan.

* :func:`selective_scan_ref`: a plain sequential torch loop, the test oracle.
* CPU: a fused C++ scan (``xatl_ds/csrc/selective_scan.cpp``), JIT-built with
  ``torch.utils.cpp_extension.load`` on first use and wrapped in autograd Functions whose
  backward recomputes the states per channel. If it cannot be built (no compiler), a torch
  autograd Function with a hand-written reverse scan takes over (``impl="torch"``).
* Triton (``xatl_ds.models.gpu.selective_scan``, imported lazily): the default on CUDA
  tensors (``select_path``, :mod:`xatl_ds.models.kernels`).
* CUDA: mamba-ssm's ``selective_scan_fn`` and causal-conv1d's ``causal_conv1d_fn`` under
  ``kernels="cuda"`` (imported lazily).

Layout: the torch/CPU functions here are channel-last, ``u, delta, z: (batch, length,
d_inner)``, ``B, C: (batch, length, d_state)``, ``A: (d_inner, d_state)`` -- unlike mamba-ssm's
``(batch, d_inner, length)``, because that is what ``nn.Linear`` produces. The math is the
same: ``h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t``, ``y_t = C_t h_t + D u_t``,
``out = y * silu(z)``, with ``delta = softplus(delta + delta_bias)`` when asked.

Parameter names and shapes follow mamba-ssm's ``Mamba`` module so checkpoints move between
the CPU and kernel paths.
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
import platform
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import Mixer
from .scan_shapes import check_scan_shapes
from .configuration import XatlConfig
from .kernels import available, select_path

__all__ = [
    "MambaMixer",
    "causal_conv1d_silu",
    "cpp_available",
    "selective_scan",
    "selective_scan_ref",
]

CPU_IMPLS = ("auto", "cpp", "torch", "ref")
_SRC = Path(__file__).resolve().parent.parent / "csrc" / "selective_scan.cpp"
_MAX_STATE = 256  # the C++ kernel's stack arrays
_MAX_CONV = 16


# ----------------------------------------------------------------------------------------
# the oracle
def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan as a sequential loop over time (differentiable by autograd; slow).

    Shapes (channel-last): ``u, delta, z: (b, l, d)``, ``A: (d, n)``, ``B, C: (b, l, n)``,
    ``D, delta_bias: (d,)``. Computes in fp32 (fp64 inputs stay fp64) and returns ``out``
    in ``u``'s dtype, plus the final state ``(b, d, n)`` if ``return_last_state``.
    """
    dtype = u.dtype
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    u, delta, A, B, C = (t.to(ct) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)
    if delta_softplus:
        delta = F.softplus(delta)
    b, length, d = u.shape
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(length):
        dt = delta[:, t, :, None]  # (b, d, 1)
        h = torch.exp(dt * A) * h + dt * u[:, t, :, None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    y = torch.stack(ys, dim=1) if ys else u.new_zeros(b, 0, d)
    if D is not None:
        y = y + u * D.to(ct)
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(dtype)
    return (y, h) if return_last_state else y


# ----------------------------------------------------------------------------------------
# the C++ library (built on first use)
def _build_flags() -> tuple[str, list[str]]:
    """Compile flags and a tag naming the build (so machines with different CPUs sharing a
    cache never load each other's binaries)."""
    flags = ["-O3", "-ffp-contract=fast", "-fno-math-errno"]
    tag = "generic"
    if platform.machine().lower() in ("x86_64", "amd64"):
        cap = torch.backends.cpu.get_cpu_capability()
        if cap.startswith("AVX2") or cap.startswith("AVX512"):
            flags += ["-mavx2", "-mfma"]  # AVX2 is enough: 8 lanes match the kernel's vectors
            tag = "avx2"
    return tag, flags


@functools.lru_cache(maxsize=None)
def _load_lib() -> ctypes.CDLL | None:
    """Build (or reuse) and load the C++ kernels; None (with one warning) if that fails."""
    from torch.utils.cpp_extension import get_default_build_root, load

    from ..jit_build import exclusive_build

    tag, flags = _build_flags()
    name = f"xatl_selective_scan_{tag}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    build_dir = os.path.join(root, name)
    err: Exception | None = None
    for omp in (True, False):  # a compiler without OpenMP still gets a (serial) kernel
        try:
            os.makedirs(build_dir, exist_ok=True)
            before = set(torch.ops.loaded_libraries)
            cflags = flags + (["-fopenmp"] if omp else [])
            with exclusive_build(build_dir):  # a killed earlier build must not hang this one
                path = load(
                    name=name if omp else name + "_serial",
                    sources=[str(_SRC)],
                    extra_cflags=cflags,
                    extra_ldflags=["-fopenmp"] if omp else [],
                    build_directory=build_dir,
                    is_python_module=False,
                    verbose=False,
                )
            if not isinstance(path, str):  # older torch returns None: find what it loaded
                new = set(torch.ops.loaded_libraries) - before
                path = next(iter(new)) if new else os.path.join(build_dir, name + ".so")
            lib = ctypes.CDLL(path)
            i64p, fp = ctypes.POINTER(ctypes.c_int64), ctypes.c_void_p
            lib.xatl_scan_fwd.argtypes = [i64p] + [fp] * 9 + [ctypes.c_int]
            lib.xatl_scan_bwd.argtypes = [i64p] + [fp] * 15 + [ctypes.c_int]
            lib.xatl_conv_fwd.argtypes = [i64p] + [fp] * 4 + [ctypes.c_int]
            lib.xatl_conv_bwd.argtypes = [i64p] + [fp] * 7 + [ctypes.c_int]
            for f in (lib.xatl_scan_fwd, lib.xatl_scan_bwd, lib.xatl_conv_fwd, lib.xatl_conv_bwd):
                f.restype = ctypes.c_int
            return lib
        except Exception as e:  # no compiler, no OpenMP, unwritable cache dir, ...
            err = e
    warnings.warn(
        f"could not build the C++ Mamba scan ({type(err).__name__}: {str(err).strip()[:300]}); "
        "falling back to a slower torch scan. Install a C++ compiler (g++ or clang++) and make "
        "TORCH_EXTENSIONS_DIR writable to get the fast CPU path.",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def cpp_available() -> bool:
    """Whether the fused C++ CPU kernels are built and loaded (builds them on first call)."""
    return _load_lib() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _dims(*vals: int) -> ctypes.Array:
    return (ctypes.c_int64 * len(vals))(*[int(v) for v in vals])


def _last_dim_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"the C++ {what} kernel rejected its input sizes (rc={rc})")


def _parts(batch: int, dim: int) -> int:
    """Channel-block groups per batch row in the backward: enough work items for the
    threads, decided by shape only so results do not depend on the thread count."""
    nblk = -(-dim // 8)
    return max(1, min(nblk, -(-32 // batch)))


class _CppScanFn(torch.autograd.Function):
    """Fused C++ scan; ``delta`` is final (softplus and bias applied by the caller)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z):
        u, delta, B, C, z = (_last_dim_contiguous(t) for t in (u, delta, B, C, z))
        A = A.contiguous()
        D = D.contiguous() if D is not None else None
        b, length, d = u.shape
        n = A.shape[1]
        out = u.new_empty(b, length, d)
        last = u.new_empty(b, d, n)
        dims = _dims(
            b, length, d, n, u.stride(0), u.stride(1), delta.stride(0), delta.stride(1),
            z.stride(0) if z is not None else 0, z.stride(1) if z is not None else 0,
            B.stride(0), B.stride(1), C.stride(0), C.stride(1), 1,
        )  # fmt: skip
        lib = _load_lib()
        rc = lib.xatl_scan_fwd(
            dims, _ptr(u), _ptr(delta), _ptr(A), _ptr(B), _ptr(C), _ptr(D), _ptr(z), _ptr(out),
            _ptr(last), torch.get_num_threads(),
        )  # fmt: skip
        _check(rc, "selective scan")
        ctx.save_for_backward(u, delta, A, B, C, D, z)
        ctx.mark_non_differentiable(last)
        return out, last

    @staticmethod
    def backward(ctx, dout, _dlast):
        u, delta, A, B, C, D, z = ctx.saved_tensors
        b, length, d = u.shape
        n = A.shape[1]
        dout = dout.contiguous()
        parts = _parts(b, d)
        du, ddelta = torch.empty_like(dout), torch.empty_like(dout)
        dz = torch.empty_like(dout) if z is not None else None
        dA_part = u.new_empty(b, d, n)
        dD_part = u.new_empty(b, d) if D is not None else None
        dB_part = u.new_empty(b, parts, length, n)
        dC_part = u.new_empty(b, parts, length, n)
        dims = _dims(
            b, length, d, n, u.stride(0), u.stride(1), delta.stride(0), delta.stride(1),
            z.stride(0) if z is not None else 0, z.stride(1) if z is not None else 0,
            B.stride(0), B.stride(1), C.stride(0), C.stride(1), parts,
        )  # fmt: skip
        rc = _load_lib().xatl_scan_bwd(
            dims, _ptr(u), _ptr(delta), _ptr(A), _ptr(B), _ptr(C), _ptr(D), _ptr(z), _ptr(dout),
            _ptr(du), _ptr(ddelta), _ptr(dz), _ptr(dA_part), _ptr(dD_part), _ptr(dB_part),
            _ptr(dC_part), torch.get_num_threads(),
        )  # fmt: skip
        _check(rc, "selective scan backward")
        dD = dD_part.sum(0) if D is not None else None
        return du, ddelta, dA_part.sum(0), dB_part.sum(1), dC_part.sum(1), dD, dz


class _TorchScanFn(torch.autograd.Function):
    """Fallback: the recurrence as a torch loop with a hand-written reverse scan (any device).

    Keeps the (b, l, d, n) states for the backward; memory-bound, but far faster than
    letting autograd differentiate the loop."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z):
        b, length, d = u.shape
        dA = torch.exp(delta.unsqueeze(-1) * A)  # (b, l, d, n)
        dBu = (delta * u).unsqueeze(-1) * B.unsqueeze(2)
        hs = torch.empty_like(dA)
        h = u.new_zeros(b, d, A.shape[1])
        for t in range(length):
            h = torch.addcmul(dBu[:, t], dA[:, t], h)
            hs[:, t] = h
        y = torch.einsum("bldn,bln->bld", hs, C)
        if D is not None:
            y = y + u * D
        out = y * F.silu(z) if z is not None else y
        ctx.save_for_backward(u, delta, A, B, C, D, z, hs, y)
        ctx.mark_non_differentiable(h)
        return out, h

    @staticmethod
    def backward(ctx, dout, _dlast):
        u, delta, A, B, C, D, z, hs, y = ctx.saved_tensors
        length = u.shape[1]
        dz = None
        if z is not None:
            sg = torch.sigmoid(z)
            dz = dout * y * sg * (1 + z * (1 - sg))
            dy = dout * z * sg
        else:
            dy = dout
        dD = (dy * u).sum((0, 1)) if D is not None else None
        du = dy * D if D is not None else torch.zeros_like(u)
        dC = torch.einsum("bld,bldn->bln", dy, hs)
        dA = torch.exp(delta.unsqueeze(-1) * A)
        gs = dy.unsqueeze(-1) * C.unsqueeze(2)  # becomes dL/dh_t in place
        for t in range(length - 2, -1, -1):
            gs[:, t].addcmul_(gs[:, t + 1], dA[:, t + 1])
        # h_t = dA_t h_{t-1} + delta_t u_t B_t
        q = gs[:, 1:] * hs[:, :-1] * dA[:, 1:]  # dL/d(delta_t A) for t >= 1
        dA_param = torch.einsum("bldn,bld->dn", q, delta[:, 1:])
        ddelta = torch.zeros_like(delta)
        ddelta[:, 1:] = torch.einsum("bldn,dn->bld", q, A)
        gB = torch.einsum("bldn,bln->bld", gs, B)
        ddelta = ddelta + gB * u
        du = du + gB * delta
        dB = torch.einsum("bldn,bld->bln", gs, delta * u)
        return du, ddelta, dA_param, dB, dC, dD, dz


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    impl: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan, fast path; same arguments and result as :func:`selective_scan_ref`.

    ``impl``: ``"auto"`` (C++ on CPU if it builds, else torch), ``"cpp"`` (C++, raising if it
    cannot be built or the input is not on CPU), ``"torch"`` (torch loop + hand-written
    backward, any device) or ``"ref"`` (the oracle). Computes in fp32; returns ``u``'s dtype.
    """
    if impl not in CPU_IMPLS:
        raise ValueError(f"impl={impl!r} is unknown; choose one of {CPU_IMPLS}")
    if impl == "ref":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    check_scan_shapes(u, delta, A, B, C, D, z, delta_bias)
    dtype = u.dtype
    f32 = torch.float32
    if delta_bias is not None:
        delta = delta.to(f32) + delta_bias.to(f32)
    if delta_softplus:
        delta = F.softplus(delta.to(f32))
    args = [t.to(f32) if t is not None else None for t in (u, delta, A, B, C, D, z)]
    fn = _TorchScanFn
    if impl in ("auto", "cpp"):
        ok = u.device.type == "cpu" and A.shape[1] <= _MAX_STATE
        if impl == "cpp" and not ok:
            raise ValueError(
                f"impl='cpp' needs CPU tensors and d_state <= {_MAX_STATE} (got {u.device}, "
                f"d_state={A.shape[1]}); use impl='auto' or 'torch'"
            )
        if ok and _load_lib() is not None:
            fn = _CppScanFn
        elif impl == "cpp":
            raise RuntimeError("impl='cpp' but the C++ kernel could not be built (see the warning above)")
    out, last = fn.apply(*args)
    out = out.to(dtype)
    return (out, last) if return_last_state else out


# ----------------------------------------------------------------------------------------
# causal depthwise conv + SiLU
class _CppConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        x = _last_dim_contiguous(x)
        weight = weight.contiguous()
        bias = bias.contiguous() if bias is not None else None
        b, length, d = x.shape
        k = weight.shape[1]
        out = x.new_empty(b, length, d)
        dims = _dims(b, length, d, k, x.stride(0), x.stride(1))
        rc = _load_lib().xatl_conv_fwd(dims, _ptr(x), _ptr(weight), _ptr(bias), _ptr(out), torch.get_num_threads())
        _check(rc, "causal conv")
        ctx.save_for_backward(x, weight, bias)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias = ctx.saved_tensors
        b, length, d = x.shape
        k = weight.shape[1]
        dout = dout.contiguous()
        dx = torch.empty(b, length, d, dtype=x.dtype)
        dw_part = x.new_empty(b, d, k)
        db_part = x.new_empty(b, d) if bias is not None else None
        dims = _dims(b, length, d, k, x.stride(0), x.stride(1))
        rc = _load_lib().xatl_conv_bwd(
            dims, _ptr(x), _ptr(weight), _ptr(bias), _ptr(dout), _ptr(dx), _ptr(dw_part), _ptr(db_part),
            torch.get_num_threads(),
        )  # fmt: skip
        _check(rc, "causal conv backward")
        return dx, dw_part.sum(0), db_part.sum(0) if bias is not None else None


def causal_conv1d_silu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, impl: str = "auto"
) -> torch.Tensor:
    """``silu(causal depthwise conv(x))`` on channel-last ``x: (b, l, d)``, ``weight: (d, k)``.

    Equals ``Conv1d(d, d, k, groups=d, padding=k-1)`` cut to the first ``l`` outputs. ``impl``
    as in :func:`selective_scan` (``"ref"`` and ``"torch"`` both use ``F.conv1d``)."""
    use_cpp = (
        impl in ("auto", "cpp")
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.shape[1] <= _MAX_CONV
        and _load_lib() is not None
    )
    if use_cpp:
        return _CppConvFn.apply(x, weight, bias)
    if impl == "cpp":
        raise RuntimeError("impl='cpp' needs fp32 CPU input, width <= 16 and a built C++ kernel")
    d, k = weight.shape
    y = F.conv1d(x.transpose(1, 2), weight.unsqueeze(1), bias, padding=k - 1, groups=d)[..., : x.shape[1]]
    return F.silu(y).transpose(1, 2)


# ----------------------------------------------------------------------------------------
class MambaMixer(Mixer):
    """Mamba-1 selective-SSM mixer with mamba-ssm's parameter names and shapes.

    ``cpu_impl`` (default from the ``XATL_MAMBA_CPU_IMPL`` environment variable, else
    ``"auto"``) picks the non-CUDA scan: ``auto``/``cpp``/``torch``/``ref``.
    """

    out_proj_name = "out_proj"

    def __init__(self, config: XatlConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.kernels = config.kernels
        d_model, self.d_inner = config.hidden_size, config.d_inner
        self.d_state, self.d_conv, self.dt_rank = config.d_state, config.d_conv, config.dt_rank_value
        for field in ("d_state", "d_conv", "expand"):
            if getattr(config, field) < 1:
                raise ValueError(f"{field}={getattr(config, field)} must be >= 1 for mixer='mamba'")
        if self.dt_rank < 1:
            raise ValueError(f"dt_rank={config.dt_rank!r} must be 'auto' or a positive int")
        self.cpu_impl = os.environ.get("XATL_MAMBA_CPU_IMPL", "auto")
        if self.cpu_impl not in CPU_IMPLS:
            raise ValueError(f"XATL_MAMBA_CPU_IMPL={self.cpu_impl!r} is unknown; choose one of {CPU_IMPLS}")
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=config.mamba_proj_bias)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, self.d_conv, groups=self.d_inner,
            padding=self.d_conv - 1, bias=config.mamba_conv_bias,
        )  # fmt: skip
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=config.mamba_proj_bias)
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self.reset_mixer_parameters()

    @torch.no_grad()
    def reset_mixer_parameters(
        self, dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4
    ) -> None:
        """mamba-ssm's init of the SSM parameters (S4D-real A, dt log-uniform in
        [dt_min, dt_max]) and torch's default init of the depthwise conv.

        Under DeepSpeed ZeRO-3 (``deepspeed.zero.Init``) the tensors are partitioned: they are
        gathered, initialised on rank 0 and re-partitioned."""
        params = [p for p in (self.conv1d.weight, self.conv1d.bias, self.dt_proj.weight, self.dt_proj.bias,
                              self.A_log, self.D) if p is not None]  # fmt: skip
        if any(hasattr(p, "ds_id") for p in params):
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                self._reset(dt_min, dt_max, dt_init_floor)
        else:
            self._reset(dt_min, dt_max, dt_init_floor)

    def _reset(self, dt_min: float, dt_max: float, dt_init_floor: float) -> None:
        self.conv1d.reset_parameters()
        std = self.dt_rank**-0.5
        self.dt_proj.weight.uniform_(-std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        # inverse of softplus: softplus(dt + log(1 - exp(-dt))) = dt
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log.copy_(torch.log(A))
        self.D.fill_(1.0)

    # -- forward -----------------------------------------------------------------------
    def forward(self, x, *, rope=None, state=None):
        """``x: (batch, length, hidden)`` -> same shape. ``state`` (generation): empty dict ->
        parallel pass that stores ``conv``/``ssm``; filled -> token-by-token steps."""
        if state:
            return torch.cat([self.step(x[:, t : t + 1], state) for t in range(x.shape[1])], dim=1)
        path = select_path(self.kernels, x, "the Mamba mixer", cuda_module="mamba_ssm")
        self.last_path = path
        if path == "cuda":
            xz = self.in_proj(x)
            xs = xz[..., : self.d_inner]
            y, last = self._scan_cuda(xz, want_state=state is not None)
        else:
            # two half-projections instead of slicing one: the backward then adds two small
            # input gradients instead of zero-filling and copying a (b, l, 2*d_inner) one
            w, bias = self.in_proj.weight, self.in_proj.bias
            xs = F.linear(x, w[: self.d_inner], None if bias is None else bias[: self.d_inner])
            z = F.linear(x, w[self.d_inner :], None if bias is None else bias[self.d_inner :])
            scan = self._scan_triton if path == "triton" else self._scan_cpu
            y, last = scan(xs, z, want_state=state is not None)
        if state is not None:  # generation state is never backpropagated through
            state["conv"] = self._conv_state(xs.detach())
            state["ssm"] = last.detach()
        return self.out_proj(y)

    def _ssm_inputs(self, u: torch.Tensor):
        """x_proj/dt_proj of the conv output ``u: (b, l, d_inner)``: (dt without bias, B, C)."""
        x_dbl = self.x_proj(u)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt, self.dt_proj.weight), B, C  # dt bias goes into the scan (fp32)

    def _scan_cpu(self, xs: torch.Tensor, z: torch.Tensor, want_state: bool):
        impl = self.cpu_impl
        u = causal_conv1d_silu(xs, self.conv1d.weight.squeeze(1), self.conv1d.bias, impl=impl)
        dt, B, C = self._ssm_inputs(u)
        A = -torch.exp(self.A_log.float())
        y, last = selective_scan(
            u, dt, A, B, C, self.D.float(), z, self.dt_proj.bias.float(),
            delta_softplus=True, return_last_state=True, impl=impl,
        )  # fmt: skip
        return y, (last if want_state else None)

    def _scan_triton(self, xs: torch.Tensor, z: torch.Tensor, want_state: bool):
        """Channel-last Triton scan (xatl_ds.models.gpu, imported here so the package imports
        without triton), after the Triton causal conv + SiLU."""
        from .gpu.conv import causal_conv1d_silu as conv_silu
        from .gpu.selective_scan import selective_scan_triton

        u = conv_silu(xs, self.conv1d.weight.squeeze(1), self.conv1d.bias)
        dt, B, C = self._ssm_inputs(u)
        A = -torch.exp(self.A_log.float())
        y, last = selective_scan_triton(
            u, dt, A, B, C, self.D.float(), z, self.dt_proj.bias.float(),
            delta_softplus=True, return_last_state=True,
        )  # fmt: skip
        return y, (last if want_state else None)

    def _scan_cuda(self, xz: torch.Tensor, want_state: bool):
        """mamba-ssm / causal-conv1d kernels, which take (batch, channels, length)."""
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        xzt = xz.transpose(1, 2)
        xs, z = xzt[:, : self.d_inner], xzt[:, self.d_inner :]
        weight = self.conv1d.weight.squeeze(1)  # (d_inner, d_conv)
        if available("causal_conv1d"):  # optional, as in mamba-ssm
            from causal_conv1d import causal_conv1d_fn

            u = causal_conv1d_fn(xs.contiguous(), weight, self.conv1d.bias, activation="silu")
        else:
            u = causal_conv1d_silu(xs.transpose(1, 2), weight, self.conv1d.bias, impl="torch").transpose(1, 2)
        dt, B, C = self._ssm_inputs(u.transpose(1, 2))
        A = -torch.exp(self.A_log.float())
        res = selective_scan_fn(
            u.contiguous(), dt.transpose(1, 2).contiguous(), A, B.transpose(1, 2).contiguous(),
            C.transpose(1, 2).contiguous(), self.D.float(), z=z.contiguous(),
            delta_bias=self.dt_proj.bias.float(), delta_softplus=True, return_last_state=want_state,
        )  # fmt: skip
        y, last = res if want_state else (res, None)
        return y.transpose(1, 2), (last.float() if last is not None else None)

    def _conv_state(self, xs: torch.Tensor) -> torch.Tensor:
        """The last ``d_conv`` conv inputs as (b, d_inner, d_conv), zero-padded on the left."""
        tail = xs[:, -self.d_conv :].transpose(1, 2)
        return F.pad(tail, (self.d_conv - tail.shape[-1], 0)).contiguous()

    def step(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        """One token ``x: (b, 1, hidden)`` from a filled ``state`` (updated in place)."""
        xz = self.in_proj(x[:, 0])
        xs, z = xz[:, : self.d_inner], xz[:, self.d_inner :]
        conv = torch.cat([state["conv"][:, :, 1:], xs.unsqueeze(-1)], dim=-1)
        state["conv"] = conv
        u = (conv * self.conv1d.weight.squeeze(1)).sum(-1)
        if self.conv1d.bias is not None:
            u = u + self.conv1d.bias
        u = F.silu(u)
        dt, B, C = self._ssm_inputs(u)
        dt = F.softplus(dt.float() + self.dt_proj.bias.float())  # (b, d)
        A = -torch.exp(self.A_log.float())
        h = torch.exp(dt.unsqueeze(-1) * A) * state["ssm"] + (dt * u.float()).unsqueeze(-1) * B.float().unsqueeze(1)
        state["ssm"] = h
        y = (h * C.float().unsqueeze(1)).sum(-1) + self.D.float() * u.float()
        y = (y * F.silu(z.float())).to(x.dtype)
        return self.out_proj(y).unsqueeze(1)
