"""The sink and the output schema: row building, HeatmapWriter files, manifest commits and the lock."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gradcam_batch.engine.job.config import OutputBusy
from gradcam_batch.engine.job.outdir import clean_uncommitted, survey
from gradcam_batch.engine.job.schema import ResultBatch, build_table, output_schema
from gradcam_batch.engine.job.sink import (
    COMMIT_LOG,
    HeatmapWriter,
    Manifest,
    OutputLock,
    WriteItem,
    next_part_index,
)


def _schema(heat=(4, 6), dtype="uint8", label=True):
    return output_schema(
        id_type=pa.string(),
        passthrough=[pa.field("path", pa.string())],
        label_type=pa.int64() if label else None,
        cam_shape=(2, 3),
        heatmap_shape=heat,
        heatmap_dtype=dtype,
    )


def _batch(ok, classes, scores, keep=None, heat=(4, 6), seed=0, prefix="r", cam_max=None):
    rng = np.random.default_rng(seed)
    ok = np.asarray(ok, bool)
    n = len(ok)
    classes = np.asarray(classes, np.int64)
    m, c = classes.shape
    return ResultBatch(
        rows=pa.table(
            {
                "id": [f"{prefix}{i}" for i in range(n)],
                "path": [f"p{i}" for i in range(n)],
                "label": pa.array([i % 3 for i in range(n)], pa.int64()),
            }
        ),
        ok=ok,
        errors=[None if o else f"bad {i}" for i, o in enumerate(ok)],
        keep=np.ones((m, c), bool) if keep is None else np.asarray(keep, bool),
        notes=[None] * m,
        values=_values(rng, classes, scores, heat, cam_max),
    )


def _values(rng, classes, scores, heat, cam_max) -> dict:
    m, c = classes.shape
    cam_max = rng.random((m, c)).astype(np.float32) + 0.1 if cam_max is None else np.asarray(cam_max, np.float32)
    peaks = rng.integers(0, 4, (m, c, 2))
    peaks[cam_max <= 0] = -1  # the batch step's "no peak"
    return {
        "class_index": classes,
        "score": np.asarray(scores, np.float32),
        "probability": np.full((m, c), 0.25, np.float32),
        "entropy": np.full((m, c), 1.5, np.float32),
        "cam": rng.random((m, c, 2, 3)).astype(np.float16),
        "heatmap": None if heat is None else rng.integers(0, 256, (m, c, *heat)).astype(np.uint8),
        "peak_y": peaks[..., 0],
        "peak_x": peaks[..., 1],
        "cam_max": cam_max,
    }


def _item(batch: ResultBatch, unit_key: str | None, schema=None) -> WriteItem:
    table, _ = build_table(batch, schema or _schema())
    return WriteItem(table, batch.num_images, int((~batch.ok).sum()), unit_key)


def test_schema_names_and_types():
    s = _schema()
    assert s.names == [
        "id",
        "path",
        "class_index",
        "class_rank",
        "label",
        "score",
        "probability",
        "entropy",
        "cam",
        "heatmap",
        "peak_y",
        "peak_x",
        "cam_max",
        "status",
        "error",
    ]
    assert s.field("cam").type == pa.fixed_shape_tensor(pa.float16(), [2, 3])
    assert s.field("heatmap").type == pa.fixed_shape_tensor(pa.uint8(), [4, 6])
    assert _schema(dtype="float16").field("heatmap").type.value_type == pa.float16()
    no_heat = _schema(heat=None, label=False)
    assert "heatmap" not in no_heat.names and "label" not in no_heat.names


def test_build_table_orders_rows_ranks_and_errors():
    # Three images, the middle one failed to decode; two slots each, the second image's slot 1 dropped.
    batch = _batch(ok=[1, 0, 1], classes=[[3, 1], [0, 2]], scores=[[0.5, 2.0], [1.0, 9.0]], keep=[[1, 1], [1, 0]])
    t, source = build_table(batch, _schema())
    assert source.tolist() == [0, 0, 1, 2]
    assert t["id"].to_pylist() == ["r0", "r0", "r1", "r2"]
    assert t["path"].to_pylist() == ["p0", "p0", "p1", "p2"]
    assert t["class_index"].to_pylist() == [1, 3, None, 0]  # rank order: higher score first
    assert t["class_rank"].to_pylist() == [0, 1, None, 0]
    assert t["score"].to_pylist() == [2.0, 0.5, None, 1.0]
    assert t["status"].to_pylist() == ["ok", "ok", "error", "ok"]
    assert t["error"].to_pylist() == [None, None, "bad 1", None]
    assert t["heatmap"].null_count == 1 and t["cam"].null_count == 1 and t["peak_y"].null_count == 1
    # The heatmap of output row 0 is slot 1 of image 0.
    storage = t["heatmap"].combine_chunks().storage
    np.testing.assert_array_equal(np.asarray(storage[0].values).reshape(4, 6), batch.values["heatmap"][0, 1])
    np.testing.assert_array_equal(np.asarray(storage[3].values).reshape(4, 6), batch.values["heatmap"][1, 0])
    cams = t["cam"].combine_chunks().storage
    np.testing.assert_array_equal(np.asarray(cams[1].values).reshape(2, 3), batch.values["cam"][0, 0])
    assert t["peak_x"].to_pylist()[3] == batch.values["peak_x"][1, 0]


def test_build_table_all_errors():
    batch = _batch(ok=[0, 0], classes=np.zeros((0, 2)), scores=np.zeros((0, 2)))
    t, _ = build_table(batch, _schema())
    assert t.num_rows == 2 and t["status"].to_pylist() == ["error", "error"]
    assert t["class_index"].null_count == 2


def test_writer_splits_files_at_unit_boundaries_and_commits(tmp_path):
    schema = _schema()
    man = Manifest.new(tmp_path, fingerprint="f", config={}, versions={})
    man.save()
    commits = []
    w = HeatmapWriter(tmp_path, schema, man, rows_per_file=5, queue_depth=2, on_commit=commits.append)
    # Unit a: 2 batches of 2 images x 2 classes (8 rows); unit b: 1 batch; unit c: 1 batch.
    w.put(_item(_batch([1, 1], [[0, 1], [1, 2]], [[1, 0], [1, 0]], prefix="a"), None))
    w.put(_item(_batch([1, 1], [[0, 1], [1, 2]], [[1, 0], [1, 0]], prefix="a2"), "a"))
    w.put(_item(_batch([1], [[0, 1]], [[1, 0]], prefix="b"), "b"))
    w.put(_item(_batch([0, 1], [[0, 1]], [[1, 0]], prefix="c"), "c"))
    w.close()
    assert commits == ["part-00000.parquet", "part-00001.parquet"]
    assert not list(tmp_path.glob("*.tmp"))
    # The commits are in the log; a reload folds them in, and save() compacts them into manifest.json.
    loaded = Manifest.load(tmp_path)
    assert [f["units"] for f in loaded.files] == [["a"], ["b", "c"]]
    assert loaded.completed_units() == {"a", "b", "c"}
    assert loaded.data["totals"] == {"rows_in": 7, "images_ok": 6, "errors": 1, "rows_out": 13, "files": 2}
    loaded.save()
    saved = json.loads((tmp_path / "manifest.json").read_text())
    assert [f["units"] for f in saved["files"]] == [["a"], ["b", "c"]]
    assert saved["totals"] == {"rows_in": 7, "images_ok": 6, "errors": 1, "rows_out": 13, "files": 2}
    assert (tmp_path / COMMIT_LOG).read_bytes() == b""
    t0 = pq.read_table(tmp_path / "part-00000.parquet")
    assert t0.num_rows == 8 and t0.schema.field("heatmap").type == schema.field("heatmap").type
    md = pq.ParquetFile(tmp_path / "part-00000.parquet").metadata
    assert md.row_group(0).column(0).compression == "ZSTD"
    assert next_part_index(Manifest.load(tmp_path)) == 2


def test_writer_abort_leaves_no_partial_file(tmp_path):
    man = Manifest.new(tmp_path, fingerprint="f", config={}, versions={})
    w = HeatmapWriter(tmp_path, _schema(), man, rows_per_file=100)
    w.put(_item(_batch([1], [[0, 1]], [[1, 0]]), "a"))
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_writer_error_surfaces_in_the_producer(tmp_path):
    man = Manifest.new(tmp_path, fingerprint="f", config={}, versions={})
    w = HeatmapWriter(tmp_path, _schema(heat=(5, 5)), man, rows_per_file=100)  # heatmaps are 4x6: mismatch
    w.put(_item(_batch([1], [[0, 1]], [[1, 0]]), "a"))
    with pytest.raises(RuntimeError, match="Parquet writer failed"):
        w.close()
    assert not list(tmp_path.glob("*.tmp"))


def test_clean_uncommitted(tmp_path):
    man = Manifest.new(tmp_path, fingerprint="f", config={}, versions={})
    man.save()
    man.note_open("part-00000.parquet")
    (tmp_path / "part-00000.parquet").write_bytes(b"x")
    man.commit_file("part-00000.parquet", rows=1, images=1, errors=0, units=["u"])
    man.note_open("part-00001.parquet")
    (tmp_path / "part-00001.parquet").write_bytes(b"uncommitted")
    man.note_open("part-00002.parquet")
    (tmp_path / ".part-00002.parquet.tmp").write_bytes(b"partial")
    (tmp_path / "user-notes.txt").write_text("not ours")
    # A part file that no line of the log names is someone else's: nothing is deleted, and it is named.
    (tmp_path / "part-00007.parquet").write_bytes(b"theirs")
    with pytest.raises(ValueError, match="holds part-00007.parquet, which the run there did not write"):
        clean_uncommitted(tmp_path)
    assert (tmp_path / "part-00001.parquet").exists() and (tmp_path / ".part-00002.parquet.tmp").exists()
    (tmp_path / "part-00007.parquet").unlink()
    _, removed = clean_uncommitted(tmp_path)
    assert sorted(removed) == [".part-00002.parquet.tmp", "part-00001.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        COMMIT_LOG,
        "manifest.json",
        "part-00000.parquet",
        "user-notes.txt",
    ]
    (tmp_path / "part-00000.parquet").unlink()
    with pytest.raises(ValueError, match="lists part-00000.parquet, which is missing"):
        clean_uncommitted(tmp_path)


def test_survey_attributes_the_lock_and_the_manifest_temp_by_content(tmp_path):
    (tmp_path / ".lock").write_text("1234 host\n")
    (tmp_path / ".manifest.json.tmp").write_text('{\n  "format": "gradcam-batch/2",\n  "sta')
    s = survey(tmp_path)
    assert s.is_empty and sorted(s.own) == [".lock", ".manifest.json.tmp"] and s.foreign == []
    (tmp_path / ".lock").write_text("my own lock notes")
    (tmp_path / ".manifest.json.tmp").write_text("my notes")
    s = survey(tmp_path)
    assert not s.is_empty and s.own == [] and s.foreign == [".lock", ".manifest.json.tmp"]


def test_class_rank_is_wide_and_empty_maps_have_no_peak():
    # 150 classes explained per image: ranks past 127 (an int8 would overflow).
    c = 150
    classes = np.arange(c)[None, :]
    scores = -np.arange(c, dtype=np.float32)[None, :]
    cam_max = np.ones((1, c), np.float32)
    cam_max[0, 5] = 0.0  # an all-zero map
    t, _ = build_table(_batch([1], classes, scores, cam_max=cam_max, heat=None), _schema(heat=None))
    assert t.schema.field("class_rank").type == pa.int32()
    assert t["class_rank"].to_pylist() == list(range(c))
    assert t["peak_y"][5].as_py() is None and t["peak_x"][5].as_py() is None
    assert t["peak_y"].null_count == 1 and t["cam_max"][5].as_py() == 0.0


def test_commit_log_is_append_only_and_survives_a_torn_line(tmp_path):
    man = Manifest.new(tmp_path, fingerprint="f", config={"x": "y" * 1000}, versions={})
    man.save()
    size0 = man.bytes_written
    for i in range(3):
        (tmp_path / f"part-{i:05d}.parquet").write_bytes(b"x")
        man.commit_file(f"part-{i:05d}.parquet", rows=2, images=1, errors=0, units=[f"u{i}"])
    # Each commit appended one short line; manifest.json was not rewritten.
    per_commit = (man.bytes_written - size0) / 3
    assert per_commit < 200 and json.loads((tmp_path / "manifest.json").read_text())["files"] == []
    with open(tmp_path / COMMIT_LOG, "ab") as fh:  # a crash in the middle of a fourth append
        fh.write(b'{"seq":4,"name":"part-00003.parq')
    loaded = Manifest.load(tmp_path)
    assert [f["name"] for f in loaded.files] == [f"part-{i:05d}.parquet" for i in range(3)]
    assert loaded.data["totals"]["rows_out"] == 6


def test_save_then_crash_before_truncating_folds_nothing_twice(tmp_path):
    man = Manifest.new(tmp_path, fingerprint="f", config={}, versions={})
    man.save()
    man.commit_file("part-00000.parquet", rows=1, images=1, errors=0, units=["a"])
    log = (tmp_path / COMMIT_LOG).read_bytes()
    man.save()  # folds the commit into manifest.json and empties the log...
    (tmp_path / COMMIT_LOG).write_bytes(log)  # ...as if the process died before the truncation
    loaded = Manifest.load(tmp_path)
    assert [f["units"] for f in loaded.files] == [["a"]]


def test_each_commit_line_keeps_its_files_tally_and_a_reload_folds_it_in(tmp_path):
    man = Manifest.new(tmp_path, fingerprint="f", config={}, versions={})
    man.save()
    w = HeatmapWriter(tmp_path, _schema(), man, rows_per_file=5, tally=lambda t: {"rows.sum": t.num_rows, "x": 0.5})
    w.put(_item(_batch([1, 1], [[0, 1], [1, 2]], [[1, 0], [1, 0]], prefix="a"), None))
    w.put(_item(_batch([1, 1], [[0, 1], [1, 2]], [[1, 0], [1, 0]], prefix="a2"), "a"))
    w.put(_item(_batch([1], [[0, 1]], [[1, 0]], prefix="b"), "b"))
    w.close()
    lines = [json.loads(x) for x in (tmp_path / COMMIT_LOG).read_text().splitlines() if '"seq"' in x]
    assert [e["tally"] for e in lines] == [{"rows.sum": 8, "x": 1.0}, {"rows.sum": 2, "x": 0.5}]
    with open(tmp_path / COMMIT_LOG, "a") as fh:  # a line whose tally is not numbers is no commit
        fh.write(json.dumps({"seq": 3, "name": "part-00002.parquet", "rows": 1, "images": 1, "errors": 0,
                             "units": ["c"], "tally": {"x": "y"}}) + "\n")  # fmt: skip
    loaded = Manifest.load(tmp_path)
    assert [f["tally"] for f in loaded.files] == [{"rows.sum": 8, "x": 1.0}, {"rows.sum": 2, "x": 0.5}]
    loaded.save()
    assert [f["tally"] for f in json.loads((tmp_path / "manifest.json").read_text())["files"]][1] == {
        "rows.sum": 2,
        "x": 0.5,
    }


def test_format_2_manifests_still_load(tmp_path):
    (tmp_path / "manifest.json").write_text(
        json.dumps(
            {
                "format": "gradcam-batch/2",
                "status": "complete",
                "fingerprint": "f",
                "files": [{"name": "part-00000.parquet", "rows": 2, "images": 1, "errors": 0, "units": ["u"]}],
            }
        )
    )
    loaded = Manifest.load(tmp_path)
    assert loaded.completed_units() == {"u"} and "tally" not in loaded.files[0]


def test_format_1_manifests_still_load(tmp_path):
    (tmp_path / "manifest.json").write_text(
        json.dumps(
            {
                "format": "gradcam-batch/1",
                "status": "complete",
                "fingerprint": "f",
                "files": [{"name": "part-00000.parquet", "rows": 2, "images": 1, "errors": 0, "units": ["u"]}],
                "completed_units": ["u"],
            }
        )
    )
    loaded = Manifest.load(tmp_path)
    assert loaded.completed_units() == {"u"} and loaded.data["totals"]["files"] == 1


def test_output_lock_is_exclusive_and_names_the_holder(tmp_path):
    import os
    import socket

    with OutputLock(tmp_path):
        with pytest.raises(OutputBusy) as err:
            OutputLock(tmp_path).acquire()  # flock locks are per open file: a second open conflicts
        assert f"pid {os.getpid()} on {socket.gethostname()}" in str(err.value)
        assert str(tmp_path) in str(err.value) and "in use by another gradcam-batch run" in str(err.value)
    with OutputLock(tmp_path):  # released: free again
        pass
