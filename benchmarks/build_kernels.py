"""Build mamba-ssm's and causal-conv1d's CUDA extensions for this machine's GPU alone.

    python benchmarks/build_kernels.py --sdists DIR --build DIR [--arch 9.0] [--dry-run]

Their setup.py compiles every architecture from sm_75 to sm_121, far longer than a short
lease of a GPU machine allows. This unpacks the two source distributions (``make
gpu-bundle`` downloads them into ``.gpu/sdists``), JIT-builds the same sources with the
same nvcc flags for the visible GPU's architecture only (``torch.utils.cpp_extension``,
ninja, one job per core), and writes ``BUILD/env.sh``, which puts the built extensions and
the packages' Python sources on ``PYTHONPATH``. ``--dry-run`` prints the plan and compiles
nothing (no CUDA needed). Ends with one JSON line: what was built and how long it took.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

#: the flags both setup.py files give nvcc (minus their per-architecture -gencode list)
NVCC_FLAGS = [
    "-O3", "-std=c++17",
    "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math", "-lineinfo",
    "--threads", "2",
]  # fmt: skip


@dataclass(frozen=True)
class Extension:
    name: str  #: the Python module the package imports
    sdist: str  #: glob of the source distribution
    sources: tuple[str, ...]  #: globs inside it
    cxx_flags: tuple[str, ...] = ("-O3", "-std=c++17")


EXTENSIONS = (
    Extension("causal_conv1d_cuda", "causal_conv1d-*.tar.gz", ("csrc/causal_conv1d.cpp", "csrc/causal_conv1d_*.cu")),
    Extension("selective_scan_cuda", "mamba_ssm-*.tar.gz",
              ("csrc/selective_scan/selective_scan.cpp", "csrc/selective_scan/selective_scan_*.cu")),  # fmt: skip
)


class BuildError(RuntimeError):
    pass


def unpack(sdists: Path, ext: Extension, dest: Path) -> Path:
    """Unpack the one sdist matching ``ext.sdist`` into ``dest``; returns its root folder."""
    found = sorted(sdists.glob(ext.sdist))
    if len(found) != 1:
        raise BuildError(f"{sdists}: expected one {ext.sdist} for {ext.name}, found {[p.name for p in found]}; "
                         "run `make gpu-bundle` on a machine with PyPI")  # fmt: skip
    with tarfile.open(found[0]) as tar:
        top = {m.name.split("/")[0] for m in tar.getmembers()}
        if len(top) != 1:
            raise BuildError(f"{found[0].name}: expected one top-level folder, found {sorted(top)}")
        root = dest / top.pop()
        if not root.is_dir():
            tar.extractall(dest, filter="data")
    return root


def plan(sdists: Path, build: Path, arch: str) -> list[dict]:
    """Unpack and list what to compile, per extension."""
    out = []
    for ext in EXTENSIONS:
        root = unpack(sdists, ext, build / "src")
        sources = []
        for pattern in ext.sources:
            hits = sorted(glob.glob(str(root / pattern)))
            if not hits:
                raise BuildError(f"{root.name}: no source matches {pattern}; the package layout changed")
            sources += hits
        out.append({
            "name": ext.name, "root": str(root), "sources": sources, "include": [str(Path(sources[0]).parent)],
            "cxx_flags": list(ext.cxx_flags), "nvcc_flags": NVCC_FLAGS, "arch": arch,
            "build_dir": str(build / "ext" / ext.name),
        })  # fmt: skip
    return out


def compile_one(item: dict) -> float:
    """JIT-build one extension into its build_dir; returns the seconds it took."""
    from torch.utils.cpp_extension import load

    os.makedirs(item["build_dir"], exist_ok=True)
    t0 = time.perf_counter()
    load(name=item["name"], sources=item["sources"], extra_cflags=item["cxx_flags"],
         extra_cuda_cflags=item["nvcc_flags"], extra_include_paths=item["include"], build_directory=item["build_dir"],
         verbose=True)  # fmt: skip
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sdists", type=Path, default=Path(".gpu/sdists"))
    p.add_argument("--build", type=Path, default=Path("/tmp/xatl_kernels"))
    p.add_argument("--arch", help="compute capability, e.g. 9.0 (default: the visible GPU's)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, compile nothing")
    args = p.parse_args(argv)
    arch = args.arch
    if arch is None:
        import torch

        if not torch.cuda.is_available():
            print("build_kernels: no CUDA device; pass --arch with --dry-run to see the plan", file=sys.stderr)
            return 2
        arch = "{}.{}".format(*torch.cuda.get_device_capability(0))
    try:
        items = plan(args.sdists, args.build, arch)
    except BuildError as e:
        print(f"build_kernels: {e}", file=sys.stderr)
        return 2
    paths = [it["build_dir"] for it in items] + [it["root"] for it in items]
    env = args.build / "env.sh"
    env.write_text(f"export PYTHONPATH={':'.join(shlex.quote(x) for x in paths)}${{PYTHONPATH:+:$PYTHONPATH}}\n")
    summary = {"arch": arch, "env": str(env), "extensions": {}}
    for it in items:
        print(f"[build_kernels] {it['name']}: {len(it['sources'])} sources for sm_{arch.replace('.', '')}", flush=True)
        if args.dry_run:
            summary["extensions"][it["name"]] = {"sources": [Path(s).name for s in it["sources"]], "built": False}
            continue
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch  # cpp_extension's -gencode: this architecture only
        os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
        try:
            secs = compile_one(it)
            summary["extensions"][it["name"]] = {"built": True, "seconds": round(secs, 1)}
        except Exception as e:  # report, try the other one, let gpu_check say what is missing
            summary["extensions"][it["name"]] = {"built": False, "error": f"{type(e).__name__}: {str(e)[-500:]}"}
    print(json.dumps(summary))
    return 0 if args.dry_run or all(v["built"] for v in summary["extensions"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
