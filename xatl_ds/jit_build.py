"""torch JIT-extension builds that survive a builder killed mid-build.

``torch.utils.cpp_extension.load`` guards a build folder with a plain ``lock`` file
(``FileBaton``: ``O_CREAT | O_EXCL``, removed when the build ends). A process killed while it
holds it -- a run stopped with SIGKILL, a test timeout, a lease ending -- leaves the file behind,
and every later ``load`` of that extension then waits for it forever, silently. This was seen:
after one killed launch, every run of a checkout hung in its first rank until its timeout.

:func:`exclusive_build` runs a build under an ``fcntl`` lock beside the folder, which the kernel
drops whatever way its holder ends. Every xatl-ds builder of an extension takes it first, so
while one holds it a torch ``lock`` file in the folder has no live owner and is removed.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator

__all__ = ["TORCH_LOCK", "exclusive_build"]

#: the file torch's ``FileBaton`` keeps in a build folder while it builds
TORCH_LOCK = "lock"


@contextlib.contextmanager
def exclusive_build(build_dir: str) -> Iterator[None]:
    """Hold the build of the extension in ``build_dir`` for this process; a torch lock file
    found inside (left by a killed builder) is removed with a one-line notice on stderr."""
    os.makedirs(build_dir, exist_ok=True)
    with open(os.path.join(os.path.dirname(os.path.abspath(build_dir)),
                           f".{os.path.basename(os.path.abspath(build_dir))}.xatl-lock"), "a") as f:  # fmt: skip
        fcntl.flock(f, fcntl.LOCK_EX)  # waits for a live builder; released by the kernel on exit
        try:
            stale = os.path.join(build_dir, TORCH_LOCK)
            if os.path.exists(stale):
                os.remove(stale)
                print(f"[xatl-ds] removed {stale}: left by a build that was killed", file=sys.stderr, flush=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
