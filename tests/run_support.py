"""Shared fixtures for the `run` tests: tiny models as factory files, tiny Parquet inputs."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from click.testing import CliRunner
from PIL import Image

from gradcam_batch.cli import cli
from gradcam_batch.engine.demo.synthetic import make_shapes

# A small CNN with a GAP -> linear head (closed form) and one with an MLP head (VJP path).
MODEL_FILE = textwrap.dedent(
    """
    import time

    import torch
    import torch.nn as nn


    class Tiny(nn.Module):
        def __init__(self, num_classes=5, mlp=False):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1, stride=2), nn.ReLU()
            )
            self.pool = nn.AdaptiveAvgPool2d(1)
            if mlp:
                self.fc = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, num_classes))
            else:
                self.fc = nn.Linear(12, num_classes)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.features(x)), 1))


    class Slow(Tiny):
        # Data-dependent Python control flow: torch.fx cannot trace it, so the forward (and its
        # sleep) really runs for every batch.
        def forward(self, x):
            if float(x.detach().abs().sum()) >= 0:
                time.sleep(0.15)
            return super().forward(x)


    def make(num_classes=5):
        torch.manual_seed(0)
        return Tiny(num_classes)


    def make_mlp(num_classes=5):
        torch.manual_seed(0)
        return Tiny(num_classes, mlp=True)


    def make_slow(num_classes=5):
        torch.manual_seed(0)
        return Slow(num_classes)


    def not_a_model():
        return 42
    """
)


def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "models" / "tiny_models.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(MODEL_FILE)
    return path


def png_bytes(img: np.ndarray | Image.Image, fmt: str = "PNG", **kw) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def shapes(n: int, size: int = 32, seed: int = 0):
    return make_shapes(n, size=size, seed=seed)


def write_table(path: Path, table: pa.Table, row_group_size: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def bytes_table(n: int, size: int = 32, seed: int = 0) -> pa.Table:
    data = shapes(n, size, seed)
    return pa.table(
        {
            "image": pa.array([png_bytes(im) for im in data.images], pa.binary()),
            "label": pa.array(data.labels % 5, pa.int64()),
            "name": pa.array([f"img{i}" for i in range(n)]),
        }
    )


def invoke(args: list[str]):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def base_args(tmp_path: Path, out: Path, factory: str = "make") -> list[str]:
    return [
        "-o",
        str(out),
        "--model",
        f"{model_file(tmp_path)}:{factory}",
        "--resize",
        "32",
        "--crop",
        "32",
        "--batch-size",
        "8",
        "--no-progress",
    ]


def read_output(out: Path) -> pa.Table:
    files = sorted(out.glob("part-*.parquet"))
    assert files, f"no part files in {out}"
    return pq.read_table(files)
