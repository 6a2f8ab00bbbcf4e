"""The Parquet source: discovery, image-column detection, units, decode and preprocessing."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from run_support import bytes_table, png_bytes, write_table

from gradcam_batch.engine.job.decode import decode_image, to_rgb
from gradcam_batch.engine.job.errors import DecodeError, SourceError
from gradcam_batch.engine.job.inputs import detect_image_column, discover_inputs, plan_units
from gradcam_batch.engine.job.preprocess import Preprocess
from gradcam_batch.engine.job.source import ParquetSource


def test_discover_files_directories_globs_and_file_uris(tmp_path):
    d = tmp_path / "data"
    write_table(d / "b.parquet", bytes_table(2), row_group_size=1)
    write_table(d / "a" / "c.parquet", bytes_table(3))
    (d / "_SUCCESS").write_text("")
    (d / ".hidden.parquet").write_text("not parquet, but hidden")

    files, dirs = discover_inputs([str(d)])
    assert [f.key for f in files] == ["a/c.parquet", "b.parquet"]
    assert [f.row_group_rows for f in files] == [(3,), (1, 1)]
    assert dirs == [str(d)]

    files, dirs = discover_inputs([str(d / "b.parquet")])
    assert [f.key for f in files] == ["b.parquet"] and dirs == []

    files, _ = discover_inputs([str(d / "**" / "*.parquet"), str(d / "b.parquet")])  # duplicates once
    assert [f.key for f in files] == ["a/c.parquet", "b.parquet"]

    files, _ = discover_inputs([f"file://{d}"])
    assert [f.key for f in files] == ["a/c.parquet", "b.parquet"] and files[0].num_rows == 3

    files, _ = discover_inputs([f"file://{d}/*.parquet"])
    assert [f.key for f in files] == ["b.parquet"]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: str(d / "missing.parquet"), "input not found"),
        (lambda d: str(d / "*.nothing"), "no files match"),
        (lambda d: (d / "t.parquet").write_text("x") and str(d / "t.parquet"), "not a readable Parquet file"),
        (lambda d: (d / "empty").mkdir() or str(d / "empty"), "no .parquet files"),
    ],
)
def test_discover_errors(tmp_path, setup, message):
    with pytest.raises(SourceError, match=message):
        discover_inputs([setup(tmp_path)])


def test_detect_image_column():
    hf = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert detect_image_column(pa.schema([("label", pa.int64()), ("image", hf)])) == "image"
    assert detect_image_column(pa.schema([("jpg", pa.binary()), ("caption", pa.string())])) == "jpg"
    # A name that says "image" wins over a bare binary column.
    assert detect_image_column(pa.schema([("thumb", pa.binary()), ("img_bytes", pa.large_binary())])) == "img_bytes"
    assert detect_image_column(pa.schema([("caption", pa.string()), ("file_path", pa.string())])) == "file_path"
    with pytest.raises(SourceError, match="several columns could hold the images"):
        detect_image_column(pa.schema([("a", pa.binary()), ("b", pa.binary())]))
    with pytest.raises(SourceError, match="no image column found"):
        detect_image_column(pa.schema([("caption", pa.string()), ("x", pa.int32())]))


def test_plan_units_respects_row_groups_and_limit(tmp_path):
    write_table(tmp_path / "a.parquet", bytes_table(7), row_group_size=5)  # row groups 5, 2
    write_table(tmp_path / "b.parquet", bytes_table(3))
    files, _ = discover_inputs([str(tmp_path)])
    units = plan_units(files, unit_rows=2)
    assert [u.key for u in units] == [
        "a.parquet:0-2",
        "a.parquet:2-4",
        "a.parquet:4-5",
        "a.parquet:5-7",
        "b.parquet:0-2",
        "b.parquet:2-3",
    ]
    assert [u.row_group for u in units] == [0, 0, 0, 1, 0, 0]
    limited = plan_units(files, unit_rows=2, limit=6)
    assert [u.key for u in limited] == ["a.parquet:0-2", "a.parquet:2-4", "a.parquet:4-5", "a.parquet:5-6"]
    assert plan_units(files, unit_rows=4, limit=0) == []


def test_preprocess_resize_shorter_side_then_center_crop():
    # Columns hold their x coordinate: after a 2x downscale and a center crop the values tell
    # exactly which part of the image was kept.
    arr = np.tile(np.arange(200, dtype=np.uint8)[None, :, None], (100, 1, 3))
    prep = Preprocess(resize=50, crop=(50, 50))
    out = prep(Image.fromarray(arr))
    assert out.shape == (50, 50, 3)
    cols = out[0, :, 0].astype(int)
    # The 100x50 resized image is cropped at x in [25, 75): original x in about [50, 150).
    assert abs(cols[0] - 51) <= 2 and abs(cols[-1] - 149) <= 2
    exact = Preprocess(resize=(20, 30), crop=None)
    assert exact(Image.fromarray(arr)).shape == (20, 30, 3)
    with pytest.raises(ValueError, match="without a crop"):
        Preprocess(resize=64, crop=None)


def test_preprocess_int_crop_means_square_and_int_resize_stays_shorter_side():
    prep = Preprocess(resize=256, crop=224)
    assert prep.crop == (224, 224) and prep.out_size == (224, 224) and prep.resize == 256
    assert prep == Preprocess(resize=256, crop=(224, 224))  # same config, same fingerprint
    assert Preprocess(resize=[20, 30], crop=None).resize == (20, 30)
    assert Preprocess(resize=None, crop=[8, 9]).crop == (8, 9)
    rect = png_bytes(np.zeros((300, 400, 3), np.uint8))
    assert decode_image(rect, Preprocess(resize=64, crop=48)).shape == (48, 48, 3)


@pytest.mark.parametrize(
    ("kwargs", "what"),
    [
        ({"crop": 0}, "crop"),
        ({"crop": -224}, "crop"),
        ({"crop": (224, 0)}, "crop"),
        ({"crop": (224,)}, "crop"),
        ({"crop": 22.5}, "crop"),
        ({"crop": True}, "crop"),
        ({"resize": 0}, "resize"),
        ({"resize": (0, 10), "crop": None}, "resize"),
        ({"resize": "256"}, "resize"),
    ],
)
def test_preprocess_rejects_sizes_that_are_not_positive(kwargs, what):
    with pytest.raises(ValueError, match=f"{what} must be a positive integer N or a pair"):
        Preprocess(**kwargs)


def test_to_rgb_modes():
    rgb = np.random.default_rng(0).integers(0, 255, (6, 7, 3), dtype=np.uint8)
    img = Image.fromarray(rgb)
    grey = to_rgb(img.convert("L"))
    assert grey.mode == "RGB" and np.array_equal(np.asarray(grey)[..., 0], np.asarray(grey)[..., 2])
    assert to_rgb(img.convert("CMYK")).mode == "RGB"
    # Alpha is composited over black: a fully transparent pixel becomes black.
    rgba = np.dstack([rgb, np.full((6, 7), 255, np.uint8)])
    rgba[0, 0, 3] = 0
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert out[0, 0].tolist() == [0, 0, 0] and out[1, 1].tolist() == rgb[1, 1].tolist()
    g16 = Image.fromarray(np.array([[0, 65535]], dtype=np.uint16))
    assert np.asarray(to_rgb(g16))[0, :, 0].tolist() == [0, 255]


def test_exif_orientation_is_applied():
    arr = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # the camera was turned: show the pixels rotated 90 degrees clockwise
    data = png_bytes(img, exif=exif.tobytes())
    out = decode_image(data, Preprocess(resize=None, crop=(30, 20)))  # exactly the rotated size
    np.testing.assert_array_equal(out, np.rot90(arr, k=-1))
    plain = decode_image(png_bytes(arr), Preprocess(resize=None, crop=(20, 30)))
    np.testing.assert_array_equal(plain, arr)


def test_decode_errors():
    prep = Preprocess(resize=16, crop=(16, 16))
    good = png_bytes(np.zeros((20, 20, 3), np.uint8))
    assert decode_image(good, prep).shape == (16, 16, 3)
    with pytest.raises(DecodeError, match="empty image"):
        decode_image(b"", prep)
    with pytest.raises(DecodeError, match="cannot identify"):
        decode_image(b"\x00" * 50, prep)
    noisy = png_bytes(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    with pytest.raises(DecodeError, match="cannot decode"):
        decode_image(noisy[: len(noisy) // 2], prep)
    jpeg = png_bytes(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8), "JPEG")
    with pytest.raises(DecodeError):
        decode_image(jpeg[: len(jpeg) // 3], prep)


def test_source_streams_units_in_batches(tmp_path):
    table = bytes_table(11).append_column("row", pa.array(range(11)))
    write_table(tmp_path / "x.parquet", table, row_group_size=6)
    files, _ = discover_inputs([str(tmp_path / "x.parquet")])
    units = plan_units(files, unit_rows=4)  # 0-4, 4-6, 6-10, 10-11
    src = ParquetSource(files, "image", ["row"], Preprocess(resize=32, crop=(32, 32)), batch_size=3, workers=2)
    batches = list(src.batches(units[1:]))  # the first unit counts as done already
    assert [(b.unit.key, b.num_rows, b.unit_done) for b in batches] == [
        ("x.parquet:4-6", 2, True),
        ("x.parquet:6-10", 3, False),
        ("x.parquet:6-10", 1, True),
        ("x.parquet:10-11", 1, True),
    ]
    rows = [r for b in batches for r in b.rows.column("row").to_pylist()]
    assert rows == list(range(4, 11))
    assert [r for b in batches for r in b.row_index.tolist()] == rows
    assert all(b.images.shape == (b.num_rows, 32, 32, 3) and b.ok.all() for b in batches)
    assert "image" not in batches[0].rows.column_names
    # Decoded pixels are the PNG's pixels (32x32 already: no resampling).
    ref = np.asarray(Image.open(__import__("io").BytesIO(table["image"][4].as_py())).convert("RGB"))
    np.testing.assert_array_equal(batches[0].images[0], ref)
