"""Keep this project's source root off ``sys.path``.

The import package ``gradcam_batch`` is assembled from top-level folders with generic names
(``kernels/``, ``engine/``, ``cli/``; see ``[tool.setuptools.package-dir]``). When the source
root itself is on ``sys.path`` those folders shadow real packages of the same names: Hugging
Face's ``kernels``, which transformers imports, then resolves to our ``kernels/`` folder and the
import fails. ``python -m`` and ``python -c`` put the working directory first on ``sys.path``,
and Ray puts the driver's working directory on every worker's ``sys.path``, so a run started
from a checkout would hit it. The Makefile runs console scripts with ``PYTHONSAFEPATH=1``; the
entry points below also drop the root wherever they start, as a second guard.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

# The folders that pyproject.toml maps into gradcam_batch; one of them identifies the source root.
MAPPED_FOLDERS = ("kernels", "engine", "cli")


def source_root() -> Path | None:
    """The checkout whose ``kernels/`` folder is ``gradcam_batch.kernels``, or None for an installed wheel."""
    spec = importlib.util.find_spec("gradcam_batch.kernels")
    if spec is None or not spec.submodule_search_locations:
        return None
    kernels_dir = Path(next(iter(spec.submodule_search_locations))).resolve()
    if kernels_dir.name != "kernels":  # a wheel: site-packages/gradcam_batch/kernels
        return None
    if kernels_dir.parent.name == "gradcam_batch":
        return None
    return kernels_dir.parent


def _resolved(entry: str) -> Path | None:
    try:
        return Path(entry or os.getcwd()).resolve()
    except (OSError, RuntimeError):
        return None


def drop_source_root(path: list[str] | None = None) -> list[str]:
    """Remove every entry of ``path`` (``sys.path`` by default) that is the source root; return them.

    The modules of this package that are already imported stay as they are; what changes is where
    later imports of ``kernels``, ``engine`` or ``cli`` look.
    """
    path = sys.path if path is None else path
    root = source_root()
    if root is None:
        return []
    dropped = [entry for entry in path if _resolved(entry) == root]
    path[:] = [entry for entry in path if _resolved(entry) != root]
    for name in MAPPED_FOLDERS:
        module = sys.modules.get(name)
        origin = getattr(module, "__file__", None) if module is not None else None
        if origin and Path(origin).resolve().is_relative_to(root):
            del sys.modules[name]  # a shadowing import that already happened must not stick
    return dropped
