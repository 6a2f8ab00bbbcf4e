"""The output session both runners share: the summary added up at commit time, older runs refused in one line."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from run_support import base_args, bytes_table, invoke, model_file, read_output, write_table

from gradcam_batch.engine.job.config import RunConfig
from gradcam_batch.engine.job.local import prepare
from gradcam_batch.engine.job.plan import fingerprint
from gradcam_batch.engine.job.sink import FORMAT


def _boxed_table(n: int) -> pa.Table:
    t = bytes_table(n)
    x0 = [None if i == 1 else 4 for i in range(n)]  # one image without a box
    x1 = [2 if i == 2 else 20 for i in range(n)]  # one malformed box: x1 < x0
    return t.append_column("x0", pa.array(x0, pa.int64())).append_column("y0", pa.array([4] * n, pa.int64())) \
        .append_column("x1", pa.array(x1, pa.int64())).append_column("y1", pa.array([20] * n, pa.int64()))  # fmt: skip


def test_the_summary_is_added_up_at_commit_and_no_part_file_is_read_back(tmp_path, monkeypatch):
    inp = write_table(tmp_path / "in.parquet", _boxed_table(12), row_group_size=4)
    out = tmp_path / "out"
    cfg = RunConfig(inputs=[str(inp)], output=str(out), model=f"{model_file(tmp_path)}:make", resize=32, crop=32,
                    batch_size=4, top_k=2, rows_per_file=8, metrics=("deletion", "confidence"), metrics_steps=2,
                    box_column="x0,y0,x1,y1", method="gradcam,layercam")  # fmt: skip
    job = prepare(cfg)
    real_read, real_file = pq.read_table, pq.ParquetFile

    def no_output(path):
        if str(out) in str(path):
            raise AssertionError(f"the run read {path} back")

    monkeypatch.setattr(pq, "read_table", lambda path, *a, **k: no_output(path) or real_read(path, *a, **k))
    monkeypatch.setattr(pq, "ParquetFile", lambda path, *a, **k: no_output(path) or real_file(path, *a, **k))
    summary = job.run()
    monkeypatch.undo()
    man = json.loads((out / "manifest.json").read_text())
    assert man["format"] == FORMAT and man["units_total"] == summary["units_total"] == 3 and len(man["files"]) == 3
    assert all("deletion_auc.sum" in f["tally"] and "box_iou.rows" in f["tally"] for f in man["files"])
    t = read_output(out)
    ok = t.filter(pa.compute.equal(t["status"], "ok"))
    for key, col in (("deletion_auc", "deletion_auc"), ("average_drop", "confidence_drop")):
        values = ok[col].to_numpy(zero_copy_only=False).astype(float)
        assert man["metric_means"][key] == pytest.approx(np.nanmean(values), abs=1e-4), key
    hits = ok["pointing_hit"].drop_null().to_numpy(zero_copy_only=False)
    assert man["metric_means"]["pointing_accuracy"] == pytest.approx(hits.mean(), abs=1e-4)
    assert man["metric_means"]["rows"]["pointing_accuracy"] == len(hits) == 2 * 2 * 10  # 10 images with a box
    iou = ok["box_iou"].drop_null().to_numpy(zero_copy_only=False)
    assert man["metric_means"]["localization_accuracy"] == pytest.approx((iou >= 0.5).mean(), abs=1e-4)
    assert man["malformed_boxes"] == summary["malformed_boxes"] == 1
    assert summary["metric_means"] == man["metric_means"]


def _older(out) -> None:
    """``out`` as the previous version left it: manifest format 2, no tallies."""
    man = json.loads((out / "manifest.json").read_text())
    man["format"] = "gradcam-batch/2"
    for f in man["files"]:
        f.pop("tally", None)
    man.pop("units_total", None)
    (out / "manifest.json").write_text(json.dumps(man))


@pytest.mark.parametrize("status", ["complete", "running"])
def test_a_run_of_the_previous_format_is_refused_with_one_line(tmp_path, status):
    inp = write_table(tmp_path / "in.parquet", bytes_table(6), row_group_size=3)
    out = tmp_path / "out"
    args = ["run", str(inp), *base_args(tmp_path, out)]
    assert invoke(args).exit_code == 0
    _older(out)
    if status == "running":
        man = json.loads((out / "manifest.json").read_text())
        man["status"] = "running"
        (out / man["files"].pop()["name"]).unlink()
        (out / "manifest.json").write_text(json.dumps(man))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    res = invoke(args)
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert "gradcam-batch/2" in lines[0] and "does not resume" in lines[0] and "--overwrite" in lines[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    res = invoke([*args, "--overwrite"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "manifest.json").read_text())["format"] == FORMAT


def test_the_entropy_column_gives_the_runs_of_the_previous_schema_another_fingerprint(tmp_path):
    inp = write_table(tmp_path / "in.parquet", bytes_table(4))
    cfg = RunConfig(inputs=[str(inp)], output=str(tmp_path / "out"), model=f"{model_file(tmp_path)}:make", resize=32,
                    crop=32, batch_size=4)  # fmt: skip
    plan = prepare(cfg).plan
    older = plan.schema.remove(plan.schema.get_field_index("entropy"))
    assert fingerprint(dataclasses.replace(plan, sink=dataclasses.replace(plan.sink, schema=older))) != plan.fingerprint


def test_the_runners_reexport_no_config_types_and_the_former_ray_module_is_gone():
    import importlib.util

    from gradcam_batch.engine.job import config, local, ray_runner

    assert importlib.util.find_spec("gradcam_batch.engine.ray_job") is None
    for runner in (local, ray_runner):
        assert not set(runner.__all__) & set(config.__all__), runner.__name__
    assert "execute" not in vars(ray_runner) or ray_runner.execute.__module__.endswith(".session")
