"""Shared test set-up: Triton's interpreter on machines without CUDA, fixed seeds, the gpu marker.

TRITON_INTERPRET must be in the environment before Triton is first imported (``triton.jit``
reads it when a kernel is defined), so it is set here, before any test module imports
``gradcam_batch.kernels.cam_kernel``. ``import torch`` does not import Triton.
"""

from __future__ import annotations

import os
import random
import sys

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("Triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"

# Every Python these tests start (`sys.executable -m gradcam_batch`, `-c`, Ray workers) keeps the
# working directory off sys.path: from the repository root it would put kernels/ ahead of Hugging
# Face's `kernels` package (see the Makefile and gradcam_batch/source_root.py).
os.environ["PYTHONSAFEPATH"] = "1"

SEED = 0


@pytest.fixture(autouse=True)
def _fixed_seeds():
    """Every test starts from the same random state, whatever ran before it."""
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    yield


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
