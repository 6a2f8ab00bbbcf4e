"""A model that torch.fx cannot cut falls back to the forward-hook path, and says so once, with the cause.

The hook path runs the whole model eager and in float32: no torch.compile, no autocast backbone.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from engine_reference import GapLinearNet, UntraceableNet, random_images, seeded

from gradcam_batch.engine.explain.explainer import Explainer, SplitFallbackWarning
from gradcam_batch.engine.explain.split import SplitError, split_at


def _fallback_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, SplitFallbackWarning)]


def test_untraceable_model_warns_once_naming_the_cause():
    model = seeded(UntraceableNet)
    images = random_images(2, 16)
    explainer = Explainer(model)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        explainer(images, top_k=2)
        explainer(images, top_k=2)  # set up once: no second warning
        Explainer(model)(images)  # a run's second Explainer on the same model (the plan's probe, then the step)
    lines = _fallback_warnings(record)
    assert len(lines) == 1, lines
    line = lines[0]
    assert "\n" not in line
    assert "features" in line  # the layer
    assert "UntraceableNet" in line and "TraceError" in line  # the cause
    assert "hook" in line and "compile" in line  # what it costs
    assert explainer._split is None
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        Explainer(seeded(UntraceableNet))(images)  # another model: said again
    assert len(_fallback_warnings(record)) == 1


def test_a_module_called_twice_is_a_cause_too():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.fc = nn.Linear(3, 4)

        def forward(self, x):
            return self.fc(self.conv(self.conv(x)).mean((2, 3)))

    with pytest.raises(SplitError, match=r"calls 'conv' 2 times"):
        split_at(Twice(), "conv")


def test_a_traceable_model_does_not_warn():
    model = seeded(GapLinearNet)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        Explainer(model)(random_images(1, 16))
    assert _fallback_warnings(record) == []


def test_compile_on_an_untraceable_model_is_one_line_too():
    model = seeded(UntraceableNet)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        Explainer(model, compile=True)(random_images(1, 16))
    lines = _fallback_warnings(record)
    assert len(lines) == 1 and "compile" in lines[0]
    assert not [w for w in record if "torch.compile skipped" in str(w.message)]  # not a second line
    assert torch.is_tensor(model.head[0].weight)
