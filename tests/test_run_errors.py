"""Bad images become error rows; bad invocations exit 2 with one line and write nothing."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from run_support import base_args, bytes_table, invoke, model_file, png_bytes, read_output, shapes, write_table


def _mixed_values() -> list[bytes | None]:
    good = [png_bytes(im) for im in shapes(2).images]
    full = png_bytes(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    return [
        good[0],
        full[: len(full) // 2],  # truncated PNG
        b"",  # empty
        None,  # null
        b"definitely not an image",
        good[1],
    ]


def test_bad_images_become_error_rows(tmp_path):
    values = _mixed_values()
    inp = write_table(tmp_path / "in" / "bad.parquet", pa.table({"image": pa.array(values, pa.binary())}))
    out = tmp_path / "out"
    res = invoke(
        ["run", str(inp), *base_args(tmp_path, out), "--top-k", "2", "--summary-json", str(tmp_path / "s.json")]
    )
    assert res.exit_code == 0, res.output
    assert "4 errors" in res.output
    t = read_output(out)
    rows = t.to_pylist()
    by_id: dict[str, list[dict]] = {}
    for r in rows:
        by_id.setdefault(r["id"], []).append(r)
    assert list(by_id) == [f"bad.parquet:{i}" for i in range(6)]  # input order, none dropped
    for i in (0, 5):
        assert [r["status"] for r in by_id[f"bad.parquet:{i}"]] == ["ok", "ok"]
    reasons = {1: "cannot decode image", 2: "empty image", 3: "null image", 4: "cannot identify image"}
    for i, why in reasons.items():
        (r,) = by_id[f"bad.parquet:{i}"]
        assert r["status"] == "error" and why in r["error"], r["error"]
        assert r["heatmap"] is None and r["cam"] is None and r["class_index"] is None and r["score"] is None
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["errors"] == 4 and summary["images"] == 6 and summary["rows_out"] == 2 * 2 + 4
    man = json.loads((out / "manifest.json").read_text())
    assert man["totals"]["errors"] == 4 and man["totals"]["images_ok"] == 2

    # --fail-on-error: the same job finishes, then exits non-zero.
    res = invoke(["run", str(inp), *base_args(tmp_path, tmp_path / "out2"), "--fail-on-error"])
    assert res.exit_code == 1 and "4 images could not be explained" in res.output
    assert read_output(tmp_path / "out2").num_rows == 6


def test_missing_path_file_is_an_error_row(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "ok.png").write_bytes(png_bytes(shapes(1).images[0]))
    inp = write_table(d / "p.parquet", pa.table({"path": ["ok.png", "gone.png"]}))
    out = tmp_path / "out"
    assert invoke(["run", str(inp), *base_args(tmp_path, out)]).exit_code == 0
    t = read_output(out)
    assert t["status"].to_pylist() == ["ok", "error"]
    assert t["error"].to_pylist()[1] == "image file not found: gone.png"


def _odd_images():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    img = Image.fromarray(rgb)
    pal = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    gray16 = Image.fromarray(rng.integers(0, 65535, (30, 30), dtype=np.uint16))
    return {
        "gray": png_bytes(img.convert("L")),
        "cmyk": png_bytes(img.convert("CMYK"), "JPEG"),
        "palette": png_bytes(pal),
        "rgba": png_bytes(img.convert("RGBA")),
        "la": png_bytes(img.convert("LA")),
        "gray16": png_bytes(gray16),
        "tiny": png_bytes(Image.new("RGB", (1, 1), (200, 10, 10))),
        "wide": png_bytes(Image.fromarray(rng.integers(0, 255, (5, 300, 3), dtype=np.uint8))),
        "webp": png_bytes(img, "WEBP"),
        "bmp": png_bytes(img, "BMP"),
    }


def test_odd_modes_and_tiny_images_are_explained(tmp_path):
    imgs = _odd_images()
    inp = write_table(tmp_path / "odd.parquet", pa.table({"name": list(imgs), "image": list(imgs.values())}))
    out = tmp_path / "out"
    res = invoke(["run", str(inp), *base_args(tmp_path, out), "--keep-columns", "name"])
    assert res.exit_code == 0, res.output
    t = read_output(out)
    assert t["name"].to_pylist() == list(imgs)
    assert t["status"].to_pylist() == ["ok"] * len(imgs), t["error"].to_pylist()
    assert t["heatmap"].combine_chunks().to_numpy_ndarray().shape == (len(imgs), 32, 32)


@pytest.mark.parametrize(
    "case",
    [
        "missing_column",
        "missing_label",
        "missing_keep",
        "not_parquet",
        "missing_input",
        "empty",
        "limit0",
        "bad_spec",
        "bad_factory",
        "bad_weights",
        "bad_layer",
        "out_in_input_dir",
        "out_is_input_dir",
        "out_beside_input",
        "class_out_of_range",
        "top_k_too_big",
        "float_label",
        "foreign_output",
    ],
)
def test_bad_invocations_exit_2_and_write_nothing(tmp_path, case):
    d = tmp_path / "in"
    inp = write_table(d / "x.parquet", bytes_table(3))
    out = tmp_path / "out"
    args = ["run", str(inp), *base_args(tmp_path, out)]
    expect = {
        "missing_column": "column 'nope' (image column) not found",
        "missing_label": "column 'nope' (label column) not found",
        "missing_keep": "column 'nope' (kept column",
        "not_parquet": "not a readable Parquet file",
        "missing_input": "input not found",
        "empty": "no input rows",
        "limit0": "no input rows",
        "bad_spec": "cannot parse model spec",
        "bad_factory": "not a torch nn.Module",
        "bad_weights": "cannot read weights",
        "bad_layer": "is not a module of",
        "out_in_input_dir": "is inside the input directory",
        "out_is_input_dir": "is inside the input directory",
        "out_beside_input": "holds the input",
        "class_out_of_range": "class 7 is out of range",
        "top_k_too_big": "exceeds the number of classes",
        "float_label": "must hold integer class indices",
        "foreign_output": "not empty and holds no gradcam-batch run",
    }[case]
    if case == "missing_column":
        args += ["--image-column", "nope"]
    elif case == "missing_label":
        args += ["--label-column", "nope"]
    elif case == "missing_keep":
        args += ["--keep-columns", "name,nope"]
    elif case == "not_parquet":
        (d / "y.parquet").write_text("hello")
        args[1] = str(d)
    elif case == "missing_input":
        args[1] = str(d / "nothere.parquet")
    elif case == "empty":
        args[1] = str(write_table(d / "e.parquet", bytes_table(3).slice(0, 0)))
    elif case == "limit0":
        args += ["--limit", "0"]
    elif case == "bad_spec":
        args[args.index("--model") + 1] = "no_such_thing"
    elif case == "bad_factory":
        args[args.index("--model") + 1] = f"{model_file(tmp_path)}:not_a_model"
    elif case == "bad_weights":
        (tmp_path / "w.pt").write_bytes(b"garbage")
        args += ["--weights", str(tmp_path / "w.pt")]
    elif case == "bad_layer":
        args += ["--target-layer", "features.99"]
    elif case == "out_in_input_dir":
        args[1] = str(d)
        args[args.index("-o") + 1] = str(d / "out")
        out = d / "out"
    elif case == "out_is_input_dir":
        args[1] = str(d)
        args[args.index("-o") + 1] = str(d)
    elif case == "out_beside_input":
        args[args.index("-o") + 1] = str(d)
    elif case == "class_out_of_range":
        args += ["--classes", "1,7"]
    elif case == "top_k_too_big":
        args += ["--top-k", "9"]
    elif case == "float_label":
        write_table(d / "x.parquet", bytes_table(3).append_column("f", pa.array([0.5, 1.0, 2.0])))
        args += ["--label-column", "f"]
    elif case == "foreign_output":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    res = invoke(args)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expect in lines[0], res.output
    assert "Traceback" not in res.output
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "__pycache__" not in p.parts) == [
        b for b in before if "__pycache__" not in b.parts
    ]
    if case != "foreign_output":
        assert not out.exists() or case in ("out_is_input_dir", "out_beside_input")


def test_missing_model_or_input_is_a_usage_error(tmp_path):
    inp = write_table(tmp_path / "x.parquet", bytes_table(2))
    res = invoke(["run", str(inp), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--model is required" in res.output
    assert not (tmp_path / "o").exists()


def test_weights_load_into_a_factory_model(tmp_path):
    from gradcam_batch.engine.models.loader import load_model

    model = load_model(f"{model_file(tmp_path)}:make")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1)
    torch.save(model.state_dict(), tmp_path / "neg.pt")
    inp = write_table(tmp_path / "x.parquet", bytes_table(3))
    o1, o2 = tmp_path / "o1", tmp_path / "o2"
    assert invoke(["run", str(inp), *base_args(tmp_path, o1)]).exit_code == 0
    assert invoke(["run", str(inp), *base_args(tmp_path, o2), "--weights", str(tmp_path / "neg.pt")]).exit_code == 0
    s1, s2 = read_output(o1)["score"].to_numpy(), read_output(o2)["score"].to_numpy()
    assert not np.allclose(s1, s2)


def test_column_types_must_agree_across_files(tmp_path):
    d = tmp_path / "in"
    write_table(d / "a.parquet", bytes_table(2))
    t = bytes_table(2)
    write_table(d / "b.parquet", t.set_column(t.schema.get_field_index("label"), "label", pa.array([1.0, 2.0])))
    res = invoke(["run", str(d), *base_args(tmp_path, tmp_path / "out"), "--keep-columns", "label"])
    assert res.exit_code == 2 and "column 'label' is int64 in" in res.output
