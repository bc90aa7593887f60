"""The house rules of the package, checked on its source: module, test-file and function sizes, our own modules
imported at module top, and pure models (model modules import no data, cache, trainer or VAE-loading module).
Each rule is a function of a module's source; the tests run it on the real tree and on examples that break it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tokenbridge"
MODULES = sorted(PACKAGE.rglob("*.py"))
TEST_FILES = sorted((ROOT / "tests").rglob("*.py"))
ARGPARSE_BUILDERS = {("cli_parser.py", "build_parser")}
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 80

# Model modules: networks, their maths and their own file formats. Globs, relative to the package.
MODEL_MODULES = ("autoencoder.py", "backbone.py", "classifier.py", "diffusion.py", "discrete.py", "fusion.py",
                 "gpt.py", "heads.py", "layers.py", "ordering.py", "quantizer.py", "samplers.py", "sampling.py",
                 "vq.py", "generators/*.py")
# What a model module must not import: the data pipeline and caches, the trainers, and the VAE loader.
NOT_IN_MODELS = ("tokenbridge.data", "tokenbridge.tokens", "tokenbridge.shards", "tokenbridge.sources",
                 "tokenbridge.train", "tokenbridge.training", "tokenbridge.vae")


def _functions(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _is_own(node: ast.AST) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or (node.module or "").split(".")[0] == "tokenbridge"
    return isinstance(node, ast.Import) and any(a.name.split(".")[0] == "tokenbridge" for a in node.names)


def size_and_import_violations(name: str, source: str) -> list[str]:
    """Modules of at most 500 lines, functions of at most 80 (argparse builders aside), and our own modules
    imported at module top only (optional third-party dependencies may be imported late)."""
    found = []
    lines = len(source.splitlines())
    if lines > MAX_MODULE_LINES:
        found.append(f"{name} has {lines} lines (max {MAX_MODULE_LINES})")
    for fn in _functions(ast.parse(source)):
        length = fn.end_lineno - fn.lineno + 1
        if length > MAX_FUNCTION_LINES and (Path(name).name, fn.name) not in ARGPARSE_BUILDERS:
            found.append(f"{name}:{fn.lineno} {fn.name} has {length} lines (max {MAX_FUNCTION_LINES})")
        found += [f"{name}:{node.lineno} imports our own module inside {fn.name}"
                  for node in ast.walk(fn) if _is_own(node)]
    return found


def imported_modules(module: str, source: str) -> set[str]:
    """Absolute names of everything ``module`` (dotted, e.g. tokenbridge.generators.d2c) imports, anywhere in its
    source; ``from X import a`` counts X and X.a (a may be a submodule)."""
    package = module.split(".")[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            origin = ".".join(base + ([node.module] if node.module else []))
            names.add(origin)
            names.update(f"{origin}.{a.name}" for a in node.names)
    return names


def impure_imports(module: str, source: str) -> list[str]:
    """The entries of NOT_IN_MODELS (data, cache, trainer or VAE-loading modules) that ``module`` imports, or
    imports a submodule of (none for a model module)."""
    names = imported_modules(module, source)
    return [bad for bad in NOT_IN_MODELS if any(n == bad or n.startswith(bad + ".") for n in names)]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _model_paths() -> list[Path]:
    return sorted({p for pattern in MODEL_MODULES for p in PACKAGE.glob(pattern)})


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_rules(path):
    assert size_and_import_violations(str(path.relative_to(PACKAGE)), path.read_text()) == []


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_test_files_are_at_most_500_lines(path):
    assert len(path.read_text().splitlines()) <= MAX_MODULE_LINES


@pytest.mark.parametrize("path", _model_paths(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_model_modules_import_no_data_modules(path):
    assert impure_imports(_module_name(path), path.read_text()) == []


def test_the_model_module_list_names_real_modules():
    for pattern in MODEL_MODULES:
        assert list(PACKAGE.glob(pattern)), f"MODEL_MODULES names {pattern}, which matches no module"
    assert {"tokenbridge.vq", "tokenbridge.generators.d2c"} <= {_module_name(p) for p in _model_paths()}


def test_the_size_and_import_rule_catches_violations():
    long_fn = "def f():\n" + "    pass\n" * MAX_FUNCTION_LINES
    assert size_and_import_violations("ok.py", "import torch\n\n\ndef f():\n    import numpy\n") == []
    assert size_and_import_violations("m.py", long_fn) == [f"m.py:1 f has {MAX_FUNCTION_LINES + 1} lines (max 80)"]
    assert size_and_import_violations("m.py", "def f():\n    from .x import y\n") == [
        "m.py:2 imports our own module inside f"]
    assert size_and_import_violations("m.py", "def f():\n    import tokenbridge.data\n") == [
        "m.py:2 imports our own module inside f"]
    assert size_and_import_violations("m.py", "x = 1\n" * 501) == ["m.py has 501 lines (max 500)"]
    assert size_and_import_violations("cli_parser.py", "def build_parser():\n" + "    pass\n" * 90) == []


@pytest.mark.parametrize("module, source, bad", [
    # vq.py before the trainers moved out: the token caches and the VAE loader
    ("tokenbridge.vq", "from .shards import ShardedTokens\nfrom .tokens import CachedTokens\n"
                       "from .vae import load_vae, vae_fingerprint\n",
     ["tokenbridge.tokens", "tokenbridge.shards", "tokenbridge.vae"]),
    ("tokenbridge.generators.d2c", "from ..data import as_tensors\n", ["tokenbridge.data"]),
    ("tokenbridge.generators.d2c", "from .. import sources, layers\n", ["tokenbridge.sources"]),
    ("tokenbridge.heads", "def f():\n    from .training.vq import train_vq\n", ["tokenbridge.training"]),
    ("tokenbridge.heads", "import tokenbridge.train as T\n", ["tokenbridge.train"]),
    ("tokenbridge.heads", "from .training import vae\n", ["tokenbridge.training"]),
    ("tokenbridge.heads", "from . import vae\n", ["tokenbridge.vae"]),
    ("tokenbridge.heads", "from .layers import guide\nfrom .trainer_free import x\nimport torch.utils.data\n", []),
])
def test_the_pure_model_rule_catches_violations(module, source, bad):
    assert impure_imports(module, source) == bad
