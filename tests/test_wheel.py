"""A wheel install works without the repository: built with ``pip wheel .``, installed into a
folder of its own and used from a directory outside the checkout, ``xatl-ds`` prepares data,
runs a shipped sweep by name and finds its DeepSpeed config by name."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, train_env

pytestmark = pytest.mark.slow


def test_wheel_install_runs_a_shipped_sweep_by_name(tmp_path):
    wheels, site, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)], check=True,
                   capture_output=True, timeout=600)  # fmt: skip
    (wheel,) = wheels.glob("xatl_ds-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=600)  # fmt: skip
    env = train_env()
    env["PYTHONPATH"] = str(site)  # ahead of the editable install of the checkout
    env["PATH"] = f"{site / 'bin'}{os.pathsep}{env['PATH']}"

    def run(*args: str, timeout: int = 600) -> str:
        r = subprocess.run([sys.executable, "-m", "xatl_ds.cli", *args], cwd=work, env=env, capture_output=True,
                           text=True, timeout=timeout)  # fmt: skip
        assert r.returncode == 0, f"xatl-ds {' '.join(args)}: {r.stdout[-3000:]}{r.stderr[-3000:]}"
        return r.stdout

    where = subprocess.run([sys.executable, "-c", "import xatl_ds, xatl_ds.config as c; print(xatl_ds.__file__); "
                            "print(c.ds_config_path('zero2.json')); print(c.sweep_file_path('smoke'))"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=120, check=True).stdout.split()
    assert all(Path(p).is_relative_to(site) for p in where), where
    run("data", "prepare", "--out", "runs/data/smoke", "--max-chars", "40000", "--vocab-size", "320")
    out = run("sweep", "run", "smoke")
    assert "all 3 runs done" in out, out
    runs = sorted((work / "runs" / "sweeps" / "smoke" / "runs").iterdir())
    assert len(runs) == 3 and all((r / "DONE").is_file() and (r / "hf" / "config.json").is_file() for r in runs)
    assert "zero_stage" in (runs[0] / "meta.json").read_text()
