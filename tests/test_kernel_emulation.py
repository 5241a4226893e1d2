"""gpu_check on the CPU: the project's Triton kernels under Triton's interpreter, compared
with the torch paths (benchmarks/gpu_check.py --emulate), and the optional mamba-ssm call
sites through benchmarks/kernel_emulation.py (its CUDA extensions' entry points as their
packages' reference functions behind checks of the extensions' input contracts). Each
emulated run is a fresh subprocess: the interpreter must be switched on before anything
imports triton. The mamba-ssm part needs ``make emulation-deps`` (``make test`` installs it).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO

from benchmarks import kernel_emulation as ke

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="emulation is for machines without CUDA")
needs_emulation_deps = pytest.mark.skipif(any(v is None for v in ke._versions().values()),
                                          reason=f"kernel emulation packages missing: {ke.INSTALL_HINT}")  # fmt: skip


def _python(code: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip


def test_gpu_check_emulated_parity(tmp_path):
    """gpu_check's parity section end to end on the CPU: every Triton row present, run on the
    Triton path, passing, and the fp32 rows far inside the tolerances (the kernels compute
    the same function, not a near one)."""
    from benchmarks.gpu_check import EMULATION_DTYPES, PARITY_MIXERS

    r = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--emulate", "--skip-throughput", "--out",
                        str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=900)  # fmt: skip
    res = json.loads((tmp_path / "gpu_check.json").read_text())["results"]
    rows = {(p["mixer"], p["dtype"]): p for p in res["parity"]}
    assert set(rows) == {(m, d) for m in PARITY_MIXERS for d in EMULATION_DTYPES}
    bad = {k: p.get("error") or p for k, p in rows.items() if not p["ok"]}
    assert not bad, bad
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for (mixer, dtype), p in rows.items():
        assert p["kernels"] == "triton" and set(p["paths"].values()) == {"triton"}, p["paths"]
        assert set(p["paths_ref"].values()) == {"torch"}, p["paths_ref"]
        if dtype == "fp32":
            assert max(p["loss_err"], p["logits_err"], p["mixer_err"], p["gen_err"]) < 1e-5, p
            assert p["grad_err_max"] < 1e-3, p
    assert "throughput" not in res and "Emulated on a CPU" in (tmp_path / "gpu_check.md").read_text()


def test_a_wrong_triton_call_fails_parity():
    """The harness can fail on our kernels: q and k swapped at the Mamba-2 call site of the
    chunked-scan kernel breaks the parity row."""
    r = _python(
        """
        import os
        os.environ["TRITON_INTERPRET"] = "1"
        from benchmarks import gpu_check
        from xatl_ds.models.gpu import chunk_scan as cs
        shape = dict(layers=1, d_model=64, heads=4, vocab=64, batch=1, seq=40, new_tokens=2,
                     config=dict(chunk_size=16, mamba2_headdim=32, mamba2_ngroups=2, d_state=8))
        print("good", gpu_check.parity("mamba2", "fp32", "cpu", **shape)["ok"])
        good = cs.chunk_scan
        cs.chunk_scan = lambda q, k, *a, **kw: good(k, q, *a, **kw)
        p = gpu_check.parity("mamba2", "fp32", "cpu", **shape)
        print("swapped", p["ok"], p["path_ok"], p["mixer_err"] > 1e-2)
        """
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "good True" in r.stdout and "swapped False True True" in r.stdout, r.stdout


@needs_emulation_deps
def test_emulation_catches_a_wrong_call():
    """The optional mamba-ssm rows can fail: a plausible call-site bug (B and C swapped) breaks
    every parity measure, and a dtype the extension rejects (bf16 delta_bias) raises the
    contract error. Once emulated, kernels='triton' still runs our Triton kernels."""
    r = _python(
        """
        import os
        os.environ["TRITON_INTERPRET"] = "1"
        from benchmarks import kernel_emulation, gpu_check
        gpu_check.emulate_cuda_paths()
        import mamba_ssm.ops.selective_scan_interface as ssi
        good = ssi.selective_scan_fn
        shape = dict(layers=1, d_model=32, heads=4, vocab=64, batch=2, seq=24, new_tokens=2)
        def errs(p):
            return max(p["logits_err"], p["mixer_err"], p["gen_err"])
        p = gpu_check.parity("mamba", "fp32", "cpu", kernels_b="cuda", **shape)
        print("good", errs(p) < 1e-5)
        ssi.selective_scan_fn = lambda u, dt, A, B, C, *a, **k: good(u, dt, A, C, B, *a, **k)
        p = gpu_check.parity("mamba", "fp32", "cpu", kernels_b="cuda", **shape)
        print("swapped", p["ok"], min(p["logits_err"], p["mixer_err"], p["gen_err"]) > 1e-2)
        def bf16_bias(*a, delta_bias=None, **k):
            return good(*a, delta_bias=delta_bias.bfloat16(), **k)
        ssi.selective_scan_fn = bf16_bias
        try:
            gpu_check.parity("mamba", "bf16", "cpu", kernels_b="cuda", **shape)
        except kernel_emulation.ContractError as e:
            print("contract", e)
        p = gpu_check.parity("mamba2", "fp32", "cpu", kernels_b="triton", layers=1, d_model=64, heads=4, vocab=64,
                             batch=1, seq=24, new_tokens=2, config=dict(chunk_size=16, mamba2_headdim=32))
        print("triton stays", p["paths"].get("Mamba2Mixer"), p["ok"])
        """
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "good True" in out and "swapped False True" in out, out
    assert "contract selective_scan_fn: delta_bias must be fp32" in out, out
    assert "triton stays triton True" in out, out


@needs_emulation_deps
def test_activate_refuses_a_compiled_triton():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # (conftest may set it for the suite)
    r = _python("import triton\nfrom benchmarks import kernel_emulation\nkernel_emulation.activate()", env=env)
    assert r.returncode != 0 and "activate first, in a fresh process" in r.stderr


def test_contract_checks():
    f32, bf16 = torch.float32, torch.bfloat16
    b, d, n, l = 2, 8, 4, 5
    u = torch.zeros(b, d, l)
    A, B = torch.zeros(d, n), torch.zeros(b, n, l)
    ke.check_selective_scan(u, u, A, B, B, torch.zeros(d), u, torch.zeros(d))  # a valid call
    ke.check_selective_scan(u.to(bf16), u.to(bf16), A, B.to(bf16), B.to(bf16).unsqueeze(1), torch.zeros(d))
    bad = {
        "A must be fp32": dict(A=A.to(bf16)),
        "delta must be": dict(delta=u.to(bf16)),
        "variable C must have u's dtype": dict(C=B.double()),
        "variable B must be (batch, dstate, seqlen)": dict(B=torch.zeros(b, n, l + 1)),
        "D must be fp32": dict(D=torch.zeros(d, dtype=bf16)),
        "z must be": dict(z=torch.zeros(b, d, l + 1)),
    }
    for msg, kw in bad.items():
        args = dict(u=u, delta=u, A=A, B=B, C=B, D=torch.zeros(d), z=u, delta_bias=torch.zeros(d)) | kw
        with pytest.raises(ke.ContractError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            ke.check_selective_scan(**args)

    x, w = torch.zeros(b, 16, l), torch.zeros(16, 4)
    ke.check_causal_conv1d(x, w, torch.zeros(16), activation="silu")
    ke.check_causal_conv1d(torch.zeros(b, l, 16).transpose(1, 2), w)  # channel-last, strides % 8 == 0
    with pytest.raises(ke.ContractError, match="multiples of 8"):
        ke.check_causal_conv1d(torch.zeros(b, l, 20)[..., :16].transpose(1, 2), w)
    with pytest.raises(ke.ContractError, match="width 5"):
        ke.check_causal_conv1d(x, torch.zeros(16, 5))
    with pytest.raises(ke.ContractError, match="bias must be"):
        ke.check_causal_conv1d(x, w, torch.zeros(16, dtype=f32).to(bf16))
