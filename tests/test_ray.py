"""The Ray Data runner (``engine/ray_job.py``, ``run --ray``) against the single-machine run.

One local Ray cluster for the whole module (``ray.init(num_cpus=2)``, started once, shut down at
the end) and, in the default run, one Ray execution: a resume of a single-machine run that was
"killed" after its first committed file. That one execution covers a partly done file (row
ranges recovered from Ray's row hash), a whole file, bad images, the manifest commit and the
comparison with the single-machine rows. The fresh ``--id-column`` run and ``explain_dataset``
on a user's Dataset are heavier and marked slow.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")

from gradcam_batch.engine import demo_assets  # noqa: E402
from gradcam_batch.engine.pipeline import RunConfig, run_job  # noqa: E402
from gradcam_batch.engine.ray_job import (  # noqa: E402
    RayOptions,
    RunSetupError,
    _first_line,
    _row_positions,
    explain_dataset,
    run_ray,
)

# Ray's DataContext warns about its own deprecated fields whenever it is copied to the workers.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")

BAD = {3: b"not an image", 17: "truncated", 25: None}  # row -> what replaces the image
ROWS_PER_FILE = 16  # small: several units and part files from 40 rows


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by([("id", "ascending"), ("class_rank", "ascending")])


def _parts(out: Path) -> list[str]:
    return sorted(str(p) for p in out.glob("part-*.parquet"))


def _read(out: Path) -> pa.Table:
    return _sorted(pq.read_table(_parts(out)))


def _unit_rows(key: str) -> int:
    start, stop = key.rsplit(":", 1)[1].split("-")
    return int(stop) - int(start)


def _tensor(col: pa.ChunkedArray) -> np.ndarray:
    """A fixed_shape_tensor column as (n, H, W) float64, NaN for null rows (error rows)."""
    arr = col.combine_chunks()
    shape = tuple(arr.type.shape)
    flat = arr.storage.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    out = np.full((len(arr), *shape), np.nan)
    valid = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False))
    out[valid] = flat.reshape(-1, *shape)
    return out


@pytest.fixture(scope="module")
def cluster():
    from ray.data import DataContext

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """40 demo images in two files of 8-row row groups; rows 3, 17 and 25 cannot be decoded."""
    d = tmp_path_factory.mktemp("ray_in")
    t = pq.read_table(demo_assets.SAMPLE).slice(0, 40)
    images = t.column("image").to_pylist()
    for i, bad in BAD.items():
        images[i] = images[i][:40] if bad == "truncated" else bad
    t = t.set_column(t.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    # Ray's include_paths=True would overwrite a column named "path": the runner must not use it.
    t = t.append_column("path", pa.array([f"shapes/{i:03d}.png" for i in range(40)]))
    pq.write_table(t.slice(0, 24), d / "a.parquet", row_group_size=8)
    pq.write_table(t.slice(24), d / "b.parquet", row_group_size=8)
    return d


def _config(dataset: Path, output: Path, **over) -> RunConfig:
    kw = dict(
        inputs=[str(dataset)],
        output=str(output),
        model=demo_assets.MODEL_SPEC,
        weights=str(demo_assets.CHECKPOINT),
        top_k=2,
        label_column="label",
        keep_columns=["class_name", "path"],
        image_column="image",
        batch_size=8,
        rows_per_file=ROWS_PER_FILE,
        **demo_assets.PREPROCESS,
    )
    kw.update(over)
    return RunConfig(**kw)


@pytest.fixture(scope="module")
def single(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "out"
    run_job(_config(dataset, out))
    return out


@pytest.fixture(scope="module")
def resumed(cluster, dataset, single, tmp_path_factory):
    """A single-machine run cut back to its first committed file, then finished with Ray."""
    out = tmp_path_factory.mktemp("resumed") / "out"
    run_job(_config(dataset, out))
    manifest = json.loads((out / "manifest.json").read_text())
    first = manifest["files"][0]
    for f in manifest["files"][1:]:
        (out / f["name"]).unlink()
    manifest["files"] = [first]
    manifest["completed_units"] = list(first["units"])
    manifest["status"] = "running"
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / ".ray-staging-00000").mkdir()  # a killed Ray group's leftovers
    (out / ".ray-staging-00000" / "x.parquet").write_bytes(b"partial")
    logs: list[str] = []
    summary = run_ray(_config(dataset, out), RayOptions(workers=1), log=logs.append)
    return out, summary, first, logs


def test_resume_with_ray_gives_the_single_machine_rows(single, resumed):
    out, summary, first, _ = resumed
    a, b = _read(single), _read(out)
    assert a.schema == b.schema
    assert a.num_rows == b.num_rows == 77  # 37 images x (2 or 3 slots, label deduped) + 3 error rows
    assert b.column("path").to_pylist()[0].startswith("shapes/")
    for name in (
        "id",
        "class_name",
        "path",
        "class_index",
        "class_rank",
        "label",
        "status",
        "error",
        "peak_y",
        "peak_x",
    ):
        assert a.column(name).equals(b.column(name)), name
    for name in ("score", "probability", "cam_max"):
        np.testing.assert_allclose(b.column(name).to_numpy(), a.column(name).to_numpy(), atol=1e-5, err_msg=name)
    np.testing.assert_allclose(_tensor(b.column("cam")), _tensor(a.column("cam")), atol=1e-5, equal_nan=True)
    diff = np.nan_to_num(np.abs(_tensor(b.column("heatmap")) - _tensor(a.column("heatmap"))))
    assert diff.max() <= 1, f"heatmaps differ by up to {diff.max()} at {np.unravel_index(diff.argmax(), diff.shape)}"
    # Ray explained exactly what the cut-back manifest did not list.
    assert summary["resumed_units"] == len(first["units"])
    assert summary["images"] == 40 - sum(_unit_rows(u) for u in first["units"])
    assert summary["device"].startswith("ray")


def test_bad_images_are_error_rows(single, resumed):
    out = resumed[0]
    b = _read(out)
    err = b.filter(pa.compute.equal(b.column("status"), "error"))
    ids = sorted(err.column("id").to_pylist())
    assert ids == sorted(f"a.parquet:{i}" if i < 24 else f"b.parquet:{i - 24}" for i in BAD)
    assert all(e for e in err.column("error").to_pylist())
    assert err.column("cam").null_count == err.num_rows and err.column("class_index").null_count == err.num_rows
    a = _read(single)
    a_err = a.filter(pa.compute.equal(a.column("status"), "error"))
    assert a_err.column("error").to_pylist() == err.column("error").to_pylist()


def test_manifest_commits_and_staging_cleanup(resumed):
    out, summary, first, logs = resumed
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete"
    assert m["totals"] == {"rows_in": 40, "images_ok": 37, "errors": 3, "rows_out": 77, "files": len(m["files"])}
    listed = sorted(f["name"] for f in m["files"])
    assert listed == sorted(Path(p).name for p in _parts(out))
    assert not list(out.glob(".ray-staging-*")) and summary["removed_partial_files"] == [".ray-staging-00000"]
    assert sorted(m["completed_units"]) == sorted({u for f in m["files"] for u in f["units"]})
    assert len(logs) == summary["groups"] == 1 and f"{summary['images']} images" in logs[0]


def test_schema_is_arrow_fixed_shape_tensor(resumed):
    out = resumed[0]
    for path in _parts(out):
        schema = pq.read_schema(path)
        for name, dtype in (("cam", pa.float16()), ("heatmap", pa.uint8())):
            typ = schema.field(name).type
            assert isinstance(typ, pa.FixedShapeTensorType), (name, typ)
            assert typ.extension_name == "arrow.fixed_shape_tensor" and typ.value_type == dtype
        assert tuple(schema.field("heatmap").type.shape) == (48, 48)


def test_reads_back_with_pyarrow_duckdb_polars(resumed):
    duckdb = pytest.importorskip("duckdb")
    pl = pytest.importorskip("polars")
    out = resumed[0]
    files = _parts(out)
    t = _read(out)
    ok = t.filter(pa.compute.equal(t.column("status"), "ok"))
    heat = ok.column("heatmap").combine_chunks().to_numpy_ndarray()
    assert heat.shape == (ok.num_rows, 48, 48) and heat.dtype == np.uint8
    h, w = pq.read_schema(files[0]).field("heatmap").type.shape

    rows = (
        duckdb.connect()
        .execute(
            "SELECT id, class_rank, heatmap FROM read_parquet(?) WHERE status = 'ok' ORDER BY id, class_rank", [files]
        )
        .fetchall()
    )
    assert [r[0] for r in rows] == ok.column("id").to_pylist()
    duck = np.array([r[2] for r in rows], dtype=np.uint8).reshape(-1, h, w)
    np.testing.assert_array_equal(duck, heat)

    df = pl.read_parquet(files).filter(pl.col("status") == "ok").sort(["id", "class_rank"])
    polar = np.asarray(df["heatmap"].to_numpy(), dtype=np.uint8).reshape(-1, h, w)
    np.testing.assert_array_equal(polar, heat)
    assert df["id"].to_list() == ok.column("id").to_pylist()


def test_rerun_of_a_complete_output_explains_nothing(dataset, resumed):
    out = resumed[0]
    before = {p: Path(p).stat().st_mtime_ns for p in _parts(out)}
    summary = run_ray(_config(dataset, out), RayOptions(workers=1))
    assert summary["images"] == 0 and summary["groups"] == 0
    assert summary["totals"]["rows_out"] == 77
    assert {p: Path(p).stat().st_mtime_ns for p in _parts(out)} == before


def test_setup_errors_are_one_line(cluster, dataset, tmp_path):
    with pytest.raises(RunSetupError, match="GPUs"):
        run_ray(_config(dataset, tmp_path / "o"), RayOptions(num_gpus_per_worker=1))
    with pytest.raises(RunSetupError, match="workers"):
        run_ray(_config(dataset, tmp_path / "o"), RayOptions(workers=0))
    with pytest.raises(RunSetupError, match="no-such-column"):
        run_ray(_config(dataset, tmp_path / "o", id_column="no-such-column"), RayOptions(workers=1))
    assert not (tmp_path / "o").exists()


def test_cli_ray_dispatch(cluster, dataset, resumed):
    from click.testing import CliRunner

    from gradcam_batch.cli import cli

    out = resumed[0]
    args = ["run", str(dataset), "-o", str(out), "--model", demo_assets.MODEL_SPEC, "--weights",
            str(demo_assets.CHECKPOINT), "--top-k", "2", "--label-column", "label",
            "--keep-columns", "class_name,path", "--image-column", "image",
            "--batch-size", "8", "--rows-per-file", str(ROWS_PER_FILE), "--resize", "48", "--crop", "48",
            "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5"]  # fmt: skip
    res = CliRunner().invoke(cli, [*args, "--ray", "--workers", "1"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "on ray (1 x CPU)" in res.output and "77 rows" in res.output
    res = CliRunner().invoke(cli, [*args, "--ray", "--num-gpus-per-worker", "1"], catch_exceptions=False)
    assert res.exit_code != 0 and "GPUs" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, [*args, "--ray-address", "auto"], catch_exceptions=False)
    assert res.exit_code == 2 and "--ray" in res.output


def test_row_hash_inverse_matches_ray():
    from ray.data._internal.datasource_v2.common.synthesized_columns import _compute_row_hashes

    for path, start, n in (("/data/a.parquet", 0, 50), ("bucket/x/part-0.parquet", 123_456, 7), ("ü/é.parquet", 5, 1)):
        hashes = _compute_row_hashes(path, start, n)
        np.testing.assert_array_equal(_row_positions(hashes, path), np.arange(start, start + n, dtype=np.uint64))
    # Another path's seed gives positions far outside any file: the range check catches it.
    assert (_row_positions(_compute_row_hashes("/a", 0, 5), "/b") > np.uint64(1 << 40)).all()


def test_actor_errors_become_one_line():
    remote = (
        'Traceback (most recent call last):\n  File "x.py", line 1, in f\n    g()\n'
        "ray.exceptions.RayTaskError(RunSetupError): ray::MapWorker.__init__()\n"
        "gradcam_batch.engine.pipeline.RunSetupError: device 'cuda' asked for, but CUDA is not available here"
    )
    inner = RuntimeError(remote)
    outer = RuntimeError("SystemException")
    outer.__cause__ = inner
    assert _first_line(outer) == "device 'cuda' asked for, but CUDA is not available here"
    assert _first_line(RuntimeError("Traceback:\n  ...\nValueError: bad value")) == "ValueError: bad value"
    assert _first_line(KeyError("k")) == "'k'"


def test_ray_is_optional(tmp_path):
    """Without Ray: the package, the CLI and the single-machine run import; --ray says what to install."""
    code = textwrap.dedent(
        """
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "ray" or name.startswith("ray."):
                    raise ImportError("no ray here")

        sys.meta_path.insert(0, Block())
        import gradcam_batch, gradcam_batch.cli, gradcam_batch.engine.pipeline
        from gradcam_batch.engine.ray_job import RayNotInstalled, RunConfig, run_ray
        try:
            run_ray(RunConfig(inputs=["x"], output="y", model="m"))
        except RayNotInstalled as exc:
            print("ERR", exc)
        assert "ray" not in sys.modules
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "pip install 'gradcam-batch[ray]'" in res.stdout


@pytest.mark.slow
def test_fresh_run_with_id_column_matches(cluster, dataset, tmp_path):
    """No resume, ids from a column: the row hash is not read at all."""
    ref = tmp_path / "ref"
    run_job(_config(dataset, ref, id_column="image_id", label_column=None, top_k=3))
    out = tmp_path / "ray"
    summary = run_ray(
        _config(dataset, out, id_column="image_id", label_column=None, top_k=3),
        RayOptions(workers=2, num_cpus_per_worker=0.5),
    )
    assert summary["images"] == 40 and summary["errors"] == 3
    a, b = _read(ref), _read(out)
    assert a.schema == b.schema
    for name in ("id", "class_index", "class_rank", "status", "error"):
        assert a.column(name).equals(b.column(name)), name
    np.testing.assert_allclose(_tensor(b.column("cam")), _tensor(a.column("cam")), atol=1e-5, equal_nan=True)


@pytest.mark.slow
def test_explain_dataset_on_a_users_dataset(cluster, dataset, single):
    ds = ray.data.read_parquet(str(dataset), include_paths=True, include_row_hash=True)
    cfg = _config(dataset, Path("unused"), keep_columns=["class_name"])
    with pytest.raises(ValueError, match="'path'"):
        explain_dataset(ds, cfg, keep_columns=["path"])
    with pytest.raises(ValueError, match="model"):
        explain_dataset(ds)
    got = _sorted(pa.concat_tables(ray.get(explain_dataset(ds, cfg, workers=1).to_arrow_refs())))
    ref = _read(single).drop_columns(["path"])
    assert got.schema == ref.schema
    # Ids carry the file path that Ray read, not the key relative to the inputs.
    assert [i.rsplit("/", 1)[1] for i in got.column("id").to_pylist()] == ref.column("id").to_pylist()
    for name in ("class_index", "class_rank", "label", "status", "error"):
        assert got.column(name).equals(ref.column(name)), name
    np.testing.assert_allclose(_tensor(got.column("cam")), _tensor(ref.column("cam")), atol=1e-5, equal_nan=True)


@pytest.mark.slow
def test_a_failing_actor_stops_the_run_with_one_line(cluster, dataset, tmp_path):
    """The model loads on the driver (the probe) but raises in the actor: one line, no hang, nothing committed."""
    import os

    factory = tmp_path / "failing_model.py"
    factory.write_text(
        "import os\nfrom gradcam_batch.engine.synthetic import ShapesCNN\n\n"
        f"def make():\n    if os.getpid() != {os.getpid()}:\n        raise ValueError('boom in the actor')\n"
        "    return ShapesCNN()\n"
    )
    out = tmp_path / "out"
    cfg = _config(dataset, out, model=f"{factory}:make", weights=None)
    with pytest.raises(RuntimeError) as info:
        run_ray(cfg, RayOptions(workers=1))
    assert "boom in the actor" in str(info.value) and "\n" not in str(info.value)
    assert not list(out.glob("part-*.parquet"))
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
