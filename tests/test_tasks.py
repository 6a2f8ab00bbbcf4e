"""Multi-label and segmentation tasks (engine/explain/tasks.py): maps against float64 full-backward references
and pytorch-grad-cam, class selection, the task's figures and the errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from engine_reference import reference_gradcam
from task_support import save_tiny_segformer

from gradcam_batch.engine.explain import explain
from gradcam_batch.engine.explain.tasks import (
    SegmentationScore,
    TaskError,
    TaskExplainer,
    check_task_options,
    check_true_mask,
    compact,
    deferred_interpolate,
    detect_task,
    first_max,
    positive_labels,
    select_multilabel,
)
from gradcam_batch.engine.metrics import mask_metrics


class TinySegNet(nn.Module):
    """A conv encoder-decoder whose logits come at half the input's resolution (as SegFormer's at a quarter)."""

    def __init__(self, n_classes: int = 5):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU()
        )
        self.decoder = nn.Sequential(nn.Conv2d(12, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, n_classes, 1))

    def forward(self, x):
        return self.decoder(self.backbone(x))


class DictSegNet(TinySegNet):
    """torchvision's output convention: {"out": logits at the input's size}."""

    def forward(self, x):
        out = self.decoder(self.backbone(x))
        return {"out": F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)}


def reference_seg_score(size):
    """The segmentation score, written the obvious way: one-hot of the argmax, times the logits, summed."""

    def score(output):
        logits = output["out"] if isinstance(output, dict) else output
        up = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        onehot = F.one_hot(up.detach().argmax(1), up.shape[1]).permute(0, 3, 1, 2).to(up.dtype)
        return (up * onehot).sum(dim=(2, 3))

    return score


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


# -- segmentation: maps ------------------------------------------------------------------------------------


def test_segmentation_maps_equal_one_full_backward_per_class_float64():
    model = TinySegNet(5).double()
    images = torch.randn(3, 3, 20, 24, dtype=torch.float64)
    classes = torch.tensor([0, 1, 2, 3, 4])
    exp = TaskExplainer(model, "segmentation", target_layer="backbone")(images, classes=classes)
    e = exp.explanation
    ref = reference_gradcam(model, images, "backbone", classes.expand(3, -1), score_fn=reference_seg_score((20, 24)))
    assert e.classes.tolist() == classes.expand(3, -1).tolist()
    torch.testing.assert_close(e.scores, ref["scores"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(e.weights, ref["alpha"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(e.cams, ref["cams"], atol=1e-6, rtol=1e-6)
    # area and probability from the upsampled logits
    up = F.interpolate(model(images), size=(20, 24), mode="bilinear", align_corners=False)
    mask = up.argmax(1)
    area = torch.stack([(mask == c).double().mean(dim=(1, 2)) for c in range(5)], dim=1)
    soft = up.softmax(1)
    prob = torch.stack(
        [((soft[:, c] * (mask == c)).sum((1, 2)) / (mask == c).sum((1, 2)).clamp_min(1)) for c in range(5)], 1
    )
    torch.testing.assert_close(exp.area.double(), area, atol=1e-6, rtol=0)
    torch.testing.assert_close(exp.explanation.probabilities.double(), prob, atol=1e-6, rtol=1e-6)
    assert torch.equal(exp.pred_mask, mask)
    assert exp.keep.all()


def test_segmentation_score_is_pytorch_grad_cams_target_sum():
    """Our score (gather + scatter_add) equals the recipe's sum of the class's logits over its predicted mask."""
    logits = torch.randn(2, 4, 6, 7, dtype=torch.float64)
    scores, aux = SegmentationScore((6, 7))(logits)
    mask = logits.argmax(1)
    for b in range(2):
        for c in range(4):
            assert float(scores[b, c]) == pytest.approx(float((logits[b, c] * (mask[b] == c)).sum()), abs=1e-12)
            assert int(aux["count"][b, c]) == int((mask[b] == c).sum())


def test_first_max_is_argmax_with_ties_to_the_lower_class():
    x = torch.randint(0, 3, (2, 7, 50)).float()  # many ties
    assert torch.equal(first_max(x, x.amax(1, keepdim=True)), x.argmax(1))


def test_top_k_takes_the_largest_regions_and_never_an_empty_one():
    model = TinySegNet(6)
    images = torch.randn(2, 3, 16, 16)
    exp = TaskExplainer(model, "segmentation", target_layer="backbone")(images, top_k=6)
    mask = exp.pred_mask
    for b in range(2):
        counts = torch.bincount(mask[b].flatten(), minlength=6)
        kept = exp.explanation.classes[b][exp.keep[b]].tolist()
        expected = [c for c in torch.argsort(-counts, stable=True).tolist() if counts[c] > 0]
        assert kept == expected
        assert (counts == 0).any() or len(kept) == 6


def test_an_asked_class_with_an_empty_region_has_zero_score_map_and_a_note():
    model = TinySegNet(4)
    with torch.no_grad():  # class 3 never wins: its bias is far below the others
        model.decoder[2].bias[3] = -1e3
    images = torch.randn(2, 3, 12, 12)
    exp = TaskExplainer(model, "segmentation", target_layer="backbone")(images, classes=[0, 3])
    e = exp.explanation
    assert exp.empty[:, 1].all() and exp.keep.all()
    assert (e.scores[:, 1] == 0).all() and (e.cams[:, 1] == 0).all() and (e.heatmaps[:, 1] == 0).all()
    assert (e.cam_max[:, 1] == 0).all() and (exp.area[:, 1] == 0).all() and (e.probabilities[:, 1] == 0).all()
    assert all("class 3 has no predicted pixel" in n[1] for n in exp.notes)
    assert all(n[0] is None for n in exp.notes)
    # top-k never picks it
    top = TaskExplainer(model, "segmentation", target_layer="backbone")(images, top_k=4)
    assert 3 not in top.explanation.classes[top.keep].tolist()


def test_segmentation_with_true_masks_selects_their_classes_and_scores_energy_and_iou():
    model = TinySegNet(4)
    images = torch.randn(2, 3, 12, 12)
    truth = torch.zeros(2, 12, 12, dtype=torch.long)
    truth[0, :6] = 2
    truth[1, :, :4] = 3
    truth[1, 0, 0] = 255  # ignored
    exp = TaskExplainer(model, "segmentation", target_layer="backbone")(images, true_masks=truth, ignore_index=255)
    kept = [exp.explanation.classes[b][exp.keep[b]].tolist() for b in range(2)]
    assert kept == [[0, 2], [0, 3]]
    assert exp.positive[exp.keep].all()
    # NaN energy only for an all-zero map (a random model's ReLU can leave nothing)
    lit = exp.explanation.cam_max > 0
    assert lit.any() and torch.equal(torch.isfinite(exp.mask_energy), lit)
    assert ((exp.mask_iou[exp.keep] >= 0) & (exp.mask_iou[exp.keep] <= 1)).all()


def test_mask_metrics_by_hand():
    sal = torch.zeros(1, 3, 4, 4)
    sal[0, 0, :2, :2] = 1.0  # all its mass on class 1's pixels; thresholded region = the 2x2 block
    sal[0, 1, :, :] = 0.1
    sal[0, 1, 0, 0] = 1.0  # only (0, 0) is >= 15% of the max ... with 0.1 < 0.15
    truth = torch.zeros(1, 4, 4, dtype=torch.long)
    truth[0, :2, :] = 1  # class 1: the top two rows (8 pixels)
    m = mask_metrics(sal, truth, torch.tensor([[1, 1, 2]]))
    assert m["mask_energy"][0, 0] == pytest.approx(1.0)
    assert m["mask_iou"][0, 0] == pytest.approx(4 / 8)
    assert m["mask_energy"][0, 1] == pytest.approx((1.0 + 7 * 0.1) / (1.0 + 15 * 0.1))
    assert m["mask_iou"][0, 1] == pytest.approx(1 / 8)
    assert torch.isnan(m["mask_energy"][0, 2]) and torch.isnan(m["mask_iou"][0, 2])  # class 2 not in the mask
    assert m["in_true_mask"].tolist() == [[True, True, False]]


# -- segmentation: errors ----------------------------------------------------------------------------------


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def test_segmentation_on_a_classifier_is_one_clear_error():
    with pytest.raises(TaskError, match=r"needs a model that returns \(B, C, H, W\) logits.*returns \(1, 3\)"):
        TaskExplainer(Classifier(), "segmentation")(torch.randn(2, 3, 8, 8))
    with pytest.raises(TaskError, match=r"returns \(2, 3\)"):
        TaskExplainer(Classifier(), "segmentation", target_layer="features")(torch.randn(2, 3, 8, 8))


def test_bad_true_masks_are_one_clear_error():
    model, images = TinySegNet(4), torch.randn(2, 3, 12, 12)
    explainer = TaskExplainer(model, "segmentation", target_layer="backbone")
    with pytest.raises(TaskError, match=r"the true mask is 10x12 \(WxH\) and the input 12x12"):
        explainer(images, true_masks=torch.zeros(2, 12, 10, dtype=torch.long))
    bad = torch.zeros(2, 12, 12, dtype=torch.long)
    bad[1, 3, 3] = 7
    with pytest.raises(TaskError, match=r"class index 7; the model has 4 classes"):
        explainer(images, true_masks=bad)
    bad[1, 3, 3] = -1
    with pytest.raises(TaskError, match=r"class indices \[-1\]"):
        explainer(images, true_masks=bad)
    assert check_true_mask(np.full((12, 12), 4), (12, 12), 4) is not None
    assert check_true_mask(np.full((12, 12), 255), (12, 12), 4, ignore_index=255) is None
    assert "integer class indices" in check_true_mask(np.zeros((12, 12), np.float32), (12, 12), 4)


def test_threshold_needs_the_multilabel_task():
    with pytest.raises(TaskError, match="threshold needs the multilabel task"):
        check_task_options("softmax", threshold=0.5)
    with pytest.raises(TaskError, match="threshold needs the multilabel task"):
        TaskExplainer(Classifier(), "softmax")(torch.randn(1, 3, 8, 8), threshold=0.5)
    with pytest.raises(TaskError, match="max_classes caps"):
        check_task_options("multilabel", max_classes=2)
    with pytest.raises(TaskError, match="unknown task"):
        check_task_options("detection")


# -- multi-label -------------------------------------------------------------------------------------------


class MultiLabelNet(nn.Module):
    """A conv trunk and a head that is not GAP -> linear (so both paths are exercised elsewhere)."""

    def __init__(self, n: int = 6, gap_linear: bool = False):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.gap_linear = gap_linear
        self.fc = nn.Linear(8, n)

    def forward(self, x):
        a = self.features(x)
        pooled = a.mean((2, 3)) if self.gap_linear else a.amax((2, 3))
        return self.fc(pooled)


@pytest.mark.parametrize("gap_linear", [False, True])
def test_multilabel_maps_equal_explain_with_the_sigmoid_score(gap_linear):
    model = MultiLabelNet(6, gap_linear)
    images = torch.randn(3, 3, 10, 10)
    exp = TaskExplainer(model, "multilabel", target_layer="features")(images, threshold=0.0, max_classes=6)
    e = exp.explanation
    assert exp.keep.all() and e.classes.shape == (3, 6)
    assert e.closed_form is gap_linear
    sig = explain(model, images, target_layer="features", classes=e.classes, score_fn=torch.sigmoid)
    torch.testing.assert_close(e.heatmaps, sig.heatmaps, atol=1e-4, rtol=0)
    logit = explain(model, images, target_layer="features", classes=e.classes)
    torch.testing.assert_close(e.cams, logit.cams)
    torch.testing.assert_close(e.probabilities, torch.sigmoid(e.scores))
    torch.testing.assert_close(e.scores, model(images).gather(1, e.classes), atol=1e-5, rtol=1e-5)


def test_threshold_selects_the_classes_at_or_above_it_capped_highest_first():
    scores = torch.tensor([[2.0, -1.0, 0.5, 0.0, -3.0], [-1.0, -2.0, -2.5, -3.0, -2.2]])
    classes, keep, _ = select_multilabel(scores, threshold=0.5)
    assert [classes[b][keep[b]].tolist() for b in range(2)] == [[0, 2, 3], []]
    classes, keep, _ = select_multilabel(scores, threshold=0.5, max_classes=2)
    assert [classes[b][keep[b]].tolist() for b in range(2)] == [[0, 2], []]
    classes, keep, _ = select_multilabel(scores, threshold=0.5, max_classes=2, top_k=1, classes=[4])
    assert [classes[b][keep[b]].tolist() for b in range(2)] == [[0, 4, 2], [0, 4]]


def test_a_multi_hot_row_explains_exactly_its_positives_once():
    model = MultiLabelNet(5)
    images = torch.randn(2, 3, 10, 10)
    rows = [[0, 1, 0, 1, 1], [0, 0, 1, 0, 0]]
    positives = [positive_labels(r, 5)[0] for r in rows]
    assert positives == [[1, 3, 4], [2]]
    exp = TaskExplainer(model, "multilabel", target_layer="features")(images, positives=positives)
    kept = [exp.explanation.classes[b][exp.keep[b]].tolist() for b in range(2)]
    assert kept == [[1, 3, 4], [2]]
    assert torch.equal(exp.positive, exp.keep)
    # with the top-1 too: a positive that is also the top class is explained once
    top = int(model(images)[0].argmax())
    exp = TaskExplainer(model, "multilabel", target_layer="features")(images, top_k=1, positives=[[top], [2]])
    kept0 = exp.explanation.classes[0][exp.keep[0]].tolist()
    assert kept0 == [top] and exp.positive[0][exp.keep[0]].tolist() == [True]


def test_positive_labels_forms_and_errors():
    assert positive_labels(3, 5) == ([3], None)
    assert positive_labels([4, 1, 4], 5) == ([1, 4], None)
    assert positive_labels(np.array([1.0, 0.0, 1.0]), 3) == ([0, 2], None)
    assert positive_labels([True, False, True], 3) == ([0, 2], None)
    assert positive_labels([0, 1, 0], 3, "indices") == ([0, 1], None)
    assert positive_labels(None, 3) == (None, "null label")
    assert "not a class of the model" in positive_labels([7], 5)[1]
    assert "not integers" in positive_labels([0.5], 5)[1]
    assert "multi-hot label needs 5" in positive_labels([1, 0], 5, "multihot")[1]


def test_detect_task_reads_the_transformers_config():
    class Cfg:
        problem_type = "multi_label_classification"
        architectures = ["ViTForImageClassification"]

    m = Classifier()
    assert detect_task(m) == "softmax"
    m.config = Cfg()
    assert detect_task(m) == "multilabel"
    Cfg.problem_type, Cfg.architectures = None, ["SegformerForSemanticSegmentation"]
    assert detect_task(m) == "segmentation"


def test_compact_packs_dedupes_and_pads():
    cand = torch.tensor([[3, 1, 3, 2], [0, 0, 0, 0]])
    ok = torch.tensor([[True, False, True, True], [False, False, False, False]])
    classes, keep = compact(cand, ok)
    assert classes.tolist() == [[3, 2], [0, 0]] and keep.tolist() == [[True, True], [False, False]]


# -- segmentation: torchvision and Transformers models ------------------------------------------------------


def varied(model: nn.Module, size: int = 48) -> nn.Module:
    """A randomly initialized torchvision segmentation model whose prediction is not one class everywhere:
    BatchNorm statistics from one batch of noise, and a last classifier conv with unit-variance weights."""
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, size, size))
    convs = [m for m in model.classifier.modules() if isinstance(m, nn.Conv2d)]
    nn.init.normal_(convs[-1].weight, std=1.0)
    return model.eval()


def tv_model(name: str, n_classes: int = 6) -> nn.Module:
    import torchvision.models.segmentation as seg

    return varied(getattr(seg, name)(weights=None, weights_backbone=None, num_classes=n_classes))


def tiny_segformer(tmp_path) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    save_tiny_segformer(tmp_path / "segformer")
    return transformers.AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "segformer").eval()


def test_lraspp_top3_equals_one_full_backward_per_class_float64():
    model = tv_model("lraspp_mobilenet_v3_large").double()
    images = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    exp = TaskExplainer(model, "segmentation")(images, top_k=3)
    e = exp.explanation
    assert e.target_layer == "backbone.16.2"  # the backbone's last feature map (the "high" features)
    assert exp.keep.all() and (exp.area > 0).all()
    ref = reference_gradcam(
        model, images, e.target_layer, e.classes, score_fn=reference_seg_score((48, 48)), method="gradcam"
    )
    torch.testing.assert_close(e.scores, ref["scores"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(e.cams, ref["cams"], atol=1e-6, rtol=1e-6)
    assert float(e.cams.abs().max()) > 0


class _EndsInUpsample(nn.Module):
    """A conv net at a quarter of the input, upsampled by its own last step (as torchvision's heads end).
    ``scale``: upsample by that factor (not recomputed) instead of to a size."""

    def __init__(self, mode: str = "bilinear", factor: int = 4, scale: float | None = None):
        super().__init__()
        self.mode, self.factor, self.scale = mode, factor, scale
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1))
        self.classifier = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 5, 1))

    def forward(self, x):
        out = self.classifier(self.backbone(x))
        h, w = x.shape[-2:]
        size = (h * self.factor // 4, w * self.factor // 4)
        align = False if self.mode == "bilinear" else None
        if self.scale is not None:
            return {"out": F.interpolate(out, scale_factor=self.scale, mode=self.mode, align_corners=align)}
        return {"out": F.interpolate(out, size=size, mode=self.mode, align_corners=align)}


@pytest.mark.parametrize(
    ("mode", "factor", "adjoint"),
    # To half the input: the model's own upsample is done in the score, then the score's own (to the input's size,
    # as for SegFormer's quarter-size logits) goes through the adjoint. Nearest to the input's size: no adjoint.
    [("bilinear", 4, True), ("bilinear", 2, True), ("nearest", 4, False)],
)
def test_a_heads_final_upsample_is_taken_over_and_the_maps_are_unchanged(mode, factor, adjoint, monkeypatch):
    """The head's last F.interpolate is deferred to the score (SegmentationScore.adopt_head): to the input's size and
    bilinear, the score is taken on the small logits against the upsample's adjoint; otherwise the score does the
    model's own upsample. Either way the maps are the full backward's, in float64."""
    import gradcam_batch.engine.explain.tasks as tasks

    calls = []
    real = tasks._upsample_adjoint
    monkeypatch.setattr(tasks, "_upsample_adjoint", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    model = _EndsInUpsample(mode, factor).double().eval()
    images = torch.randn(2, 3, 24, 28, dtype=torch.float64)
    explainer = TaskExplainer(model, "segmentation", target_layer="backbone")
    exp = explainer(images, top_k=3)
    assert explainer.segmentation_score.deferred  # the head's interpolate was rewritten
    head = explainer.explainer._split.head
    assert any(n.target is deferred_interpolate for n in head.graph.nodes)
    e = exp.explanation
    ref = reference_gradcam(model, images, "backbone", e.classes, score_fn=reference_seg_score((24, 28)))
    torch.testing.assert_close(e.scores, ref["scores"], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(e.cams, ref["cams"], atol=1e-9, rtol=1e-9)
    up = F.interpolate(model(images)["out"], size=(24, 28), mode="bilinear", align_corners=False)
    assert torch.equal(exp.pred_mask, up.argmax(1))
    assert bool(calls) == adjoint  # the adjoint path for bilinear upsamples to the input's size only


def test_a_final_upsample_by_a_scale_factor_is_done_as_the_model_does_it():
    """F.interpolate(scale_factor=3.8) samples at 1 / 3.8, not at the sizes' ratio (8 -> 30): even where the output
    has the input's size, the score does the model's own upsample, and the maps are the full backward's."""
    torch.manual_seed(0)
    model = _EndsInUpsample(scale=3.8).double().eval()
    images = torch.randn(2, 3, 30, 30, dtype=torch.float64)  # a quarter: 8 x 8; floor(8 * 3.8) = 30
    exp = TaskExplainer(model, "segmentation", target_layer="backbone")(images, top_k=3)
    assert torch.equal(exp.pred_mask, model(images)["out"].argmax(1))
    e = exp.explanation
    ref = reference_gradcam(model, images, "backbone", e.classes, score_fn=reference_seg_score((30, 30)))
    torch.testing.assert_close(e.scores, ref["scores"], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(e.cams, ref["cams"], atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"])
def test_maps_agree_with_pytorch_grad_cams_segmentation_target(name):
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    model = tv_model(name)
    images = torch.randn(2, 3, 64, 64)
    exp = TaskExplainer(model, "segmentation")(images, top_k=3)
    e = exp.explanation

    class Out(nn.Module):  # the tutorial's wrapper: the "out" logits
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x)["out"]

    layer = model.get_submodule(e.target_layer)
    checked = 0
    with pgc.GradCAM(model=Out(model), target_layers=[layer]) as cam:
        for b in range(2):
            for j in range(e.classes.shape[1]):
                if not exp.keep[b, j] or float(e.cam_max[b, j]) == 0:
                    continue
                c = int(e.classes[b, j])
                target = SemanticSegmentationTarget(c, (exp.pred_mask[b] == c).float().numpy())
                theirs = torch.from_numpy(cam(input_tensor=images[b : b + 1], targets=[target])[0])
                assert pearson(e.heatmaps[b, j], theirs) >= 0.999, (b, c)
                checked += 1
    assert checked >= 2


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "layer"),
    [
        ("lraspp_mobilenet_v3_large", "backbone.16.2"),
        ("deeplabv3_mobilenet_v3_large", "backbone.16.2"),
        ("fcn_resnet50", "backbone.layer4.2"),
    ],
)
def test_default_layer_of_torchvision_segmentation_models(name, layer):
    import torchvision.models.segmentation as seg

    model = getattr(seg, name)(weights=None, weights_backbone=None).eval()
    exp = TaskExplainer(model, "segmentation")(torch.randn(1, 3, 64, 64), top_k=1)
    assert exp.explanation.target_layer == layer
    assert exp.keep.all() and exp.explanation.cams.shape[0] == 1


def test_segformer_logits_at_a_quarter_are_upsampled_and_its_last_stage_is_the_layer(tmp_path):
    model = tiny_segformer(tmp_path)
    assert detect_task(model) == "segmentation"
    images = torch.randn(2, 3, 64, 64)
    with pytest.warns(RuntimeWarning, match="graph split failed"):  # Transformers models do not trace: hook path
        exp = TaskExplainer(model, "segmentation")(images, top_k=2)
    e = exp.explanation
    assert e.target_layer == "segformer.stages.3"
    up = F.interpolate(model(images).logits, size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.equal(exp.pred_mask, up.argmax(1))
    torch.testing.assert_close(e.scores, reference_seg_score((64, 64))(up).gather(1, e.classes), rtol=1e-5, atol=1e-4)
    assert e.heatmaps.shape == (2, e.classes.shape[1], 64, 64)


@pytest.mark.parametrize("strategy", ["batched_grad", "loop", "vmap"])
def test_every_vjp_strategy_and_the_hook_path_give_the_same_segmentation_maps(strategy, monkeypatch):
    model = TinySegNet(5).double()
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    base = TaskExplainer(model, "segmentation", target_layer="backbone")(images, top_k=3)
    other = TaskExplainer(model, "segmentation", target_layer="backbone", vjp_strategy=strategy)
    got = other(images, top_k=3)
    assert torch.equal(got.explanation.classes, base.explanation.classes)
    torch.testing.assert_close(got.explanation.cams, base.explanation.cams, atol=1e-10, rtol=1e-10)
    from gradcam_batch.engine.explain import explainer as explainer_module

    def no_split(*args, **kwargs):
        raise explainer_module.SplitError("forced")

    monkeypatch.setattr(explainer_module, "split_at", no_split)
    with pytest.warns(RuntimeWarning, match="forced"):
        hooked = TaskExplainer(model, "segmentation", target_layer="backbone")(images, top_k=3)
    torch.testing.assert_close(hooked.explanation.cams, base.explanation.cams, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(hooked.area, base.area)
