"""The CUDA-kernel call sites, run on the CPU (benchmarks/kernel_emulation.py).

mamba-ssm's SSD Triton kernels run under Triton's interpreter; the CUDA extensions' entry
points are their packages' reference functions behind checks of the extensions' input
contracts. Each emulated run is a fresh subprocess: the interpreter must be switched on
before anything imports triton. Needs ``make emulation-deps`` (``make test`` installs it).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO

from benchmarks import kernel_emulation as ke

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="emulation is for machines without CUDA"),
    pytest.mark.skipif(any(v is None for v in ke._versions().values()),
                       reason=f"kernel emulation packages missing: {ke.INSTALL_HINT}"),  # fmt: skip
]


def _python(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_gpu_check_emulated_parity(tmp_path):
    """gpu_check's parity section end to end on the CPU: every row present, passing, and
    far inside the tolerances (the call sites compute the same function, not a near one)."""
    r = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--emulate", "--out", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = {(p["mixer"], p["dtype"]): p for p in res["parity"]}
    assert set(rows) == {("mamba", "fp32"), ("mamba", "bf16"), ("mamba2", "fp32")}
    assert all(p["ok"] and p["kernels"] == "cuda" for p in rows.values())
    for key in (("mamba", "fp32"), ("mamba2", "fp32")):
        p = rows[key]
        assert max(p["logits_err"], p["mixer_err"], p["gen_err"]) < 1e-5 and p["grad_err_max"] < 1e-3, p
    assert res["throughput"] == [] and "Emulated on a CPU" in (tmp_path / "gpu_check.md").read_text()
    assert "triton" in res["info"]["kernels"] and "interpreter" in res["info"]["kernels"]["triton"]


def test_emulation_catches_a_wrong_call():
    """The harness can fail: a plausible call-site bug (B and C swapped) breaks every parity measure, and a
    dtype the extension rejects (bf16 delta_bias) raises the contract error."""
    r = _python(
        """
        from benchmarks import kernel_emulation, gpu_check
        kernel_emulation.activate()
        import mamba_ssm.ops.selective_scan_interface as ssi
        good = ssi.selective_scan_fn
        shape = dict(layers=1, d_model=32, heads=4, vocab=64, batch=2, seq=24, new_tokens=2)
        print("good", gpu_check.parity("mamba", "fp32", "cpu", kernels_b="cuda", **shape)["ok"])
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
        """
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "good True" in out and "swapped False True" in out, out
    assert "contract selective_scan_fn: delta_bias must be fp32" in out, out


def test_activate_refuses_a_compiled_triton():
    r = _python("import triton\nfrom benchmarks import kernel_emulation\nkernel_emulation.activate()")
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


def test_gpu_check_stubs_a_missing_selective_scan():
    """With mamba-ssm's sources but no selective-scan extension (a GPU build that ran out of
    time), gpu_check stands a stub in so mamba-ssm imports for the SSD kernels, once."""
    r = _python(
        """
        from benchmarks import gpu_check
        print("stubbed", gpu_check.stub_missing_selective_scan(), gpu_check.stub_missing_selective_scan())
        import mamba_ssm.ops.triton.ssd_combined
        import selective_scan_cuda
        try:
            selective_scan_cuda.fwd
        except RuntimeError as e:
            print("raises", e)
        """
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stubbed True False" in r.stdout and "raises kernel emulation: selective_scan_cuda.fwd" in r.stdout
