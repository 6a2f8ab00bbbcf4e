"""Localization: Grad-CAM of a small CNN trained here points at the object (the pointing game).

Synthetic images hold one shape at a random place; the class is the shape's type. A model that
classifies them well must look at the shape, so the top-1 heatmap's peak should fall inside its
box. Training is deterministic on the CPU (fixed seeds) and takes seconds.
"""

from __future__ import annotations

import pytest
import torch

from gradcam_batch import Explainer
from gradcam_batch.engine.demo.synthetic import make_shapes, pointing_game, train_shapes_cnn

# Training the CNN is the slow part (about a minute here); tests/test_demo.py checks the pointing
# game of the shipped model in the default run.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained():
    with torch.random.fork_rng():
        train = make_shapes(1500, size=48, seed=1)
        model = train_shapes_cnn(train, epochs=4, seed=0)
    test = make_shapes(200, size=48, seed=2)
    x, y = test.tensors()
    return model, test, x, y


def test_model_learned_the_task(trained):
    model, _, x, y = trained
    with torch.no_grad():
        accuracy = (model(x).argmax(dim=1) == y).double().mean().item()
    assert accuracy >= 0.95


def test_pointing_game_top1(trained):
    model, test, x, y = trained
    r = Explainer(model)(x)
    # The output of ``features`` (its last ReLU), 1/4 of the input: 12 x 12.
    assert r.target_layer.startswith("features") and r.cams.shape == (200, 1, 12, 12)
    assert r.closed_form
    assert r.heatmaps.shape == (200, 1, 48, 48)  # input size: peaks are in image pixels
    hit = pointing_game(r.peaks[:, 0], test.boxes)
    assert hit >= 0.95, f"pointing game {hit:.3f} < 0.95"


def test_pointing_game_for_the_true_class_and_the_autograd_path(trained):
    model, test, x, y = trained
    # The autograd path (score_fn turns the closed form off) and explicit per-image classes.
    r = Explainer(model, score_fn=lambda out: out)(x, classes=y.unsqueeze(1))
    assert not r.closed_form
    assert pointing_game(r.peaks[:, 0], test.boxes) >= 0.95


def test_pointing_game_counts_misses(trained):
    """Guards the metric: peaks moved to the opposite corner of the box's image miss most boxes."""
    model, test, x, _ = trained
    r = Explainer(model)(x)
    peaks = r.peaks[:, 0]
    flipped = 47 - peaks
    assert pointing_game(flipped, test.boxes) < 0.5


def test_counterfactual_does_not_point_at_the_object(trained):
    """The counterfactual map shows evidence against the class: rarely the object itself."""
    model, test, x, _ = trained
    e = Explainer(model)
    r = e(x, counterfactual=True)
    live = r.cam_max[:, 0] > 0
    hit = pointing_game(r.peaks[live, 0], test.boxes[live.numpy()])
    assert hit < 0.5
