"""Our cams against pytorch-grad-cam's and captum's, called through their public APIs.

Same model (random weights), same target layer, same classes; the raw low-resolution maps
(before ReLU, resize and normalization) must correlate at Pearson >= 0.999 per map.
Where the outputs differ by design (normalization, resize implementation) the tests below
pin down how.
"""

from __future__ import annotations

import pytest
import torch

from gradcam_batch import Explainer
from gradcam_batch.engine.bench.harness import pearson

torchvision = pytest.importorskip("torchvision")
pytest.importorskip("pytorch_grad_cam")
pytest.importorskip("captum")

from captum.attr import LayerAttribution, LayerGradCam  # noqa: E402
from pytorch_grad_cam import GradCAM  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

# 128x128 gives 4x4 maps at both models' last stage: 16 values per map to correlate.
SIZE = 128
TOP_K = 3
MODELS = {"resnet18": "layer4.1", "mobilenet_v3_small": "features.12"}


@pytest.fixture(scope="module", params=sorted(MODELS))
def setup(request):
    torch.manual_seed(0)
    model = torchvision.models.get_model(request.param, weights=None).eval()
    images = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    return request.param, model, images


@pytest.fixture(scope="module")
def baseline_maps(setup):
    """The baselines' raw maps for our top-k classes, computed once per model."""
    name, model, images = setup
    classes = Explainer(model)(images, top_k=TOP_K, heatmaps=False).classes
    pgc_raw, pgc_resized = _pgc_raw(model, MODELS[name], images, classes)
    return classes, pgc_raw, pgc_resized, _captum_raw(model, MODELS[name], images, classes)


def _pgc_raw(model, layer, images, classes):
    module = model.get_submodule(layer)
    raw, resized = [], []
    with GradCAM(model=model, target_layers=[module]) as cam:
        for r in range(classes.shape[1]):
            targets = [ClassifierOutputTarget(int(c)) for c in classes[:, r]]
            resized.append(torch.from_numpy(cam(input_tensor=images, targets=targets)))
            acts = cam.activations_and_grads.activations[0].numpy()
            grads = cam.activations_and_grads.gradients[0].numpy()
            raw.append(torch.from_numpy(cam.get_cam_image(images, module, targets, acts, grads)))
    return torch.stack(raw, 1), torch.stack(resized, 1)


def _captum_raw(model, layer, images, classes):
    gc = LayerGradCam(model, model.get_submodule(layer))
    maps = [gc.attribute(images, target=classes[:, r], relu_attributions=False) for r in range(classes.shape[1])]
    return torch.cat(maps, 1).detach()


def _assert_correlated(ours, theirs, what):
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    r = pearson(ours, theirs)
    worst = int(r.flatten().argmin())
    b, c = divmod(worst, r.shape[1])
    assert float(r.min()) >= 0.999, f"{what}: Pearson {float(r.min()):.6f} at image {b}, class rank {c}"


# resnet18's GAP -> linear head takes the closed form, which has no VJP strategy to vary.
@pytest.mark.parametrize("strategy", ["vmap", "loop", "batched_grad"])
def test_raw_cams_match_both_baselines(setup, baseline_maps, strategy):
    name, model, images = setup
    if name == "resnet18" and strategy != "vmap":
        pytest.skip("closed-form head: the VJP strategy is not used")
    classes, pgc, _, cap = baseline_maps
    explainer = Explainer(model, vjp_strategy=strategy)
    exp = explainer(images, top_k=TOP_K, relu=False, heatmaps=False)
    assert explainer.target_layer == MODELS[name]
    assert torch.equal(exp.classes, classes)
    # resnet18 has a GAP -> linear head (closed form); mobilenet_v3_small's head is non-linear.
    assert exp.closed_form == (name == "resnet18")
    assert exp.cams.shape == (4, TOP_K, 4, 4)
    # Every map varies, so a correlation is meaningful.
    assert bool((exp.cams.flatten(2).std(dim=2) > 0).all())

    _assert_correlated(exp.cams, pgc, f"{name} vs pytorch-grad-cam")
    _assert_correlated(exp.cams, cap, f"{name} vs captum")
    # Same math, so not only correlated but equal up to float rounding.
    scale = exp.cams.abs().amax()
    torch.testing.assert_close(exp.cams / scale, cap / scale, atol=1e-4, rtol=0)
    torch.testing.assert_close(exp.cams / scale, pgc / scale, atol=1e-4, rtol=0)


def test_upsampled_heatmaps_differ_only_by_documented_normalization(setup, baseline_maps):
    """captum: F.interpolate of the ReLU'd map, not normalized; we min-max normalize it."""
    name, model, images = setup
    _, _, _, raw = baseline_maps
    exp = Explainer(model)(images, top_k=TOP_K)
    cap = raw.clamp_min(0)  # what relu_attributions=True returns
    up = LayerAttribution.interpolate(cap, (SIZE, SIZE), "bilinear")
    flat = up.flatten(2)
    lo, hi = flat.amin(2, keepdim=True), flat.amax(2, keepdim=True)
    expected = ((flat - lo) / (hi - lo)).view_as(up)
    torch.testing.assert_close(exp.heatmaps, expected, atol=1e-4, rtol=0)


def test_pytorch_grad_cam_resized_maps_correlate(setup, baseline_maps):
    """pytorch-grad-cam resizes with OpenCV on the host and normalizes with a 1e-7 epsilon."""
    name, model, images = setup
    _, _, resized, _ = baseline_maps
    exp = Explainer(model)(images, top_k=TOP_K)
    _assert_correlated(exp.heatmaps, resized, f"{name} heatmaps vs pytorch-grad-cam")
    # Both are min-max normalized to [0, 1] at input size; their 1e-7 epsilon keeps the top
    # a little under 1 when the map's range is small.
    assert resized.shape == exp.heatmaps.shape
    torch.testing.assert_close(resized.amax(dim=(2, 3)), exp.heatmaps.amax(dim=(2, 3)), atol=1e-3, rtol=0)
    torch.testing.assert_close(resized.amin(dim=(2, 3)), exp.heatmaps.amin(dim=(2, 3)), atol=1e-6, rtol=0)


def test_pearson_helper():
    a = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pearson(a, 3 * a + 1), torch.ones(2, 3, dtype=torch.float64))
    torch.testing.assert_close(pearson(a, -a), -torch.ones(2, 3, dtype=torch.float64))
    const = torch.ones(1, 1, 5, 5)
    assert float(pearson(const, const)) == 1.0
    assert float(pearson(const, a[:1, :1])) == 0.0
    b = a.clone()
    b[0, 0, 0, 0] += 10.0
    assert float(pearson(a, b)[0, 0]) < 0.99
    assert float(pearson(a, b)[1, 2]) == pytest.approx(1.0)
    # Unrelated maps do not correlate.
    c = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    assert float(pearson(a, c).abs().max()) < 0.9
