"""The shape of the xatl_ds.data package: every public name of the former data.py is still
importable from xatl_ds.data, modules share no private names, the builtin corpus is found
one level up, and ``python -m xatl_ds.data`` runs the CLI."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import xatl_ds
from xatl_ds import data as D

PACKAGE_DIR = Path(D.__file__).parent
# the public API of data.py before it became a package (its CLI, add_cli and main, moved to xatl_ds/cli.py)
FORMER_PUBLIC = {
    "BUILTIN_CORPUS_DIR", "BUILTIN_FILES", "DataError", "EOS_TOKEN", "FORMAT_VERSION", "PackedTokens",
    "PrepareConfig", "global_mean_loss", "load_tokenizer", "prepare", "read_meta",
    "split_units", "token_dtype",
}  # fmt: skip


def test_public_names_are_re_exported():
    assert FORMER_PUBLIC <= set(D.__all__)
    for name in D.__all__:
        assert getattr(D, name) is not None, name
    assert D.DataError.__module__ == "xatl_ds.data.errors" and issubclass(D.DataError, ValueError)


def test_no_module_imports_a_private_name_from_another():
    modules = sorted(PACKAGE_DIR.glob("*.py"))
    assert {"corpus.py", "split.py", "tokenizer.py", "packing.py", "loader.py"} <= {m.name for m in modules}
    offenders = []
    for path in modules:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                offenders += [f"{path.name}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert offenders == []


def test_builtin_corpus_dir_is_the_shipped_one():
    assert D.BUILTIN_CORPUS_DIR == Path(xatl_ds.__file__).resolve().parent / "corpus"
    assert all((D.BUILTIN_CORPUS_DIR / f).is_file() for f in D.BUILTIN_FILES)


def test_python_dash_m_runs_the_cli(tmp_path, capsys):
    run = subprocess.run(
        [sys.executable, "-m", "xatl_ds.data", "info", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 2 and "is not a prepared dataset" in run.stderr
    from xatl_ds.cli import main

    with pytest.raises(SystemExit) as e:
        main(["data", "prepare", "--help"])
    assert e.value.code == 0
    assert "--overwrite" in capsys.readouterr().out


def test_cli_parses_prepare_options(tmp_path, capsys):
    from xatl_ds.cli import build_parser, main

    assert main(["data", "info", str(tmp_path)]) == 2 and "is not a prepared dataset" in capsys.readouterr().err
    args = build_parser("data").parse_args(["data", "prepare", "--out", str(tmp_path / "x"), "--seed", "3", "--overwrite"])
    assert (args.seed, args.overwrite, args.corpus) == (3, True, None)
    with pytest.raises(SystemExit):
        main(["data", "prepare", "--help"])
    assert "is ever replaced" in " ".join(capsys.readouterr().out.split())
