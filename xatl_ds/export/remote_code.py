"""Remote-code export: a model folder that carries XatlForCausalLM's own source.

``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` then works where
only torch and transformers are installed. The code is not a second copy kept by hand: it
is generated at export time from the package's modules (:data:`ENTRY_MODULES`, the mixers
``modeling.MIXER_CLASSES`` names, and everything they import from xatl_ds), flattened
into one folder with their relative imports rewritten to the flat names:

* imports of other xatl_ds modules become relative imports of their flat copies
  (``from ..families import x`` -> ``from .xatl_families import x``);
* the fast kernels are left out: an import of a kernel module (:data:`EXCLUDED`) or of a
  package outside torch, transformers and the standard library is only allowed inside a
  function, where it becomes ``raise ImportError(...)`` (transformers' loader refuses a file
  importing a package that is not installed, wherever the import sits); a module-level
  one is an :class:`RemoteCodeError`;
* short epilogues pin the pure-torch paths (:data:`EPILOGUES`): ``kernels.select_path``
  always answers ``"torch"``, the Mamba C++ CPU scan is never built (its source is not in
  the folder), and ``modeling.mixer_class`` imports the bundled mixers relatively (the
  loader copies only files imported that way).
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import sys
from pathlib import Path

__all__ = ["AUTO_MAP", "ENTRY_MODULES", "RemoteCodeError", "bundle_sources", "write_remote_code"]

PACKAGE = "xatl_ds"
#: module -> file name (without .py) in the folder; the rest are ``xatl_<last name>``
ENTRY_MODULES = {
    "xatl_ds.models.configuration": "configuration_xatl",
    "xatl_ds.models.modeling": "modeling_xatl",
}
#: what ``config.json``'s auto_map points the Auto classes at
AUTO_MAP = {
    "AutoConfig": "configuration_xatl.XatlConfig",
    "AutoModel": "modeling_xatl.XatlModel",
    "AutoModelForCausalLM": "modeling_xatl.XatlForCausalLM",
}
#: module prefixes never bundled: the Triton / CUDA kernels
EXCLUDED = ("xatl_ds.models.gpu",)
#: top-level packages a bundled module may import at module level
ALLOWED = frozenset({"torch", "transformers"}) | frozenset(sys.stdlib_module_names)

_NO_KERNEL = "the exported model runs pure torch; {what} is not part of it (pip install xatl-ds for the fast kernels)"

#: module -> (top-level function it must define, code appended to its copy)
EPILOGUES: dict[str, tuple[str, str]] = {
    "xatl_ds.models.kernels": (
        "select_path",
        '''
def _try_import(module):
    return None


def select_path(mode, x, what, cuda_module=None):
    """Always the torch path: the exported folder carries no kernels."""
    return "torch"
''',
    ),
    "xatl_ds.models.mamba": (
        "_load_lib",
        '''
def _load_lib():
    """No C++ CPU scan: its source is not in the exported folder; the torch scan runs."""
    return None
''',
    ),
}


class RemoteCodeError(RuntimeError):
    """The package's model code cannot be bundled (it imports something outside torch and
    transformers at module level)."""


def _flat_name(module: str) -> str:
    return ENTRY_MODULES.get(module) or "xatl_" + module.rsplit(".", 1)[-1]


def _module_file(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise RemoteCodeError(f"cannot find the source of {module}")
    return Path(spec.origin)


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module name a (possibly relative) ``from ... import`` names."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _in_function(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return True
    return False


def _aliases(names: list[ast.alias]) -> str:
    return ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in names)


def _rewrite(module: str, source: str, path: Path) -> tuple[str, list[str]]:
    """``source`` of ``module`` with its imports rewritten (see the module docstring) and the
    xatl_ds modules it needs."""
    tree = ast.parse(source, filename=str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    is_package = path.name == "__init__.py"
    edits: list[tuple[ast.stmt, str]] = []
    needs: list[str] = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        lazy = _in_function(node, parents)
        if isinstance(node, ast.Import):
            tops = {a.name.split(".")[0] for a in node.names}
            if PACKAGE in tops:
                raise RemoteCodeError(f"{path}:{node.lineno}: write `from xatl_ds.x import name` to bundle it")
            target, ours = node.names[0].name, False
            foreign = not tops <= ALLOWED
        else:
            target = _absolute(module, node, is_package)
            ours = node.level > 0 or target.split(".")[0] == PACKAGE
            foreign = target.split(".")[0] not in ALLOWED
        if ours:
            if target.startswith(EXCLUDED):
                if not lazy:
                    raise RemoteCodeError(f"{path}:{node.lineno}: module-level import of kernel module {target}")
                edits.append((node, f"raise ImportError({_NO_KERNEL.format(what=target)!r})"))
                continue
            if node.module is None:  # `from . import x`: not used by the model code
                raise RemoteCodeError(f"{path}:{node.lineno}: write `from .x import name` to bundle {target}")
            needs.append(target)
            edits.append((node, f"from .{_flat_name(target)} import {_aliases(node.names)}"))
        elif foreign:
            if not lazy:
                raise RemoteCodeError(
                    f"{path}:{node.lineno}: module-level import of {target}; the exported code may only "
                    "import torch, transformers and the standard library at module level"
                )
            edits.append((node, f"raise ImportError({_NO_KERNEL.format(what=target)!r})"))
    lines = source.splitlines(keepends=True)
    # apply from the bottom up so earlier positions stay valid
    for node, text in sorted(edits, key=lambda e: (e[0].lineno, e[0].col_offset), reverse=True):
        first, last = node.lineno - 1, node.end_lineno - 1
        # ast offsets count UTF-8 bytes
        head = lines[first].encode()[: node.col_offset].decode()
        tail = lines[last].encode()[node.end_col_offset :].decode()
        lines[first : last + 1] = [head + text + tail]
    return "".join(lines), needs


def _mixer_epilogue() -> str:
    """``mixer_class`` over relatively imported bundled mixers (modeling's MIXER_CLASSES
    names them by absolute module path, which does not exist where the folder is loaded)."""
    from ..models.modeling import MIXER_CLASSES

    imports, table = [], []
    for name, spec in MIXER_CLASSES.items():
        mod, cls = spec.split(":")
        alias = f"_{cls}_{name}"
        imports.append(f"from .{_flat_name(mod)} import {cls} as {alias}")
        table.append(f"    {name!r}: {alias},")
    return (
        "\n" + "\n".join(imports) + "\n\n_BUNDLED_MIXERS = {\n" + "\n".join(table) + "\n}\n\n\n"
        "def mixer_class(name):\n"
        "    try:\n"
        "        return _BUNDLED_MIXERS[name]\n"
        "    except KeyError:\n"
        "        raise ValueError(f\"mixer={name!r} is unknown; choose one of {sorted(_BUNDLED_MIXERS)}\") from None\n"
    )


def _header(module: str, version: str) -> str:
    rel = module.replace(".", "/") + ".py"
    return (
        f"# Generated by xatl-ds {version} from {rel} for `trust_remote_code=True` loading\n"
        "# (torch + transformers only, pure-torch paths). Do not edit: re-export instead.\n"
        f"# xatl-ds is licensed under the Apache License 2.0.\n"
    )


def bundle_sources() -> dict[str, str]:
    """``{file name: source}`` of every file of the remote-code folder."""
    from .. import __version__
    from ..models.modeling import MIXER_CLASSES

    queue = list(ENTRY_MODULES) + [spec.split(":")[0] for spec in MIXER_CLASSES.values()]
    done: dict[str, str] = {}
    while queue:
        module = queue.pop(0)
        if module in done:
            continue
        path = _module_file(module)
        text, needs = _rewrite(module, path.read_text(encoding="utf-8"), path)
        if module in EPILOGUES:
            must_define, epilogue = EPILOGUES[module]
            if must_define not in {n.name for n in ast.parse(text).body if isinstance(n, ast.FunctionDef)}:
                raise RemoteCodeError(f"{module} no longer defines {must_define}(); update remote_code.EPILOGUES")
            text += "\n\n# -- remote-code export: pure torch ---------------------------------------\n" + epilogue
        if module == "xatl_ds.models.modeling":
            text += "\n\n# -- remote-code export: the bundled mixers -----------------------------\n"
            text += _mixer_epilogue()
        done[module] = _header(module, __version__) + text
        queue.extend(n for n in needs if n not in done)
    for module, text in done.items():  # the loader must accept every file
        ast.parse(text, filename=_flat_name(module))
    return {_flat_name(m) + ".py": t for m, t in done.items()}


def write_remote_code(out_dir: str | Path) -> list[str]:
    """Write the bundled code into ``out_dir`` (a saved XatlForCausalLM folder) and point
    ``config.json``'s auto_map at it; returns the file names written."""
    out = Path(out_dir)
    files = bundle_sources()
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["auto_map"] = dict(AUTO_MAP)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return sorted(files)
