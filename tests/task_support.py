"""Helpers for tests/test_run_tasks.py: tiny multi-label and segmentation models as a factory file, drawn
shapes with their boxes, the run's preprocessing written out by hand, and the job's output grouped by image."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from click.testing import CliRunner

from gradcam_batch.cli import cli

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

TASK_MODELS = textwrap.dedent(
    """
    import torch
    import torch.nn as nn


    class MultiLabel(nn.Module):
        # GAP -> linear: the closed form of the head.
        def __init__(self, num_classes=5, width=12):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, width, 3, padding=1, stride=2), nn.ReLU()
            )
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(width, num_classes)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.features(x)), 1))


    class Shapes(nn.Module):
        # The net that tests/task_support.py trains on drawn squares, discs and bars.
        def __init__(self, num_classes=3):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
                nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            )
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(32, num_classes)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.features(x)), 1))


    class Seg(nn.Module):
        # Logits (B, N, H/2, W/2) as a plain tensor: the run upsamples them.
        def __init__(self, num_classes=4):
            super().__init__()
            self.backbone = nn.Sequential(
                nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU()
            )
            self.decoder = nn.Sequential(nn.Conv2d(12, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, num_classes, 1))

        def forward(self, x):
            return self.decoder(self.backbone(x))


    def multilabel(num_classes=5):
        torch.manual_seed(0)
        return MultiLabel(num_classes)


    def shapes(num_classes=3):
        torch.manual_seed(0)
        return Shapes(num_classes)


    def seg(num_classes=4):
        # A last conv of unit-variance weights and no bias: several classes win pixels of a noise image.
        torch.manual_seed(0)
        model = Seg(num_classes)
        nn.init.normal_(model.decoder[2].weight, std=1.0, generator=torch.Generator().manual_seed(1))
        nn.init.zeros_(model.decoder[2].bias)
        return model


    def seg_dead(num_classes=4):
        # The last class never wins a pixel: its bias is far below the others'.
        model = seg(num_classes)
        with torch.no_grad():
            model.decoder[2].bias[num_classes - 1] = -1e3
        return model
    """
)


def task_models(tmp_path: Path) -> Path:
    path = tmp_path / "models" / "task_models.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(TASK_MODELS)
    return path


def normalized(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> the model input of a run whose resize and crop leave the images as they are
    (ImageNet mean and std, the run's default)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    return ((x - MEAN) / STD).contiguous()


def invoke(args: list[str]):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def by_image(table: pa.Table) -> dict[str, list[dict]]:
    """The output rows (without the map columns) grouped by id, in output order."""
    cols = [c for c in table.column_names if c not in ("cam", "heatmap")]
    out: dict[str, list[dict]] = {}
    for r in table.select(cols).to_pylist():
        out.setdefault(r["id"], []).append(r)
    return out


def draw_shapes(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, list[list[int]], list[dict]]:
    """``n`` images holding 1 to 3 of: 0 a square, 1 a disc, 2 a bar (horizontal or vertical), apart from
    each other, each in a random bright colour (the colour says nothing of the class) on dark noise.
    Returns images (n, size, size, 3) uint8, each image's sorted classes, and per image {class: (H, W) mask}."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, size, size, 3), np.uint8)
    labels: list[list[int]] = []
    masks: list[dict] = []
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
        classes = sorted(rng.choice(3, int(rng.integers(1, 4)), replace=False).tolist())
        taken = np.zeros((size, size), bool)
        drawn = {}
        for c in classes:
            for _ in range(200):
                if c == 0:
                    h, w = 8, 8
                elif c == 1:
                    h, w = 9, 9
                else:
                    h, w = (3, 14) if rng.random() < 0.5 else (14, 3)
                y0, x0 = int(rng.integers(1, size - h - 1)), int(rng.integers(1, size - w - 1))
                if not taken[max(0, y0 - 2) : y0 + h + 2, max(0, x0 - 2) : x0 + w + 2].any():
                    break
            if c == 1:
                m = (yy - (y0 + 4)) ** 2 + (xx - (x0 + 4)) ** 2 <= 4.5**2
            else:
                m = np.zeros((size, size), bool)
                m[y0 : y0 + h, x0 : x0 + w] = True
            taken |= m
            img[m] = rng.integers(150, 256, 3)
            drawn[c] = m
        images[i] = img
        labels.append(classes)
        masks.append(drawn)
    return images, labels, masks


def train_shapes(model: torch.nn.Module, n: int = 400, epochs: int = 25, seed: int = 0) -> torch.nn.Module:
    """Multi-label training (BCE with logits, Adam) on ``draw_shapes``; a few seconds on two CPU cores."""
    images, labels, _ = draw_shapes(n, seed)
    x = normalized(images)
    y = torch.zeros(n, 3)
    for i, classes in enumerate(labels):
        y[i, classes] = 1
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for s in range(0, n, 32):
            idx = order[s : s + 32]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def varied(model: torch.nn.Module, size: int = 48, std: float = 1e-3) -> torch.nn.Module:
    """A randomly initialized torchvision segmentation model whose prediction is not one class everywhere
    (as tests/test_tasks.py): BatchNorm statistics from one batch of noise, and new weights of the last
    classifier conv (``std`` 1e-3 keeps the logits within a few units, so that float32 figures compare well)."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0)))
    convs = [m for m in model.classifier.modules() if isinstance(m, torch.nn.Conv2d)]
    torch.nn.init.normal_(convs[-1].weight, std=std, generator=torch.Generator().manual_seed(1))
    return model.eval()


def save_tiny_segformer(path: Path, num_labels: int = 4) -> Path:
    """A 4-stage SegFormer of a few thousand weights, saved with ``save_pretrained`` (no image processor)."""
    import transformers

    cfg = transformers.SegformerConfig(
        num_channels=3,
        num_encoder_blocks=4,
        depths=[1, 1, 1, 1],
        sr_ratios=[8, 4, 2, 1],
        hidden_sizes=[8, 16, 24, 32],
        num_attention_heads=[1, 1, 1, 1],
        mlp_ratios=[2, 2, 2, 2],
        decoder_hidden_size=16,
        num_labels=num_labels,
    )
    torch.manual_seed(0)
    transformers.SegformerForSemanticSegmentation(cfg).save_pretrained(path)
    return path


def save_tiny_multilabel_resnet(path: Path, num_labels: int = 5) -> Path:
    """A Transformers ResNet classifier whose config says ``problem_type="multi_label_classification"``."""
    import transformers

    cfg = transformers.ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        num_labels=num_labels,
        problem_type="multi_label_classification",
    )
    torch.manual_seed(0)
    transformers.ResNetForImageClassification(cfg).save_pretrained(path)
    return path
