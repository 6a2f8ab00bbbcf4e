"""The distribution: a regular wheel holds gradcam_batch and its three subpackages, nothing else
at the top level, and installs a working ``gradcam-batch`` script and ``python -m gradcam_batch``.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Build outputs and caches of the working tree that must not leak into the copied sources.
_IGNORE = shutil.ignore_patterns(
    ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", ".benchmarks"
)


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the wheel from a copy of the tree, so that no build/ or egg-info lands in the checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_IGNORE)
    out = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)])
    wheels = list(out.glob("gradcam_batch-*.whl"))
    assert len(wheels) == 1, f"expected one gradcam_batch wheel, got {[w.name for w in out.iterdir()]}"
    return wheels[0]


@pytest.fixture(scope="module")
def names(wheel) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def test_wheel_holds_the_package_and_its_subpackages(names):
    for required in (
        "gradcam_batch/__init__.py",
        "gradcam_batch/__main__.py",
        "gradcam_batch/engine/__init__.py",
        "gradcam_batch/engine/explain/explainer.py",
        "gradcam_batch/engine/models/loader.py",
        "gradcam_batch/engine/job/local.py",
        "gradcam_batch/engine/demo/data/shapes_cnn.pt",
        "gradcam_batch/engine/audit/scatter.js",  # the report inlines it
        "gradcam_batch/version.py",
        "gradcam_batch/kernels/__init__.py",
        "gradcam_batch/kernels/reference.py",
        "gradcam_batch/cli/__init__.py",
    ):
        assert required in names, f"{required} missing from the wheel"


def test_wheel_has_no_stray_top_level_modules(names):
    top = {n.split("/", 1)[0] for n in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert len(dist_info) == 1
    assert top - dist_info == {"gradcam_batch"}, f"unexpected top-level entries: {sorted(top - dist_info)}"
    for forbidden in ("engine/", "kernels/", "cli/", "tests/", "benchmarks/"):
        assert not any(n.startswith(forbidden) for n in names), forbidden
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)


def test_wheel_metadata(wheel, names):
    info = next(n.split("/", 1)[0] for n in names if n.endswith(".dist-info/METADATA"))
    with zipfile.ZipFile(wheel) as zf:
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
        metadata = zf.read(f"{info}/METADATA").decode()
    section = entry_points.split("[console_scripts]", 1)[1].split("[", 1)[0]
    scripts = {k.strip(): v.strip() for k, v in (line.split("=", 1) for line in section.splitlines() if "=" in line)}
    assert scripts.get("gradcam-batch") == "gradcam_batch.cli:main"
    assert "Name: gradcam-batch" in metadata
    requires = [
        line.split(":", 1)[1].strip().lower() for line in metadata.splitlines() if line.startswith("Requires-Dist:")
    ]
    for dep in ("torch", "numpy", "pyarrow", "click"):
        assert any(r.startswith(dep) for r in requires), f"{dep} is not a dependency"


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The wheel installed into a bare target folder; dependencies come from this environment."""
    target = tmp_path_factory.mktemp("site")
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)])
    env = dict(os.environ, PYTHONPATH=str(target))
    return target, env


@pytest.mark.slow
def test_installed_wheel_imports_from_the_wheel(installed, tmp_path):
    target, env = installed
    code = (
        "import importlib.util, gradcam_batch, gradcam_batch.engine, gradcam_batch.kernels, gradcam_batch.cli\n"
        "print(gradcam_batch.__file__)\n"
        "print(gradcam_batch.engine.__file__)\n"
        "specs = {m: importlib.util.find_spec(m) for m in ('engine', 'kernels', 'cli')}\n"
        "print({m: s.origin for m, s in specs.items() if s is not None})\n"
    )
    # cwd outside the checkout: its top-level folders must not be importable by accident.
    out = _run([sys.executable, "-c", code], env=env, cwd=tmp_path).stdout.splitlines()
    assert Path(out[0]).resolve().is_relative_to(target.resolve()), out[0]
    assert Path(out[1]).resolve() == (target / "gradcam_batch" / "engine" / "__init__.py").resolve()
    # Another distribution may own a top-level name (Hugging Face's `kernels`); the wheel must not.
    found = ast.literal_eval(out[2])
    from_wheel = {m: o for m, o in found.items() if o and Path(o).resolve().is_relative_to(target.resolve())}
    assert not from_wheel, f"the wheel installs top-level modules: {from_wheel}"
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info")) in (
        ["gradcam_batch"],
        ["bin", "gradcam_batch"],
    )


@pytest.mark.slow
def test_installed_console_script_and_module_run(installed, tmp_path):
    target, env = installed
    script = target / "bin" / "gradcam-batch"
    assert script.exists(), "the wheel installs no gradcam-batch script"
    help_text = _run([str(script), "--help"], env=env, cwd=tmp_path).stdout
    assert "Usage:" in help_text and "gradcam-batch" in help_text
    module_help = _run([sys.executable, "-m", "gradcam_batch", "--help"], env=env, cwd=tmp_path).stdout
    assert module_help == help_text


def test_development_install_script(tmp_path):
    """The editable install of the working tree puts a working script next to this Python."""
    script = Path(sys.executable).parent / "gradcam-batch"
    if not script.exists():
        found = shutil.which("gradcam-batch")
        assert found, "no gradcam-batch script installed in this environment"
        script = Path(found)
    version = _run([str(script), "--version"], cwd=tmp_path).stdout
    import gradcam_batch

    assert gradcam_batch.__version__ in version
