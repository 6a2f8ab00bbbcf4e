"""Module boundaries, read from the source: each name is imported from the module that defines it, and no
module reaches into another's private members.

``engine/job/source.py`` was split by concern (inputs, preprocess, decode, device_jpeg, retries, errors); it
streams, and exports only what it defines. A module of the package may use a private name (``_x``) only where
that name is its own: a private name that another module of the package defines is that module's business.
Private names of other libraries (``torch.nn.Module._parameters``) are outside this check.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from gradcam_batch.engine.job import source

ROOT = Path(__file__).resolve().parent.parent
# Where each top-level package of the distribution lives in the repository (pyproject's package-dir).
PACKAGE_DIRS = {"gradcam_batch": "gradcam_batch", "gradcam_batch.engine": "engine", "gradcam_batch.kernels": "kernels"}
PACKAGE_DIRS["gradcam_batch.cli"] = "cli"
CALLERS = ("engine", "cli", "kernels", "gradcam_batch", "benchmarks", "tests")


def _files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


def _module_file(module: str) -> Path | None:
    for prefix, folder in sorted(PACKAGE_DIRS.items(), key=lambda kv: -len(kv[0])):
        if module == prefix or module.startswith(prefix + "."):
            rest = module[len(prefix) :].lstrip(".").replace(".", "/")
            base = ROOT / folder / rest if rest else ROOT / folder
            for p in (base.with_suffix(".py"), base / "__init__.py"):
                if p.is_file():
                    return p
    return None


def _defined_private_names(tree: ast.AST) -> set[str]:
    """Private names a module defines: functions, classes, assignments, and attributes it sets on self."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.alias) and node.asname:
            names.add(node.asname)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def _trees(dirs: tuple[str, ...]) -> dict[Path, ast.AST]:
    return {p: ast.parse(p.read_text(), str(p)) for p in _files(*dirs)}


def test_names_from_source_are_the_ones_it_defines():
    """Every ``from gradcam_batch.engine.job.source import X`` names something source.py exports, not a name it
    only imports for its own use from the module that now holds it."""
    wrong = []
    for path, tree in _trees(CALLERS).items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "gradcam_batch.engine.job.source":
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                wrong += [f"{where} {a.name}" for a in node.names if a.name not in source.__all__]
    assert not wrong, "import these from the module that defines them: " + ", ".join(wrong)


def test_source_exports_only_what_it_defines():
    for name in source.__all__:
        obj = getattr(source, name)
        assert getattr(obj, "__module__", source.__name__) == source.__name__, name
    assert not hasattr(source, "__getattr__"), "source.py resolves names it does not define"


def test_no_module_uses_another_modules_private_members():
    """``from m import _x``, ``m._x`` and ``obj._x`` where ``_x`` is defined by another module of the package."""
    trees = _trees(("engine", "cli", "kernels", "gradcam_batch"))
    own = {path: _defined_private_names(tree) for path, tree in trees.items()}
    anyone = set().union(*own.values())
    wrong = []
    for path, tree in trees.items():
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gradcam_batch"):
                target = _module_file(node.module)
                wrong += [
                    f"{where}:{node.lineno} imports {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__") and target != path
                ]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                    continue
                if node.attr in anyone and node.attr not in own[path]:
                    wrong.append(f"{where}:{node.lineno} reads .{node.attr}")
    assert not wrong, "use a public name: " + "; ".join(wrong)


@pytest.mark.parametrize("module", ["inputs", "preprocess", "decode", "device_jpeg", "retries", "errors", "source"])
def test_each_source_module_says_what_it_is(module):
    text = (ROOT / "engine" / "job" / f"{module}.py").read_text()
    doc = ast.get_docstring(ast.parse(text))
    assert doc, f"{module}.py has no docstring"
    lines = len(text.splitlines())
    assert ("past 500 lines" in doc or "past about 500 lines" in doc) == (lines > 500), (
        f"{module}.py has {lines} lines; a module past about 500 lines says why it is one, and only then"
    )


def test_the_source_modules_do_not_import_torch():
    """What the docstrings say: only ``device_jpeg`` needs torch, so the rest can serve a torch-free process."""
    modules = ("source", "inputs", "decode", "preprocess", "retries", "errors")
    code = "import importlib, sys\n"
    code += "".join(f"importlib.import_module('gradcam_batch.engine.job.{m}')\n" for m in modules)
    code += "print('torch' in sys.modules)\n"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip().splitlines()[-1] == "False"
