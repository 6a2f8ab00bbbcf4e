"""The CAM equivalence, the closed form against the autograd path, and counterfactuals.

For a global-average-pool -> linear head, dy^c/dA^k_ij = W[c, k] / (h*w): Grad-CAM's alpha is
W[c] / (h*w) and CAM (Zhou et al.) is Grad-CAM times h*w. The engine uses that as a closed form
with no backward pass; here it must agree with the autograd path (forced by a ``score_fn``, which
turns the head analysis off) for every VJP strategy, and with CAM computed by hand from the
linear layer's weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from engine_reference import (
    FlattenMLPNet,
    GapLinearNet,
    UntraceableNet,
    assert_close_rel,
    random_images,
    reference_gradcam,
    seeded,
)

from gradcam_batch import Explainer, explain

STRATEGIES = ["vmap", "loop", "batched_grad"]
IDENTITY = lambda out: out  # any score_fn disables the closed form


class _MeanHead(nn.Module):
    """GAP written as x.mean((2, 3)), then dropout (identity in eval) and a linear layer."""

    def __init__(self, num_classes: int = 6):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 10, 3, padding=1), nn.ReLU(), nn.Conv2d(10, 9, 3, padding=1))
        self.drop = nn.Dropout(0.2)
        self.classifier = nn.Linear(9, num_classes)

    def forward(self, x):
        return self.classifier(self.drop(self.features(x).mean(dim=(2, 3))))


class _FunctionalPoolHead(_MeanHead):
    """GAP as F.adaptive_avg_pool2d, flattened with torch.flatten."""

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class _ViewFlattenHead(_MeanHead):
    """GAP, then the classic ``x.view(x.size(0), -1)`` flatten (a second use of the pooled tensor)."""

    def __init__(self, num_classes: int = 6):
        super().__init__(num_classes)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        a = self.pool(self.features(x))
        return self.classifier(a.view(a.size(0), -1))


class _ScaledLinearHead(_MeanHead):
    """GAP -> linear -> x 2: not the closed form's head (the scale is after the linear layer)."""

    def forward(self, x):
        return 2.0 * self.classifier(self.features(x).mean(dim=(2, 3)))


class _MaxPoolHead(_MeanHead):
    """Global max pool -> linear: looks like CAM's head but is not one."""

    def forward(self, x):
        return self.classifier(torch.amax(self.features(x), dim=(2, 3)))


GAP_MODELS = {
    "gap_linear": (lambda: GapLinearNet(num_classes=7), (16, 20), "fc"),
    "mean_head": (_MeanHead, (10, 14), "classifier"),
    "functional_pool": (_FunctionalPoolHead, (10, 14), "classifier"),
    "view_flatten": (_ViewFlattenHead, (10, 14), "classifier"),
}
GAP_NAMES = list(GAP_MODELS)


def _gap_case(name: str, dtype=torch.float64):
    factory, size, fc = GAP_MODELS[name]
    model = seeded(factory).to(dtype)
    x = random_images(3, size, seed=4, dtype=dtype)
    return model, x, model.get_submodule(fc)


@pytest.mark.parametrize("name", GAP_NAMES)
def test_closed_form_is_detected(name):
    model, x, _ = _gap_case(name)
    e = Explainer(model)
    r = e(x)
    assert r.closed_form and e.closed_form
    assert not Explainer(model, score_fn=IDENTITY)(x).closed_form


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", GAP_NAMES)
def test_closed_form_equals_autograd_path(name, strategy):
    model, x, _ = _gap_case(name)
    classes = torch.tensor([[0, 3, 5], [5, 1, 1], [2, 4, 0]])
    _check_closed_equals_autograd(model, x, classes, strategy)


def _check_closed_equals_autograd(model, x, classes, strategy):
    closed = Explainer(model)(x, classes=classes)
    auto = Explainer(model, score_fn=IDENTITY, vjp_strategy=strategy)(x, classes=classes)
    assert closed.closed_form and not auto.closed_form
    assert closed.target_layer == auto.target_layer
    for field in ("scores", "weights", "cams", "heatmaps", "cam_max"):
        assert_close_rel(getattr(closed, field), getattr(auto, field), 1e-12, field)
    assert torch.equal(closed.peaks, auto.peaks)


@pytest.mark.parametrize("name", GAP_NAMES)
def test_closed_form_alpha_is_the_linear_weight_over_hw(name):
    model, x, fc = _gap_case(name)
    r = explain(model, x, top_k=3)
    h, w = r.cams.shape[-2:]
    expected = fc.weight.detach()[r.classes] / (h * w)
    assert_close_rel(r.weights, expected, 1e-15, "alpha")
    ref = reference_gradcam(model, x, r.target_layer, r.classes)
    assert_close_rel(r.weights, ref["alpha"], 1e-9, "alpha against backward()")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", GAP_NAMES)
def test_cam_equals_gradcam_times_hw(name, dtype):
    model, x, fc = _gap_case(name, dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    grad = explain(model, x, top_k=4)
    cam = explain(model, x, top_k=4, method="cam")
    assert torch.equal(cam.classes, grad.classes) and cam.closed_form
    h, w = grad.cams.shape[-2:]
    assert h * w > 1
    assert_close_rel(cam.cams, grad.cams * (h * w), tol, "cams")
    assert_close_rel(cam.weights, grad.weights * (h * w), tol, "weights")
    # Normalization removes the constant factor: the heatmaps are the same.
    assert_close_rel(cam.heatmaps, grad.heatmaps, 1e-5, "heatmaps")
    assert torch.equal(cam.scores, grad.scores)

    # CAM by hand (Zhou et al.): M_c = sum_k W[c, k] A^k, from a forward hook and the weights.
    captured = []
    handle = model.get_submodule(grad.target_layer).register_forward_hook(lambda m, a, o: captured.append(o))
    with torch.no_grad():
        model(x)
    handle.remove()
    by_hand = torch.relu(torch.einsum("bck,bkhw->bchw", fc.weight.detach()[cam.classes], captured[0]))
    assert_close_rel(cam.cams, by_hand, tol, "CAM by hand")


@pytest.mark.parametrize("model_cls", [_ScaledLinearHead, _MaxPoolHead, FlattenMLPNet])
def test_other_heads_are_not_taken_for_gap_linear(model_cls):
    kwargs = {"size": (12, 16)} if model_cls is FlattenMLPNet else {}
    model = seeded(model_cls, **kwargs).double()
    x = random_images(2, (12, 16) if model_cls is FlattenMLPNet else (10, 14), seed=5, dtype=torch.float64)
    r = explain(model, x, top_k=3)
    assert not r.closed_form
    ref = reference_gradcam(model, x, r.target_layer, r.classes)
    assert_close_rel(r.cams, ref["cams"], 1e-9, "cams")
    with pytest.raises(ValueError, match="method='cam'"):
        explain(model, x, method="cam")


def test_resnet18_closed_form_cam_and_autograd_agree():
    torchvision = pytest.importorskip("torchvision")
    model = seeded(torchvision.models.resnet18, weights=None, num_classes=12).double()
    x = random_images(2, (64, 96), seed=4, dtype=torch.float64)
    classes = torch.tensor([[0, 7, 11], [3, 3, 9]])
    _check_closed_equals_autograd(model, x, classes, "vmap")
    grad = explain(model, x, classes=classes)
    cam = explain(model, x, classes=classes, method="cam")
    h, w = grad.cams.shape[-2:]
    assert (h, w) == (2, 3) and grad.target_layer == "layer4.1"
    assert_close_rel(grad.weights, model.fc.weight.detach()[classes] / (h * w), 1e-15, "alpha")
    assert_close_rel(cam.cams, grad.cams * (h * w), 1e-12, "cams")


# -- counterfactual explanations -------------------------------------------------------------------


def _counterfactual_cases():
    return {
        "closed_form": (lambda: GapLinearNet(num_classes=7), (16, 20), {}),
        "autograd_on_gap": (lambda: GapLinearNet(num_classes=7), (16, 20), {"score_fn": IDENTITY}),
        "mlp_head": (lambda: FlattenMLPNet(num_classes=10, size=(16, 20)), (16, 20), {}),
        "hooks": (lambda: UntraceableNet(num_classes=6), (12, 18), {}),
    }


@pytest.mark.parametrize("case", list(_counterfactual_cases()))
def test_counterfactual_equals_negated_gradient_map(case):
    factory, size, kwargs = _counterfactual_cases()[case]
    model = seeded(factory).double()
    x = random_images(3, size, seed=6, dtype=torch.float64)
    classes = torch.tensor([[0, 2], [1, 5], [3, 3]])
    e = Explainer(model, **kwargs)
    normal = e(x, classes=classes)
    cf = e(x, classes=classes, counterfactual=True)
    assert torch.equal(cf.classes, normal.classes)
    assert torch.equal(cf.scores, normal.scores)
    assert_close_rel(cf.weights, -normal.weights, 1e-15, "weights")

    ref = reference_gradcam(model, x, cf.target_layer, classes, counterfactual=True, score_fn=kwargs.get("score_fn"))
    assert_close_rel(cf.weights, ref["alpha"], 1e-9, "alpha")
    assert_close_rel(cf.cams, ref["cams"], 1e-9, "cams")

    # ReLU(-L) and ReLU(L) split the signed map: they never overlap, and their sum is |L|.
    signed = torch.einsum("bck,bkhw->bchw", normal.weights, ref["acts"])
    assert torch.equal((cf.cams > 0) & (normal.cams > 0), torch.zeros_like(cf.cams, dtype=torch.bool))
    assert_close_rel(cf.cams + normal.cams, signed.abs(), 1e-9, "|L|")
    assert bool((cf.cams > 0).any()) and bool((normal.cams > 0).any())


def test_counterfactual_cam_method():
    model = seeded(GapLinearNet, num_classes=7).double()
    x = random_images(2, (16, 20), seed=8, dtype=torch.float64)
    normal = explain(model, x, top_k=2, method="cam")
    cf = explain(model, x, top_k=2, method="cam", counterfactual=True)
    ref = reference_gradcam(model, x, cf.target_layer, cf.classes, counterfactual=True, method="cam")
    assert_close_rel(cf.cams, ref["cams"], 1e-9, "cams")
    assert_close_rel(cf.weights, -normal.weights, 1e-15, "weights")
