"""explain()'s set-up cache and the Explainer's graph split see the model as it is at call time.

The FX cut traces through norm layers that torch.fx does not keep as leaves (timm's BatchNormAct2d,
any BatchNorm subclass defined outside torch.nn), so the split graph reads the norm's buffers. Those
buffers must be the model's current ones: ``.double()``, ``.to()``, ``.half()`` and ``.cuda()``
replace every buffer object, and code may assign a new tensor to ``running_mean``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from engine_reference import random_images

import gradcam_batch.engine.explain.explainer as explainer_mod
from gradcam_batch.engine.explain.explainer import Explainer, explain


class BatchNormRelu(nn.BatchNorm2d):
    """A BatchNorm subclass outside torch.nn, as timm's BatchNormAct2d: torch.fx traces through it."""

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return torch.relu(x)


class TracedNormNet(nn.Module):
    """conv -> traced BN -> conv -> traced BN (the target) -> GAP -> linear."""

    def __init__(self, num_classes: int = 6):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = BatchNormRelu(8)
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.bn2 = BatchNormRelu(12)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x):
        x = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def _model() -> TracedNormNet:
    torch.manual_seed(0)
    model = TracedNormNet().eval()
    with torch.no_grad():  # non-trivial running statistics, so that a stale buffer shows in the scores
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return model


def _fresh(model: nn.Module, images: torch.Tensor, **kwargs):
    return Explainer(model, target_layer="conv2")(images, top_k=2, **kwargs)


def test_the_cut_reads_the_norm_buffers_through_the_model():
    """The precondition of the tests below: the split graph really reads bn1's buffers."""
    model = _model()
    explainer = Explainer(model, target_layer="conv2")
    explainer(random_images(1, 16))
    targets = {n.target for n in explainer._split.backbone.graph.nodes if n.op == "get_attr"}
    assert "bn1.running_mean" in targets


@pytest.mark.parametrize("cast", ["double-then-float", "to-float64"])
def test_explain_after_a_dtype_change(cast):
    model = _model()
    images = random_images(2, 16)
    first = explain(model, images, target_layer="conv2", top_k=2)
    if cast == "double-then-float":
        model.double()
        doubled = explain(model, images.double(), target_layer="conv2", top_k=2)
        assert doubled.scores.dtype == torch.float64
        torch.testing.assert_close(doubled.scores, first.scores.double(), rtol=1e-5, atol=1e-6)
        model.float()
        again = explain(model, images, target_layer="conv2", top_k=2)
        torch.testing.assert_close(again.scores, first.scores)
        torch.testing.assert_close(again.cams, first.cams)
    else:
        model.to(torch.float64)
        doubled = explain(model, images.double(), target_layer="conv2", top_k=2)
        ref = _fresh(model, images.double())
        assert torch.equal(doubled.scores, ref.scores) and torch.equal(doubled.cams, ref.cams)


def test_explain_after_a_buffer_is_reassigned():
    """The silent variant: a new running_mean of the same dtype and device."""
    model = _model()
    images = random_images(2, 16)
    first = explain(model, images, target_layer="conv2", top_k=2)
    model.bn1.running_mean = torch.full_like(model.bn1.running_mean, 3.0)
    again = explain(model, images, target_layer="conv2", top_k=2, classes=first.classes)
    ref = _fresh(model, images, classes=first.classes)
    assert not torch.allclose(ref.scores, first.scores)  # the new statistics matter
    assert torch.equal(again.scores, ref.scores) and torch.equal(again.cams, ref.cams)


def test_an_explainer_after_a_buffer_is_reassigned():
    model = _model()
    images = random_images(2, 16)
    explainer = Explainer(model, target_layer="conv2")
    first = explainer(images, top_k=2)
    model.bn2.running_var = model.bn2.running_var * 4.0
    again = explainer(images, classes=first.classes)
    assert torch.equal(again.scores, _fresh(model, images, classes=first.classes).scores)


def test_root_level_buffers_are_read_at_call_time():
    """A buffer of the model itself (not of a submodule) is held by the cut graph directly."""

    class Shifted(TracedNormNet):
        def __init__(self):
            super().__init__()
            self.register_buffer("shift", torch.zeros(1, 3, 1, 1))

        def forward(self, x):
            return super().forward(x - self.shift)

    torch.manual_seed(0)
    model = Shifted().eval()
    images = random_images(2, 16)
    first = explain(model, images, target_layer="conv2", top_k=2)
    model.shift = torch.full((1, 3, 1, 1), 0.7)
    again = explain(model, images, target_layer="conv2", classes=first.classes)
    ref = _fresh(model, images, classes=first.classes)
    assert not torch.allclose(ref.scores, first.scores)
    assert torch.equal(again.scores, ref.scores)


def test_a_dtype_change_keeps_the_cached_set_up(monkeypatch):
    """`.to()` needs nothing: the same set-up serves the model in its new dtype (no new trace)."""
    calls: list[str] = []
    split = explainer_mod.split_at
    monkeypatch.setattr(explainer_mod, "split_at", lambda m, name: (calls.append(name), split(m, name))[1])
    model = _model()
    images = random_images(2, 16)
    explain(model, images, target_layer="conv2")
    model.double()
    explain(model, images.double(), target_layer="conv2")
    assert calls == ["conv2"]


def test_timm_batchnormact_after_double_and_back():
    timm = pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=5).eval()
    assert any(isinstance(m, BatchNormAct2d) for m in model.modules())
    images = random_images(2, 32)
    first = explain(model, images, top_k=2)
    model.double()
    doubled = explain(model, images.double(), classes=first.classes)
    assert doubled.target_layer == first.target_layer
    torch.testing.assert_close(doubled.scores.float(), first.scores, rtol=1e-4, atol=1e-5)
    model.float()
    again = explain(model, images, classes=first.classes)
    torch.testing.assert_close(again.cams, first.cams)


@pytest.mark.gpu
def test_half_and_cuda_after_a_first_call():
    model = _model()
    images = random_images(2, 16)
    first = explain(model, images, target_layer="conv2", top_k=2)
    model.cuda()
    on_gpu = explain(model, images.cuda(), target_layer="conv2", classes=first.classes.cuda())
    torch.testing.assert_close(on_gpu.scores.cpu(), first.scores, rtol=1e-4, atol=1e-5)
    model.half()
    halved = explain(model, images.cuda().half(), target_layer="conv2", classes=first.classes.cuda())
    torch.testing.assert_close(halved.scores.float().cpu(), first.scores, rtol=2e-2, atol=2e-2)
    model.float().cpu()
    back = explain(model, images, target_layer="conv2", classes=first.classes)
    torch.testing.assert_close(back.cams, first.cams)
