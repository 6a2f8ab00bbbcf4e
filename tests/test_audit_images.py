"""The audit's overlays without torch: its decode, its input discovery and its unit count equal the run's.

``engine/audit/images.py`` and ``inputs.py`` repeat a few lines of the run's ``engine/job/inputs.py``,
``preprocess.py`` and ``decode.py``; these tests hold the copies to the run's own functions, pixel for
pixel and key for key, and check that an audit with overlays never imports torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from run_support import base_args, bytes_table, invoke, png_bytes, write_table

from gradcam_batch.engine.audit.images import Geometry, decode, load_images
from gradcam_batch.engine.audit.inputs import find_inputs, unit_keys
from gradcam_batch.engine.job.decode import decode_image
from gradcam_batch.engine.job.inputs import discover_inputs, plan_units
from gradcam_batch.engine.job.preprocess import Preprocess

PREPS = [
    {"resize": 32, "crop": [32, 32]},
    {"resize": 48, "crop": [40, 40], "interpolation": "bicubic"},
    {"resize": [24, 40], "crop": None},
    {"resize": None, "crop": [28, 28]},
    {"resize": 20, "crop": [30, 26], "interpolation": "lanczos"},  # the crop is larger than the resize
]


def _images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)

    def rgb(h, w):
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    rotated = Image.fromarray(rgb(30, 50))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise
    grey16 = Image.fromarray((rng.integers(0, 65535, (33, 21))).astype(np.uint16))
    return {
        "png 37x50": png_bytes(rgb(37, 50)),
        "jpeg 300x200 (draft)": png_bytes(rgb(200, 300), "JPEG", quality=90),
        "png 20x20 (below the crop)": png_bytes(rgb(20, 20)),
        "png 64x64": png_bytes(rgb(64, 64)),
        "jpeg with EXIF rotation": png_bytes(rotated, "JPEG", exif=exif.tobytes()),
        "rgba png": png_bytes(rng.integers(0, 256, (25, 31, 4), dtype=np.uint8)),
        "16-bit grey png": png_bytes(grey16),
        "palette gif": png_bytes(Image.fromarray(rgb(18, 29)).convert("P"), "GIF"),
    }


@pytest.mark.parametrize("prep", PREPS, ids=lambda p: f"resize={p['resize']},crop={p['crop']}")
def test_decode_equals_the_runs_pixels(prep):
    run = Preprocess(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in prep.items()})
    ours = Geometry.from_config(prep)
    for name, data in _images().items():
        want = decode_image(data, run)
        got = decode(data, ours)
        assert got.shape == want.shape == (*run.out_size, 3), name
        np.testing.assert_array_equal(got, want, err_msg=name)


def _layout(root: Path) -> None:
    t = pa.table({"x": list(range(10))})
    for rel in ("a/one.parquet", "a/b/two.parquet", "c/three.parquet", "c/.hidden.parquet", "c/_meta.parquet"):
        write_table(root / rel, t, row_group_size=4)


@pytest.mark.parametrize(
    "specs", [["{r}"], ["{r}/a"], ["{r}/c/three.parquet"], ["{r}/**/*.parquet"], ["{r}/a", "{r}/c"]]
)
def test_inputs_are_keyed_as_the_run_keys_them(tmp_path, specs):
    _layout(tmp_path)
    specs = [s.format(r=tmp_path) for s in specs]
    run, _ = discover_inputs(specs)
    ours = find_inputs(specs)
    assert [(f.key, f.uri, f.row_group_rows) for f in ours] == [(f.key, f.uri, f.row_group_rows) for f in run]
    for unit_rows, limit in [(3, None), (4, None), (100, None), (3, 7), (2, 0)]:
        assert unit_keys(ours, unit_rows, limit) == [u.key for u in plan_units(run, unit_rows, limit)]


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A tiny real run with a manifest: 12 images, ids from an id column, in two row groups."""
    tmp = tmp_path_factory.mktemp("imgrun")
    t = bytes_table(12)
    inp = write_table(tmp / "in" / "in.parquet", t, row_group_size=5)
    out = tmp / "run"
    res = invoke(["run", str(inp), *base_args(tmp, out), "--id-column", "name", "--label-column", "label"])
    assert res.exit_code == 0, res.output
    return out, inp


def test_load_images_reads_the_runs_images(image_run):
    out, inp = image_run
    config = json.loads((out / "manifest.json").read_text())["config"]
    ids = pq.read_table(sorted(out.glob("part-*.parquet")), columns=["id"])["id"].to_pylist()
    images, note = load_images(config, [*ids, "no-such-id"])
    assert note is None and set(images) == set(ids)
    prep = Preprocess(resize=32, crop=(32, 32))
    column = pq.read_table(inp)
    for i in (0, 6, 11):  # both row groups
        np.testing.assert_array_equal(images[f"img{i}"], decode_image(column["image"][i].as_py(), prep))
    small, _ = load_images(config, ["img3"], max_side=16)
    assert small["img3"].shape == (16, 16, 3)
    assert load_images(config, ["img3"], ["/no/such/dir"])[1].startswith("input images not reachable")


def test_an_audit_with_overlays_imports_no_torch(image_run, tmp_path):
    """Also on a run whose manifest says "running": its units are counted again from the inputs."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(image_run[0], out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["status"] = "running"
    (out / "manifest.json").write_text(json.dumps(manifest))
    code = (
        "import sys, json\n"
        "from gradcam_batch.engine.audit import audit\n"
        f"r = audit({str(out)!r}, {str(tmp_path / 'rep')!r}, overlays=True)\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'notes': r.summary['notes'],"
        " 'partial': r.summary['run']['partial']}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["torch"] is False
    assert got["partial"] is None  # every unit committed: counted, and complete
    assert not any("image" in n for n in got["notes"]), got["notes"]  # the overlays found their images
    page = (tmp_path / "rep" / "index.html").read_text()
    assert page.count("data:image/") > 12
