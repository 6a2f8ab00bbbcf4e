"""``gradcam-batch demo``: a short explain() run on a small CNN with synthetic images."""

from __future__ import annotations

import time

import click


@click.command()
@click.option("--batch-size", default=32, show_default=True, help="Images per batch.")
@click.option("--top-k", default=3, show_default=True, help="Classes explained per image.")
def demo(batch_size: int, top_k: int) -> None:
    """Explain a random batch with a small CNN and print what came out."""
    import torch

    from gradcam_batch import explain

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1, stride=2),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 10),
    )
    images = torch.randn(batch_size, 3, 64, 64)
    t0 = time.perf_counter()
    exp = explain(model, images, top_k=top_k)
    dt = time.perf_counter() - t0
    click.echo(
        f"explained {batch_size} images x {top_k} classes at layer {exp.target_layer!r} "
        f"in {dt * 1000:.1f} ms ({batch_size / dt:.0f} img/s); heatmaps {tuple(exp.heatmaps.shape)}"
    )
