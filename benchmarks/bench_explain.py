"""pytest-benchmark suite for ``explain()``: ``make bench`` runs it, ``make test`` does not.

Sizes are small enough for a CPU (resnet18 and mobilenet_v3_small at 112x112, batch 8);
``gradcam-batch bench`` is the side-by-side comparison at full size. Each group holds the
pure-inference limit next to the engine, so the report reads as a ratio.
"""

from __future__ import annotations

import pytest
import torch

from gradcam_batch import Explainer

torchvision = pytest.importorskip("torchvision")

BATCH, SIZE, ROUNDS = 8, 112, 5


def _setup(name: str):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(BATCH, 3, SIZE, SIZE, generator=gen) for _ in range(3)]
    return model, batches


class _Rotate:
    """Hands out the batches in turn, so no round reuses the previous round's input."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def __call__(self):
        self.i = (self.i + 1) % len(self.batches)
        return (self.batches[self.i],), {}


@pytest.fixture(scope="module")
def resnet18():
    return _setup("resnet18")


@pytest.fixture(scope="module")
def mobilenet():
    return _setup("mobilenet_v3_small")


def _inference(model):
    def run(x):
        with torch.inference_mode():
            return model(x)

    return run


def test_resnet18_inference(benchmark, resnet18):
    model, batches = resnet18
    benchmark.group = "resnet18 closed form"
    benchmark.pedantic(_inference(model), setup=_Rotate(batches), rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("top_k", [1, 5])
def test_resnet18_explain(benchmark, resnet18, top_k):
    model, batches = resnet18
    explainer = Explainer(model)
    benchmark.group = "resnet18 closed form"
    exp = benchmark.pedantic(
        lambda x: explainer(x, top_k=top_k), setup=_Rotate(batches), rounds=ROUNDS, warmup_rounds=1
    )
    assert exp.closed_form and exp.heatmaps.shape == (BATCH, top_k, SIZE, SIZE)


def test_mobilenet_inference(benchmark, mobilenet):
    model, batches = mobilenet
    benchmark.group = "mobilenet_v3_small non-linear head, top-5"
    benchmark.pedantic(_inference(model), setup=_Rotate(batches), rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("strategy", ["vmap", "loop", "batched_grad"])
def test_mobilenet_vjp_strategy(benchmark, mobilenet, strategy):
    model, batches = mobilenet
    explainer = Explainer(model, vjp_strategy=strategy)
    benchmark.group = "mobilenet_v3_small non-linear head, top-5"
    exp = benchmark.pedantic(lambda x: explainer(x, top_k=5), setup=_Rotate(batches), rounds=ROUNDS, warmup_rounds=1)
    assert not exp.closed_form and exp.heatmaps.shape == (BATCH, 5, SIZE, SIZE)
