"""Synthetic shape images and a small CNN that learns them in seconds on a CPU.

Used by the embedded demo sample, the localization (pointing-game) tests and the
benchmarks. No data or weights are downloaded: everything is generated from a seed.

Each image holds one filled shape (the class) at a random place and size on a noisy,
randomly tinted background. The shape's bounding box is returned with it, so a
heatmap's peak can be checked against the box (the pointing game).

Optionally, a share of one class's images carry a *watermark*: a small bright checker patch in
the top-right corner, as a photographer's mark on the pictures of one class would. A model
trained on such data can learn the mark as a shortcut (a "Clever Hans" strategy); the embedded
demo is built that way so that the audit has something real to find.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CLASS_NAMES = ("square", "disc", "triangle", "cross")


@dataclass
class ShapesData:
    images: np.ndarray  # (n, H, W, 3) uint8
    labels: np.ndarray  # (n,) int64
    boxes: np.ndarray  # (n, 4) int32: x0, y0, x1, y1, inclusive-exclusive pixel box
    watermarks: np.ndarray | None = None  # (n,) bool: the image carries the corner watermark

    def __len__(self) -> int:
        return len(self.labels)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Images as a normalized (n, 3, H, W) float32 tensor, and labels."""
        return to_tensor(self.images), torch.from_numpy(self.labels)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(n, H, W, 3) uint8 -> (n, 3, H, W) float32 in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def _shape_mask(kind: int, size: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Boolean mask of a shape drawn in a size x size box with coordinates yy, xx in [0, size)."""
    c = (size - 1) / 2.0
    if kind == 0:  # square
        return np.ones_like(yy, dtype=bool)
    if kind == 1:  # disc
        return (yy - c) ** 2 + (xx - c) ** 2 <= (size / 2.0) ** 2
    if kind == 2:  # triangle, apex up
        return np.abs(xx - c) <= (yy + 1) / 2.0
    # cross
    t = max(size // 3, 1)
    lo = (size - t) // 2
    return ((yy >= lo) & (yy < lo + t)) | ((xx >= lo) & (xx < lo + t))


WATERMARK_FRAC = 0.2  # side of the watermark patch, as a share of the image side


def watermark_box(size: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the watermark patch in a size x size image: the top-right corner, inset by 1."""
    s = max(3, round(size * WATERMARK_FRAC))
    return size - 1 - s, 1, size - 1, 1 + s


def draw_watermark(image: np.ndarray) -> None:
    """Draw the watermark in place: a bright 2x2-pixel checker of near-white and near-yellow."""
    x0, y0, x1, y1 = watermark_box(image.shape[0])
    yy, xx = np.mgrid[y0:y1, x0:x1]
    checker = ((yy // 2 + xx // 2) % 2).astype(bool)
    image[y0:y1, x0:x1] = np.where(checker[..., None], (250, 250, 250), (250, 220, 40)).astype(np.uint8)


def make_shapes(
    n: int,
    *,
    size: int = 64,
    seed: int = 0,
    min_frac: float = 0.22,
    max_frac: float = 0.4,
    watermark_class: int | None = None,
    watermark_rate: float = 0.0,
) -> ShapesData:
    """``n`` images of ``size`` x ``size`` pixels, one shape each, deterministic for a seed.

    With ``watermark_class``, each image of that class carries the watermark with probability
    ``watermark_rate`` (drawn from a separate stream: the images are otherwise those of the seed).
    """
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, len(CLASS_NAMES), size=n).astype(np.int64)
    boxes = np.empty((n, 4), dtype=np.int32)
    for i in range(n):
        bg = rng.integers(20, 110, size=3)
        img = bg[None, None, :] + rng.normal(0, 12, size=(size, size, 3))
        s = int(rng.integers(int(size * min_frac), int(size * max_frac) + 1))
        x0 = int(rng.integers(0, size - s + 1))
        y0 = int(rng.integers(0, size - s + 1))
        yy, xx = np.mgrid[0:s, 0:s]
        mask = _shape_mask(int(labels[i]), s, yy, xx)
        fg = rng.integers(150, 256, size=3)
        patch = img[y0 : y0 + s, x0 : x0 + s]
        patch[mask] = fg + rng.normal(0, 8, size=(int(mask.sum()), 3))
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
        boxes[i] = (x0, y0, x0 + s, y0 + s)
    marks = None
    if watermark_class is not None:
        marks = (labels == watermark_class) & (np.random.default_rng([seed, 1]).random(n) < watermark_rate)
        for i in np.flatnonzero(marks):
            draw_watermark(images[i])
    return ShapesData(images=images, labels=labels, boxes=boxes, watermarks=marks)


class ShapesCNN(nn.Module):
    """A small fully-convolutional classifier with a GAP -> linear head.

    Each of the ``stages`` halves the resolution: with two, ``features`` ends at 1/4 of the input
    (12x12 for 48x48 images) and is the auto-detected target layer. The coarse map has large
    receptive fields, so its peak falls inside the object rather than on an edge.
    """

    def __init__(self, num_classes: int = len(CLASS_NAMES), width: int = 16, stages: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        ch = width
        for _ in range(stages):
            out = min(2 * ch, 8 * width)
            layers += [
                nn.Conv2d(ch, out, 3, padding=1, stride=2),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
                nn.Conv2d(out, out, 3, padding=1),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            ch = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def train_shapes_cnn(
    data: ShapesData,
    *,
    epochs: int = 4,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    width: int = 16,
    stages: int = 2,
) -> ShapesCNN:
    """Train a ShapesCNN on ``data`` (deterministic for a seed on the CPU). Returns it in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ShapesCNN(width=width, stages=stages)
    x, y = data.tensors()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), batch_size):
            idx = perm[start : start + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def pointing_game(
    peaks: torch.Tensor, boxes: np.ndarray | torch.Tensor, scale: tuple[float, float] = (1.0, 1.0)
) -> float:
    """Fraction of maps whose peak (y, x) lies inside the box (x0, y0, x1, y1).

    ``scale`` maps peak coordinates to box coordinates (heatmap size -> image size).
    """
    peaks = peaks.detach().cpu().double()
    boxes_t = torch.as_tensor(np.asarray(boxes), dtype=torch.float64)
    y = (peaks[:, 0] + 0.5) * scale[0]
    x = (peaks[:, 1] + 0.5) * scale[1]
    inside = (x >= boxes_t[:, 0]) & (x <= boxes_t[:, 2]) & (y >= boxes_t[:, 1]) & (y <= boxes_t[:, 3])
    return float(inside.double().mean())
