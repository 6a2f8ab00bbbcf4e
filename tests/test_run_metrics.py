"""Metrics and boxes in a run: box layouts, the preprocessing's geometry, the metric columns, the means."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw
from run_support import base_args, bytes_table, invoke, model_file, png_bytes, read_output, write_table

from gradcam_batch.engine.demo import assets as demo_assets
from gradcam_batch.engine.job.boxes import BOX_NOTE, box_spec, read_boxes, to_input_frame
from gradcam_batch.engine.job.config import RunSetupError
from gradcam_batch.engine.job.preprocess import Preprocess


@pytest.mark.parametrize(
    ("size", "resize", "crop"),
    [
        ((160, 120), 64, (48, 48)),  # landscape: shorter side, then a center crop
        ((90, 200), 64, (56, 40)),  # portrait, non-square crop
        ((40, 30), 32, (48, 48)),  # smaller than the crop after the resize: scaled up to fit
        ((100, 80), (50, 70), None),  # an exact resize, no crop
        ((77, 61), None, (40, 40)),  # no resize: only the crop
    ],
)
def test_geometry_maps_a_drawn_box_onto_the_preprocessed_image(size, resize, crop):
    w, h = size
    box = np.array([0.3 * w, 0.25 * h, 0.7 * w, 0.8 * h])
    img = Image.new("RGB", size, (0, 0, 0))
    ImageDraw.Draw(img).rectangle(
        [int(box[0]), int(box[1]), int(np.ceil(box[2])) - 1, int(np.ceil(box[3])) - 1], fill=(255, 255, 255)
    )
    prep = Preprocess(resize=resize, crop=crop)
    out = prep(img)[..., 0] > 127
    ys, xs = np.nonzero(out)
    drawn = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)
    mapped, _ = to_input_frame(
        np.array([[int(box[0]), int(box[1]), np.ceil(box[2]), np.ceil(box[3])]]), None, size, prep
    )
    # Bilinear resampling blurs one pixel at each edge.
    np.testing.assert_allclose(mapped[0], drawn, atol=1.5)


def test_box_layouts_and_nulls():
    rows = pa.table(
        {
            "many": pa.array([[[1, 2, 11, 12], [0, 0, 4, 4]], None, []], pa.list_(pa.list_(pa.float32()))),
            "one": pa.array([[1, 2, 11, 12], None, [5, 5, 6, 6]], pa.list_(pa.float64())),
            "hf": pa.array(
                [{"bbox": [[1, 2, 10, 10]], "category": [3]}, None, {"bbox": [], "category": []}],
                pa.struct([("bbox", pa.list_(pa.list_(pa.float32()))), ("category", pa.list_(pa.int64()))]),
            ),
            "x0": [1, None, 2],
            "y0": [2, 0, 2],
            "x1": [11, 5, 3],
            "y1": [12, 5, 3],
        }
    )
    many, _, notes = read_boxes(rows, box_spec(rows.schema, "many"))
    assert notes == [None, None, None]
    assert many[0].tolist() == [[1, 2, 11, 12], [0, 0, 4, 4]] and many[1] is None and many[2] is None
    one, _, _ = read_boxes(rows, box_spec(rows.schema, "one"))
    assert one[0].tolist() == [[1, 2, 11, 12]] and one[1] is None
    hf, cats, _ = read_boxes(rows, box_spec(rows.schema, "hf", "coco"))
    assert hf[0].tolist() == [[1, 2, 11, 12]] and cats[0].tolist() == [3] and hf[1] is None and hf[2] is None
    cols, _, notes = read_boxes(rows, box_spec(rows.schema, "x0,y0,x1,y1"))
    assert cols[0].tolist() == [[1, 2, 11, 12]] and cols[1] is None and notes == [None, None, None]
    with pytest.raises(RunSetupError, match="box column 'nope' not found"):
        box_spec(rows.schema, "nope")
    with pytest.raises(RunSetupError, match="four coordinate columns"):
        box_spec(rows.schema, "x0,y0")
    with pytest.raises(RunSetupError, match="has type"):
        box_spec(pa.schema([("b", pa.string())]), "b")


def test_malformed_boxes_get_a_note_and_no_boxes():
    nan = float("nan")
    rows = pa.table(
        {
            "many": pa.array(
                [
                    [[10, 10, 5, 20]],
                    [[1, 2, 3]],
                    [[4, 4, 4, 9]],
                    [[0, nan, 5, 5]],
                    [[1, 1, 5, 5], [0, 0, 2, 2]],
                    [[1, None, 5, 5]],
                    [[1, 1, 5, 5], [3, 3, 2, 2]],
                ],
                pa.list_(pa.list_(pa.float64())),
            )  # fmt: skip
        }
    )
    boxes, cats, notes = read_boxes(rows, box_spec(rows.schema, "many"))
    assert [b is None for b in boxes] == [True, True, True, True, False, True, True]
    assert notes[4] is None and all(n.startswith(BOX_NOTE) for i, n in enumerate(notes) if i != 4)
    for i, why in enumerate(["reversed", "3 coordinates", "zero area", "not finite", None, "null", "reversed"]):
        assert why is None or why in notes[i], (i, notes[i])
    cols = pa.table({"x0": [5.0, 1.0, 1.0], "y0": [0.0, 1.0, nan], "x1": [2.0, 4.0, 4.0], "y1": [3.0, 4.0, 4.0]})
    _, _, notes = read_boxes(cols, box_spec(cols.schema, "x0,y0,x1,y1"))
    assert "reversed" in notes[0] and notes[1] is None and "not finite" in notes[2]
    coco = pa.table({"b": pa.array([[1, 1, 0, 5], [1, 1, -2, 5], [1, 1, 2, 5]], pa.list_(pa.float64()))})
    boxes, _, notes = read_boxes(coco, box_spec(coco.schema, "b", "coco"))
    assert "zero area" in notes[0] and "reversed" in notes[1] and notes[2] is None
    assert boxes[2].tolist() == [[1, 1, 3, 6]]


def test_a_run_notes_and_counts_malformed_boxes(tmp_path):
    t = bytes_table(6)
    boxes = [[[2, 2, 20, 20]], [[20, 20, 2, 2]], [[1, 2, 3]], None, [[5, 5, 5, 9]], [[2, 2, 20, 20]]]
    t = t.append_column("boxes", pa.array(boxes, pa.list_(pa.list_(pa.float64()))))
    inp = write_table(tmp_path / "in.parquet", t)
    out = tmp_path / "out"
    sj = tmp_path / "summary.json"
    res = invoke(["run", str(inp), *base_args(tmp_path, out), "--box-column", "boxes", "--top-k", "2",
                  "--summary-json", str(sj)])  # fmt: skip
    assert res.exit_code == 0, res.output
    got = read_output(out)
    assert got["status"].to_pylist() == ["ok"] * 12
    errors = dict(zip(got["id"].to_pylist(), got["error"].to_pylist(), strict=False))
    assert [errors[f"in.parquet:{i}"] is None for i in range(6)] == [True, False, False, True, False, True]
    assert all(errors[f"in.parquet:{i}"].startswith(BOX_NOTE) for i in (1, 2, 4))
    hit = dict(zip(got["id"].to_pylist(), got["pointing_hit"].to_pylist(), strict=False))
    assert [hit[f"in.parquet:{i}"] is None for i in range(6)] == [False, True, True, True, True, False]
    assert "3 images with malformed boxes" in res.output
    assert json.loads(sj.read_text())["malformed_boxes"] == 3
    assert json.loads((out / "manifest.json").read_text())["malformed_boxes"] == 3


def test_a_box_outside_the_crop_is_dropped():
    prep = Preprocess(resize=(40, 40), crop=(20, 20))  # keeps the centre 20x20 of a 40x40 resize
    inside, _ = to_input_frame(np.array([[0.0, 0.0, 40.0, 40.0]]), None, (40, 40), prep)
    assert inside.tolist() == [[0, 0, 20, 20]]  # clipped to the crop
    gone, _ = to_input_frame(np.array([[0.0, 0.0, 5.0, 5.0]]), None, (40, 40), prep)
    assert gone is None


def test_bad_metric_and_box_options_exit_2(tmp_path):
    inp = write_table(tmp_path / "in.parquet", bytes_table(2))
    res = invoke(["run", str(inp), *base_args(tmp_path, tmp_path / "o"), "--metrics", "deletion,nonsense"])
    assert res.exit_code == 2 and "unknown metric 'nonsense'" in res.output
    res = invoke(["run", str(inp), *base_args(tmp_path, tmp_path / "o"), "--box-column", "name"])
    assert res.exit_code == 2 and "box column 'name' has type string" in res.output
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    pytest.importorskip("scipy")
    d = tmp_path_factory.mktemp("metrics")
    t = pq.read_table(demo_assets.SAMPLE).slice(0, 24)
    # One image without a box: its box columns are null, the rest of its row is not.
    t = t.set_column(
        t.schema.get_field_index("box_x0"), "box_x0", pa.array([None, *t["box_x0"].to_pylist()[1:]], pa.int32())
    )
    inp = d / "in.parquet"
    pq.write_table(t, inp)
    out = d / "out"
    prep = demo_assets.PREPROCESS
    args = ["run", str(inp), "-o", str(out), "--model", demo_assets.MODEL_SPEC,
            "--weights", str(demo_assets.CHECKPOINT),
            "--resize", str(prep["resize"]), "--crop", "{}x{}".format(*prep["crop"]),
            "--mean", ",".join(map(str, prep["mean"])), "--std", ",".join(map(str, prep["std"])),
            "--top-k", "2", "--metrics", "deletion,insertion,confidence", "--metrics-steps", "8",
            "--box-column", "box_x0,box_y0,box_x1,box_y1", "--batch-size", "8", "--no-progress"]  # fmt: skip
    res = invoke(args)
    assert res.exit_code == 0, res.output
    return out, res.output


def test_metric_columns_are_written(demo_run):
    out, _ = demo_run
    t = read_output(out)
    types = {"deletion_auc": pa.float32(), "insertion_auc": pa.float32(), "confidence_drop": pa.float32(),
             "confidence_increase": pa.bool_(), "pointing_hit": pa.bool_(), "box_energy": pa.float32(),
             "pred_box": pa.list_(pa.int32(), 4), "box_iou": pa.float32()}  # fmt: skip
    for name, typ in types.items():
        assert t.schema.field(name).type == typ, name
    for name in ("deletion_auc", "insertion_auc", "confidence_drop", "box_energy", "box_iou"):
        v = t[name].to_numpy(zero_copy_only=False).astype(float)
        v = v[~np.isnan(v)]
        assert len(v) and (v >= 0).all() and (v <= 1).all(), name
    first = t.filter(pa.compute.equal(t["id"], "in.parquet:0"))
    assert first["pointing_hit"].null_count == 2 and first["pred_box"].null_count == 2
    assert first["deletion_auc"].null_count == 0  # the faithfulness metrics need no box
    boxes = np.array(t["pred_box"].drop_null().to_pylist())
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all() and boxes.max() <= 48


def test_the_summary_and_manifest_give_the_dataset_means(demo_run):
    out, output = demo_run
    means = json.loads((out / "manifest.json").read_text())["metric_means"]
    t = read_output(out)
    assert means["deletion_auc"] == pytest.approx(
        float(np.nanmean(t["deletion_auc"].to_numpy(zero_copy_only=False))), abs=1e-4
    )
    hits = t["pointing_hit"].drop_null().to_numpy(zero_copy_only=False)
    assert (
        means["pointing_accuracy"] == pytest.approx(hits.mean(), abs=1e-4) and means["rows"]["pointing_accuracy"] == 46
    )
    assert "deletion AUC" in output and "pointing accuracy" in output and "localization accuracy" in output


def test_metrics_change_the_fingerprint(tmp_path):
    inp = write_table(tmp_path / "in.parquet", bytes_table(3))
    out = tmp_path / "o"
    assert invoke(["run", str(inp), *base_args(tmp_path, out)]).exit_code == 0
    res = invoke(["run", str(inp), *base_args(tmp_path, out), "--metrics", "confidence"])
    assert res.exit_code == 2 and "other settings" in res.output


def test_a_small_png_image_with_its_box(tmp_path):
    """Boxes in the original pixels of images of several sizes, through the run's own preprocessing."""
    pytest.importorskip("scipy")
    rng = np.random.default_rng(0)
    images, boxes = [], []
    for w, h in ((64, 48), (40, 80), (100, 100)):
        arr = (rng.random((h, w, 3)) * 40).astype(np.uint8)
        x0, y0 = w // 4, h // 4
        arr[y0 : y0 + h // 3, x0 : x0 + w // 3] = 255
        images.append(png_bytes(arr))
        boxes.append([[x0, y0, x0 + w // 3, y0 + h // 3]])
    t = pa.table({"image": pa.array(images, pa.binary()), "box": pa.array(boxes, pa.list_(pa.list_(pa.float32())))})
    inp = write_table(tmp_path / "in.parquet", t)
    res = invoke(["run", str(inp), *base_args(tmp_path, tmp_path / "o"), "--box-column", "box"])
    assert res.exit_code == 0, res.output
    got = read_output(tmp_path / "o")
    assert got["box_energy"].null_count == 0 and got["pointing_hit"].null_count == 0


def test_a_corrupt_jpeg_on_the_device_route_with_boxes_is_an_error_row(tmp_path):
    """A corrupt file that starts like a JPEG passes the device check; its header, read for the box
    geometry, then fails. That is the row's error, not the run's (which a rerun would only repeat)."""
    pytest.importorskip("torchvision")
    pytest.importorskip("scipy")
    arr = (np.random.default_rng(0).random((40, 40, 3)) * 60).astype(np.uint8)
    arr[4:20, 4:20] = 255
    good = png_bytes(arr, "JPEG", quality=95)
    corrupt = b"\xff\xd8\xff" + bytes(range(256)) * 4
    boxes = [[[4.0, 4.0, 20.0, 20.0]]] * 3
    t = pa.table({"image": pa.array([good, corrupt, good], pa.binary()), "box": pa.array(boxes)})
    inp = write_table(tmp_path / "in.parquet", t)
    res = invoke(["run", str(inp), *base_args(tmp_path, tmp_path / "o"), "--box-column", "box", "--device-jpeg"])
    assert res.exit_code == 0, res.output
    got = read_output(tmp_path / "o")
    assert got["status"].to_pylist() == ["ok", "error", "ok"]
    assert "cannot identify image format" in got["error"].to_pylist()[1]
    assert got["box_energy"].null_count == 1


def test_an_image_error_that_escapes_is_not_transient():
    from PIL import UnidentifiedImageError

    from gradcam_batch.engine.job.session import is_transient

    assert not is_transient(UnidentifiedImageError("cannot identify image file"))
    assert is_transient(OSError(28, "No space left on device"))


def test_explain_fills_explanation_metrics():
    import torch

    from gradcam_batch import explain
    from gradcam_batch.engine.metrics import confidence_change, deletion_insertion

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(6, 4),
    ).eval()  # fmt: skip
    images = torch.randn(2, 3, 16, 16)
    exp = explain(model, images, top_k=2, metrics=("deletion", "insertion", "confidence"))
    assert set(exp.metrics) == {"deletion_auc", "insertion_auc", "confidence_drop", "confidence_increase"}
    saliency = exp.heatmaps  # float32, input size, normalized: the same map the metrics use
    d, i = deletion_insertion(model, images, saliency, exp.classes)
    drop, inc = confidence_change(model, images, saliency, exp.classes)
    torch.testing.assert_close(exp.metrics["deletion_auc"], d)
    torch.testing.assert_close(exp.metrics["insertion_auc"], i)
    torch.testing.assert_close(exp.metrics["confidence_drop"], drop)
    assert torch.equal(exp.metrics["confidence_increase"], inc)
    assert explain(model, images).metrics is None
    with pytest.raises(ValueError, match="unknown metric"):
        explain(model, images, metrics=("nope",))


def test_the_saliency_is_made_once_per_batch_for_heatmap_metrics_and_guided(tmp_path, monkeypatch):
    """One fused-kernel call per batch and method: the input-size heatmap is the saliency, quantized."""
    from gradcam_batch.engine.explain import explainer as explainer_module
    from gradcam_batch.engine.job.config import RunConfig
    from gradcam_batch.engine.job.local import prepare
    from gradcam_batch.kernels import dispatch

    inp = write_table(tmp_path / "in.parquet", bytes_table(8))
    cfg = RunConfig(inputs=[str(inp)], output=str(tmp_path / "out"), model=f"{model_file(tmp_path)}:make",
                    resize=32, crop=32, batch_size=8, guided=True, metrics=("deletion",), metrics_steps=2)  # fmt: skip
    job = prepare(cfg)
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs.get("out_dtype"))
        return dispatch.fused_cam(*args, **kwargs)

    monkeypatch.setattr(explainer_module, "fused_cam", counting)
    monkeypatch.setattr("gradcam_batch.kernels.fused_cam", counting)
    job.run()
    assert len(calls) == 1, calls  # one batch, one method


def test_the_explainers_saliency_is_the_heatmap_before_quantization():
    import torch

    from gradcam_batch import Explainer
    from gradcam_batch.kernels import fused_cam
    from gradcam_batch.kernels.reference import quantize

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(6, 8, 3, stride=2, padding=1),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5),
    ).eval()  # fmt: skip
    x = torch.randn(3, 3, 20, 20)
    for size in (None, (7, 9)):  # at the input size (shared with the heatmap) and at another size
        exp = Explainer(model, method="gradcam++")(x, top_k=2, out_dtype=torch.uint8, output_size=size, saliency=True)
        cams = exp.cams.float()
        ones = torch.ones((6, 1, 1))
        ref = fused_cam(cams.reshape(6, 1, *cams.shape[-2:]), ones, (20, 20), out_dtype=torch.float32).heatmaps
        torch.testing.assert_close(exp.saliency, ref.reshape(3, 2, 20, 20))
        if size is None:
            assert torch.equal(exp.heatmaps, quantize(exp.saliency, torch.uint8))
    assert Explainer(model)(x).saliency is None


# -- --metrics-sample ------------------------------------------------------------------------------------


def _sampled_run(tmp_path, out, *extra):
    inp = tmp_path / "in.parquet"
    if not inp.exists():
        write_table(inp, bytes_table(40))
    args = ["run", str(inp), *base_args(tmp_path, out), "--top-k", "2", "--metrics", "deletion,insertion,confidence",
            "--metrics-steps", "4", *extra]  # fmt: skip
    res = invoke(args)
    assert res.exit_code == 0, res.output
    return read_output(out).sort_by([("id", "ascending"), ("class_rank", "ascending")]), res.output


def test_a_metrics_sample_computes_the_metrics_of_a_seeded_share_of_the_images(tmp_path):
    from gradcam_batch.engine.job.step import metrics_sample

    full, _ = _sampled_run(tmp_path, tmp_path / "full")
    half, output = _sampled_run(tmp_path, tmp_path / "half", "--metrics-sample", "0.5")
    other, _ = _sampled_run(tmp_path, tmp_path / "other", "--metrics-sample", "0.5", "--batch-size", "3")
    ids = np.array(half["id"].to_pylist())
    chosen = metrics_sample(pa.array(ids), 0.5)
    assert 8 <= len(set(ids[chosen])) <= 32  # about half of the 40 images, by their ids
    for name in ("deletion_auc", "insertion_auc", "confidence_drop", "confidence_increase"):
        got = half[name]
        assert got.null_count == int((~chosen).sum()), name  # every row of an unsampled image is null ...
        assert got.filter(pa.array(chosen)).null_count == 0, name  # ... and every sampled row holds a value
        # The sampled rows hold what a run over every image gives them (one image's maps and forwards).
        want = full[name].filter(pa.array(chosen)).to_numpy(zero_copy_only=False).astype(float)
        np.testing.assert_allclose(got.filter(pa.array(chosen)).to_numpy(zero_copy_only=False).astype(float), want,
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
        # The same images whatever the batch size (the sample goes by id, not by position).
        assert other[name].is_null().to_pylist() == got.is_null().to_pylist(), name
    assert half.schema.field("confidence_increase").type == pa.bool_()
    means = json.loads((tmp_path / "half" / "manifest.json").read_text())["metric_means"]
    assert means["rows"]["deletion_auc"] == int(chosen.sum())  # the means stand on the sampled rows
    assert means["deletion_auc"] == pytest.approx(
        float(np.nanmean(half["deletion_auc"].to_numpy(zero_copy_only=False).astype(float))), abs=1e-4
    )
    assert "deletion AUC" in output


def test_a_metrics_sample_is_part_of_the_fingerprint_and_needs_metrics(tmp_path):
    out = tmp_path / "o"
    _sampled_run(tmp_path, out, "--metrics-sample", "0.5")
    inp = tmp_path / "in.parquet"
    same = ["--top-k", "2", "--metrics", "deletion,insertion,confidence", "--metrics-steps", "4"]
    res = invoke(["run", str(inp), *base_args(tmp_path, out), *same, "--metrics-sample", "0.5"])
    assert res.exit_code == 0 and "complete already" in res.output  # the same sample: nothing to redo
    res = invoke(["run", str(inp), *base_args(tmp_path, out), *same, "--metrics-sample", "0.25"])
    assert res.exit_code == 2 and "other settings" in res.output
    res = invoke(["run", str(inp), *base_args(tmp_path, tmp_path / "p"), "--metrics-sample", "0.5"])
    assert res.exit_code == 2 and "give --metrics too" in res.output
    res = invoke(["run", str(inp), *base_args(tmp_path, tmp_path / "p"), "--metrics", "deletion",
                  "--metrics-sample", "0"])  # fmt: skip
    assert res.exit_code == 2 and "Traceback" not in res.output
