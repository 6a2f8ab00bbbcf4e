"""Edge cases of explain()/Explainer: odd class selections, bad inputs, output options, and
the promise that the caller's model is left exactly as it was."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from engine_reference import (
    FlattenMLPNet,
    GapLinearNet,
    UntraceableNet,
    assert_close_rel,
    assert_state_equal,
    model_state,
    random_images,
    reference_gradcam,
    reference_heatmaps,
    seeded,
)

from gradcam_batch import Explainer, explain
from gradcam_batch.engine import TargetLayerError

# name -> (factory, input (H, W)); one model per engine path: closed form, FX + VJP, hooks.
MODELS = {
    "gap_linear": (lambda: GapLinearNet(num_classes=7), (16, 20)),
    "flatten_mlp": (lambda: FlattenMLPNet(num_classes=10, size=(16, 20)), (16, 20)),
    "untraceable": (lambda: UntraceableNet(num_classes=6), (12, 18)),
}
ALL_MODELS = pytest.mark.parametrize("name", list(MODELS))


def _model(name: str, dtype: torch.dtype = torch.float64) -> nn.Module:
    model = seeded(MODELS[name][0]).to(dtype)
    _settle_batchnorm(model, MODELS[name][1], dtype)
    return model


def _settle_batchnorm(model: nn.Module, size, dtype) -> None:
    """Move the BatchNorm running statistics away from (0, 1) so that train and eval differ."""
    flags = {m: m.training for m in model.modules()}
    model.train()
    with torch.no_grad():
        for seed in range(3):
            model(random_images(8, size, seed=100 + seed, dtype=dtype) * 2 + 0.5)
    for m, t in flags.items():
        m.training = t


def _images(name: str, b: int = 3, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    return random_images(b, MODELS[name][1], seed=seed, dtype=dtype)


def _check_reference(model, x, r, tol=1e-9, **kwargs):
    ref = reference_gradcam(model, x, r.target_layer, r.classes, **kwargs)
    assert_close_rel(r.weights, ref["alpha"], tol, "alpha")
    assert_close_rel(r.cams, ref["cams"], tol, "cams")
    return ref


# -- class selections ------------------------------------------------------------------------------


@ALL_MODELS
def test_single_image_batch(name):
    model, x = _model(name), _images(name, b=3)
    full = explain(model, x, top_k=2)
    one = explain(model, x[1:2], top_k=2)
    assert one.cams.shape[0] == 1 and one.heatmaps.shape[:2] == (1, 2)
    # Images are independent: a batch of one gives that image's row of the full batch.
    assert torch.equal(one.classes, full.classes[1:2])
    assert_close_rel(one.cams, full.cams[1:2], 1e-12, "cams")
    assert_close_rel(one.heatmaps, full.heatmaps[1:2], 1e-12, "heatmaps")
    _check_reference(model, x[1:2], one)


@ALL_MODELS
def test_all_classes_at_once(name):
    model, x = _model(name), _images(name)
    n = model(x).shape[1]
    r = explain(model, x, classes=torch.arange(n))
    assert r.classes.shape == (x.shape[0], n)
    assert torch.equal(r.classes, torch.arange(n).expand(x.shape[0], n))
    _check_reference(model, x, r)


@ALL_MODELS
def test_repeated_class_gives_identical_copies(name):
    model, x = _model(name), _images(name, b=2)
    classes = torch.tensor([[2, 2, 5], [1, 1, 1]])
    r = explain(model, x, classes=classes)
    assert torch.equal(r.classes, classes)
    for field in ("cams", "heatmaps", "weights", "scores"):
        t = getattr(r, field)
        # Equal up to the rounding of the vectorized backward (the rows of one vmapped matmul can
        # take different SIMD paths): a few ulps in float64, nothing like a real difference.
        assert_close_rel(t[0, 1], t[0, 0], 1e-13, field)
        assert_close_rel(t[1, 2], t[1, 0], 1e-13, field)
        assert_close_rel(t[1, 1], t[1, 0], 1e-13, field)
    _check_reference(model, x, r)


@ALL_MODELS
def test_one_dimensional_classes_broadcast(name):
    model, x = _model(name), _images(name)
    e = Explainer(model)
    r1 = e(x, classes=torch.tensor([4, 0]))
    r2 = e(x, classes=torch.tensor([[4, 0]] * x.shape[0]))
    assert torch.equal(r1.classes, r2.classes)
    assert torch.equal(r1.cams, r2.cams)
    assert torch.equal(r1.heatmaps, r2.heatmaps)


@pytest.mark.parametrize("bad", [123, -1, -3])
@ALL_MODELS
def test_out_of_range_class_names_the_index(name, bad):
    model, x = _model(name), _images(name, b=2)
    classes = torch.tensor([[0, 1], [bad, 2]])
    with pytest.raises(ValueError, match=rf"(?<![\d-]){bad}(?!\d)"):
        explain(model, x, classes=classes)
    with pytest.raises(ValueError, match=rf"(?<![\d-]){bad}(?!\d)"):
        explain(model, x, classes=torch.tensor([bad]))


@pytest.mark.parametrize("top_k", [0, -2, 11, 1000])
def test_bad_top_k(top_k):
    model, x = _model("flatten_mlp"), _images("flatten_mlp")
    with pytest.raises(ValueError, match="top_k"):
        explain(model, x, top_k=top_k)


@pytest.mark.parametrize(
    "classes",
    [
        torch.tensor([1.0, 2.0]),  # float indices
        torch.zeros(3, 1, 1, dtype=torch.long),  # 3-D
        torch.zeros(2, 1, dtype=torch.long),  # wrong batch size (B = 3)
        torch.zeros(3, 0, dtype=torch.long),  # no class at all
    ],
)
def test_bad_classes_shape_or_dtype(classes):
    model, x = _model("gap_linear"), _images("gap_linear")
    with pytest.raises(ValueError, match="classes"):
        explain(model, x, classes=classes)


def test_top_k_equals_topk_of_the_logits():
    model, x = _model("flatten_mlp"), _images("flatten_mlp", b=4)
    r = explain(model, x, top_k=10)
    logits = model(x).detach()
    assert torch.equal(r.classes, torch.topk(logits, 10, dim=1).indices)
    assert torch.equal(r.scores, logits.gather(1, r.classes))
    # Descending scores: rank 0 is the highest.
    assert bool((r.scores[:, :-1] >= r.scores[:, 1:]).all())


# -- target layers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "layer"),
    [
        ("gap_linear", "fc"),
        ("flatten_mlp", "classifier.0"),  # the Flatten: (B, K*h*w)
        ("flatten_mlp", "classifier.1"),
        ("untraceable", "head.0"),  # hook path
    ],
)
def test_target_layer_that_is_not_4d(name, layer):
    model, x = _model(name), _images(name)
    with pytest.raises(TargetLayerError, match="4-D"):
        explain(model, x, target_layer=layer)


class _SideBranch(nn.Module):
    """``side`` runs in every forward but its output is thrown away."""

    def __init__(self, untraceable: bool):
        super().__init__()
        self.net = GapLinearNet(num_classes=5)
        self.side = nn.Conv2d(3, 4, 3, padding=1)
        self.untraceable = untraceable

    def forward(self, x):
        _ = self.side(x)
        if self.untraceable and x.sum() > -1e9:  # a data-dependent branch defeats torch.fx
            x = x + 0
        return self.net(x)


@pytest.mark.parametrize("untraceable", [False, True], ids=["fx", "hooks"])
def test_target_layer_the_scores_do_not_depend_on(untraceable):
    model = seeded(_SideBranch, untraceable=untraceable).double()
    x = _images("gap_linear")
    with pytest.raises(TargetLayerError, match="do not depend"):
        explain(model, x, target_layer="side")
    # Auto-detection must not pick the unused branch.
    assert explain(model, x).target_layer == "net.features.4"


def test_bad_layer_name_lists_the_modules():
    model, x = _model("gap_linear"), _images("gap_linear")
    with pytest.raises(TargetLayerError, match=r"features\.nope") as info:
        explain(model, x, target_layer="features.nope")
    assert "features.4" in str(info.value) and "fc" in str(info.value)


def test_target_layer_given_as_module_or_name():
    model, x = _model("flatten_mlp"), _images("flatten_mlp")
    by_module = explain(model, x, target_layer=model.features[4])
    by_name = explain(model, x, target_layer="features.4")
    assert by_module.target_layer == by_name.target_layer == "features.4"
    assert torch.equal(by_module.cams, by_name.cams)
    _check_reference(model, x, by_module)
    with pytest.raises(TargetLayerError):
        explain(model, x, target_layer=nn.Conv2d(3, 3, 1))  # not part of the model


def test_cam_needs_a_gap_linear_head():
    for name in ("flatten_mlp", "untraceable"):
        model, x = _model(name), _images(name)
        with pytest.raises(ValueError, match="method='cam'"):
            explain(model, x, method="cam")
    with pytest.raises(ValueError, match="method"):
        explain(_model("gap_linear"), _images("gap_linear"), method="gradcam++x")


class _InplaceAfterTarget(nn.Module):
    """The target conv is followed by ReLU(inplace=True), as in VGG's features."""

    def __init__(self, untraceable: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Sequential(nn.Linear(8, 10), nn.Tanh(), nn.Linear(10, 5))
        self.untraceable = untraceable

    def forward(self, x):
        if self.untraceable and x.sum() > -1e9:
            x = x + 0
        a = self.act(self.conv2(torch.relu(self.conv1(x))))
        return self.head(a.mean((2, 3)))


@pytest.mark.parametrize("untraceable", [False, True], ids=["fx", "hooks"])
def test_in_place_op_after_the_target_layer(untraceable):
    """A is the conv's output, not the ReLU'd tensor that the in-place op leaves behind."""
    model = seeded(_InplaceAfterTarget, untraceable=untraceable).double()
    twin = copy.deepcopy(model)
    twin.act.inplace = False  # the same function without the in-place write: the reference
    x = _images("gap_linear")
    classes = torch.tensor([[0, 3]] * x.shape[0])
    r = explain(model, x, target_layer="conv2", classes=classes)
    ref = _check_reference(twin, x, r)
    assert bool((ref["acts"] < 0).any()), "the test needs negative activations to tell A from ReLU(A)"


# -- score functions and model outputs -----------------------------------------------------------


class _DictOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = FlattenMLPNet(num_classes=10, size=(16, 20))

    def forward(self, x):
        return {"logits": self.net(x), "aux": x.mean()}


class _TupleOutput(_DictOutput):
    def forward(self, x):
        return self.net(x), x.mean()


@pytest.mark.parametrize(
    ("wrapper", "score_fn"),
    [(_DictOutput, lambda out: out["logits"]), (_TupleOutput, lambda out: out[0])],
    ids=["dict", "tuple"],
)
def test_score_fn_for_structured_outputs(wrapper, score_fn):
    model = seeded(wrapper).double()
    x = _images("flatten_mlp")
    with pytest.raises(TypeError, match="score_fn"):
        explain(model, x)
    r = explain(model, x, score_fn=score_fn, top_k=3)
    plain = explain(model.net, x, top_k=3)
    assert r.target_layer == "net." + plain.target_layer
    assert torch.equal(r.classes, plain.classes)
    assert_close_rel(r.cams, plain.cams, 1e-12, "cams")
    ref = reference_gradcam(model, x, r.target_layer, r.classes, score_fn=score_fn)
    assert_close_rel(r.cams, ref["cams"], 1e-9, "cams")


class _Segmenter(nn.Module):
    """Outputs (B, N, H, W) per-pixel logits: not (B, N) scores."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.out(self.body(x))


def test_output_that_is_not_scores_needs_a_score_fn():
    model = seeded(_Segmenter).double()
    x = _images("gap_linear")
    with pytest.raises(TypeError, match="score_fn"):
        explain(model, x)
    with pytest.raises(TypeError, match="score_fn"):
        explain(model, x, target_layer="body.3")
    mask = torch.zeros(x.shape[-2:], dtype=x.dtype)
    mask[4:10, 5:12] = 1

    def region_score(out):  # a segmentation target: the class logits summed over a region
        return (out * mask).sum(dim=(2, 3))

    r = explain(model, x, score_fn=region_score, target_layer="body.3", classes=torch.tensor([0, 3]))
    ref = reference_gradcam(model, x, "body.3", r.classes, score_fn=region_score)
    assert_close_rel(r.cams, ref["cams"], 1e-9, "cams")
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        explain(model, x, score_fn=lambda out: out.sum(dim=(1, 2, 3)), target_layer="body.3")


@pytest.mark.parametrize("images", [torch.zeros(3, 16, 20), torch.zeros(0, 3, 16, 20), "not a tensor"])
def test_bad_images(images):
    with pytest.raises(ValueError, match="images"):
        explain(_model("gap_linear", torch.float32), images)


# -- output options --------------------------------------------------------------------------------


@pytest.mark.parametrize(("output_size", "expected"), [(7, (7, 7)), ((5, 9), (5, 9)), ((33, 21), (33, 21))])
def test_output_size(output_size, expected):
    model, x = _model("flatten_mlp"), _images("flatten_mlp")
    r = explain(model, x, top_k=2, output_size=output_size)
    assert r.heatmaps.shape == (x.shape[0], 2, *expected)
    # float32 heatmaps (the default out_dtype) from a float64 model.
    assert r.heatmaps.dtype == torch.float32
    assert_close_rel(r.heatmaps, reference_heatmaps(r.cams, expected), 1e-6, "heatmaps")
    # The peak is at the maximum of the map at that size.
    flat = r.heatmaps.flatten(2)
    at_peak = flat.gather(2, (r.peaks[..., 0] * expected[1] + r.peaks[..., 1]).unsqueeze(-1)).squeeze(-1)
    assert torch.equal(at_peak, flat.amax(dim=2))


def test_default_heatmaps_are_normalized_at_input_size():
    model, x = _model("flatten_mlp"), _images("flatten_mlp")
    r = explain(model, x, top_k=3)
    assert r.heatmaps.shape[-2:] == x.shape[-2:]
    flat = r.heatmaps.flatten(2)
    live = r.cam_max > 0
    assert bool(live.any())
    assert torch.allclose(flat.amax(dim=2)[live], torch.ones(()))
    assert torch.allclose(flat.amin(dim=2)[live], torch.zeros(()))


def test_normalize_false_returns_upsampled_raw_maps():
    model, x = _model("flatten_mlp"), _images("flatten_mlp")
    r = explain(model, x, top_k=3, normalize=False)
    up = F.interpolate(r.cams, size=x.shape[-2:], mode="bilinear", align_corners=False)
    assert_close_rel(r.heatmaps, up, 1e-6, "heatmaps")
    assert float(r.heatmaps.max()) > 1.0 or float(r.heatmaps.max()) < 0.99  # really not normalized
    assert float(r.heatmaps.min()) >= 0.0  # ReLU'd maps stay non-negative after bilinear upsampling
    assert bool((r.heatmaps.flatten(2).amax(dim=2) <= r.cam_max * (1 + 1e-6)).all())


def test_uint8_heatmaps_are_rounded_255x():
    model, x = _model("flatten_mlp", torch.float32), _images("flatten_mlp", dtype=torch.float32)
    e = Explainer(model)
    f = e(x, top_k=3).heatmaps
    q = e(x, top_k=3, out_dtype=torch.uint8).heatmaps
    assert q.dtype == torch.uint8 and q.shape == f.shape
    assert torch.equal(q, torch.floor(f * 255 + 0.5).to(torch.uint8))
    assert int(q.max()) == 255 and int(q.min()) == 0


def test_constant_maps_become_zeros_not_nan():
    model, x = _model("gap_linear"), _images("gap_linear")
    # A 1x1 target map upsamples to a map that is constant up to rounding noise.
    r = explain(model, x, target_layer="pool", top_k=3)
    assert r.cams.shape[-2:] == (1, 1)
    assert bool((r.cam_max > 0).any())
    assert not bool(r.heatmaps.isnan().any())
    assert torch.equal(r.heatmaps, torch.zeros_like(r.heatmaps))
    # A class whose weights are all negative on non-negative (post-ReLU) maps: the cam is zero.
    with torch.no_grad():
        model.fc.weight[0] = -model.fc.weight[0].abs() - 0.1
    r = explain(model, x, classes=torch.tensor([0]))
    assert torch.equal(r.cams, torch.zeros_like(r.cams))
    assert torch.equal(r.heatmaps, torch.zeros_like(r.heatmaps))


# -- train mode and the caller's model -------------------------------------------------------------


@ALL_MODELS
def test_train_mode_is_explained_in_eval_semantics(name):
    model, x = _model(name), _images(name)
    classes = torch.tensor([[0, 1]] * x.shape[0])
    expected = explain(model.eval(), x, classes=classes)
    model.train()
    got = [explain(model, x, classes=classes) for _ in range(2)]
    for r in got:
        for field in ("scores", "weights", "cams", "heatmaps"):
            assert torch.equal(getattr(r, field), getattr(expected, field)), field
    assert all(m.training for m in model.modules())
    # Really different from train semantics (BatchNorm batch statistics, dropout).
    with torch.no_grad():
        train_logits = model(x).gather(1, classes)
    assert not torch.allclose(train_logits, expected.scores)


def _tamper(model: nn.Module) -> list:
    """Put the model in an unusual state: mixed train/eval, frozen parameters, user hooks."""
    model.train()
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    first.eval()
    for i, p in enumerate(model.parameters()):
        if i % 3 == 0:
            p.requires_grad_(False)
    calls = []
    handles = [
        model.register_forward_hook(lambda m, a, o: calls.append("model")),
        first.register_forward_hook(lambda m, a, o: calls.append("first")),
        first.register_forward_pre_hook(lambda m, a: None),
    ]
    return handles


@pytest.mark.parametrize(
    ("name", "method"),
    [("gap_linear", "gradcam"), ("gap_linear", "cam"), ("flatten_mlp", "gradcam"), ("untraceable", "gradcam")],
)
def test_caller_model_is_untouched(name, method):
    model = _model(name, torch.float32)
    handles = _tamper(model)
    before = model_state(model)
    x = _images(name, dtype=torch.float32)
    e = Explainer(model, method=method)
    e(x, top_k=3)
    e(x, classes=torch.tensor([1, 2]), counterfactual=True)
    explain(model, x, top_k=2, method=method)
    assert_state_equal(before, model_state(model))
    for h in handles:
        h.remove()


@ALL_MODELS
def test_caller_model_is_untouched_after_errors(name):
    model = _model(name, torch.float32)
    handles = _tamper(model)
    before = model_state(model)
    x = _images(name, dtype=torch.float32)
    e = Explainer(model)
    with pytest.raises(ValueError):
        e(x, classes=torch.tensor([999]))
    with pytest.raises(TargetLayerError):
        explain(model, x, target_layer=next(n for n, m in model.named_modules() if isinstance(m, nn.Linear)))
    with pytest.raises(TypeError):
        explain(model, x, score_fn=lambda out: (_ for _ in ()).throw(TypeError("boom")))
    assert_state_equal(before, model_state(model))
    for h in handles:
        h.remove()
    # And the explainer still works after the failed call.
    assert e(x).cams.shape[0] == x.shape[0]


@ALL_MODELS
def test_frozen_model(name):
    """All parameters frozen, as for a model loaded for inference: A still gets its gradient."""
    model, x = _model(name), _images(name)
    model.requires_grad_(False)
    r = explain(model, x, top_k=2)
    _check_reference(model, x, r)
    assert not any(p.requires_grad for p in model.parameters())


def test_batchnorm_statistics_untouched_in_train_mode():
    model = _model("untraceable", torch.float32).train()
    bn = model.features[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    explain(model, _images("untraceable", dtype=torch.float32), top_k=2)
    assert torch.equal(bn.running_mean, stats[0])
    assert torch.equal(bn.running_var, stats[1])
    assert torch.equal(bn.num_batches_tracked, stats[2])
    assert model.training and bn.training


def test_parameter_gradients_stay_none_but_existing_grads_are_kept():
    model = _model("flatten_mlp", torch.float32)
    x = _images("flatten_mlp", dtype=torch.float32)
    explain(model, x, top_k=2)
    assert all(p.grad is None for p in model.parameters())
    model(x).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    explain(model, x, top_k=2)
    for k, p in model.named_parameters():
        assert torch.equal(p.grad, grads[k]), k


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
@ALL_MODELS
def test_explain_under_a_callers_no_grad_or_inference_mode(name, context):
    model, x = _model(name), _images(name)
    expected = explain(model, x, top_k=2)
    with context():
        images = x.clone()  # an inference tensor under inference_mode
        first = explain(model, images, top_k=2)  # set-up (layer auto-detection) inside the context
        e = Explainer(model)
    second = e(x, top_k=2)
    with context():
        third = e(images, top_k=2)
    for r in (first, second, third):
        assert r.target_layer == expected.target_layer
        assert_close_rel(r.cams, expected.cams, 1e-12, "cams")
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
