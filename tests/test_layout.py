"""The house rules of the package, checked on its source: module and function sizes, and imports at module top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tokenbridge"
MODULES = sorted(PACKAGE.rglob("*.py"))
ARGPARSE_BUILDERS = {("cli_parser.py", "build_parser")}


def _functions(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_rules(path):
    source = path.read_text()
    assert len(source.splitlines()) <= 500, f"{path.name} has {len(source.splitlines())} lines (max 500)"
    tree = ast.parse(source)
    for fn in _functions(tree):
        length = fn.end_lineno - fn.lineno + 1
        if (path.name, fn.name) not in ARGPARSE_BUILDERS:
            assert length <= 80, f"{path.name}:{fn.lineno} {fn.name} has {length} lines (max 80)"
        for node in ast.walk(fn):  # optional third-party dependencies may be imported late, our own modules not
            if isinstance(node, ast.ImportFrom):
                own = node.level > 0 or (node.module or "").split(".")[0] == "tokenbridge"
                assert not own, f"{path.name}:{node.lineno} imports {node.module} inside {fn.name}"
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] != "tokenbridge" for a in node.names), f"{path.name}:{node.lineno}"


def test_the_rules_catch_violations(tmp_path):
    bad = "def f():\n    from .x import y\n" + "    pass\n" * 80
    tree = ast.parse(bad)
    fn = _functions(tree)[0]
    assert fn.end_lineno - fn.lineno + 1 > 80
    assert any(isinstance(n, ast.ImportFrom) and n.level == 1 for n in ast.walk(fn))
