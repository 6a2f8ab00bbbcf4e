"""The Ray Data runner (``engine/job/ray_runner.py``, ``run --ray``) against the local runner.

One local Ray (``ray.init(num_cpus=2)``) for the module. In the default run: a resume by Ray of a
local run "killed" after its first committed file (a partly done file, a whole file, bad images,
the label slot with top-k), one parity run with counterfactual maps and no heatmaps, the
option-by-option check that the actors see the driver's plan, and the cheap failure paths. The
ONNX, ViT and user-Dataset runs, and the two-node cluster (``tests/test_ray_cluster.py``), are slow.
"""

from __future__ import annotations

import dataclasses
import io
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

from gradcam_batch.engine.demo import assets as demo_assets  # noqa: E402
from gradcam_batch.engine.job.config import (  # noqa: E402
    OutputBusy,
    RunConfig,  # noqa: E402
    RunFailed,
)
from gradcam_batch.engine.job.local import run_job  # noqa: E402
from gradcam_batch.engine.job.plan import build_plan  # noqa: E402
from gradcam_batch.engine.job.ray_runner import (  # noqa: E402
    RayOptions,
    RunSetupError,
    _error_line,
    check_schedulable,
    explain_dataset,
    run_ray,
)
from gradcam_batch.engine.job.sink import OutputLock  # noqa: E402

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


def _tensor(col: pa.ChunkedArray) -> np.ndarray:
    """A fixed_shape_tensor column as (n, H, W) float64, NaN for null rows (error rows)."""
    arr = col.combine_chunks()
    shape = tuple(arr.type.shape)
    flat = arr.storage.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    out = np.full((len(arr), *shape), np.nan)
    valid = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False))
    out[valid] = flat.reshape(-1, *shape)
    return out


def assert_same_rows(a: pa.Table, b: pa.Table) -> None:
    """Same rows and columns; floats within 1e-5 (another batch composition rounds differently)."""
    assert a.schema == b.schema
    for name in a.column_names:
        if name in ("peak_y", "peak_x") and "heatmap" in a.column_names:
            # Near-ties in a flat map may put the first maximum elsewhere: the peak found by one
            # runner must be a maximum (within rounding) of the other's heatmap.
            ha = _tensor(a.column("heatmap"))
            yb, xb = (b.column(c).to_numpy(zero_copy_only=False) for c in ("peak_y", "peak_x"))
            ok = ~np.isnan(yb.astype(float))
            assert np.array_equal(ok, ~np.isnan(a.column(name).to_numpy(zero_copy_only=False).astype(float))), name
            rows = np.flatnonzero(ok)
            at = ha[rows, yb[ok].astype(int), xb[ok].astype(int)]
            np.testing.assert_allclose(at, np.nanmax(ha[rows].reshape(len(rows), -1), axis=1), atol=2, err_msg=name)
        elif name in ("cam", "heatmap"):
            np.testing.assert_allclose(_tensor(b.column(name)), _tensor(a.column(name)), atol=2e-3, equal_nan=True)
        elif pa.types.is_floating(a.schema.field(name).type):  # score, probability, entropy, cam_max, ...
            x = a.column(name).to_numpy(zero_copy_only=False).astype(float)
            y = b.column(name).to_numpy(zero_copy_only=False).astype(float)
            np.testing.assert_allclose(y, x, atol=1e-5, equal_nan=True)
        else:
            assert a.column(name).equals(b.column(name)), name


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
    # A column named "path" (which Ray's include_paths would overwrite) passes through untouched.
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
    """A local run cut back to its first committed file, then finished with Ray."""
    out = tmp_path_factory.mktemp("resumed") / "out"
    run_job(_config(dataset, out))
    manifest = json.loads((out / "manifest.json").read_text())
    first = manifest["files"][0]
    for f in manifest["files"][1:]:
        (out / f["name"]).unlink()
    manifest["files"] = [first]
    manifest["status"] = "running"
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / ".part-00001.parquet.tmp").write_bytes(b"partial")  # a killed run's leftovers...
    (out / "commits.jsonl").write_text('{"open":"part-00001.parquet"}\n')  # ...named in its log: the run's
    summary = run_ray(_config(dataset, out), RayOptions(workers=1))
    return out, summary, first


def test_resume_with_ray_gives_the_local_rows(single, resumed):
    out, summary, first = resumed
    assert summary["resumed_units"] == len(first["units"]) and summary["images"] == 40 - first["images"]
    assert summary["removed_partial_files"] == [".part-00001.parquet.tmp"]
    assert_same_rows(_read(single), _read(out))
    assert not list(out.glob("*.tmp"))


def test_bad_images_are_error_rows(single, resumed):
    t = _read(resumed[0])
    errors = t.filter(pa.compute.equal(t.column("status"), "error"))
    assert sorted(errors.column("id").to_pylist()) == sorted(
        f"{'a' if i < 24 else 'b'}.parquet:{i if i < 24 else i - 24}" for i in BAD
    )
    assert errors.column("cam").null_count == 3


def test_manifest_after_a_ray_resume(resumed):
    out, summary, _ = resumed
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["versions"]["runner"] == "ray (1 x CPU)"
    units = [u for f in m["files"] for u in f["units"]]
    assert (
        len(units) == len(set(units))
        and sum(int(u.split("-")[1]) - int(u.split(":")[1].split("-")[0]) for u in units) == 40
    )
    assert m["totals"] == summary["totals"] and m["totals"]["rows_in"] == 40 and m["totals"]["errors"] == 3
    assert (out / "commits.jsonl").read_bytes() == b""  # folded into manifest.json at the end


def test_schema_and_read_back(resumed):
    duckdb = pytest.importorskip("duckdb")
    pl = pytest.importorskip("polars")
    out = resumed[0]
    t = _read(out)
    for name, dtype in (("cam", pa.float16()), ("heatmap", pa.uint8())):
        assert isinstance(t.schema.field(name).type, pa.FixedShapeTensorType)
        assert t.schema.field(name).type.value_type == dtype
    glob = str(out / "part-*.parquet")
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{glob}')").fetchall()[0][0] == t.num_rows
    assert pl.read_parquet(glob).height == t.num_rows


def test_rerun_of_a_complete_output_explains_nothing(dataset, resumed):
    out = resumed[0]
    before = {p: Path(p).stat().st_mtime_ns for p in _parts(out)}
    summary = run_ray(_config(dataset, out), RayOptions(workers=1))
    assert summary["images"] == 0 and summary["totals"]["rows_in"] == 40
    assert {p: Path(p).stat().st_mtime_ns for p in _parts(out)} == before


def test_counterfactual_without_heatmaps_matches_local(cluster, dataset, tmp_path):
    over = {"counterfactual": True, "heatmap_size": None, "label_column": None, "top_k": 3, "keep_columns": ["path"]}
    run_job(_config(dataset, tmp_path / "local", **over))
    run_ray(_config(dataset, tmp_path / "ray", **over), RayOptions(workers=1))
    a, b = _read(tmp_path / "local"), _read(tmp_path / "ray")
    assert "heatmap" not in b.column_names and b.num_rows == 37 * 3 + 3
    assert_same_rows(a, b)


def test_every_option_reaches_the_batch_step(cluster, dataset, tmp_path):
    """Each RunConfig field, set away from its default where a run allows, arrives on an actor as
    sent, and shows in what the actor computes: its output rows equal this process's, and carry the
    options' effects (heatmap size and dtype, the classes, the id column, counterfactual maps)."""
    from gradcam_batch.engine.job.ray_runner import ExplainActor, decode_rows

    cfg = _config(
        dataset,
        tmp_path / "o",
        counterfactual=True,
        method="cam",
        classes=[1, 3],
        top_k=None,
        id_column="image_id",
        heatmap_size=(20, 24),
        heatmap_dtype="float16",
        max_image_pixels=123_456,
        limit=30,
        queue_depth=2,
        rows_per_file=7,
        target_layer="features.14",
        device="cpu",
        extra={"note": "x"},
    )
    plan = build_plan(cfg, device="cpu")
    rows = pq.read_table(next(dataset.glob("a.parquet"))).slice(0, 8)
    decoded = decode_rows(rows, plan=plan, cpus=1)  # no unit: the output rows come untagged

    @ray.remote
    def on_an_actor(plan, decoded):
        actor = ExplainActor(plan, tag_rows=False)
        step = actor.step
        return dataclasses.asdict(step.plan.config), step.plan.fingerprint, step.explainer.method, actor(decoded)

    seen, fingerprint, method, out = ray.get(on_an_actor.remote(plan, decoded))
    sent = dataclasses.asdict(cfg)
    assert seen.keys() == sent.keys() == {f.name for f in dataclasses.fields(RunConfig)}
    for name in sent:
        got = seen[name]
        want = sent[name]
        assert (list(got) if isinstance(got, tuple) else got) == (list(want) if isinstance(want, tuple) else want), name
    assert fingerprint == plan.fingerprint and method == "cam"
    # The effects, in the actor's output.
    here = ExplainActor(plan, tag_rows=False)(decoded)
    assert_same_rows(here, out)
    heat = out.schema.field("heatmap").type
    assert tuple(heat.shape) == (20, 24) and heat.value_type == pa.float16()
    ok = out.filter(pa.compute.equal(out.column("status"), "ok"))
    pairs = list(zip(ok.column("class_index").to_pylist(), ok.column("label").to_pylist(), strict=True))
    assert {c for c, _ in pairs} >= {1, 3} and all(c in (1, 3) or c == label for c, label in pairs)
    assert list(dict.fromkeys(out.column("id").to_pylist())) == rows.column("image_id").to_pylist()
    # Counterfactual: the maps of the negated gradients differ from the plain ones.
    plain = build_plan(dataclasses.replace(cfg, counterfactual=False), device="cpu")
    plain_cams = _tensor(ExplainActor(plain, tag_rows=False)(decoded).column("cam"))
    assert not np.allclose(plain_cams, _tensor(out.column("cam")), equal_nan=True)


def test_setup_errors_are_one_line(cluster, dataset, tmp_path):
    with pytest.raises(RunSetupError, match="GPUs"):
        run_ray(_config(dataset, tmp_path / "o"), RayOptions(num_gpus_per_worker=1))
    with pytest.raises(RunSetupError, match="workers"):
        run_ray(_config(dataset, tmp_path / "o"), RayOptions(workers=0))
    with pytest.raises(RunSetupError, match="no-such-column"):
        run_ray(_config(dataset, tmp_path / "o", id_column="no-such-column"), RayOptions(workers=1))
    # Two actors of one CPU each hold both CPUs: no read task could ever run.
    with pytest.raises(RunSetupError, match="no CPU left for the read tasks"):
        run_ray(_config(dataset, tmp_path / "o"), RayOptions(workers=2))
    assert not (tmp_path / "o").exists()


def test_an_output_changed_after_the_checks_is_a_setup_error(cluster, dataset, tmp_path):
    """The runners share ``execute``: under the lock, the output is checked again, as the plan did."""
    from gradcam_batch.engine.job.ray_runner import prepare_ray

    out = tmp_path / "o"
    job = prepare_ray(_config(dataset, out), RayOptions(workers=1))
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # lands after the plan was checked
    with pytest.raises(RunSetupError, match=r"not empty and holds no gradcam-batch run \(notes.txt\)"):
        job.run()
    assert sorted(p.name for p in out.iterdir()) == [".lock", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"


def test_check_schedulable_names_the_missing_resource():
    two_nodes = [{"CPU": 1.0}, {"CPU": 1.0}]
    with pytest.raises(RunSetupError, match=r"no CPU left for the read tasks.*CPUs left per node: 0, 0"):
        check_schedulable(two_nodes, 2, {"CPU": 1.0}, {"CPU": 1.0})
    check_schedulable([{"CPU": 2.0}, {"CPU": 2.0}], 2, {"CPU": 1.0}, {"CPU": 1.0})  # one read slot left per node
    check_schedulable(two_nodes, 2, {"CPU": 0.5}, {"CPU": 0.5})
    with pytest.raises(RunSetupError, match=r"cannot place 3 actors of 1 CPU, 1 GPU each \(actor 3 does not fit"):
        check_schedulable([{"CPU": 8.0, "GPU": 2.0}], 3, {"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0})


def test_the_lock_holds_against_a_ray_run(cluster, dataset, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    with OutputLock(out), pytest.raises(OutputBusy, match="in use by another gradcam-batch run"):
        run_ray(_config(dataset, out), RayOptions(workers=1))
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


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
    rows = _read(out).num_rows
    assert "on ray (1 x CPU)" in res.output and f"{rows} rows" in res.output
    res = CliRunner().invoke(cli, [*args, "--ray", "--num-gpus-per-worker", "1"], catch_exceptions=False)
    assert res.exit_code == 2 and "GPUs" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, [*args, "--ray", "--workers", "2"], catch_exceptions=False)
    assert res.exit_code == 2 and "no CPU left for the read tasks" in res.output
    res = CliRunner().invoke(cli, [*args, "--ray-address", "auto"], catch_exceptions=False)
    assert res.exit_code == 2 and "--ray" in res.output


def test_actor_errors_become_one_line():
    remote = (
        'Traceback (most recent call last):\n  File "x.py", line 1, in f\n    g()\n'
        "ray.exceptions.RayTaskError(RunSetupError): ray::MapWorker.__init__()\n"
        "gradcam_batch.engine.job.config.RunSetupError: device 'cuda' asked for, but CUDA is not available here"
    )
    inner = RuntimeError(remote)
    outer = RuntimeError("SystemException")
    outer.__cause__ = inner
    assert _error_line(outer) == "device 'cuda' asked for, but CUDA is not available here"
    assert _error_line(RuntimeError("Traceback:\n  ...\nValueError: bad value")) == "ValueError: bad value"
    assert _error_line(KeyError("k")) == "'k'"


def test_ray_is_optional(tmp_path):
    """Without Ray: the package, the CLI and the local run import; --ray says what to install."""
    code = textwrap.dedent(
        """
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "ray" or name.startswith("ray."):
                    raise ImportError("no ray here")

        sys.meta_path.insert(0, Block())
        import gradcam_batch, gradcam_batch.cli, gradcam_batch.engine.job.local
        from gradcam_batch.engine.job.config import RunConfig
        from gradcam_batch.engine.job.ray_runner import RayNotInstalled, run_ray
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


def test_no_test_reaches_into_ray_internals():
    here = Path(__file__).parent
    needle = "ray.data." + "_internal"
    assert not [p.name for p in here.glob("*.py") if needle in p.read_text()]


# -- the read stage, without a cluster -------------------------------------------------------------------


def _count_rows_read(monkeypatch, rows: int) -> np.ndarray:
    """How many times pyarrow hands out each row of a file of one row group (filled as it is read)."""
    counts = np.zeros(rows, np.int64)
    base = pq.ParquetFile

    class Counting(base):
        def iter_batches(self, *args, **kwargs):
            at = 0  # pyarrow streams a row group from its first row
            for rb in super().iter_batches(*args, **kwargs):
                counts[at : at + rb.num_rows] += 1
                at += rb.num_rows
                yield rb

        def read_row_group(self, i, *args, **kwargs):
            t = super().read_row_group(i, *args, **kwargs)
            counts[: t.num_rows] += 1
            return t

    monkeypatch.setattr(pq, "ParquetFile", Counting)
    return counts


@pytest.fixture
def one_row_group(tmp_path) -> Path:
    """48 demo images in one file of one row group (as pq.write_table writes a small table)."""
    path = tmp_path / "one.parquet"
    pq.write_table(pq.read_table(demo_assets.SAMPLE).slice(0, 48), path)
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    return path


def test_the_read_stage_reads_each_row_once(one_row_group, tmp_path, monkeypatch):
    """Many units in one row group: every row is read once, not once per unit up to it (quadratic)."""
    from gradcam_batch.engine.job.ray_runner import ROW, UNIT, read_tasks, read_units

    plan = build_plan(_config(one_row_group, tmp_path / "o", label_column=None, keep_columns=[]), device="cpu")
    assert len(plan.units) >= 6
    pending = [i for i in range(len(plan.units) - 1) if i != 2]  # unit 2 done before; the last one too
    counts = _count_rows_read(monkeypatch, 48)
    tables = []
    for task in read_tasks(plan, pending):
        out = read_units(pa.Table.from_pylist([task]), plan=plan)
        tables += [out] if isinstance(out, pa.Table) else list(out)  # one table, or a stream of them
    want = [r for i in pending for r in range(plan.units[i].start, plan.units[i].stop)]
    assert counts.max() == 1, f"rows read more than once: {counts.tolist()}"
    assert (counts[want] == 1).all() and (counts[plan.units[-1].start :] == 0).all()
    got = pa.concat_tables(tables)
    assert got.column(ROW).to_pylist() == want
    assert got.column(UNIT).to_pylist() == [i for i in pending for _ in range(plan.units[i].rows)]
    assert got.column("image").to_pylist() == pq.read_table(one_row_group).column("image").take(want).to_pylist()


def test_the_decode_stage_decodes_in_parallel(one_row_group, tmp_path, monkeypatch):
    """A read-and-decode task of 2 CPUs decodes two images at once (the local runner's thread pool)."""
    import threading

    from gradcam_batch.engine.job import ray_runner
    from gradcam_batch.engine.job.source import ParquetSource

    plan = build_plan(_config(one_row_group, tmp_path / "o", label_column=None, keep_columns=[]), device="cpu")
    both = threading.Barrier(2, timeout=20)  # passes only when two decodes overlap
    decode_value = ParquetSource.decode_value

    def meeting(self, value, f):
        both.wait()
        return decode_value(self, value, f)

    monkeypatch.setattr(ParquetSource, "decode_value", meeting)
    rows = pq.read_table(one_row_group).slice(0, 4)
    out = ray_runner.decode_rows(rows, plan=plan, cpus=2)
    assert out.num_rows == 4 and out.column(ray_runner.ERROR).null_count == 4


def _out_rows(index: int, rows: list[int], k: int = 2) -> pa.Table:
    """Output rows as the actors send them: k classes per image, tagged with unit and row."""
    from gradcam_batch.engine.job.ray_runner import FIRST, ROW, UNIT

    return pa.table(
        {
            "id": [f"r{r}" for r in rows for _ in range(k)],
            "class_rank": [j for _ in rows for j in range(k)],
            "status": ["ok"] * (len(rows) * k),
            UNIT: pa.array([index] * (len(rows) * k), pa.int32()),
            ROW: pa.array([r for r in rows for _ in range(k)], pa.int64()),
            FIRST: [j == 0 for _ in rows for j in range(k)],
        }
    )


def test_the_driver_writes_units_in_order_and_holds_a_bounded_number():
    from types import SimpleNamespace

    from gradcam_batch.engine.job.inputs import Unit
    from gradcam_batch.engine.job.ray_runner import DRIVER_UNITS_HELD, UnitAssembler

    plan = SimpleNamespace(units=[Unit(0, 0, s, s + 4, f"f:{s}-{s + 4}") for s in range(0, 16, 4)])
    keys = [u.key for u in plan.units]
    out = []

    def put(unit, table, errors):
        out.append((unit.key, table.column("id").to_pylist(), errors))

    # In input order, batches across unit boundaries (what Ray Data delivers): one unit held at a time.
    a = UnitAssembler(plan, [0, 1, 2, 3], put)
    for batch in (
        _out_rows(0, [0, 1, 2]),
        pa.concat_tables([_out_rows(0, [3]), _out_rows(1, [4, 5])]),
        pa.concat_tables([_out_rows(1, [7, 6]), _out_rows(2, [8, 9, 10, 11]), _out_rows(3, [12])]),
        _out_rows(3, [13, 14, 15]),
    ):
        a.add(batch)
    a.finish()
    assert [k for k, _, _ in out] == keys and a.peak == 1
    assert out[1][1] == ["r4", "r4", "r5", "r5", "r6", "r6", "r7", "r7"]  # by row, then class rank
    # A unit complete before an earlier one waits for it: the output stays in input order.
    out.clear()
    a = UnitAssembler(plan, [0, 1, 2, 3], put)
    a.add(_out_rows(1, [4, 5, 6, 7]))
    assert out == []
    a.add(_out_rows(0, [0, 1, 2, 3]))
    assert [k for k, _, _ in out] == keys[:2]
    # More units held than the bound: the run stops, naming the unit it waits for.
    assert DRIVER_UNITS_HELD == 2
    a = UnitAssembler(plan, [0, 1, 2, 3], put)
    a.add(_out_rows(1, [4, 5, 6, 7]))
    a.add(_out_rows(2, [8, 9]))
    with pytest.raises(RuntimeError, match=r"3 units while unit f:0-4 is incomplete.*at most 2"):
        a.add(_out_rows(3, [12]))
    # A unit that never completes is named at the end.
    a = UnitAssembler(plan, [0], put)
    a.add(_out_rows(0, [0, 1]))
    with pytest.raises(RuntimeError, match=r"Ray returned 2 of the 4 rows of unit f:0-4"):
        a.finish()


def test_a_ray_run_writes_in_input_order(cluster, dataset, tmp_path, monkeypatch):
    """Ray Data is asked to keep the input order, and the part files hold the rows in input order."""
    asked = []
    iter_batches = ray.data.Dataset.iter_batches

    def spy(self, *args, **kwargs):
        asked.append(self.context.execution_options.preserve_order)
        return iter_batches(self, *args, **kwargs)

    monkeypatch.setattr(ray.data.Dataset, "iter_batches", spy)
    out = tmp_path / "o"
    run_ray(_config(dataset, out, rows_per_file=8, label_column=None, top_k=1), RayOptions(workers=1))
    assert asked == [True]
    ids = pq.read_table(_parts(out)).column("id").to_pylist()  # part files in name order
    order = [(i.split(":")[0], int(i.split(":")[1])) for i in ids]
    assert order == sorted(order) and len(order) == 40


# -- slow: more models and entry points ----------------------------------------------------------------


@pytest.mark.slow
def test_onnx_with_providers_matches_local(cluster, tmp_path):
    import torch

    from gradcam_batch.engine.demo.synthetic import ShapesCNN

    model = ShapesCNN()
    model.load_state_dict(torch.load(demo_assets.CHECKPOINT, weights_only=True))
    model.eval()
    path = tmp_path / "shapes.onnx"
    torch.onnx.export(model, (torch.randn(2, 3, 48, 48),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], dynamic_axes={"x": {0: "b"}})  # fmt: skip
    inp = tmp_path / "in.parquet"
    pq.write_table(pq.read_table(demo_assets.SAMPLE).slice(0, 24), inp)
    over = {"model": str(path), "weights": None, "providers": ["CPUExecutionProvider"], "keep_columns": []}
    run_job(_config(inp, tmp_path / "local", **over))
    run_ray(_config(inp, tmp_path / "ray", **over), RayOptions(workers=1))
    assert_same_rows(_read(tmp_path / "local"), _read(tmp_path / "ray"))


@pytest.mark.slow
def test_vit_tokens_match_local(cluster, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    import torch

    factory = tmp_path / "vit.py"
    factory.write_text(
        "import torch, torchvision\n\n"
        "def make(num_classes=5):\n    torch.manual_seed(0)\n"
        "    m = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,"
        " hidden_dim=16, mlp_dim=32, num_classes=num_classes)\n"
        # torchvision zero-initializes the head: no gradient reaches any token until it is trained.
        "    torch.nn.init.normal_(m.heads.head.weight, std=0.5)\n"
        "    return m\n"
    )
    assert torchvision and torch
    inp = tmp_path / "in.parquet"
    pq.write_table(pq.read_table(demo_assets.SAMPLE).slice(0, 16), inp)
    over = {
        "model": f"{factory}:make",
        "weights": None,
        "reshape": "tokens",
        "resize": 32,
        "crop": (32, 32),
        "keep_columns": [],
    }
    run_job(_config(inp, tmp_path / "local", **over))
    run_ray(_config(inp, tmp_path / "ray", **over), RayOptions(workers=1))
    assert_same_rows(_read(tmp_path / "local"), _read(tmp_path / "ray"))


@pytest.mark.slow
def test_explain_dataset_on_a_users_dataset(cluster, dataset, single):
    ds = ray.data.read_parquet(str(dataset))
    cfg = _config(dataset, Path("unused"), keep_columns=["class_name"])
    with pytest.raises(ValueError, match="id_column"):
        explain_dataset(ds, cfg)
    with pytest.raises(ValueError, match="model"):
        explain_dataset(ds)
    got = pa.concat_tables(ray.get(explain_dataset(ds, cfg, id_column="image_id", workers=1).to_arrow_refs()))
    ref = run_job(_config(dataset, Path(single).parent / "by_id", id_column="image_id", keep_columns=["class_name"]))
    assert ref["images"] == 40
    assert_same_rows(_read(Path(single).parent / "by_id"), _sorted(got))


@pytest.mark.slow
def test_a_failing_actor_stops_the_run_with_one_line(cluster, dataset, tmp_path):
    """The model loads on the driver (the probe) but raises in the actor: one line, no hang, nothing committed."""
    import os

    factory = tmp_path / "failing_model.py"
    factory.write_text(
        "import os\nfrom gradcam_batch.engine.demo.synthetic import ShapesCNN\n\n"
        f"def make():\n    if os.getpid() != {os.getpid()}:\n        raise ValueError('boom in the actor')\n"
        "    return ShapesCNN()\n"
    )
    out = tmp_path / "out"
    cfg = _config(dataset, out, model=f"{factory}:make", weights=None)
    with pytest.raises(RunFailed) as info:
        run_ray(cfg, RayOptions(workers=1))
    assert "boom in the actor" in str(info.value) and "\n" not in str(info.value)
    assert not info.value.transient  # a rerun would fail the same way
    assert not list(out.glob("part-*.parquet"))
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"


@pytest.mark.slow
def test_metrics_and_boxes_match_local(cluster, dataset, tmp_path):
    pytest.importorskip("scipy")
    over = {"metrics": ("deletion", "insertion", "confidence"), "metrics_steps": 5,
            "box_column": "box_x0,box_y0,box_x1,box_y1", "keep_columns": []}  # fmt: skip
    run_job(_config(dataset, tmp_path / "local", **over))
    run_ray(_config(dataset, tmp_path / "ray", **over), RayOptions(workers=1))
    a, b = _read(tmp_path / "local"), _read(tmp_path / "ray")
    assert "pred_box" in b.column_names and b["box_iou"].null_count < b.num_rows
    for name in ("deletion_auc", "insertion_auc", "confidence_drop", "box_energy", "box_iou"):
        x = a[name].to_numpy(zero_copy_only=False).astype(float)
        y = b[name].to_numpy(zero_copy_only=False).astype(float)
        np.testing.assert_allclose(y, x, atol=1e-4, equal_nan=True, err_msg=name)
    for name in ("pointing_hit", "pred_box", "confidence_increase", "id", "class_index", "status"):
        assert a[name].equals(b[name]), name


@pytest.mark.slow
def test_an_actors_warnings_reach_the_driver_once(cluster, tmp_path):
    """A device-JPEG fallback happens in the actors; the driver says each kind once, as a local run does."""
    import warnings

    from PIL import Image

    from gradcam_batch.engine.job.config import RunWarning

    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(12):
        buf = io.BytesIO()
        Image.fromarray((rng.random((48, 48, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
        jpegs.append(buf.getvalue())
    jpegs[5] = jpegs[5][:200]  # a truncated JPEG: the device decoder refuses it, and so does Pillow
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"image": pa.array(jpegs, pa.binary())}), tmp_path / "in" / "j.parquet", row_group_size=4)
    over = {"label_column": None, "keep_columns": [], "device_jpeg": True, "batch_size": 4, "heatmap_size": None}
    said = {}
    two_actors = RayOptions(workers=2, num_cpus_per_worker=0.5)
    for name, run in (("local", run_job), ("ray", lambda c: run_ray(c, two_actors))):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            run(_config(tmp_path / "in", tmp_path / name, **over))
        said[name] = sorted(w.message.key for w in record if issubclass(w.category, RunWarning))
    assert said["ray"] == said["local"] == ["jpeg-batch", "jpeg-image"]
    a, b = _read(tmp_path / "local"), _read(tmp_path / "ray")
    assert b["status"].to_pylist().count("error") == 1
    assert_same_rows(a, b)


@pytest.mark.slow
def test_a_real_sigint_stops_a_ray_run_with_the_resume_line(dataset, tmp_path):
    import os
    import signal
    import time

    from gradcam_batch.engine.job.sink import Manifest

    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "gradcam_batch", "run", str(dataset), "-o", str(out), "--model",
           demo_assets.MODEL_SPEC, "--weights", str(demo_assets.CHECKPOINT), "--image-column", "image",
           "--batch-size", "4", "--rows-per-file", "4", "--resize", "48", "--crop", "48", "--no-progress",
           "--ray", "--workers", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if (out / "manifest.json").exists() and Manifest.load(out).files:
                    break
            except ValueError:
                pass
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "Error: interrupted; rerun the same command to resume", stderr[-3000:]
    assert "Aborted" not in stderr
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ids = _read(out)["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 40
