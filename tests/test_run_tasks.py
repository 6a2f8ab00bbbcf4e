"""`gradcam-batch run --task multilabel|segmentation` end to end: the job's rows against the engine
(``TaskExplainer``, the metrics) on the same preprocessed images, the task's columns, its error rows, the
invocations it refuses, and the audit of a multi-label run."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from run_support import png_bytes, read_output, write_table
from task_support import (
    by_image,
    draw_shapes,
    invoke,
    normalized,
    save_tiny_multilabel_resnet,
    save_tiny_segformer,
    task_models,
    train_shapes,
    varied,
)

from gradcam_batch.engine.explain.tasks import TaskExplainer
from gradcam_batch.engine.metrics import confidence_change
from gradcam_batch.engine.models.loader import load_model


def _run_args(inp, out, model: str, size: int = 32, batch: int = 4) -> list:
    return [
        "run",
        inp,
        "-o",
        out,
        "--model",
        model,
        "--resize",
        size,
        "--crop",
        size,
        "--batch-size",
        batch,
        "--no-progress",
    ]


def _manifest(out) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _maps(table: pa.Table, name: str) -> np.ndarray:
    return table[name].combine_chunks().to_numpy_ndarray()


def _image_table(images: np.ndarray, **columns) -> pa.Table:
    return pa.table({"image": pa.array([png_bytes(im) for im in images], pa.binary()), **columns})


# -- multi-label ------------------------------------------------------------------------------------------

ML_LABELS = [[1, 3], [], [0], [2, 4, 0], [4], [1], [0, 1, 2, 3, 4], [3], [2], [0, 2]]


def test_multilabel_threshold_and_list_labels_equal_the_engine(tmp_path):
    n = len(ML_LABELS)
    images, _, _ = draw_shapes(n, seed=3)
    inp = write_table(
        tmp_path / "in" / "ml.parquet", _image_table(images, labels=pa.array(ML_LABELS, pa.list_(pa.int64())))
    )
    out = tmp_path / "out"
    spec = f"{task_models(tmp_path)}:multilabel"
    args = [*_run_args(inp, out, spec), "--task", "multilabel", "--threshold", "0.5", "--label-column", "labels"]
    res = invoke(args)
    assert res.exit_code == 0, res.output
    t = read_output(out)
    names = t.column_names
    assert "entropy" not in names and "positive" in names and t.schema.field("positive").type == pa.bool_()
    assert set(t["status"].to_pylist()) == {"ok"} and t["error"].null_count == t.num_rows
    man = _manifest(out)
    assert man["config"]["task_resolved"] == "multilabel"

    model = load_model(spec)
    x = normalized(images)
    with torch.no_grad():
        logits = model(x)
    prob = torch.sigmoid(logits)
    rows = by_image(t)
    assert list(rows) == [f"ml.parquet:{i}" for i in range(n)]
    beyond_labels = below_threshold = 0
    for i, (key, rs) in enumerate(rows.items()):
        explained = [r["class_index"] for r in rs]
        by_threshold = {int(c) for c in torch.nonzero(prob[i] >= 0.5).flatten()}
        assert len(explained) == len(set(explained)), key  # each class once
        assert set(explained) == by_threshold | set(ML_LABELS[i]), key
        assert [r["class_rank"] for r in rs] == list(range(len(rs)))
        assert [r["positive"] for r in rs] == [c in ML_LABELS[i] for c in explained], key
        assert [r["label"] for r in rs] == [ML_LABELS[i]] * len(rs)
        got_scores = np.array([r["score"] for r in rs])
        np.testing.assert_allclose(got_scores, logits[i, explained].numpy(), rtol=1e-5, atol=1e-5)
        got_prob = np.array([r["probability"] for r in rs])
        np.testing.assert_allclose(got_prob, 1 / (1 + np.exp(-got_scores.astype(np.float64))), atol=1e-6)
        beyond_labels += len(by_threshold - set(ML_LABELS[i]))
        below_threshold += len(set(ML_LABELS[i]) - by_threshold)
    # The union is not trivial: the threshold adds classes the labels lack, and the labels classes below it.
    assert beyond_labels > 0 and below_threshold > 0

    texp = TaskExplainer(model, "multilabel", target_layer=man["config"]["target_layer_resolved"])(
        x, threshold=0.5, positives=ML_LABELS, output_size=32, out_dtype=torch.uint8
    )
    e = texp.explanation
    cams, heat = _maps(t, "cam"), _maps(t, "heatmap")
    cls, pos = t["class_index"].to_numpy(), t["positive"].to_numpy(zero_copy_only=False)
    row = 0
    for i in range(n):
        want = {int(c): j for j, c in enumerate(e.classes[i].tolist()) if texp.keep[i, j]}
        got = {int(c): row + k for k, c in enumerate(cls[row : row + len(want)])}
        assert set(got) == set(want), i
        for c, j in want.items():
            r = got[c]
            np.testing.assert_allclose(cams[r].astype(np.float32), e.cams[i, j].numpy(), rtol=2e-3, atol=1e-7)
            assert np.abs(heat[r].astype(int) - e.heatmaps[i, j].numpy().astype(int)).max() <= 1, (i, c)
            assert bool(texp.positive[i, j]) == bool(pos[r])
        row += len(want)
    assert row == t.num_rows
    assert np.abs(cams).max() > 0 and heat.max() >= 200  # real maps, not blank ones


def test_multi_hot_labels_alone_explain_their_positives_and_bad_labels_are_error_rows(tmp_path):
    labels = [[0, 1, 0, 1, 1], [0, 0, 0, 0, 0], [7], [1, 0, 0, 0, 0], [0, 0, 1, 0, 0]]
    images, _, _ = draw_shapes(len(labels), seed=4)
    inp = write_table(
        tmp_path / "in" / "hot.parquet", _image_table(images, labels=pa.array(labels, pa.list_(pa.int64())))
    )
    spec = f"{task_models(tmp_path)}:multilabel"
    out = tmp_path / "out"
    res = invoke([*_run_args(inp, out, spec), "--task", "multilabel", "--label-column", "labels"])
    assert res.exit_code == 0, res.output
    t = read_output(out)
    rows = by_image(t)
    expected = {0: [1, 3, 4], 3: [0], 4: [2]}
    for i, classes in expected.items():
        rs = rows[f"hot.parquet:{i}"]
        assert sorted(r["class_index"] for r in rs) == classes
        assert all(r["positive"] and r["status"] == "ok" and r["error"] is None for r in rs)
    (r1,) = rows["hot.parquet:1"]
    assert r1["status"] == "error" and r1["class_index"] is None
    assert r1["error"].startswith("nothing to explain:") and "no positive class" in r1["error"]
    (r2,) = rows["hot.parquet:2"]
    assert r2["status"] == "error" and r2["class_index"] is None and r2["positive"] is None
    assert "label 7 is not a class of the model (0..4)" in r2["error"] and "\n" not in r2["error"]
    assert _manifest(out)["totals"]["errors"] == 2

    # --label-format multihot: [7] is not a multi-hot label of 5 classes.
    res = invoke(
        [*_run_args(inp, tmp_path / "out2", spec), "--task", "multilabel", "--label-column", "labels"]
        + ["--label-format", "multihot"]
    )
    assert res.exit_code == 0, res.output
    (r2,) = by_image(read_output(tmp_path / "out2"))["hot.parquet:2"]
    assert r2["status"] == "error" and "multi-hot label needs 5 values" in r2["error"]

    # With --top-k 1 the bad label leaves the top class: a note on an ok row; the all-zero row is its top-1.
    model = load_model(spec)
    with torch.no_grad():
        top = model(normalized(images)).argmax(1).tolist()
    res = invoke(
        [*_run_args(inp, tmp_path / "out3", spec), "--task", "multilabel", "--label-column", "labels"]
        + ["--top-k", "1"]
    )
    assert res.exit_code == 0, res.output
    rows = by_image(read_output(tmp_path / "out3"))
    (r2,) = rows["hot.parquet:2"]
    assert r2["status"] == "ok" and r2["class_index"] == top[2] and r2["positive"] is False
    assert "label 7 is not a class of the model" in r2["error"]
    (r1,) = rows["hot.parquet:1"]
    assert r1["status"] == "ok" and r1["class_index"] == top[1] and r1["positive"] is False and r1["error"] is None
    rs = rows["hot.parquet:0"]
    assert rs[0]["class_index"] == top[0]
    assert sorted(r["class_index"] for r in rs) == sorted({top[0], 1, 3, 4})
    assert [r["positive"] for r in rs] == [r["class_index"] in (1, 3, 4) for r in rs]


def test_max_classes_caps_the_threshold_highest_probability_first(tmp_path):
    n = 6
    images, _, _ = draw_shapes(n, seed=5)
    labels = [[0], [1], [2], [3], [4], [0]]
    inp = write_table(
        tmp_path / "in" / "cap.parquet", _image_table(images, labels=pa.array(labels, pa.list_(pa.int32())))
    )
    spec = f"{task_models(tmp_path)}:multilabel"
    model = load_model(spec)
    with torch.no_grad():
        prob = torch.sigmoid(model(normalized(images)))
    order = torch.argsort(prob, dim=1, descending=True)

    out = tmp_path / "out"
    res = invoke([*_run_args(inp, out, spec), "--task", "multilabel", "--threshold", "0", "--max-classes", "2"])
    assert res.exit_code == 0, res.output
    t = read_output(out)
    assert "positive" not in t.column_names  # no label column
    for i, rs in enumerate(by_image(t).values()):
        assert [r["class_index"] for r in rs] == order[i, :2].tolist()
        np.testing.assert_allclose([r["probability"] for r in rs], prob[i, order[i, :2]].numpy(), atol=1e-6)

    # The cap applies to the threshold's classes; the labels come on top of them.
    out = tmp_path / "out2"
    res = invoke(
        [*_run_args(inp, out, spec), "--task", "multilabel", "--threshold", "0", "--max-classes", "1"]
        + ["--label-column", "labels"]
    )
    assert res.exit_code == 0, res.output
    for i, rs in enumerate(by_image(read_output(out)).values()):
        first = int(order[i, 0])
        assert sorted(r["class_index"] for r in rs) == sorted({first, labels[i][0]})
        assert rs[0]["class_index"] == first

    # A threshold above every probability with a cap: nothing selected, one error row per image.
    out = tmp_path / "out3"
    high = float(prob.max()) + 1e-3
    res = invoke(
        [*_run_args(inp, out, spec), "--task", "multilabel", "--threshold", f"{high:.6f}", "--max-classes", "3"]
    )
    assert res.exit_code == 0, res.output
    t = read_output(out)
    assert t.num_rows == n and set(t["status"].to_pylist()) == {"error"}
    assert all(
        e.startswith("nothing to explain: no class has a probability of at least") for e in t["error"].to_pylist()
    )


def test_multilabel_confidence_metrics_use_the_sigmoid(tmp_path):
    n = 6
    images, _, _ = draw_shapes(n, seed=6)
    inp = write_table(tmp_path / "in" / "conf.parquet", _image_table(images))
    spec = f"{task_models(tmp_path)}:multilabel"
    out = tmp_path / "out"
    res = invoke(
        [*_run_args(inp, out, spec), "--task", "multilabel", "--threshold", "0", "--max-classes", "2"]
        + ["--metrics", "confidence"]
    )
    assert res.exit_code == 0, res.output
    t = read_output(out)
    got = t["confidence_drop"].to_numpy().reshape(n, 2)
    model = load_model(spec)
    x = normalized(images)
    texp = TaskExplainer(model, "multilabel", target_layer=_manifest(out)["config"]["target_layer_resolved"])(
        x, threshold=0.0, max_classes=2, output_size=32, saliency=True
    )
    classes = texp.explanation.classes
    assert classes.tolist() == t["class_index"].to_numpy().reshape(n, 2).tolist()
    sal = texp.explanation.saliency
    sig, sig_up = confidence_change(model, x, sal, classes, activation="sigmoid")
    soft, _ = confidence_change(model, x, sal, classes, activation="softmax")
    np.testing.assert_allclose(got, sig.numpy(), rtol=1e-4, atol=1e-5)
    assert t["confidence_increase"].to_numpy(zero_copy_only=False).reshape(n, 2).tolist() == sig_up.tolist()
    assert np.abs(soft.numpy() - sig.numpy()).max() > 1e-3  # the softmax would have given other figures


def test_a_trained_multilabel_net_points_at_each_positive_shape(tmp_path):
    """A net trained here for a few seconds on squares, discs and bars (1 to 3 per image, any colour); the
    run's map of each positive label peaks on that label's shape (within 2 pixels) in most rows."""
    safetensors = pytest.importorskip("safetensors.torch")
    spec = f"{task_models(tmp_path)}:shapes"
    torch.manual_seed(0)
    trained = train_shapes(load_model(spec))
    weights = tmp_path / "shapes.safetensors"
    safetensors.save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(weights))

    n = 40
    images, labels, masks = draw_shapes(n, seed=1)
    inp = write_table(
        tmp_path / "in" / "shapes.parquet", _image_table(images, labels=pa.array(labels, pa.list_(pa.int64())))
    )
    out = tmp_path / "out"
    res = invoke(
        [*_run_args(inp, out, spec, batch=16), "--weights", weights, "--task", "multilabel"]
        + ["--threshold", "0.5", "--label-column", "labels"]
    )
    assert res.exit_code == 0, res.output
    t = read_output(out)
    assert set(t["status"].to_pylist()) == {"ok"}
    rows = by_image(t)
    hits = total = 0
    for i, rs in enumerate(rows.values()):
        assert sorted(r["class_index"] for r in rs if r["positive"]) == labels[i]  # the positives, each once
        for r in rs:
            if not r["positive"]:
                continue
            near = np.zeros((34, 34), bool)  # the shape grown by 2 pixels (padded by 1 for the slicing)
            ys, xs = np.nonzero(masks[i][r["class_index"]])
            for dy in range(-2, 3):
                for dx in range(-2, 3):
                    near[np.clip(ys + dy + 1, 0, 33), np.clip(xs + dx + 1, 0, 33)] = True
            total += 1
            hits += r["peak_y"] is not None and bool(near[r["peak_y"] + 1, r["peak_x"] + 1])
    assert total == sum(len(lab) for lab in labels)
    assert hits >= 0.7 * total, f"{hits} of {total} positive maps peak on their shape"


# -- segmentation -----------------------------------------------------------------------------------------


def _noise(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _check_top_regions(t: pa.Table, logits: torch.Tensor, k: int, size: int) -> None:
    """The run's top-k rows against the model's own logits on the same input: the K largest predicted
    regions, their area, score (sum of the logits over the region) and probability (mean softmax there).
    A pixel whose two best logits are within 1e-4 may go either way in the run's float32 forward: the
    tolerances allow for those."""
    up = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False).double()
    pred = up.argmax(1)
    soft = up.softmax(1)
    top2 = up.topk(2, dim=1).values
    ambiguous = ((top2[:, 0] - top2[:, 1]) < 1e-4).flatten(1).sum(1)
    rows = by_image(t)
    assert len(rows) == logits.shape[0]
    several = 0
    for i, rs in enumerate(rows.values()):
        counts = torch.bincount(pred[i].flatten(), minlength=logits.shape[1])
        order = [c for c in torch.argsort(-counts, stable=True).tolist() if counts[c] > 0][:k]
        assert [r["class_index"] for r in rs] == order, i  # largest first, never an empty region
        assert [r["class_rank"] for r in rs] == list(range(len(order)))
        several += len(order) > 1
        amb = int(ambiguous[i])
        for r in rs:
            c = r["class_index"]
            region = pred[i] == c
            n_px = int(region.sum())
            assert r["status"] == "ok" and r["error"] is None and r["area"] > 0
            assert r["area"] == pytest.approx(n_px / size**2, abs=1e-6 + amb / size**2)
            score_tol = 1e-3 + amb * float(up[i].abs().max())
            assert r["score"] == pytest.approx(float(up[i, c][region].sum()), rel=1e-4, abs=score_tol)
            assert r["probability"] == pytest.approx(float(soft[i, c][region].mean()), abs=1e-5 + 2 * amb / n_px)
    assert several > 0  # the check saw images with more than one predicted region


def _torchvision_segmentation(tmp_path, name: str, size: int):
    spec = f"torchvision:{name}"
    model = varied(load_model(spec, num_classes=4), size)
    weights = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), weights)
    n = 4
    images = _noise(n, size, seed=7)
    inp = write_table(tmp_path / "in" / "seg.parquet", _image_table(images))
    out = tmp_path / "out"
    res = invoke(
        [*_run_args(inp, out, spec, size=size, batch=n), "--num-classes", "4", "--weights", weights]
        + ["--task", "segmentation", "--top-k", "2"]
    )
    assert res.exit_code == 0, res.output
    t = read_output(out)
    assert _manifest(out)["config"]["task_resolved"] == "segmentation"
    names = t.column_names
    assert {"area", "probability"} <= set(names)
    assert not {"entropy", "positive", "mask_energy", "mask_iou"} & set(names)
    with torch.no_grad():
        logits = model(normalized(images))["out"]
    _check_top_regions(t, logits, 2, size)


@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"])
def test_torchvision_segmentation_top_regions_area_score_probability(tmp_path, name):
    _torchvision_segmentation(tmp_path, name, 48)


@pytest.mark.slow
def test_fcn_resnet50_segmentation_top_regions(tmp_path):
    _torchvision_segmentation(tmp_path, "fcn_resnet50", 64)


def _mask_png(mask: np.ndarray, mode: str = "L") -> bytes:
    if mode == "P":
        img = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.astype(np.uint8).tobytes())
        img.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    elif mode == "I;16":
        img = Image.fromarray(mask.astype(np.uint16))
    elif mode == "I":  # 32-bit integers: PNG has no such mode, TIFF has
        return png_bytes(Image.fromarray(mask.astype(np.int32)), fmt="TIFF")
    else:
        img = Image.fromarray(mask.astype(np.uint8))
    return png_bytes(img)


def _masks_32() -> list[np.ndarray]:
    """True masks of 32x32 images: the classes present differ per image; the third holds class 3, which
    ``seg_dead`` never predicts."""
    m = [np.zeros((32, 32), np.int64) for _ in range(4)]
    m[0][4:20, 4:20] = 1
    m[1][:, :16] = 2
    m[2][:] = 1
    m[2][8:24, 8:24] = 3
    m[3][:] = 2
    return m


def test_true_masks_pick_the_classes_and_score_against_the_engine(tmp_path):
    masks = _masks_32()
    images = _noise(6, 32, seed=8)
    cells = [_mask_png(mk) for mk in masks]
    cells.append(_mask_png(np.zeros((32, 30), np.int64)))  # 30 wide, its image 32
    bad = masks[0].copy()
    bad[0, 0] = 9
    cells.append(_mask_png(bad))  # a class the model does not have
    inp = write_table(tmp_path / "in" / "m.parquet", _image_table(images, mask=pa.array(cells, pa.binary())))
    spec = f"{task_models(tmp_path)}:seg_dead"
    out = tmp_path / "out"
    # Batches of 3: the bad masks (rows 4, 5) share a batch with a good one.
    res = invoke([*_run_args(inp, out, spec, batch=3), "--task", "segmentation", "--mask-column", "mask"])
    assert res.exit_code == 0, res.output
    t = read_output(out)
    assert {"area", "probability", "positive", "mask_energy", "mask_iou"} <= set(t.column_names)
    rows = by_image(t)
    (r4,) = rows["m.parquet:4"]
    assert r4["status"] == "error" and r4["error"].startswith("the mask is 30x32 and its image 32x32;")
    (r5,) = rows["m.parquet:5"]
    assert r5["status"] == "error"
    assert r5["error"].startswith("the mask holds class indices [9] that the model does not have (0..3)")

    model = load_model(spec)
    explainer = TaskExplainer(model, "segmentation", target_layer=_manifest(out)["config"]["target_layer_resolved"])
    engine: list[dict] = []  # per image, {class: its figures}, from the batches the run made (0-2, then 3)
    preds: list[torch.Tensor] = []  # per image, the predicted mask
    for lo, hi in ((0, 3), (3, 4)):
        texp = explainer(
            normalized(images[lo:hi]),
            true_masks=torch.from_numpy(np.stack(masks[lo:hi])),
            output_size=32,
            out_dtype=torch.uint8,
        )
        e = texp.explanation
        preds.extend(texp.pred_mask)
        for b in range(hi - lo):
            engine.append(
                {
                    int(e.classes[b, j]): {
                        "area": float(texp.area[b, j]),
                        "score": float(e.scores[b, j]),
                        "heatmap": e.heatmaps[b, j].numpy(),
                        "empty": bool(texp.empty[b, j]),
                        "mask_energy": float(texp.mask_energy[b, j]),
                        "mask_iou": float(texp.mask_iou[b, j]),
                    }
                    for j in range(e.classes.shape[1])
                    if texp.keep[b, j]
                }
            )
    ok = t.filter(pc.equal(t["status"], "ok"))
    heat = _maps(ok, "heatmap")
    ids = ok["id"].to_pylist()
    checked = 0
    for i in range(4):
        rs = rows[f"m.parquet:{i}"]
        present = sorted(int(v) for v in np.unique(masks[i]))
        assert sorted(r["class_index"] for r in rs) == present == sorted(engine[i]), i
        assert all(r["positive"] is True and r["status"] == "ok" for r in rs)
        first = ids.index(f"m.parquet:{i}")
        for k, r in enumerate(rs):
            want = engine[i][r["class_index"]]
            assert r["area"] == pytest.approx(want["area"], abs=1e-6)
            assert r["score"] == pytest.approx(want["score"], rel=1e-4, abs=1e-5)
            assert np.abs(heat[first + k].astype(int) - want["heatmap"].astype(int)).max() <= 1
            if want["empty"]:
                assert r["score"] == 0 and r["area"] == 0 and r["peak_y"] is None and r["peak_x"] is None
                assert r["mask_energy"] is None and r["mask_iou"] is None and heat[first + k].max() == 0
                assert r["error"] == "the class has no predicted pixel in this image: its score and map are zero"
                continue
            assert r["error"] is None
            if np.isnan(want["mask_energy"]):  # a map that is zero everywhere: no energy to share
                assert r["mask_energy"] is None or np.isnan(r["mask_energy"])
            else:
                assert r["mask_energy"] == pytest.approx(want["mask_energy"], abs=1e-5)
            assert r["mask_iou"] == pytest.approx(want["mask_iou"], abs=1e-5)
            checked += 1
    assert checked >= 4
    # seg_dead never predicts class 3: image 2's class 3 row is the empty one.
    (dead,) = [r for r in rows["m.parquet:2"] if r["class_index"] == 3]
    assert dead["error"] is not None and dead["status"] == "ok" and dead["positive"] is True

    # With --top-k 1 too: the largest predicted region joins the true classes; it is no positive when absent.
    out = tmp_path / "out2"
    res = invoke([*_run_args(inp, out, spec), "--task", "segmentation", "--mask-column", "mask", "--top-k", "1"])
    assert res.exit_code == 0, res.output
    rows = by_image(read_output(out))
    extra = 0
    for i in range(4):
        top = int(torch.bincount(preds[i].flatten(), minlength=4).argmax())  # the largest predicted region
        present = {int(v) for v in np.unique(masks[i])}
        rs = rows[f"m.parquet:{i}"]
        assert rs[0]["class_index"] == top
        assert sorted(r["class_index"] for r in rs) == sorted(present | {top})
        assert [r["positive"] for r in rs] == [r["class_index"] in present for r in rs]
        for r in rs:
            if r["class_index"] not in present:
                extra += 1
                assert r["mask_energy"] is None and r["mask_iou"] is None
    assert extra > 0  # some image's top region is a class its true mask lacks


def test_mask_paths_modes_resize_and_the_ignore_index(tmp_path):
    """Masks as paths relative to the Parquet file, in modes L, P, I;16 (PNG) and I (TIFF), at twice the input size (the
    run's resize samples them by nearest neighbour); 255 is accepted with --mask-ignore-index 255 only."""
    rng = np.random.default_rng(9)
    n = 4
    small = [rng.integers(0, 4, (8, 8)) for _ in range(n)]  # 8x8 blocks of 8x8 pixels at 64x64
    small[0][:2, :2] = 255
    small[1] = rng.choice([0, 2], (8, 8))  # a blend of 0 and 2 (not nearest sampling) would add class 1
    masks = [np.kron(s, np.ones((8, 8), np.int64)) for s in small]
    images = _noise(n, 64, seed=10)
    d = tmp_path / "in"
    (d / "masks").mkdir(parents=True)
    modes = ["L", "P", "I;16", "I"]
    for i, (mk, mode) in enumerate(zip(masks, modes, strict=True)):
        (d / "masks" / f"m{i}.png").write_bytes(_mask_png(mk, mode))
    table = _image_table(images, mask=pa.array([f"masks/m{i}.png" for i in range(n)], pa.string()))
    inp = write_table(d / "p.parquet", table)
    spec = f"{task_models(tmp_path)}:seg"
    base = ["--task", "segmentation", "--mask-column", "mask"]
    out = tmp_path / "out"
    res = invoke([*_run_args(inp, out, spec), *base, "--mask-ignore-index", "255"])
    assert res.exit_code == 0, res.output
    t = read_output(out)
    rows = by_image(t)
    for i in range(n):
        rs = rows[f"p.parquet:{i}"]
        assert all(r["status"] == "ok" for r in rs), rs
        present = sorted(int(v) for v in np.unique(masks[i][::2, ::2]) if v != 255)
        assert sorted(r["class_index"] for r in rs) == present, (i, modes[i])
        assert all(r["positive"] for r in rs)
    assert sorted(r["class_index"] for r in rows["p.parquet:1"]) == [0, 2]

    # The same masks as PNG bytes give the same rows.
    t_bytes = _image_table(images, mask=pa.array([_mask_png(mk) for mk in masks], pa.binary()))
    inp2 = write_table(tmp_path / "in2" / "p.parquet", t_bytes)
    res = invoke([*_run_args(inp2, tmp_path / "out2", spec), *base, "--mask-ignore-index", "255"])
    assert res.exit_code == 0, res.output
    t2 = read_output(tmp_path / "out2")
    for name in ("class_index", "area", "positive"):
        assert t2[name].to_pylist() == t[name].to_pylist(), name
    for name in ("score", "mask_energy", "mask_iou"):  # float sums: equal up to their order (threads)
        got, want = (np.array(x[name].to_pylist(), dtype=float) for x in (t2, t))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)

    # Without the ignore index, 255 is a class the model lacks: that image is an error row that says what helps.
    res = invoke([*_run_args(inp, tmp_path / "out3", spec), *base])
    assert res.exit_code == 0, res.output
    rows = by_image(read_output(tmp_path / "out3"))
    (r0,) = rows["p.parquet:0"]
    assert r0["status"] == "error" and "class indices [255]" in r0["error"] and "--mask-ignore-index" in r0["error"]
    assert all(r["status"] == "ok" for i in range(1, n) for r in rows[f"p.parquet:{i}"])


# -- Transformers and timm models -------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*graph split failed")
def test_segformer_auto_task_top2_equals_the_engine(tmp_path):
    pytest.importorskip("transformers")
    d = save_tiny_segformer(tmp_path / "segformer")
    n = 3
    images = _noise(n, 64, seed=11)
    inp = write_table(tmp_path / "in" / "sf.parquet", _image_table(images))
    out = tmp_path / "out"
    res = invoke([*_run_args(inp, out, f"hf:{d}", size=64), "--top-k", "2"])  # --task auto
    assert res.exit_code == 0, res.output
    man = _manifest(out)
    assert man["config"]["task"] == "auto" and man["config"]["task_resolved"] == "segmentation"
    t = read_output(out)
    assert set(t["status"].to_pylist()) == {"ok"} and "area" in t.column_names and "entropy" not in t.column_names

    model = load_model(f"hf:{d}")
    x = normalized(images)
    with pytest.warns(RuntimeWarning):  # Transformers models do not trace: the hook path
        texp = TaskExplainer(model, "segmentation", target_layer=man["config"]["target_layer_resolved"])(
            x, top_k=2, output_size=64, out_dtype=torch.uint8
        )
    e = texp.explanation
    want = [[int(c) for c, k in zip(e.classes[i], texp.keep[i], strict=True) if k] for i in range(n)]
    assert [[r["class_index"] for r in rs] for rs in by_image(t).values()] == want
    assert all(len(w) == 2 for w in want)  # two predicted regions in every image
    heat = _maps(t, "heatmap")
    assert heat.max() >= 200
    row = 0
    for i in range(n):
        for j in range(len(want[i])):
            assert np.abs(heat[row].astype(int) - e.heatmaps[i, j].numpy().astype(int)).max() <= 1, (i, j)
            assert t["area"][row].as_py() == pytest.approx(float(texp.area[i, j]), abs=1e-6)
            row += 1


@pytest.mark.filterwarnings("ignore:.*graph split failed")
def test_transformers_multilabel_config_resolves_the_task_and_timm_takes_task_multilabel(tmp_path):
    pytest.importorskip("transformers")
    d = save_tiny_multilabel_resnet(tmp_path / "resnet")
    images, _, _ = draw_shapes(4, seed=12)
    inp = write_table(tmp_path / "in" / "r.parquet", _image_table(images))
    out = tmp_path / "out"
    res = invoke([*_run_args(inp, out, f"hf:{d}"), "--threshold", "0", "--max-classes", "3"])  # --task auto
    assert res.exit_code == 0, res.output
    assert _manifest(out)["config"]["task_resolved"] == "multilabel"
    t = read_output(out)
    assert t.num_rows == 4 * 3 and "entropy" not in t.column_names
    with torch.no_grad():
        logits = load_model(f"hf:{d}")(normalized(images)).logits
    got = t["class_index"].to_numpy().reshape(4, 3)
    assert got.tolist() == torch.topk(logits, 3, dim=1).indices.tolist()
    np.testing.assert_allclose(
        t["probability"].to_numpy().reshape(4, 3),
        torch.sigmoid(logits).gather(1, torch.tensor(got, dtype=torch.long)),
        atol=1e-5,
    )

    pytest.importorskip("timm")
    labels = [[0, 5], [], [3], [1, 2, 4]]
    inp = write_table(
        tmp_path / "in2" / "timm.parquet", _image_table(images, labels=pa.array(labels, pa.list_(pa.int64())))
    )
    out = tmp_path / "out2"
    res = invoke(
        [*_run_args(inp, out, "timm:resnet18"), "--num-classes", "6", "--task", "multilabel"]
        + ["--threshold", "0.5", "--label-column", "labels"]
    )
    assert res.exit_code == 0, res.output
    t = read_output(out)
    with torch.no_grad():
        prob = torch.sigmoid(load_model("timm:resnet18", num_classes=6)(normalized(images)))
    for i, rs in enumerate(by_image(t).values()):
        expected = {int(c) for c in torch.nonzero(prob[i] >= 0.5).flatten()} | set(labels[i])
        assert sorted(r["class_index"] for r in rs) == sorted(expected)
        assert [r["positive"] for r in rs] == [r["class_index"] in labels[i] for r in rs]
        np.testing.assert_allclose([r["probability"] for r in rs], prob[i, [r["class_index"] for r in rs]], atol=1e-5)


# -- refused invocations ----------------------------------------------------------------------------------

BAD = {
    "segmentation_on_a_classifier": (
        "multilabel",
        ["--task", "segmentation"],
        "(B, C, H, W) logits",
    ),
    "threshold_on_softmax": ("multilabel", ["--threshold", "0.5"], "threshold needs the multilabel task"),
    "mask_without_segmentation": ("multilabel", ["--mask-column", "mask"], "mask column needs --task segmentation"),
    "label_with_segmentation": (
        "seg",
        ["--task", "segmentation", "--label-column", "label"],
        "--label-column is for classifiers",
    ),
    "metrics_with_segmentation": (
        "seg",
        ["--task", "segmentation", "--metrics", "deletion"],
        "not defined for segmentation",
    ),
    "max_classes_without_threshold": (
        "multilabel",
        ["--task", "multilabel", "--max-classes", "2"],
        "give --threshold too",
    ),
    "list_label_with_softmax": ("multilabel", ["--label-column", "labels"], "needs --task multilabel"),
    "label_format_with_softmax": (
        "multilabel",
        ["--label-column", "label", "--label-format", "multihot"],
        "label format applies to --task multilabel",
    ),
    "boxes_with_segmentation": (
        "seg",
        ["--task", "segmentation", "--box-column", "label"],
        "boxes (--box-column) apply to classifiers",
    ),
    "ignore_index_without_mask": (
        "seg",
        ["--task", "segmentation", "--mask-ignore-index", "255"],
        "--mask-column",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_task_invocations_exit_2_with_one_line(tmp_path, case):
    factory, extra, expect = BAD[case]
    images = _noise(2, 32, seed=13)
    table = _image_table(
        images,
        label=pa.array([1, 2], pa.int64()),
        labels=pa.array([[1], [0, 2]], pa.list_(pa.int64())),
        mask=pa.array([_mask_png(np.zeros((32, 32), np.int64))] * 2, pa.binary()),
    )
    inp = write_table(tmp_path / "in" / "bad.parquet", table)
    spec = f"{task_models(tmp_path)}:{factory}"
    out = tmp_path / "out"
    res = invoke([*_run_args(inp, out, spec), *extra])
    assert res.exit_code == 2, (case, res.output)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expect in lines[0], (case, res.stderr)
    assert "Traceback" not in res.output
    assert not out.exists()  # nothing written


# -- the audit --------------------------------------------------------------------------------------------


def test_audit_of_a_multilabel_run_audits_each_positive_label_in_its_class(tmp_path):
    n = 24
    images, labels, _ = draw_shapes(n, seed=14)
    labels = [[c + 1 for c in lab] for lab in labels]  # classes 1..3 of 5; class 0 never a label
    inp = write_table(
        tmp_path / "in" / "a.parquet", _image_table(images, labels=pa.array(labels, pa.list_(pa.int64())))
    )
    out = tmp_path / "out"
    res = invoke(
        [*_run_args(inp, out, f"{task_models(tmp_path)}:multilabel", batch=8), "--task", "multilabel"]
        + ["--threshold", "0.5", "--label-column", "labels"]
    )
    assert res.exit_code == 0, res.output
    t = read_output(out)
    cls = t["class_index"].to_numpy()
    pos = t["positive"].to_numpy(zero_copy_only=False)
    positives = {int(c): int(((cls == c) & pos).sum()) for c in np.unique(cls[pos])}
    assert positives == {c: sum(c in lab for lab in labels) for c in (1, 2, 3)}
    assert (~pos).any()  # rows of the threshold that are no positive label: not audited under --rows label

    report = tmp_path / "report"
    res = invoke(["audit", out, "-o", report, "--rows", "label", "--no-overlays", "--view", "spectral"])
    assert res.exit_code == 0, res.output
    summary = json.loads((report / "summary.json").read_text())
    audited = {c["class_index"]: c["rows"] for c in summary["classes"]}
    assert audited == positives
    assert summary["totals"]["audited_rows"] == int(pos.sum())
    assert summary["run"]["truth"] == "positive" and summary["run"]["task"] == "multilabel"
    page = (report / "index.html").read_text()
    assert "each positive class of each image" in page and "the true label&#x27;s heatmap" not in page


# -- found while writing these tests ----------------------------------------------------------------------


def test_each_method_gets_its_own_mask_metrics(tmp_path):
    """With two methods, the gradcam++ rows' mask_energy and mask_iou are those of a gradcam++-only run
    (each row's metric is of its own heatmap), not those of the first method's map."""
    mask = np.zeros((32, 32), np.int64)
    mask[:16] = 3
    mask[20:, :10] = 1
    images = _noise(4, 32, seed=15)
    table = _image_table(images, mask=pa.array([_mask_png(mask)] * 4, pa.binary()))
    inp = write_table(tmp_path / "in" / "mm.parquet", table)
    spec = f"{task_models(tmp_path)}:seg"
    base = ["--task", "segmentation", "--mask-column", "mask"]
    res = invoke([*_run_args(inp, tmp_path / "both", spec), *base, "--method", "gradcam,gradcam++"])
    assert res.exit_code == 0, res.output
    res = invoke([*_run_args(inp, tmp_path / "pp", spec), *base, "--method", "gradcam++"])
    assert res.exit_code == 0, res.output
    both = read_output(tmp_path / "both")
    both = both.filter(pc.equal(both["method"], "gradcam++"))
    alone = read_output(tmp_path / "pp")
    assert both["class_index"].to_pylist() == alone["class_index"].to_pylist()
    assert np.abs(_maps(both, "heatmap").astype(int) - _maps(alone, "heatmap")).max() <= 1  # the same maps ...
    for name in ("mask_energy", "mask_iou"):  # ... so the same metrics
        np.testing.assert_allclose(
            np.array(both[name].to_pylist(), dtype=float), np.array(alone[name].to_pylist(), dtype=float), atol=1e-5
        )


def test_threshold_zero_is_part_of_the_run_fingerprint(tmp_path):
    """``--threshold 0`` (every class, highest first) is another selection than no threshold: rerunning an
    output directory with it must not take the finished run without a threshold as its own."""
    images, _, _ = draw_shapes(3, seed=16)
    inp = write_table(tmp_path / "in" / "fp.parquet", _image_table(images))
    spec = f"{task_models(tmp_path)}:multilabel"
    out = tmp_path / "out"
    res = invoke([*_run_args(inp, out, spec), "--task", "multilabel", "--top-k", "1"])
    assert res.exit_code == 0, res.output
    res = invoke([*_run_args(inp, out, spec), "--task", "multilabel", "--top-k", "1", "--threshold", "0"])
    assert res.exit_code == 2, res.output
    assert "holds a run with other settings" in res.output


def test_a_bad_label_with_nothing_above_the_threshold_says_the_label_is_bad(tmp_path):
    """An image whose only label is out of range and whose classes all stay below the threshold becomes an
    error row; its reason names the bad label (not "the label lists no positive class", which it does)."""
    images, _, _ = draw_shapes(2, seed=17)
    labels = pa.array([[7], [1]], pa.list_(pa.int64()))
    inp = write_table(tmp_path / "in" / "bl.parquet", _image_table(images, labels=labels))
    out = tmp_path / "out"
    res = invoke(
        [*_run_args(inp, out, f"{task_models(tmp_path)}:multilabel"), "--task", "multilabel"]
        + ["--threshold", "1", "--label-column", "labels"]
    )
    assert res.exit_code == 0, res.output
    rows = by_image(read_output(out))
    (r0,) = rows["bl.parquet:0"]
    assert r0["status"] == "error" and "label 7 is not a class of the model (0..4)" in r0["error"], r0["error"]
    (r1,) = rows["bl.parquet:1"]
    assert r1["status"] == "ok" and r1["class_index"] == 1 and r1["positive"] is True
