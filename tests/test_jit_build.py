"""A killed extension build never hangs later ones, and CPU ranks build no DeepSpeed op."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from xatl_ds.jit_build import TORCH_LOCK, exclusive_build

HOLD = """
import sys, time
from torch.utils.file_baton import FileBaton
from xatl_ds.jit_build import exclusive_build
with exclusive_build(sys.argv[1]):
    assert FileBaton(sys.argv[1] + "/lock").try_acquire()   # what torch's load does while it builds
    print("building", flush=True)
    time.sleep(600)
"""


def test_a_killed_builder_leaves_nothing_that_blocks(tmp_path):
    from torch.utils.file_baton import FileBaton

    d = str(tmp_path / "ext")
    p = subprocess.Popen([sys.executable, "-c", HOLD, d], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "building"
        assert os.path.exists(os.path.join(d, TORCH_LOCK))
        os.kill(p.pid, signal.SIGKILL)  # mid-build: torch's lock file stays behind
        p.wait(timeout=30)
    finally:
        p.kill()
    assert os.path.exists(os.path.join(d, TORCH_LOCK))
    t0 = time.monotonic()
    with exclusive_build(d):
        assert not os.path.exists(os.path.join(d, TORCH_LOCK))
        baton = FileBaton(os.path.join(d, TORCH_LOCK))
        assert baton.try_acquire()  # torch's load would build now instead of waiting forever
        baton.release()
    assert time.monotonic() - t0 < 10


def test_a_live_builder_is_waited_for(tmp_path):
    d = str(tmp_path / "ext")
    p = subprocess.Popen([sys.executable, "-c", HOLD, d], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "building"
        t0 = time.monotonic()
        threading.Timer(1.5, p.kill).start()  # the builder ends (killed) after 1.5 s
        with exclusive_build(d):
            assert time.monotonic() - t0 >= 1.0  # it waited for the live holder, not removed its lock
    finally:
        p.kill()
        p.wait(timeout=30)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU backend's op")
def test_cpu_ranks_skip_deepspeeds_inference_op(tmp_path, monkeypatch):
    import importlib

    from xatl_ds.process_setup import skip_cpu_inference_op

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    skip_cpu_inference_op()
    ds_torch = importlib.import_module("deepspeed.comm.torch")  # (deepspeed.comm's `torch` is torch)
    assert ds_torch.build_shm_op() is None  # what DeepSpeed's backend calls when it starts
    assert not any(tmp_path.iterdir()), "nothing compiled"
