"""The shape of the code base: the import graph of xatl_ds and analysis has no cycle (lazy,
function-level imports included), no module imports another's private name, the run-directory
file names have one owner, and the CLI answers --help without importing the heavy stack."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGES = ("xatl_ds", "analysis")


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (REPO / pkg).rglob("*.py"):
            out[_module_name(p)] = p
    return out


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """module -> the project modules it imports (anywhere in the file), and the private names
    imported from another module."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[tuple[str, list[str]]] = []
            if isinstance(node, ast.Import):
                targets = [(a.name, []) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                src = _resolve(mod, is_pkg, node)
                targets = [(src, [a.name for a in node.names])]
                # "from . import x" / "from pkg import sub": a submodule is a module dependency
                targets += [(f"{src}.{a.name}", []) for a in node.names if f"{src}.{a.name}" in mods]
            for target, names in targets:
                dep = target
                while dep and dep not in mods:
                    dep = dep.rpartition(".")[0]
                if dep and dep != mod and not mod.startswith(dep + ".") and not (is_pkg and dep.startswith(mod + ".")):
                    graph[mod].add(dep)
                if dep and dep != mod:
                    private += [f"{mod}: {n} from {target}" for n in names if n.startswith("_") and not n.startswith("__")]
    return graph, private


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                found.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return found


def test_import_graph_has_no_cycle_and_no_private_imports():
    graph, private = import_graph()
    assert len(graph) > 30
    assert _cycles(graph) == []
    assert private == []
    users = {m for m, deps in graph.items() if "xatl_ds.cli" in deps and not m.endswith("__main__")}
    assert users == set(), f"the library never imports the CLI (only python -m entry points do): {users}"


def test_run_directory_files_have_one_owner():
    names = re.compile(r"""["'](metrics\.jsonl|DONE|meta\.json|eval\.json)["']""")
    owners = sorted(str(p.relative_to(REPO)) for p in _modules().values() if names.search(p.read_text()))
    # a prepared dataset's meta.json is the data package's own contract (xatl_ds/data/layout.py)
    assert owners == ["xatl_ds/data/layout.py", "xatl_ds/rundir.py"], owners
    assert "metrics.jsonl" not in (REPO / "xatl_ds" / "data" / "layout.py").read_text()


def test_help_does_not_import_the_stack():
    code = ("import sys; from xatl_ds.cli import build_parser; build_parser().format_help(); "
            "build_parser('sweep').format_help(); "
            "print(sorted(m for m in ('torch', 'transformers', 'deepspeed', 'optuna', 'lm_eval', 'numpy') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
