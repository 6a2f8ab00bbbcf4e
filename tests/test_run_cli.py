"""End-to-end `gradcam-batch run` through click's CliRunner on small Parquet files."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from run_support import base_args, bytes_table, invoke, model_file, png_bytes, read_output, shapes, write_table

from gradcam_batch import Explainer
from gradcam_batch.cli import cli
from gradcam_batch.engine.models.loader import load_model

EXPECTED = [
    ("id", pa.string()),
    ("class_index", pa.int32()),
    ("class_rank", pa.int32()),
    ("score", pa.float32()),
    ("probability", pa.float32()),
    ("entropy", pa.float32()),
    ("cam", pa.fixed_shape_tensor(pa.float16(), [16, 16])),
    ("heatmap", pa.fixed_shape_tensor(pa.uint8(), [32, 32])),
    ("peak_y", pa.int32()),
    ("peak_x", pa.int32()),
    ("cam_max", pa.float32()),
    ("status", pa.string()),
    ("error", pa.string()),
]


def _expected_explanation(tmp_path, images: np.ndarray, top_k: int, factory: str = "make"):
    """What the Explainer gives for the same preprocessed images (32x32 PNGs, ImageNet stats)."""
    model = load_model(f"{model_file(tmp_path)}:{factory}")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return Explainer(model)((x - mean) / std, top_k=top_k, output_size=32, out_dtype=torch.uint8)


def test_binary_column_end_to_end(tmp_path):
    n = 20
    inp = write_table(tmp_path / "in" / "data.parquet", bytes_table(n), row_group_size=7)
    out = tmp_path / "out"
    res = invoke(["run", str(inp), *base_args(tmp_path, out), "--top-k", "2"])
    assert res.exit_code == 0, res.output
    assert "explained 20 images (40 rows, 0 errors)" in res.output

    t = read_output(out)
    assert [(f.name, f.type) for f in t.schema] == EXPECTED
    assert t.num_rows == 2 * n
    assert set(t["status"].to_pylist()) == {"ok"}
    assert t["error"].null_count == n * 2
    # Default ids: "<file>:<row>", each image twice (top-2), ranks 0 and 1 in order.
    ids = t["id"].to_pylist()
    assert ids[:4] == ["data.parquet:0", "data.parquet:0", "data.parquet:1", "data.parquet:1"]
    assert t["class_rank"].to_pylist() == [0, 1] * n

    # The values are the Explainer's for the same images.
    exp = _expected_explanation(tmp_path, shapes(n).images, top_k=2)
    np.testing.assert_array_equal(t["class_index"].to_numpy().reshape(n, 2), exp.classes.numpy())
    np.testing.assert_allclose(t["score"].to_numpy().reshape(n, 2), exp.scores.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t["probability"].to_numpy().reshape(n, 2), exp.probabilities.numpy(), atol=1e-6)
    heat = t["heatmap"].combine_chunks().to_numpy_ndarray()
    assert heat.shape == (2 * n, 32, 32) and heat.dtype == np.uint8
    diff = np.abs(heat.reshape(n, 2, 32, 32).astype(int) - exp.heatmaps.numpy().astype(int))
    assert diff.max() <= 1
    cams = t["cam"].combine_chunks().to_numpy_ndarray()
    np.testing.assert_allclose(cams.reshape(n, 2, 16, 16), exp.cams.numpy(), rtol=2e-3, atol=1e-3)
    # An all-zero map has no peak (null); every other peak is the engine's.
    has_peak = exp.cam_max.numpy() > 0
    peak_y = t["peak_y"].to_numpy().reshape(n, 2)
    assert np.isnan(peak_y[~has_peak]).all()
    np.testing.assert_array_equal(peak_y[has_peak], exp.peaks[..., 0].numpy()[has_peak])
    np.testing.assert_allclose(t["cam_max"].to_numpy().reshape(n, 2), exp.cam_max.numpy(), rtol=1e-5)

    # The manifest.
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "complete"
    assert man["totals"] == {"rows_in": n, "images_ok": n, "errors": 0, "rows_out": 2 * n, "files": 1}
    assert man["versions"]["torch"] == torch.__version__ and man["versions"]["gpu"] is None
    assert man["throughput"]["images"] == n and man["throughput"]["images_per_s"] > 0
    assert sorted(u for f in man["files"] for u in f["units"]) == sorted(
        ["data.parquet:0-7", "data.parquet:7-14", "data.parquet:14-20"]
    )
    assert man["config"]["top_k"] == 2 and man["config"]["target_layer_resolved"] == "features.3"


def test_entropy_is_the_predictive_entropy_of_each_image(tmp_path):
    """-sum p log p over the softmax of every class, per image, on each of its rows (and per method)."""
    n = 6
    inp = write_table(tmp_path / "in.parquet", bytes_table(n))
    out = tmp_path / "out"
    res = invoke(["run", str(inp), *base_args(tmp_path, out), "--top-k", "2", "--method", "gradcam,layercam"])
    assert res.exit_code == 0, res.output
    t = read_output(out)
    assert t.schema.field("entropy").type == pa.float32() and t["entropy"].null_count == 0
    model = load_model(f"{model_file(tmp_path)}:make")
    x = torch.from_numpy(shapes(n).images).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.no_grad():
        p = torch.softmax(model(x).double(), dim=1)
    expected = -(p * p.log()).sum(1).numpy()
    np.testing.assert_allclose(t["entropy"].to_numpy().reshape(n, 4), np.repeat(expected, 4).reshape(n, 4), rtol=1e-5)


def test_read_back_with_duckdb_and_polars(tmp_path):
    inp = write_table(tmp_path / "in.parquet", bytes_table(6))
    out = tmp_path / "out"
    assert invoke(["run", str(inp), *base_args(tmp_path, out), "--top-k", "3"]).exit_code == 0
    ref = read_output(out)
    ref_heat = ref["heatmap"].combine_chunks().to_numpy_ndarray()

    glob = str(out / "part-*.parquet")
    rows = duckdb.sql(f"SELECT id, class_index, heatmap FROM read_parquet('{glob}') ORDER BY id, class_rank").fetchall()
    assert len(rows) == 18
    assert [r[1] for r in rows] == ref["class_index"].to_pylist()
    duck_heat = np.array([r[2] for r in rows], dtype=np.uint8).reshape(-1, 32, 32)
    np.testing.assert_array_equal(duck_heat, ref_heat)
    query = f"SELECT count(*) FROM read_parquet('{glob}') WHERE class_rank = 0 AND status = 'ok'"
    assert duckdb.sql(query).fetchall()[0][0] == 6

    df = pl.read_parquet(glob)
    assert df.height == 18 and df["class_rank"].dtype == pl.Int32
    # Polars keeps the extension: flat (n, H*W) values plus the shape in its metadata.
    np.testing.assert_array_equal(df["heatmap"].to_numpy().reshape(-1, 32, 32), ref_heat)
    np.testing.assert_array_equal(df["heatmap"].to_arrow().to_numpy_ndarray(), ref_heat)

    pdf = pq.read_table(sorted(out.glob("part-*.parquet"))).to_pandas()
    assert list(pdf["id"][:3]) == ref["id"].to_pylist()[:3]


def test_hf_struct_column_with_bytes_and_paths(tmp_path):
    data = shapes(6)
    img_dir = tmp_path / "in" / "imgs"
    img_dir.mkdir(parents=True)
    structs = []
    for i, im in enumerate(data.images):
        if i % 2:  # half the rows carry only a path, relative to the Parquet file
            (img_dir / f"{i}.png").write_bytes(png_bytes(im))
            structs.append({"bytes": None, "path": f"imgs/{i}.png"})
        else:
            structs.append({"bytes": png_bytes(im), "path": f"ignored-{i}.png"})
    typ = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array(structs, typ), "label": pa.array(data.labels % 5)})
    inp = write_table(tmp_path / "in" / "hf.parquet", table)
    out = tmp_path / "out"
    res = invoke(["run", str(inp), *base_args(tmp_path, out)])
    assert res.exit_code == 0, res.output
    t = read_output(out)
    assert t.num_rows == 6 and set(t["status"].to_pylist()) == {"ok"}
    exp = _expected_explanation(tmp_path, data.images, top_k=1)
    np.testing.assert_array_equal(t["class_index"].to_numpy(), exp.classes[:, 0].numpy())


def test_path_column_relative_and_absolute(tmp_path):
    data = shapes(5)
    img_dir = tmp_path / "in" / "pics"
    img_dir.mkdir(parents=True)
    paths = []
    for i, im in enumerate(data.images):
        (img_dir / f"p{i}.jpg").write_bytes(png_bytes(im, "JPEG", quality=95))
        paths.append(f"pics/p{i}.jpg" if i < 3 else str(img_dir / f"p{i}.jpg"))
    inp = write_table(tmp_path / "in" / "paths.parquet", pa.table({"file_path": paths, "k": list(range(5))}))
    out = tmp_path / "out"
    res = invoke(["run", str(inp), *base_args(tmp_path, out), "--keep-columns", "file_path,k", "--id-column", "k"])
    assert res.exit_code == 0, res.output
    t = read_output(out)
    assert t.column_names[:3] == ["id", "file_path", "k"]
    assert t["id"].type == pa.int64() and t["id"].to_pylist() == [0, 1, 2, 3, 4]
    assert t["file_path"].to_pylist() == paths
    assert set(t["status"].to_pylist()) == {"ok"}


def test_label_column_combined_with_top_k(tmp_path):
    n = 12
    data = shapes(n)
    exp = _expected_explanation(tmp_path, data.images, top_k=2)
    top2 = exp.classes.numpy()
    # Labels: the top-1 class for even rows (a duplicate), a class outside the top-2 for odd rows.
    labels = [int(top2[i, 0]) if i % 2 == 0 else int(next(c for c in range(5) if c not in top2[i])) for i in range(n)]
    labels[3] = None  # a null label: top-k only, noted in error
    labels[5] = 99  # not a class of the model
    table = pa.table({"image": [png_bytes(im) for im in data.images], "truth": pa.array(labels, pa.int32())})
    inp = write_table(tmp_path / "l.parquet", table)
    out = tmp_path / "out"
    res = invoke(["run", str(inp), *base_args(tmp_path, out), "--top-k", "2", "--label-column", "truth"])
    assert res.exit_code == 0, res.output
    t = read_output(out)
    assert "label" in t.column_names and t.schema.field("label").type == pa.int32()
    by_id: dict[str, list[dict]] = {}
    for row in t.to_pylist():
        by_id.setdefault(row["id"], []).append(row)
    assert len(by_id) == n
    for i in range(n):
        rows = by_id[f"l.parquet:{i}"]
        classes = [r["class_index"] for r in rows]
        assert len(set(classes)) == len(classes), "a class is explained twice for one image"
        assert set(top2[i]) <= set(classes)
        assert [r["class_rank"] for r in rows] == list(range(len(rows)))
        scores = [r["score"] for r in rows]
        assert scores == sorted(scores, reverse=True)
        assert all(r["label"] == labels[i] for r in rows)
        if i in (3, 5):
            assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
            assert ("null label" if i == 3 else "label 99") in rows[0]["error"]
        elif i % 2 == 0:
            assert len(rows) == 2 and rows[0]["error"] is None  # the label was the top-1: no extra row
        else:
            assert len(rows) == 3 and labels[i] in classes and rows[-1]["class_index"] == labels[i]


def test_classes_option_heatmap_size_and_float16(tmp_path):
    inp = write_table(tmp_path / "in.parquet", bytes_table(4))
    out = tmp_path / "out"
    args = [*base_args(tmp_path, out), "--classes", "4,1,4", "--heatmap-size", "8x12", "--heatmap-dtype", "float16"]
    res = invoke(["run", str(inp), *args, "--summary-json", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    t = read_output(out)
    assert t.num_rows == 8  # the duplicate 4 is explained once
    assert sorted(set(t["class_index"].to_pylist())) == [1, 4]
    assert t.schema.field("heatmap").type == pa.fixed_shape_tensor(pa.float16(), [8, 12])
    heat = t["heatmap"].combine_chunks().to_numpy_ndarray()
    assert heat.shape == (8, 8, 12) and heat.dtype == np.float16
    assert float(heat.min()) >= 0.0 and float(heat.max()) <= 1.0
    assert np.nanmax(t["peak_y"].to_numpy()) < 8 and np.nanmax(t["peak_x"].to_numpy()) < 12
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["images"] == 4 and summary["rows_out"] == 8 and summary["errors"] == 0


def test_heatmap_none_keeps_only_cam(tmp_path):
    inp = write_table(tmp_path / "in.parquet", bytes_table(3))
    out = tmp_path / "out"
    assert invoke(["run", str(inp), *base_args(tmp_path, out), "--heatmap-size", "none"]).exit_code == 0
    t = read_output(out)
    assert "heatmap" not in t.column_names
    cams = t["cam"].combine_chunks().to_numpy_ndarray().astype(np.float32)
    # Without heatmaps the peak refers to the low-resolution cam.
    for cam, y, x in zip(cams, t["peak_y"].to_pylist(), t["peak_x"].to_pylist(), strict=True):
        if cam.max() == 0:
            assert y is None and x is None  # an all-zero map has no peak
        else:
            assert cam[y, x] == pytest.approx(cam.max(), rel=1e-3)


def test_method_cam_counterfactual_limit_and_mlp_head(tmp_path):
    inp = write_table(tmp_path / "in.parquet", bytes_table(10))
    out1, out2 = tmp_path / "o1", tmp_path / "o2"
    r1 = invoke(["run", str(inp), *base_args(tmp_path, out1), "--method", "cam", "--limit", "4"])
    assert r1.exit_code == 0, r1.output
    assert read_output(out1).num_rows == 4
    r2 = invoke(
        ["run", str(inp), *base_args(tmp_path, out2, "make_mlp"), "--counterfactual", "--target-layer", "features.1"]
    )
    assert r2.exit_code == 0, r2.output
    t = read_output(out2)
    assert t.num_rows == 10 and t["cam"].type.shape == [32, 32]


def test_multiple_files_directory_and_glob(tmp_path):
    d = tmp_path / "data"
    write_table(d / "a.parquet", bytes_table(3, seed=1))
    write_table(d / "sub" / "b.parquet", bytes_table(4, seed=2))
    (d / "_SUCCESS").write_text("")
    out = tmp_path / "out"
    res = invoke(["run", str(d), *base_args(tmp_path, out), "--rows-per-file", "2"])
    assert res.exit_code == 0, res.output
    t = read_output(out)
    ids = t["id"].to_pylist()
    assert ids == [f"a.parquet:{i}" for i in range(3)] + [f"sub/b.parquet:{i}" for i in range(4)]
    assert len(list(out.glob("part-*.parquet"))) >= 3  # small files: rows-per-file splits them

    out2 = tmp_path / "out2"
    res = invoke(["run", str(d / "**" / "*.parquet"), *base_args(tmp_path, out2)])
    assert res.exit_code == 0, res.output
    assert read_output(out2)["id"].to_pylist() == ids


def test_every_command_has_help():
    for name, cmd in cli.commands.items():
        assert cmd.help and cmd.help.strip(), f"{name} has no help text"
        res = invoke([name, "--help"])
        assert res.exit_code == 0 and "Usage:" in res.output
    assert "--heatmap-size" in invoke(["run", "--help"]).output


def test_progress_bar_precision_workers_and_device(tmp_path):
    inp = write_table(tmp_path / "in.parquet", bytes_table(6))
    o1, o2 = tmp_path / "o1", tmp_path / "o2"
    args = ["--progress", "--workers", "1", "--device", "cpu", "--precision", "bf16"]
    res = invoke(["run", str(inp), *base_args(tmp_path, o1), *args])
    assert res.exit_code == 0, res.output
    assert "img/s" in res.output and "6/6" in res.output  # tqdm's bar went to stderr, mixed in here
    assert invoke(["run", str(inp), *base_args(tmp_path, o2)]).exit_code == 0
    low, ref = read_output(o1), read_output(o2)
    np.testing.assert_allclose(low["score"].to_numpy(), ref["score"].to_numpy(), rtol=0.05, atol=0.05)
    assert json.loads((o1 / "manifest.json").read_text())["config"]["precision"] == "bf16"
    res = invoke(["run", str(inp), *base_args(tmp_path, tmp_path / "o3"), "--device", "cuda:3"])
    if not torch.cuda.is_available():
        assert res.exit_code == 2 and "CUDA is not available" in res.output


def test_device_jpeg_decode_matches_pillow(tmp_path):
    pytest.importorskip("torchvision")
    data = shapes(6, size=40)
    jpgs = [png_bytes(im, "JPEG", quality=95) for im in data.images]
    values = [*jpgs[:3], png_bytes(data.images[3]), jpgs[4][: len(jpgs[4]) // 3], jpgs[5]]  # a PNG, a broken JPEG
    inp = write_table(tmp_path / "j.parquet", pa.table({"image": values}))
    o1, o2 = tmp_path / "o1", tmp_path / "o2"
    res = invoke(["run", str(inp), *base_args(tmp_path, o1), "--device-jpeg", "--top-k", "2"])
    assert res.exit_code == 0, res.output
    assert invoke(["run", str(inp), *base_args(tmp_path, o2), "--top-k", "2"]).exit_code == 0
    dev, ref = read_output(o1), read_output(o2)
    assert dev["status"].to_pylist() == ref["status"].to_pylist()
    assert dev["status"].to_pylist().count("error") == 1
    ok = np.array(ref["status"].to_pylist()) == "ok"
    # Different decoders and resamplers (libjpeg via torchvision vs Pillow): close, not equal.
    np.testing.assert_allclose(dev["score"].to_numpy()[ok], ref["score"].to_numpy()[ok], rtol=0.05, atol=0.05)
    assert dev["class_index"].to_pylist() == ref["class_index"].to_pylist()


def test_a_run_warning_prints_as_one_line():
    from gradcam_batch.cli.run import format_run_warning
    from gradcam_batch.engine.job.config import RunWarning

    line = format_run_warning(RunWarning("random weights", "k"), RunWarning, "plan.py", 3)
    assert line == "warning: random weights\n"
    assert "plan.py:3: UserWarning: other" in format_run_warning(UserWarning("other"), UserWarning, "plan.py", 3)


def test_run_config_maps_every_option_explicitly_and_changes_nothing():
    """Each option of `run` is mapped to a RunConfig field by name in cli/run.py, or is the CLI's own;
    run_config reads the options without popping them (run() reads some afterwards)."""
    import dataclasses

    from gradcam_batch.cli.run import CLI_ONLY_OPTIONS, RUN_CONFIG_OPTIONS, run, run_config
    from gradcam_batch.engine.job.config import RunConfig

    ctx = run.make_context("run", ["in.parquet", "-o", "out", "--model", "torchvision:resnet18", "--workers", "3"])
    opts = dict(ctx.params)
    inputs = opts.pop("inputs")
    assert set(opts) == set(RUN_CONFIG_OPTIONS) | set(CLI_ONLY_OPTIONS)
    assert not set(RUN_CONFIG_OPTIONS) & set(CLI_ONLY_OPTIONS)
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    assert all(field in fields for field in RUN_CONFIG_OPTIONS.values())
    before = dict(opts)
    config = run_config(inputs, opts)
    assert opts == before
    assert config.model == "torchvision:resnet18" and config.workers == 3 and config.output == "out"
    assert config.inputs == ["in.parquet"] and config.overwrite is False and config.crop == (224, 224)
