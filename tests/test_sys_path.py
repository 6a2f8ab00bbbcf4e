"""The repository root stays off sys.path, however the Makefile, the tests or Ray start Python.

The folders kernels/, engine/ and cli/ at the root are gradcam_batch's sources. On sys.path they
shadow real top-level packages of those names: transformers imports Hugging Face's `kernels`, and
got this repository's folder instead ("cannot import name 'CUDAProperties' from 'kernels'").
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gradcam_batch.source_root import MAPPED_FOLDERS, drop_source_root, source_root

REPO = Path(__file__).resolve().parent.parent

# Reports where the mapped folder names resolve from the interpreter it runs in, and how it was started.
PROBE = """
import importlib.util, json, os, sys
names = {NAMES!r}
found = {{}}
for name in names:
    spec = importlib.util.find_spec(name)
    found[name] = None if spec is None else (spec.origin or list(spec.submodule_search_locations or [None])[0])
with open(os.environ["GCB_PROBE_OUT"], "a") as f:
    f.write(json.dumps({{"argv": sys.argv, "found": found}}) + "\\n")
"""


def _inside_repo(origin: str | None) -> bool:
    """Whether a module's origin is one of this repository's mapped folders (not, say, .venv inside it)."""
    if origin is None:
        return False
    path = Path(origin).resolve()
    return any(path.is_relative_to(REPO / name) for name in MAPPED_FOLDERS)


def test_this_process_does_not_see_the_repository_folders():
    """`make test` runs this suite: if its way of starting pytest put the root first, this fails."""
    for name in MAPPED_FOLDERS:
        spec = importlib.util.find_spec(name)
        origin = None if spec is None else spec.origin or next(iter(spec.submodule_search_locations or []), None)
        assert not _inside_repo(origin), f"top-level {name!r} resolves to this repository: {origin}"


def test_source_root_is_the_checkout_of_an_editable_install():
    assert source_root() == REPO


def test_drop_source_root_removes_only_the_root():
    other = str(REPO / "tests")
    path = [str(REPO), "", other, str(REPO) + "/", "/nonexistent"]
    cwd = os.getcwd()
    try:
        os.chdir(REPO)  # "" is the working directory
        dropped = drop_source_root(path)
    finally:
        os.chdir(cwd)
    assert path == [other, "/nonexistent"]
    assert dropped == [str(REPO), "", str(REPO) + "/"]


def _shim_bin(tmp_path: Path) -> Path:
    """A bin folder whose python, pytest and gradcam-batch run the probe instead.

    ``python`` keeps its flags and replaces ``-m MODULE``/``-c CODE`` with ``-m gcb_probe``, so
    sys.path gets what the recipe's own invocation would give; the console scripts are Python
    scripts with the interpreter in their shebang, as pip writes them.
    """
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    code = PROBE.format(NAMES=MAPPED_FOLDERS)
    (probe_dir / "gcb_probe.py").write_text(code)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = bin_dir / "python"
    python.write_text(
        "#!/bin/sh\n"
        f'export PYTHONPATH="{probe_dir}${{PYTHONPATH:+:$PYTHONPATH}}"\n'
        'for a; do case "$a" in -m|-c) exec ' + f'"{sys.executable}"' + ' -m gcb_probe "$@";; esac; done\n'
        f'exec "{sys.executable}" "$@"\n'
    )
    for script in ("pytest", "gradcam-batch", "ruff"):
        (bin_dir / script).write_text(f"#!{sys.executable}\n{code}")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("target", ["test", "demo", "test-all", "test-lowest"])
def test_makefile_recipes_keep_the_root_off_sys_path(tmp_path, target):
    bin_dir = _shim_bin(tmp_path)
    # Stamps newer than pyproject.toml: make installs nothing.
    lowest = tmp_path / "lowest"
    lowest.mkdir()
    (lowest / "lowest.txt").write_text("")
    stamp, lowest_stamp = tmp_path / "stamp", lowest / "stamp"
    stamp.write_text("")
    lowest_stamp.write_text("")
    out = tmp_path / "probe.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH", "MAKEFLAGS", "MFLAGS")}
    env["GCB_PROBE_OUT"] = str(out)
    overrides = [f"BIN={bin_dir}", f"STAMP={stamp}", f"LOWEST_BIN={bin_dir}", f"LOWEST_VENV={lowest}",
                 f"LOWEST_STAMP={lowest_stamp}"]  # fmt: skip
    res = subprocess.run(["make", "-s", "-C", str(REPO), target, *overrides], env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    runs = [json.loads(line) for line in out.read_text().splitlines()]
    assert runs, f"`make {target}` started no Python"
    for run in runs:
        for name, origin in run["found"].items():
            assert not _inside_repo(origin), f"`make {target}` ({run['argv']}): {name!r} resolves to {origin}"


def test_python_dash_m_from_the_root_drops_it(tmp_path):
    """`python -m gradcam_batch` from the checkout, without PYTHONSAFEPATH, still imports Hugging Face's kernels."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    code = (
        "import runpy, sys; sys.argv = ['gradcam-batch', '--version']\n"
        "try:\n    runpy.run_module('gradcam_batch', run_name='__main__', alter_sys=True)\n"
        "except SystemExit:\n    pass\n"
        "import importlib.util; spec = importlib.util.find_spec('kernels')\n"
        "print(spec.origin if spec else None)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert not _inside_repo(res.stdout.strip().splitlines()[-1]), res.stdout
