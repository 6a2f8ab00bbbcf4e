"""Metrics (issue 12): float64 references, hand-checkable goldens, batching and chunking, torchcam parity."""

from __future__ import annotations

import math
from contextlib import contextmanager

import metrics_reference as ref
import numpy as np
import pytest
import torch
from torch import nn

from gradcam_batch import metrics
from gradcam_batch.engine.metrics.faithfulness import step_counts


def assert_close(actual: torch.Tensor, expected, atol: float, what: str = "") -> None:
    """allclose that says where the values differ."""
    actual = actual.detach().double().cpu()
    expected = torch.as_tensor(np.asarray(expected), dtype=torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    both_nan = actual.isnan() & expected.isnan()
    err = torch.where(both_nan, 0.0, (actual - expected).abs()).nan_to_num(float("inf"))
    if err.max() > atol:
        idx = tuple(int(i) for i in np.unravel_index(int(err.argmax()), tuple(err.shape)))
        raise AssertionError(
            f"{what}: {int((err > atol).sum())} of {err.numel()} differ; worst at {idx}: "
            f"{float(actual[idx]):.8g} vs {float(expected[idx]):.8g} (err {float(err[idx]):.3g} > {atol})"
        )


def tiny_net(n_out: int = 5) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, n_out)
    ).eval()


def case(b=2, c=3, h=9, w=7, n_out=5):
    images = torch.randn(b, 3, h, w)
    saliency = torch.rand(b, c, h, w)
    classes = torch.randint(0, n_out, (b, c))
    return images, saliency, classes


class CountingModel(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.images = 0

    def forward(self, x):
        self.images += x.shape[0]
        return self.net(x)


# Ranking ----------------------------------------------------------------------------------------------


def test_rank_all_equal_is_flat_order():
    assert torch.equal(metrics.rank_pixels(torch.full((2, 3, 4, 5), 0.3)), torch.arange(20).expand(2, 3, 20))


def test_rank_ties_to_lower_flat_index():
    sal = torch.tensor([[0.5, 1.0, 0.5], [1.0, 0.0, 0.5]])
    assert metrics.rank_pixels(sal).tolist() == [1, 3, 0, 2, 5, 4]
    assert metrics.rank_pixels(sal).tolist() == ref.ranking(sal.numpy())


def test_rank_random_matches_reference():
    sal = (torch.rand(37, 11) * 4).round() / 4  # many ties
    assert metrics.rank_pixels(sal).tolist() == ref.ranking(sal.numpy())


def test_step_counts_follow_rise():
    assert step_counts(16, 4) == [0, 4, 8, 12, 16]
    assert step_counts(63, 5) == [0, 13, 26, 39, 52, 63]
    assert step_counts(12, 5) == [0, 3, 6, 9, 12, 12]  # tiny maps repeat the full point
    assert step_counts(112 * 112, 20)[-2:] == [19 * 628, 12544]


@pytest.mark.parametrize(("size", "sigma"), [(11, 5.0), (5, 1.0), (7, 20.0), (1, 3.0), (4, 0.7)])
def test_blur_kernel_is_rise_gkern(size, sigma):
    k = metrics.rise_blur_kernel(size, sigma)
    assert_close(torch.outer(k, k), ref.rise_kernel(size, sigma), 1e-15, "gkern")


# Deletion and insertion -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("b", "c", "h", "w", "steps", "blur"),
    [
        (2, 3, 9, 7, 5, (11, 5.0)),
        (1, 1, 13, 13, 20, (11, 5.0)),
        (3, 2, 5, 5, 20, (3, 1.0)),  # 25 pixels, step 2: points 13..20 all fully perturbed
        (2, 2, 6, 8, 1, (11, 5.0)),
        (2, 2, 8, 8, 8, None),
    ],
)
def test_deletion_insertion_matches_float64_reference(b, c, h, w, steps, blur):
    net = tiny_net()
    images, saliency, classes = case(b, c, h, w)
    d_curve, i_curve = metrics.deletion_insertion_curves(net, images, saliency, classes, steps=steps, blur=blur)
    rd, ri = ref.curves(net, images, saliency, classes, steps=steps, blur_args=blur)
    assert_close(d_curve, rd, 2e-6, "deletion curve")
    assert_close(i_curve, ri, 2e-6, "insertion curve")
    d_auc, i_auc = metrics.deletion_insertion(net, images, saliency, classes, steps=steps, blur=blur)
    assert d_auc.dtype == i_auc.dtype == torch.float32 and d_auc.shape == (b, c)
    assert_close(d_auc, ref.auc(rd), 2e-6, "deletion auc")
    assert_close(i_auc, ref.auc(ri), 2e-6, "insertion auc")


class RegionMean(nn.Module):
    """logits = (a * mean over the region rows 0-1 of the channel mean, 0)."""

    def __init__(self, a: float):
        super().__init__()
        self.a = a

    def forward(self, x):
        region = x[:, :, :2, :].mean(dim=(1, 2, 3))
        return torch.stack([self.a * region, torch.zeros_like(region)], dim=1)


def test_deletion_insertion_analytic_region_model():
    # 4x4 ones, the map ranks the region (rows 0-1, flat 0..7) first; 4 steps of 4 pixels.
    # Region mean after deleting 0, 4, 8, 12, 16 pixels: 1, 1/2, 0, 0, 0; with a = 2 ln 3 the class-0
    # probability sigmoid(a * mean) is 0.9, 0.75, 0.5, 0.5, 0.5. AUC = (3.15 - 0.45 - 0.25) / 4 = 0.6125.
    # Insertion from zeros (blur=None) runs the other way: 0.5, 0.75, 0.9, 0.9, 0.9 -> (3.95 - 0.7) / 4.
    model = RegionMean(2 * math.log(3))
    images = torch.ones(1, 3, 4, 4)
    saliency = torch.zeros(1, 1, 4, 4)
    saliency[0, 0, :2] = 1.0
    classes = torch.zeros(1, 1, dtype=torch.long)
    d_curve, i_curve = metrics.deletion_insertion_curves(model, images, saliency, classes, steps=4, blur=None)
    assert_close(d_curve[0, 0], [0.9, 0.75, 0.5, 0.5, 0.5], 1e-6, "deletion curve")
    assert_close(i_curve[0, 0], [0.5, 0.75, 0.9, 0.9, 0.9], 1e-6, "insertion curve")
    d_auc, i_auc = metrics.deletion_insertion(model, images, saliency, classes, steps=4, blur=None)
    assert_close(d_auc, [[0.6125]], 1e-6, "deletion auc")
    assert_close(i_auc, [[0.8125]], 1e-6, "insertion auc")


def test_deletion_single_pixel_peak():
    # The peak pixel goes first: with one step per pixel, point 1 deletes exactly it.
    model = RegionMean(1.0)
    images = torch.ones(1, 3, 4, 4)
    saliency = torch.zeros(1, 1, 4, 4)
    saliency[0, 0, 1, 2] = 1.0  # flat 6, inside the region (8 pixels)
    d_curve, _ = metrics.deletion_insertion_curves(
        model, images, saliency, torch.zeros(1, 1, dtype=torch.long), steps=16, blur=None
    )
    sig = lambda v: 1 / (1 + math.exp(-v))
    # Then flat order 0, 1, ... skipping 6: after 2 pixels both in the region, mean 6/8.
    assert_close(d_curve[0, 0, :3], [sig(1.0), sig(7 / 8), sig(6 / 8)], 1e-6, "single peak")


@pytest.mark.parametrize("blur", [(11, 5.0), None])
def test_batched_equals_one_image_at_a_time(blur):
    net = tiny_net()
    images, saliency, classes = case(4, 3, 10, 6)
    d, i = metrics.deletion_insertion(net, images, saliency, classes, steps=7, blur=blur)
    for k in range(4):
        dk, ik = metrics.deletion_insertion(
            net, images[k : k + 1], saliency[k : k + 1], classes[k : k + 1], steps=7, blur=blur
        )
        assert_close(d[k : k + 1], dk, 1e-6, f"deletion, image {k}")
        assert_close(i[k : k + 1], ik, 1e-6, f"insertion, image {k}")
    for c in range(3):  # and one class at a time
        dc, ic = metrics.deletion_insertion(
            net, images, saliency[:, c : c + 1], classes[:, c : c + 1], steps=7, blur=blur
        )
        assert_close(d[:, c : c + 1], dc, 1e-6, f"deletion, class {c}")
        assert_close(i[:, c : c + 1], ic, 1e-6, f"insertion, class {c}")


@pytest.mark.parametrize("batch_size", [1, 3, 7, 64, 10_000])
def test_chunked_equals_unchunked(batch_size):
    net = tiny_net()
    images, saliency, classes = case(3, 2, 8, 9)
    d, i = metrics.deletion_insertion(net, images, saliency, classes, steps=6)
    dc, ic = metrics.deletion_insertion(net, images, saliency, classes, steps=6, batch_size=batch_size)
    assert_close(dc, d, 1e-6, "deletion")
    assert_close(ic, i, 1e-6, "insertion")
    drop, inc = metrics.confidence_change(net, images, saliency, classes)
    drop_c, inc_c = metrics.confidence_change(net, images, saliency, classes, batch_size=batch_size)
    assert_close(drop_c, drop, 1e-6, "drop")
    assert torch.equal(inc_c, inc)


def test_shared_points_forwarded_once():
    b, c, steps = 3, 4, 5
    model = CountingModel(tiny_net())
    images, saliency, classes = case(b, c, 9, 7)
    metrics.deletion_insertion(model, images, saliency, classes, steps=steps, batch_size=5)
    interior = steps - 1  # 63 pixels: no interior point reaches the full count
    assert model.images == 2 * b + 1 + b * c * 2 * interior


def test_forwards_run_under_inference_mode():
    seen = []

    def model(x):
        seen.append(torch.is_inference_mode_enabled())
        return tiny_net()(x)

    images, saliency, classes = case(1, 1, 5, 5)
    metrics.deletion_insertion(model, images, saliency, classes, steps=2)
    metrics.confidence_change(model, images, saliency, classes)
    assert seen and all(seen)


def test_score_fn_and_logits_attribute():
    net = tiny_net()
    images, saliency, classes = case(2, 2, 6, 6)
    expected = metrics.deletion_insertion(net, images, saliency, classes, steps=3)

    class Out:
        def __init__(self, logits):
            self.logits = logits

    via_attr = metrics.deletion_insertion(lambda x: Out(net(x)), images, saliency, classes, steps=3)
    via_fn = metrics.deletion_insertion(
        lambda x: {"y": net(x)}, images, saliency, classes, steps=3, score_fn=lambda o: o["y"]
    )
    for got in (via_attr, via_fn):
        assert_close(got[0], expected[0], 0, "deletion")
        assert_close(got[1], expected[1], 0, "insertion")
    with pytest.raises(TypeError, match="score_fn"):
        metrics.deletion_insertion(lambda x: {"y": net(x)}, images, saliency, classes, steps=3)


def test_shape_errors():
    net = tiny_net()
    images, saliency, classes = case(2, 2, 6, 6)
    with pytest.raises(ValueError, match="saliency"):
        metrics.deletion_insertion(net, images, saliency[..., :5], classes)
    with pytest.raises(ValueError, match="classes"):
        metrics.confidence_change(net, images, saliency, classes[:, :1])


# Confidence -------------------------------------------------------------------------------------------


def test_confidence_change_matches_float64_reference():
    net = tiny_net()
    images, saliency, classes = case(3, 4, 7, 11)
    drop, increase = metrics.confidence_change(net, images, saliency, classes)
    r_drop, r_inc = ref.confidence(net, images, saliency, classes)
    assert drop.dtype == torch.float32 and increase.dtype == torch.bool
    assert_close(drop, r_drop, 2e-6, "drop")
    assert increase.tolist() == r_inc.tolist()
    assert r_inc.any() and not r_inc.all()  # both branches exercised


def test_confidence_golden():
    # An all-ones map leaves the image unchanged: drop 0, no increase. An all-zero map gives the
    # all-zero image; RegionMean's logits are then (0, 0), O = 0.5, and Y = sigmoid(a) for class 0.
    model = RegionMean(2 * math.log(3))
    images = torch.ones(1, 3, 4, 4)
    saliency = torch.stack([torch.ones(4, 4), torch.zeros(4, 4)]).unsqueeze(0)
    classes = torch.tensor([[0, 0]])
    drop, inc = metrics.confidence_change(model, images, saliency, classes)
    assert_close(drop, [[0.0, (0.9 - 0.5) / 0.9]], 1e-6, "drop")
    assert inc.tolist() == [[False, False]]
    drop, inc = metrics.confidence_change(model, images, saliency, torch.tensor([[1, 1]]))
    assert_close(drop, [[0.0, 0.0]], 1e-6, "class 1 drop")  # 0.1 -> 0.5
    assert inc.tolist() == [[False, True]]


# torchcam parity --------------------------------------------------------------------------------------


class FixedMaps:
    """A torchcam CAM extractor that returns maps given in advance, so torchcam scores our maps."""

    def __init__(self, model):
        self.model = model
        self.maps = None

    def __call__(self, class_idx=None, scores=None, normalized=True, **kwargs):
        return [self.maps]

    def fuse_cams(self, cams):
        return cams[0]

    @contextmanager
    def _hooks_off(self):
        yield


def test_torchcam_classification_metric_parity():
    torchcam_metrics = pytest.importorskip("torchcam.metrics")
    net = tiny_net()
    images, saliency, classes = case(3, 3, 8, 8)
    drop, increase = metrics.confidence_change(net, images, saliency, classes)
    y = torch.softmax(net(images), dim=1).gather(1, classes).detach()
    extractor = FixedMaps(net)
    metric = torchcam_metrics.ClassificationMetric(extractor, lambda out: torch.softmax(out, dim=-1))
    tc_drop = torch.zeros(3, 3, dtype=torch.float64)
    tc_inc = torch.zeros(3, 3, dtype=torch.bool)
    for b in range(3):
        for c in range(3):
            extractor.maps = saliency[b, c][None]
            metric.reset()
            metric.update(images[b : b + 1], class_idx=[int(classes[b, c])])
            tc_drop[b, c], tc_inc[b, c] = metric.drop, bool(metric.increase)
    assert torch.equal(tc_inc, increase)
    # torchcam divides by Y + 1e-7, we by Y: ours is larger by the factor (Y + 1e-7) / Y.
    assert_close(drop.double() * y / (y + 1e-7), tc_drop, 1e-6, "drop, torchcam's denominator")
    gap = (drop.double() - tc_drop).abs()
    assert float(gap.max()) <= float((drop.double() * 1e-7 / y).max()) + 1e-6


def _torchcam_deletion_insertion(net, images, saliency, classes, steps):
    torchcam_metrics = pytest.importorskip("torchcam.metrics")
    if not hasattr(torchcam_metrics, "DeletionInsertionMetric"):
        pytest.skip("torchcam before 0.5 has no DeletionInsertionMetric")
    extractor = FixedMaps(net)
    metric = torchcam_metrics.DeletionInsertionMetric(extractor, lambda out: torch.softmax(out, dim=-1), steps=steps)
    b, c = classes.shape
    out = torch.zeros(2, b, c, dtype=torch.float64)
    for i in range(b):
        for k in range(c):
            extractor.maps = saliency[i, k][None]
            metric.reset()
            metric.update(images[i : i + 1], class_idx=[int(classes[i, k])])
            out[0, i, k], out[1, i, k] = metric.deletion, metric.insertion
    return out


def test_torchcam_deletion_insertion_parity():
    # torchcam's baseline is zeros for both curves (ours: blur=None for insertion), its ranking is ours, and it
    # integrates against the perturbed fractions. Where steps divides HW the fractions are i / steps and the
    # AUCs agree.
    net = tiny_net()
    images, saliency, classes = case(2, 2, 8, 8)
    d, i = metrics.deletion_insertion(net, images, saliency, classes, steps=8, blur=None)
    tc = _torchcam_deletion_insertion(net, images, saliency, classes, steps=8)
    assert_close(d, tc[0], 2e-6, "deletion")
    assert_close(i, tc[1], 2e-6, "insertion")


def test_torchcam_deletion_insertion_difference_when_steps_do_not_divide():
    # 63 pixels, 5 steps of 13: the last step perturbs 11 pixels. torchcam integrates over fractions
    # (0, 13, 26, 39, 52, 63) / 63; RISE and we over i / 5. Same curve, different x axis.
    net = tiny_net()
    images, saliency, classes = case(2, 2, 9, 7)
    d_curve, i_curve = metrics.deletion_insertion_curves(net, images, saliency, classes, steps=5, blur=None)
    d, _ = metrics.deletion_insertion(net, images, saliency, classes, steps=5, blur=None)
    tc = _torchcam_deletion_insertion(net, images, saliency, classes, steps=5)
    fractions = torch.tensor(step_counts(63, 5), dtype=torch.float64) / 63
    assert_close(torch.trapezoid(d_curve.double(), fractions, dim=-1), tc[0], 2e-6, "torchcam's x axis")
    assert_close(torch.trapezoid(i_curve.double(), fractions, dim=-1), tc[1], 2e-6, "torchcam's x axis")
    gap = (d.double() - tc[0]).abs().max()
    assert 0 < gap < 0.05  # how far apart the two conventions put the deletion AUC here


# Boxes ------------------------------------------------------------------------------------------------


def test_whole_image_box_has_energy_one():
    sal = torch.rand(2, 3, 9, 7)
    out = metrics.box_metrics(sal, [torch.tensor([[0.0, 0.0, 7.0, 9.0]])] * 2)
    assert_close(out["box_energy"], torch.ones(2, 3), 1e-6, "energy")
    assert out["pointing_hit"].all() and out["has_boxes"].all()


def test_single_pixel_peak():
    sal = torch.zeros(1, 1, 20, 20)
    sal[0, 0, 5, 5] = 1.0  # centre (5.5, 5.5)
    box = torch.tensor([[10.0, 0.0, 12.0, 20.0]])  # 4.5 px to the right of the centre
    assert metrics.box_metrics(sal, [box], tolerance=4.5)["pointing_hit"].item()
    assert not metrics.box_metrics(sal, [box], tolerance=4.4)["pointing_hit"].item()
    corner = torch.tensor([[8.5, 9.5, 12.0, 12.0]])  # nearest corner (8.5, 9.5): distance 5
    assert metrics.box_metrics(sal, [corner], tolerance=5)["pointing_hit"].item()
    assert not metrics.box_metrics(sal, [corner], tolerance=4.99)["pointing_hit"].item()
    out = metrics.box_metrics(sal, [torch.tensor([[5.0, 5.0, 6.0, 6.0]])])
    assert out["pred_box"].tolist() == [[[5, 5, 6, 6]]]
    assert_close(out["box_iou"], [[1.0]], 0, "iou")
    assert_close(out["box_energy"], [[1.0]], 0, "energy")
    # A box whose edge passes just short of the pixel centre does not hold its mass.
    assert_close(metrics.box_metrics(sal, [torch.tensor([[0.0, 0.0, 5.5, 20.0]])])["box_energy"], [[0.0]], 0, "edge")


def test_pointing_tie_goes_to_first_pixel():
    sal = torch.zeros(1, 1, 10, 10)
    sal[0, 0, 0, 9] = sal[0, 0, 9, 0] = 1.0  # flat 9 ranks before flat 90
    right = torch.tensor([[8.0, 0.0, 10.0, 1.0]])
    left = torch.tensor([[0.0, 9.0, 1.0, 10.0]])
    assert metrics.box_metrics(sal, [right], tolerance=0)["pointing_hit"].item()
    assert not metrics.box_metrics(sal, [left], tolerance=0)["pointing_hit"].item()


def test_pred_box_two_blobs_and_iou_golden():
    sal = torch.zeros(1, 1, 12, 16)
    sal[0, 0, 1:3, 1:3] = 1.0  # 4 pixels, the peak region
    sal[0, 0, 5:10, 8:12] = 0.5  # 20 pixels, above 15% of the max
    sal[0, 0, 7, 13] = 0.5  # a component of its own: column 13 is two columns from 11
    sal[0, 0, 10, 12] = 0.2  # diagonal neighbour of (9, 11): joins the big blob by 8-connectivity
    sal[0, 0, 0, 15] = 0.1  # below 15%: not foreground
    gt = torch.tensor([[8.0, 5.0, 12.0, 10.0]])  # the big blob without the diagonal pixel: 20 of 25
    out = metrics.box_metrics(sal, [gt])
    assert out["pred_box"].tolist() == [[[8, 5, 13, 11]]]  # x1, y1 exclusive
    assert_close(out["box_iou"], [[20 / 30]], 1e-6, "iou")
    assert out["pred_box"].dtype == torch.int32


def test_pred_box_equal_components_take_the_first():
    sal = torch.zeros(1, 1, 6, 6)
    sal[0, 0, 4, 0:2] = 1.0
    sal[0, 0, 0, 4:6] = 1.0  # same size, first in raster order
    for backend in ("scipy", "torch"):
        assert metrics.largest_component_boxes(sal, backend=backend).tolist() == [[[4, 0, 6, 1]]]


def test_all_zero_map_and_missing_boxes():
    sal = torch.zeros(2, 2, 5, 5)
    sal[1] = torch.rand(2, 5, 5)
    out = metrics.box_metrics(sal, [torch.tensor([[0.0, 0.0, 2.0, 2.0]]), None])
    assert out["pred_box"][0].tolist() == [[-1, -1, -1, -1]] * 2
    assert out["box_energy"][0].isnan().all() and out["box_iou"][0].tolist() == [0.0, 0.0]
    assert out["has_boxes"].tolist() == [[True, True], [False, False]]
    assert not out["pointing_hit"][1].any() and out["box_energy"][1].isnan().all() and out["box_iou"][1].isnan().all()
    none = metrics.box_metrics(sal, [None, None])
    assert not none["has_boxes"].any() and none["box_iou"].isnan().all()


def test_categories_select_boxes_per_class():
    sal = torch.zeros(1, 2, 10, 10)
    sal[0, 0, 1, 1] = 1.0
    sal[0, 1, 8, 8] = 1.0
    gt = [torch.tensor([[0.0, 0.0, 3.0, 3.0], [7.0, 7.0, 10.0, 10.0]])]
    cats = [torch.tensor([4, 2])]
    out = metrics.box_metrics(sal, gt, tolerance=0, categories=cats, classes=torch.tensor([[4, 2]]))
    assert out["pointing_hit"].tolist() == [[True, True]]
    out = metrics.box_metrics(sal, gt, tolerance=0, categories=cats, classes=torch.tensor([[2, 7]]))
    assert out["pointing_hit"].tolist() == [[False, False]] and out["has_boxes"].tolist() == [[True, False]]


@pytest.mark.parametrize("with_categories", [False, True])
def test_box_metrics_match_reference(with_categories):
    b, c, h, w = 4, 3, 13, 17
    sal = torch.nn.functional.avg_pool2d(torch.rand(b * c, 1, h, w) ** 4, 3, 1, 1).view(b, c, h, w)
    sal[0, 1] = 0.0
    gt = [
        torch.tensor([[1.0, 2.0, 6.5, 9.0], [10.2, 0.0, 17.0, 4.7]]),
        None,
        torch.tensor([[0.0, 0.0, 17.0, 13.0]]),
        torch.tensor([[3.3, 3.3, 4.1, 4.9], [12.0, 8.0, 15.0, 12.0], [-5.0, -5.0, 2.0, 2.0]]),
    ]
    kwargs = {}
    if with_categories:
        kwargs = {
            "categories": [torch.tensor([0, 1]), None, torch.tensor([2]), torch.tensor([1, 1, 0])],
            "classes": torch.tensor([[0, 1, 2], [0, 1, 2], [2, 0, 1], [0, 1, 2]]),
        }
    out = metrics.box_metrics(sal, gt, tolerance=3, **kwargs)
    expected = ref.boxes(sal, gt, tolerance=3, **kwargs)
    for key in ("pointing_hit", "has_boxes"):
        assert out[key].tolist() == expected[key].tolist(), key
    assert out["pred_box"].tolist() == expected["pred_box"].tolist()
    assert_close(out["box_energy"], expected["box_energy"], 1e-6, "energy")
    assert_close(out["box_iou"], expected["box_iou"], 1e-6, "iou")


def test_torch_labelling_equals_scipy():
    maps = torch.rand(4, 6, 31, 29) ** 4  # noisy maps: many components at every threshold
    maps[0, 0] = 0.0
    for threshold in (0.15, 0.4, 0.7):
        expected = [[list(ref.largest_component_box(m.double().numpy(), threshold)) for m in row] for row in maps]
        assert len({tuple(box) for row in expected for box in row}) > 12  # the boxes differ between maps
        for backend in ("scipy", "torch"):
            got = metrics.largest_component_boxes(maps, threshold, backend=backend)
            assert got.tolist() == expected, (backend, threshold)


def test_alias_module_exports():
    import gradcam_batch.engine.metrics as engine_metrics

    for name in ("rank_pixels", "deletion_insertion", "confidence_change", "box_metrics"):
        assert getattr(metrics, name) is getattr(engine_metrics, name)
