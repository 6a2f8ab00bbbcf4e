"""The output directory: what --overwrite and a resume may delete, unwritable or impossible outputs,
input sizes checked before the probe, and an output that changes between the plan and the start."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
from run_support import base_args, bytes_table, invoke, read_output, write_table

from gradcam_batch.engine.job import local, sink
from gradcam_batch.engine.job.outdir import survey
from gradcam_batch.engine.job.sink import COMMIT_LOG, Manifest

REPO = Path(__file__).resolve().parents[1]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_error_line(res, code: int = 2) -> str:
    assert res.exit_code == code, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    assert "Traceback" not in res.output
    return lines[0]


def _finished_run(tmp_path: Path, n: int = 8, per_file: int = 4) -> tuple[list[str], Path]:
    inp = write_table(tmp_path / "in" / "x.parquet", bytes_table(n), row_group_size=per_file)
    out = tmp_path / "out"
    args = ["run", str(inp), *base_args(tmp_path, out), "--rows-per-file", str(per_file)]
    assert invoke(args).exit_code == 0
    return args, out


# -- item 7: --overwrite and resume delete only what the tool wrote ------------------------------------


@pytest.mark.parametrize("manifest", ['{"a": 1}', "not json", '{"format": "gradcam-batch/2", "files": 3}'])
def test_a_directory_that_holds_no_run_is_never_overwritten(tmp_path, manifest):
    inp = write_table(tmp_path / "in" / "x.parquet", bytes_table(3))
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "part-00007.parquet").write_bytes(b"someone's data")
    (out / "manifest.json").write_text(manifest)
    args = ["run", str(inp), *base_args(tmp_path, out)]
    before = _snapshot(tmp_path)
    for extra in ([], ["--overwrite"]):
        line = _one_error_line(invoke([*args, *extra]))
        assert "holds no gradcam-batch run" in line and "manifest.json" in line
        assert "--overwrite" not in line  # the refusal does not suggest the option that would destroy it
        assert _snapshot(tmp_path) == before


def test_a_manifest_that_names_other_files_is_not_a_run(tmp_path):
    """A manifest is this tool's only if every file it lists has the tool's part-file name."""
    _, out = _finished_run(tmp_path)
    (out / "notes.txt").write_text("mine")
    man = json.loads((out / "manifest.json").read_text())
    man["files"][0]["name"] = "notes.txt"
    (out / "manifest.json").write_text(json.dumps(man))
    assert survey(out).manifest is None
    inp = tmp_path / "in" / "x.parquet"
    before = _snapshot(out)
    line = _one_error_line(invoke(["run", str(inp), *base_args(tmp_path, out), "--overwrite"]))
    assert "holds no gradcam-batch run" in line
    assert _snapshot(out) == before


def test_overwrite_refuses_to_delete_foreign_files_in_a_run_directory(tmp_path):
    args, out = _finished_run(tmp_path)
    (out / "notes.txt").write_text("mine")
    (out / "part-00009.parquet").write_bytes(b"copied from another run")
    before = _snapshot(out)
    line = _one_error_line(invoke([*args, "--top-k", "2", "--overwrite"]))
    assert "notes.txt" in line and "part-00009.parquet" in line
    assert _snapshot(out) == before
    # Once they are moved away, the run's own files are replaced.
    (out / "notes.txt").unlink()
    (out / "part-00009.parquet").unlink()
    assert invoke([*args, "--top-k", "2", "--overwrite"]).exit_code == 0
    assert read_output(out).num_rows == 16
    parts = [f["name"] for f in json.loads((out / "manifest.json").read_text())["files"]]
    assert sorted(p.name for p in out.iterdir()) == sorted([".lock", COMMIT_LOG, "manifest.json", *parts])


def test_overwrite_deletes_exactly_the_files_the_run_names(tmp_path):
    args, out = _finished_run(tmp_path, n=12)
    # The last file committed only in the log (the run was killed after committing it), and the
    # next one opened and left as a temp file: both are the run's, and both go.
    man = json.loads((out / "manifest.json").read_text())
    last = man["files"].pop()
    man["status"] = "running"
    (out / "manifest.json").write_text(json.dumps(man))
    seq = man["log_seq"] + 1
    (out / COMMIT_LOG).write_text(
        json.dumps({"seq": seq, **last}) + "\n" + json.dumps({"open": "part-00003.parquet"}) + "\n"
    )
    (out / ".part-00003.parquet.tmp").write_bytes(b"PAR1 half a file")
    assert sorted(survey(out).own) == sorted(
        [".lock", COMMIT_LOG, "manifest.json", ".part-00003.parquet.tmp"] + [f"part-0000{i}.parquet" for i in range(3)]
    )
    assert invoke([*args, "--top-k", "2", "--overwrite"]).exit_code == 0
    assert read_output(out).num_rows == 24 and not list(out.glob("*.tmp"))


def _kill_after_two_files(out: Path, *, log_opened: bool) -> None:
    """Rewind a finished run of three files to a run killed after renaming part 2, before committing it."""
    man = json.loads((out / "manifest.json").read_text())
    last = man["files"].pop()
    man["status"] = "running"
    (out / "manifest.json").write_text(json.dumps(man))
    (out / ".part-00003.parquet.tmp").write_bytes(b"PAR1 half a file")
    if log_opened:
        lines = [json.dumps({"open": last["name"]}), json.dumps({"open": "part-00003.parquet"})]
        (out / COMMIT_LOG).write_text("\n".join(lines) + "\n")


def test_a_resume_keeps_files_no_session_of_the_run_opened(tmp_path):
    args, out = _finished_run(tmp_path, n=12)
    _kill_after_two_files(out, log_opened=False)  # as if someone put these names there
    before = _snapshot(out)
    line = _one_error_line(invoke(args))
    assert "part-00002.parquet" in line and ".part-00003.parquet.tmp" in line
    assert _snapshot(out) == before


def test_a_resume_deletes_the_uncommitted_files_its_log_names(tmp_path):
    args, out = _finished_run(tmp_path, n=12)
    _kill_after_two_files(out, log_opened=True)
    (out / "part-00009.parquet").write_bytes(b"someone's")
    line = _one_error_line(invoke(args))  # a foreign part file stops the resume; nothing is deleted
    assert "part-00009.parquet" in line and "part-00002.parquet" not in line
    assert (out / "part-00002.parquet").exists() and (out / ".part-00003.parquet.tmp").exists()
    (out / "part-00009.parquet").unlink()
    (out / "notes.txt").write_text("mine")  # a foreign file of another name does not stop a resume
    res = invoke(args)
    assert res.exit_code == 0, res.output
    assert "explained 4 images" in res.output and (out / "notes.txt").read_text() == "mine"
    assert Counter(read_output(out)["id"].to_pylist()) == Counter({f"x.parquet:{i}": 1 for i in range(12)})


def test_the_writer_names_each_file_in_the_log_before_creating_it(tmp_path):
    args, out = _finished_run(tmp_path, n=8)
    man = Manifest.load(out)
    assert man.opened_files() == set()  # the end of the run emptied the log
    seen = []
    real = sink.Manifest.note_open

    def note_open(self, name):
        real(self, name)
        seen.append((name, [p.name for p in out.iterdir() if p.name.endswith(".tmp")], self.opened_files()))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sink.Manifest, "note_open", note_open)
        assert invoke([*args, "--top-k", "2", "--overwrite"]).exit_code == 0
    assert [name for name, _, _ in seen] == [f"part-0000{i}.parquet" for i in range(4)]  # 16 rows, 4 a file
    for name, temps, opened in seen:
        assert temps == [] and name in opened  # in the log, and no temp file yet


def test_the_writer_never_replaces_an_existing_file(tmp_path):
    from gradcam_batch.engine.job.schema import output_schema

    out = tmp_path / "o"
    out.mkdir()
    man = Manifest.new(out, fingerprint="f", config={}, versions={})
    man.save()
    (out / "part-00000.parquet").write_bytes(b"someone's")
    schema = output_schema(id_type=pa.string(), passthrough=[], label_type=None,
                           cam_shape=(2, 2), heatmap_shape=None, heatmap_dtype="uint8")  # fmt: skip
    writer = sink.HeatmapWriter(out, schema, man, rows_per_file=1)
    writer.put(sink.WriteItem(pa.Table.from_pylist([], schema=schema), 1, 1, "u"))
    with pytest.raises(FileExistsError):
        writer.close()
    assert (out / "part-00000.parquet").read_bytes() == b"someone's"


# -- item 17: outputs that cannot be written, inputs too large to probe ---------------------------------


def test_an_output_under_a_regular_file_is_one_error_line(tmp_path):
    inp = write_table(tmp_path / "in" / "x.parquet", bytes_table(2))
    (tmp_path / "some_file").write_text("x")
    args = ["run", str(inp), *base_args(tmp_path, tmp_path / "some_file" / "sub")]
    before = _snapshot(tmp_path)
    line = _one_error_line(invoke(args))
    assert "some_file" in line and "not a directory" in line
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["mkdir", "lock"])
def test_a_read_only_output_is_one_error_line(tmp_path, monkeypatch, where):
    """An injected EROFS/EACCES where the runner creates the directory or its lock, after the plan's checks."""
    inp = write_table(tmp_path / "in" / "x.parquet", bytes_table(2))
    out = tmp_path / "a" / "b" / "out"
    args = ["run", str(inp), *base_args(tmp_path, out)]
    before = _snapshot(tmp_path)
    if where == "mkdir":

        def mkdir(self, *a, **k):
            raise OSError(errno.EROFS, "Read-only file system", str(self))

        monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    else:

        def acquire(self):
            raise PermissionError(errno.EACCES, "Permission denied", str(self.path))

        monkeypatch.setattr(sink.OutputLock, "acquire", acquire)
    line = _one_error_line(invoke(args))
    assert "cannot write" in line and str(out) in line
    assert ("Read-only file system" if where == "mkdir" else "Permission denied") in line
    assert _snapshot(tmp_path) == before and not (tmp_path / "a").exists()  # the directories made are removed


def test_an_unwritable_output_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    inp = write_table(tmp_path / "in" / "x.parquet", bytes_table(2))
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr("os.access", lambda p, mode, **k: False if Path(p) == ro else real_access(p, mode, **k))
    loaded = []
    monkeypatch.setattr("gradcam_batch.engine.job.plan.ModelHandle.get", lambda self: loaded.append(1))
    line = _one_error_line(invoke(["run", str(inp), *base_args(tmp_path, ro / "out")]))
    assert "cannot write" in line and str(ro) in line and not loaded


def _mount_read_only(path: Path) -> list[str] | None:
    """A command prefix that runs its command with ``path`` a read-only tmpfs, or None where not permitted."""
    if shutil.which("unshare") is None:
        return None
    for flags in (["-m"], ["-rm"]):
        probe = subprocess.run(
            ["unshare", *flags, "sh", "-c", f"mount -t tmpfs -o ro none '{path}' && ! touch '{path}/x' 2>/dev/null"],
            capture_output=True,
        )
        if probe.returncode == 0:
            return ["unshare", *flags, "sh", "-c", f"mount -t tmpfs -o ro none '{path}' && exec \"$@\"", "sh"]
    return None


@pytest.mark.slow
def test_a_real_read_only_mount_is_one_error_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    prefix = _mount_read_only(ro)
    if prefix is None:
        pytest.skip("mounting a read-only tmpfs needs privileges or user namespaces")
    inp = write_table(tmp_path / "in" / "x.parquet", bytes_table(2))
    for out in (ro, ro / "sub" / "out"):
        cmd = [*prefix, sys.executable, "-m", "gradcam_batch", "run", str(inp), *base_args(tmp_path, out)]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and "Read-only file system" in lines[0], done.stderr


@pytest.mark.parametrize(
    ("option", "value"),
    [("--crop", "100000"), ("--crop", "9000x64"), ("--resize", "100000"), ("--heatmap-size", "20000")],
)
def test_input_sizes_above_the_bound_are_refused_before_the_probe(tmp_path, monkeypatch, option, value):
    inp = write_table(tmp_path / "in" / "x.parquet", bytes_table(2))
    loaded = []
    monkeypatch.setattr("gradcam_batch.engine.job.plan.ModelHandle.get", lambda self: loaded.append(1))
    # The last of a repeated option wins: these replace base_args' --resize 32 / --crop 32.
    line = _one_error_line(invoke(["run", str(inp), *base_args(tmp_path, tmp_path / "o"), option, value]))
    assert "8192" in line and not loaded and not (tmp_path / "o").exists()


# -- item 19: the output changes between the plan and the start ----------------------------------------


def test_an_output_changed_since_the_plan_exits_2_with_setup_advice(tmp_path, monkeypatch):
    args, out = _finished_run(tmp_path)
    real_prepare = local.prepare

    def prepare(config):
        job = real_prepare(config)
        # Another run's settings land in the directory after the plan was checked.
        man = json.loads((out / "manifest.json").read_text())
        man["fingerprint"] = "someone else"
        (out / "manifest.json").write_text(json.dumps(man))
        return job

    monkeypatch.setattr(local, "prepare", prepare)
    res = invoke(args)
    assert res.exit_code == 2 and "Traceback" not in res.output
    line = res.output.strip().splitlines()[-1]  # after "... is complete already", which the plan saw
    assert "other settings" in line and "--overwrite" in line
    assert "the run stopped" not in line and "rerun" not in line
