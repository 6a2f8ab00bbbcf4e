"""The CAM family (engine/explain/methods.py) against the float64 reference of tests/method_reference.py.

Three heads, as in test_engine_parity.py: resnet18 (GAP -> linear: every gradient method in closed
form), mobilenet_v3_small (GAP -> MLP: the vmapped VJP) and a CNN whose head flattens the map into an
MLP. Raw maps (``relu=False``) are compared with max |diff| / max |reference|: 1e-6 for a float64
model, 1e-4 for a float32 one (1e-3 for the eigen methods, whose float32 Gram matrix squares the
condition number). Score-CAM, Guided Grad-CAM and the explain() cache are checked on small CNNs.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn as nn
from engine_reference import FlattenMLPNet, GapLinearNet, assert_close_rel, random_images, seeded
from method_reference import (
    GRADIENT_REFERENCES,
    reference_guided_backprop,
    reference_scorecam,
    reference_signals,
)

import gradcam_batch.engine.explain.explainer as explainer_mod
from gradcam_batch.engine.explain.explainer import Explainer, explain
from gradcam_batch.engine.explain.methods import GRADIENT_METHODS, METHODS, parse_methods, principal_projection

torchvision = pytest.importorskip("torchvision")

FAMILY = tuple(GRADIENT_REFERENCES)  # every method but cam and scorecam
MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(weights=None, num_classes=12), (64, 96), 2),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(weights=None, num_classes=12), (64, 96), 2),
    "flatten_mlp": (lambda: FlattenMLPNet(num_classes=10, size=(32, 40)), (32, 40), 3),
    "gap_linear": (lambda: GapLinearNet(num_classes=7, width=12), (20, 26), 3),
}
# The torchvision models take a minute on the 2-core development machine: slow.
_SLOW = {"resnet18", "mobilenet_v3_small"}
_REFS: dict = {}


def _tol(method: str, dtype: torch.dtype) -> float:
    if dtype == torch.float64:
        return 1e-6
    return 1e-3 if method.startswith("eigen") else 1e-4


def _case(name: str, top_k: int):
    """(model f32, images f32, layer, classes, float64 reference maps by method), cached per module."""
    key = (name, top_k)
    if key not in _REFS:
        factory, size, b = MODELS[name]
        model = seeded(factory)
        images = random_images(b, size, seed=1)
        probe = Explainer(model)
        exp = probe(images, top_k=top_k)
        a, g, _ = reference_signals(model, images, probe.target_layer, exp.classes)
        refs = {m: fn(a, g) for m, fn in GRADIENT_REFERENCES.items()}
        _REFS[key] = (model, images, probe.target_layer, exp.classes, refs)
    return _REFS[key]


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")])
@pytest.mark.parametrize("top_k", [1, 5])
@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n in _SLOW else []) for n in MODELS])
def test_every_method_matches_float64_reference(name: str, top_k: int, dtype: torch.dtype):
    model, images, layer, classes, refs = _case(name, top_k)
    m = model if dtype == torch.float32 else seeded(MODELS[name][0]).double()
    out = Explainer(m, target_layer=layer, method=FAMILY)(images.to(dtype), classes=classes, relu=False)
    assert list(out) == list(FAMILY)
    for method, exp in out.items():
        assert exp.method == method
        assert torch.equal(exp.classes, classes)
        assert_close_rel(exp.cams, refs[method], _tol(method, dtype), f"{name} {method}")
        assert (exp.weights is None) == (method in _ELEMENTWISE[exp.closed_form]), method


# Methods that return maps rather than channel weights, with and without the closed form.
_ELEMENTWISE = {
    False: {"layercam", "hirescam", "gradcam-elementwise", "eigencam", "eigengradcam"},
    True: {"gradcam-elementwise", "eigencam", "eigengradcam"},
}


def test_counterfactual_negates_the_gradient_for_every_method():
    model, images, layer, classes, _ = _case("flatten_mlp", 1)
    a, g, _ = reference_signals(model, images, layer, classes, sign=-1.0)
    out = Explainer(model, target_layer=layer, method=FAMILY)(images, classes=classes, relu=False, counterfactual=True)
    for method, exp in out.items():
        assert_close_rel(exp.cams, GRADIENT_REFERENCES[method](a, g), _tol(method, torch.float32), method)


@pytest.mark.parametrize("name", ["gap_linear", pytest.param("resnet18", marks=pytest.mark.slow)])
def test_closed_form_equals_vjp_for_every_gradient_method(name: str):
    model, images, layer, classes, _ = _case(name, 5)
    closed = Explainer(model, target_layer=layer, method=GRADIENT_METHODS)
    # A score_fn hides the head from the closed-form analysis: the same maps through the VJP.
    vjp = Explainer(model, target_layer=layer, method=GRADIENT_METHODS, score_fn=lambda out: out)
    a = closed(images, classes=classes, relu=False)
    b = vjp(images, classes=classes, relu=False)
    assert closed.closed_form and not vjp.closed_form
    for method in GRADIENT_METHODS:
        assert_close_rel(a[method].cams, b[method].cams, _tol(method, torch.float32), method)
        assert_close_rel(a[method].heatmaps, b[method].heatmaps, 1e-3, method)


def test_cam_needs_no_gradient_and_is_gradcam_times_area():
    model, images, layer, classes, refs = _case("gap_linear", 1)
    out = Explainer(model, target_layer=layer, method=["cam", "gradcam"])(images, classes=classes, relu=False)
    h, w = out["cam"].cams.shape[-2:]
    assert_close_rel(out["cam"].cams, refs["gradcam"] * (h * w), 1e-4, "cam")


def test_a_method_list_equals_separate_calls():
    model = seeded(GapLinearNet, num_classes=7, width=12)
    images = random_images(3, (20, 24), seed=2)
    names = ("gradcam", *sorted(set(METHODS) - {"gradcam"}))
    together = Explainer(model, method=names)(images, top_k=3)
    for name in names:
        alone = Explainer(model, method=name)(images, top_k=3)
        assert torch.equal(alone.classes, together[name].classes)
        for field in ("cams", "heatmaps", "cam_max"):
            assert_close_rel(getattr(together[name], field), getattr(alone, field), 1e-6, f"{name} {field}")


def test_a_name_gives_one_explanation_and_a_sequence_a_dict():
    model = seeded(GapLinearNet)
    images = random_images(1, 16)
    assert isinstance(Explainer(model, method="layercam")(images), explainer_mod.Explanation)
    out = Explainer(model, method=["layercam"])(images)
    assert isinstance(out, dict) and list(out) == ["layercam"]


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown method 'gradcam\\+'; expected one of .*gradcam\\+\\+.*scorecam"):
        Explainer(seeded(GapLinearNet), method="gradcam+")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        Explainer(seeded(GapLinearNet), method=["gradcam", "nope"])
    assert parse_methods("gradcam, LayerCAM,gradcam") == ("gradcam", "layercam")
    with pytest.raises(ValueError, match="no method given"):
        parse_methods(" , ")


# -- Score-CAM ------------------------------------------------------------------------------------------
def test_scorecam_matches_reference_and_chunking_does_not_matter():
    model = seeded(GapLinearNet, num_classes=7, width=12).double()
    images = random_images(2, (14, 18), seed=3).double()
    e = Explainer(model, method=["scorecam", "gradcam"], scorecam_batch=5)
    out = e(images, top_k=3, relu=False)
    acts = model.features(images)
    ref = reference_scorecam(model, images, acts, out["scorecam"].classes)
    assert_close_rel(out["scorecam"].cams, ref, 1e-9, "scorecam")
    whole = Explainer(model, method="scorecam", scorecam_batch=1000)(images, top_k=3, relu=False)
    assert_close_rel(whole.cams, out["scorecam"].cams, 1e-12, "chunks")


def test_scorecam_explains_every_class_from_one_set_of_forwards():
    model = seeded(FlattenMLPNet, num_classes=10, size=(32, 40))
    images = random_images(2, (32, 40), seed=4)
    calls = []
    e = Explainer(model, method="scorecam", scorecam_batch=7)
    forward = e._forward_scores
    e._forward_scores = lambda x: (calls.append(x.shape[0]), forward(x))[1]
    together = e(images, top_k=4)
    k = model.features(images).shape[1]
    assert sum(calls) == images.shape[0] * k  # K masked images per image, for all 4 classes
    for j in range(4):
        alone = Explainer(model, method="scorecam")(images, classes=together.classes[:, j : j + 1])
        assert_close_rel(together.cams[:, j : j + 1], alone.cams, 1e-6, f"class column {j}")


class _ConstantMaps(nn.Module):
    """The target layer's channels are constant over space (a zero conv plus a bias)."""

    def __init__(self, value: float):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.target = nn.ReLU()
        self.fc = nn.Linear(4, 5)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.fill_(value)

    def forward(self, x):
        return self.fc(self.target(self.conv(x)).mean(dim=(2, 3)) + x.mean(dim=(1, 2, 3))[:, None])


def test_scorecam_with_constant_channels_gives_zero_heatmaps():
    model = seeded(_ConstantMaps, value=0.7)
    out = Explainer(model, target_layer="target", method="scorecam")(random_images(2, 12), top_k=2)
    assert torch.isfinite(out.cams).all() and torch.isfinite(out.heatmaps).all()
    assert (out.heatmaps == 0).all()
    assert_close_rel(out.cams, torch.full_like(out.cams, 0.7), 1e-6, "mean of the channels")


def test_zero_activations_give_zero_maps_without_nan():
    model = seeded(_ConstantMaps, value=-1.0)  # ReLU(-1): A = 0 everywhere
    images = random_images(2, 12)
    for score_fn in (None, lambda out: out):  # closed form, then the VJP
        out = Explainer(model, target_layer="target", method=FAMILY, score_fn=score_fn)(images, top_k=2)
        for method, exp in out.items():
            assert torch.isfinite(exp.cams).all(), method
            assert (exp.cams == 0).all() and (exp.heatmaps == 0).all(), method
            if exp.weights is not None:
                assert torch.isfinite(exp.weights).all(), method


def test_eigencam_on_one_image():
    model, images, layer, classes, refs = _case("flatten_mlp", 1)
    one = Explainer(model, target_layer=layer, method="eigencam")(images[:1], classes=classes[:1], relu=False)
    assert_close_rel(one.cams, refs["eigencam"][:1], 1e-3, "eigencam B=1")


def test_principal_projection_sign_follows_the_channel_sum():
    x = torch.randn(6, 5, 3, 4, dtype=torch.float64)
    proj = principal_projection(x)
    centred = x.sum(dim=1).flatten(1)
    centred = centred - centred.mean(dim=1, keepdim=True)
    assert ((proj.flatten(1) * centred).sum(dim=1) >= 0).all()
    wide = principal_projection(x.repeat(1, 4, 1, 1))  # K > h*w takes the other Gram matrix
    assert_close_rel(wide, principal_projection(x) * 2, 1e-9, "both Gram matrices")


# -- Guided Grad-CAM ----------------------------------------------------------------------------------
def test_guided_backprop_matches_a_hand_written_backward():
    model = seeded(FlattenMLPNet, num_classes=10, size=(32, 40)).double()
    images = random_images(2, (32, 40), seed=5).double()
    e = Explainer(model, method=["gradcam", "layercam"], guided=True)
    out = e(images, top_k=3, out_dtype=torch.float64)
    gb = reference_guided_backprop(model, images, out["gradcam"].classes)
    for name, exp in out.items():
        assert exp.guided.shape == (2, 3, 3, 32, 40)
        prod = (gb * exp.heatmaps[:, :, None]).flatten(2)
        lo, hi = prod.amin(2, keepdim=True), prod.amax(2, keepdim=True)
        expected = torch.where(hi > lo, (prod - lo) / (hi - lo), torch.zeros_like(prod)).view_as(gb)
        assert_close_rel(exp.guided, expected, 1e-9, name)
    assert not any(m._forward_hooks for m in model.modules())  # the guided hooks are gone
    assert all(p.grad is None for p in model.parameters())


def test_guided_is_uint8_with_uint8_heatmaps():
    model = seeded(FlattenMLPNet, num_classes=10, size=(32, 40))
    out = Explainer(model, guided=True)(random_images(1, (32, 40)), top_k=2, out_dtype=torch.uint8)
    assert out.guided.dtype == torch.uint8 and out.guided.shape == (1, 2, 3, 32, 40)
    assert int(out.guided.max()) == 255


# -- kernels --------------------------------------------------------------------------------------------
def test_triton_and_torch_agree_on_every_method():
    pytest.importorskip("triton")
    model = seeded(GapLinearNet, num_classes=7, width=12)
    images = random_images(2, (9, 11), seed=6)
    names = tuple(METHODS)
    a = Explainer(model, method=names, kernel_backend="triton")(images, top_k=2, out_dtype=torch.uint8)
    b = Explainer(model, method=names, kernel_backend="torch")(images, top_k=2, out_dtype=torch.uint8)
    for name in names:
        diff = (a[name].heatmaps.int() - b[name].heatmaps.int()).abs().max().item()
        assert diff <= 1, f"{name}: heatmaps differ by {diff} LSB"
        assert_close_rel(a[name].cams, b[name].cams, 1e-5, name)


# -- explain() in a loop -----------------------------------------------------------------------------
def _count_splits(monkeypatch) -> list[str]:
    calls: list[str] = []
    split = explainer_mod.split_at
    monkeypatch.setattr(explainer_mod, "split_at", lambda m, name: (calls.append(name), split(m, name))[1])
    return calls


def test_explain_reuses_its_set_up_and_sees_new_weights(monkeypatch):
    calls = _count_splits(monkeypatch)
    model = seeded(FlattenMLPNet, num_classes=10, size=(32, 40))
    images = random_images(2, (32, 40), seed=7)
    first = explain(model, images, method=["gradcam", "gradcam++"], top_k=2)
    again = explain(model, images, method=["gradcam", "gradcam++"], top_k=2)
    assert len(calls) == 1
    assert torch.equal(first["gradcam++"].cams, again["gradcam++"].cams)
    # A training step changes the weights in place: the cached set-up shares them.
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(images).logsumexp(1).sum().backward()
    opt.step()
    model.eval()
    after = explain(model, images, method=["gradcam", "gradcam++"], top_k=2)
    fresh = Explainer(model, method=["gradcam", "gradcam++"])(images, top_k=2)
    assert len(calls) == 2  # the fresh Explainer above; explain() still used its cached set-up
    for name in fresh:
        # Not bit-equal: each explainer's vjp_strategy="auto" measures vmap and the loop on its own, and
        # the two differ by float rounding (about 1e-10 here).
        torch.testing.assert_close(after[name].cams, fresh[name].cams, rtol=1e-5, atol=1e-8)
    assert not torch.equal(after["gradcam"].cams, first["gradcam"].cams)


def test_explain_sets_up_again_when_a_module_is_replaced(monkeypatch):
    calls = _count_splits(monkeypatch)
    model = seeded(GapLinearNet, num_classes=7, width=12)
    images = random_images(2, 16)
    explain(model, images, method="layercam")
    model.fc = nn.Linear(12, 7)
    got = explain(model, images, method="layercam")
    assert len(calls) == 2
    assert torch.equal(got.cams, Explainer(model, method="layercam")(images).cams)
    explain(model, images, method="gradcam")  # other arguments: another entry
    assert len(calls) == 4


def test_explain_cache_does_not_keep_the_model_alive():
    model = seeded(GapLinearNet)
    explain(model, random_images(1, 16))
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


# -- pytorch-grad-cam ----------------------------------------------------------------------------------
_PGC = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "hirescam": "HiResCAM",
    "gradcam-elementwise": "GradCAMElementWise",
    "eigencam": "EigenCAM",
    "eigengradcam": "EigenGradCAM",
    "scorecam": "ScoreCAM",
}


@pytest.mark.slow  # Score-CAM's masked forwards of two torchvision models, twice: about a minute here
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_maps_correlate_with_pytorch_grad_cam(name: str, monkeypatch):
    """Pearson >= 0.999 between our upsampled maps and pytorch-grad-cam's, float32, top-2.

    Two settings bring pytorch-grad-cam's conventions in, each documented in methods.py: its
    Score-CAM upsamples with align_corners=True, and its Grad-CAM++ adds 1e-6 to the denominator,
    which dominates a random head's tiny gradients, so the last linear layer is scaled by 1e3 (the
    formula is unchanged). The eigen methods' sign is LAPACK's there: their raw projections are
    compared up to sign.
    """
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    import gradcam_batch.engine.explain.methods as methods_mod
    from gradcam_batch.engine.bench.harness import pearson

    monkeypatch.setattr(methods_mod, "SCORECAM_ALIGN_CORNERS", True)
    factory, size, b = MODELS[name]
    model = seeded(factory)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(1e3)
        last.bias.mul_(1e3)
    images = random_images(b, size, seed=8)
    names = tuple(_PGC)
    e = Explainer(model, method=names, scorecam_batch=128)
    ours = e(images, top_k=2)
    classes = ours["gradcam"].classes
    eigen = Explainer(model, target_layer=e.target_layer, method=["eigencam", "eigengradcam"])
    raw = eigen(images, classes=classes, relu=False, heatmaps=False)
    layer = model.get_submodule(e.target_layer)
    for method in names:
        with getattr(pgc, _PGC[method])(model=model, target_layers=[layer]) as cam:
            maps, projections = [], []
            for r in range(classes.shape[1]):
                targets = [ClassifierOutputTarget(int(c)) for c in classes[:, r]]
                maps.append(torch.from_numpy(cam(input_tensor=images, targets=targets)))
                if method.startswith("eigen"):
                    a = cam.activations_and_grads.activations[0].numpy()
                    g = cam.activations_and_grads.gradients[0].numpy() if method == "eigengradcam" else 1.0
                    projections.append(torch.from_numpy(get_2d_projection(g * a)))
        if method.startswith("eigen"):
            r = pearson(raw[method].cams, torch.stack(projections, dim=1)).abs()
        else:
            r = pearson(ours[method].heatmaps, torch.stack(maps, dim=1))
        assert float(r.min()) >= 0.999, f"{name} {method}: min Pearson {float(r.min()):.6f}"
