"""Parity of the engine with a float64 reference that runs ``loss.backward()`` class by class.

Three heads: resnet18 (GAP -> linear, the closed form), mobilenet_v3_small (GAP -> MLP, the
vectorized VJP) and a CNN whose head flattens the map into an MLP (no pooling at all). Random
weights, fixed seeds, small inputs with h != w. Tolerances (max abs diff / max abs reference):
1e-6 for a float64 model, 1e-4 for a float32 model (against the float64 reference).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch
from engine_reference import (
    FlattenMLPNet,
    UntraceableNet,
    assert_close_rel,
    random_images,
    reference_gradcam,
    reference_heatmaps,
    seeded,
)

import gradcam_batch.engine.explain.explainer as explainer_mod
from gradcam_batch import Explainer, explain
from gradcam_batch.engine.explain.explainer import SplitFallbackWarning
from gradcam_batch.engine.explain.split import SplitError

torchvision = pytest.importorskip("torchvision")

TOL = {torch.float64: 1e-6, torch.float32: 1e-4}
DTYPES = [pytest.param(torch.float64, id="f64"), pytest.param(torch.float32, id="f32")]

# name -> (factory, input (H, W), batch, expected auto-detected layer, closed form)
MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(weights=None), (64, 96), 3, "layer4.1", True),
    "mobilenet_v3_small": (
        lambda: torchvision.models.mobilenet_v3_small(weights=None),
        (64, 96),
        2,
        "features.12",
        False,
    ),
    "flatten_mlp": (lambda: FlattenMLPNet(num_classes=10, size=(32, 40)), (32, 40), 4, "features.7", False),
    "untraceable": (lambda: UntraceableNet(num_classes=6), (20, 28), 3, "features.4", False),
}


@dataclass
class Case:
    """One model in float32 and float64 (same weights), its inputs, logits and cached references."""

    name: str
    models: dict[torch.dtype, torch.nn.Module]
    images: dict[torch.dtype, torch.Tensor]
    logits: dict[torch.dtype, torch.Tensor]
    layer: str
    closed_form: bool
    explainers: dict[tuple, Explainer] = field(default_factory=dict)
    _ref_cols: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.logits[torch.float64].shape[1]

    def explainer(self, dtype: torch.dtype, **kwargs) -> Explainer:
        # Reused across tests, which also checks that one Explainer serves many batches.
        key = (dtype, tuple(sorted(kwargs.items())))
        if key not in self.explainers:
            self.explainers[key] = Explainer(self.models[dtype], **kwargs)
        return self.explainers[key]

    def reference(self, classes: torch.Tensor, counterfactual: bool = False) -> dict[str, torch.Tensor]:
        """Float64 reference alpha and cams for (B, C) classes; each class column computed once."""
        keys = [(tuple(col.tolist()), counterfactual) for col in classes.t()]
        missing = [j for j, k in enumerate(keys) if k not in self._ref_cols]
        if missing:
            ref = reference_gradcam(
                self.models[torch.float64],
                self.images[torch.float64],
                self.layer,
                classes[:, missing],
                counterfactual=counterfactual,
            )
            for i, j in enumerate(missing):
                self._ref_cols[keys[j]] = (ref["alpha"][:, i], ref["cams"][:, i])
        alpha = torch.stack([self._ref_cols[k][0] for k in keys], dim=1)
        cams = torch.stack([self._ref_cols[k][1] for k in keys], dim=1)
        return {"alpha": alpha, "cams": cams}


def _make_case(name: str) -> Case:
    factory, size, batch, layer, closed = MODELS[name]
    m32 = seeded(factory, seed=0)
    m64 = copy.deepcopy(m32).double()
    x32 = random_images(batch, size, seed=1)
    images = {torch.float32: x32, torch.float64: x32.double()}
    models = {torch.float32: m32, torch.float64: m64}
    with torch.no_grad():
        logits = {dt: models[dt](images[dt]) for dt in models}
    return Case(name, models, images, logits, layer, closed)


@pytest.fixture(scope="module", params=["resnet18", "mobilenet_v3_small", "flatten_mlp"])
def case(request) -> Case:
    return _make_case(request.param)


@pytest.fixture(scope="module")
def mobilenet() -> Case:
    return _make_case("mobilenet_v3_small")


@pytest.fixture(scope="module")
def untraceable() -> Case:
    return _make_case("untraceable")


def _classes_for(case: Case, spec: str) -> tuple[torch.Tensor | None, int]:
    """(classes argument, top_k argument) for a class spec."""
    if spec == "top1":
        return None, 1
    if spec == "top5":
        return None, min(5, case.num_classes)
    gen = torch.Generator().manual_seed(7)
    b = case.images[torch.float32].shape[0]
    # Different classes per image, low-scoring ones included.
    return torch.randint(0, case.num_classes, (b, 3), generator=gen), 1


def check_against_reference(
    case: Case, r, dtype: torch.dtype, classes, top_k: int, *, counterfactual: bool = False, closed_form=None
) -> None:
    """Every field of an Explanation against the float64 reference and the plain forward."""
    tol = TOL[dtype]
    logits = case.logits[dtype]
    b = logits.shape[0]
    if classes is None:
        expected_classes = torch.topk(logits, top_k, dim=1).indices
    else:
        expected_classes = classes if classes.dim() == 2 else classes.unsqueeze(0).expand(b, -1)
    assert r.classes.dtype == torch.int64
    assert torch.equal(r.classes, expected_classes)
    c = expected_classes.shape[1]

    assert_close_rel(r.scores, logits.gather(1, expected_classes), tol, "scores")
    probs = torch.softmax(logits.double(), dim=1).gather(1, expected_classes)
    assert_close_rel(r.probabilities, probs, tol, "probabilities")

    ref = case.reference(expected_classes, counterfactual=counterfactual)
    h, w = ref["cams"].shape[-2:]
    height, width = case.images[dtype].shape[-2:]
    assert r.cams.shape == (b, c, h, w)
    assert r.heatmaps.shape == (b, c, height, width)
    assert r.cams.dtype == dtype and r.heatmaps.dtype == torch.float32
    assert_close_rel(r.weights, ref["alpha"], tol, "alpha")
    assert_close_rel(r.cams, ref["cams"], tol, "cams")
    # The reference maps must not be trivial, or the comparison above proves little.
    assert (ref["cams"].flatten(2).amax(dim=2) > 0).float().mean() >= 0.5

    heat_ref = reference_heatmaps(ref["cams"], (height, width))
    assert_close_rel(r.heatmaps, heat_ref, tol, "heatmaps")
    assert_close_rel(r.cam_max, ref["cams"].flatten(2).amax(dim=2), tol, "cam_max")
    # The peak is where the heatmap reaches its maximum.
    flat = r.heatmaps.flatten(2)
    at_peak = flat.gather(2, (r.peaks[..., 0] * width + r.peaks[..., 1]).unsqueeze(-1)).squeeze(-1)
    assert torch.equal(at_peak, flat.amax(dim=2))
    assert r.target_layer == case.layer
    assert r.closed_form == (case.closed_form if closed_form is None else closed_form)


@pytest.mark.parametrize("spec", ["top1", "top5", "explicit"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_parity_with_float64_reference(case: Case, dtype: torch.dtype, spec: str):
    classes, top_k = _classes_for(case, spec)
    r = case.explainer(dtype)(case.images[dtype], classes=classes, top_k=top_k)
    check_against_reference(case, r, dtype, classes, top_k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_explain_function_matches_reference(case: Case, dtype: torch.dtype):
    """The one-call API, with the same classes given as 1-D (broadcast to every image)."""
    classes = torch.tensor([3, 0, case.num_classes - 1])
    r = explain(case.models[dtype], case.images[dtype], classes=classes)
    check_against_reference(case, r, dtype, classes, 1)


@pytest.mark.slow  # every strategy in float64 on mobilenet; tests/test_baseline_parity.py covers them fast
@pytest.mark.parametrize("strategy", ["vmap", "loop", "batched_grad"])
@pytest.mark.parametrize("spec", ["top5", "explicit"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_vjp_strategies_match_reference(mobilenet: Case, dtype: torch.dtype, spec: str, strategy: str):
    classes, top_k = _classes_for(mobilenet, spec)
    r = mobilenet.explainer(dtype, vjp_strategy=strategy)(mobilenet.images[dtype], classes=classes, top_k=top_k)
    check_against_reference(mobilenet, r, dtype, classes, top_k)


@pytest.mark.parametrize("spec", ["top1", "top5", "explicit"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_hook_fallback_matches_reference(untraceable: Case, dtype: torch.dtype, spec: str):
    """A model torch.fx cannot trace goes through the forward-hook path, with the same numbers."""
    e = untraceable.explainer(dtype)
    classes, top_k = _classes_for(untraceable, spec)
    r = e(untraceable.images[dtype], classes=classes, top_k=top_k)
    assert e._split is None, "the untraceable model should use the hook fallback"
    check_against_reference(untraceable, r, dtype, classes, top_k)


def test_hook_path_equals_fx_split_path(case: Case, monkeypatch):
    x = case.images[torch.float64]
    classes, _ = _classes_for(case, "explicit")
    fx_explainer = case.explainer(torch.float64)
    r_fx = fx_explainer(x, classes=classes)
    assert fx_explainer._split is not None

    # Make the graph split fail, as it does for a model torch.fx cannot trace.
    def no_split(model, layer):
        raise SplitError("as for an untraceable model")

    monkeypatch.setattr(explainer_mod, "split_at", no_split)
    hooked = Explainer(case.models[torch.float64])
    with pytest.warns(SplitFallbackWarning, match="as for an untraceable model"):
        r_hook = hooked(x, classes=classes)
    assert hooked._split is None
    assert r_hook.target_layer == r_fx.target_layer
    for name in ("scores", "weights", "cams", "heatmaps"):
        assert_close_rel(getattr(r_hook, name), getattr(r_fx, name), 1e-12, name)
    assert torch.equal(r_hook.peaks, r_fx.peaks)
    check_against_reference(case, r_hook, torch.float64, classes, 1, closed_form=False)
