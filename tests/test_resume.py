"""Resume exactly once: reruns, changed settings, uncommitted leftovers, a real SIGKILL; bounded memory."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
from run_support import base_args, bytes_table, invoke, png_bytes, read_output, shapes, write_table

from gradcam_batch.engine.job.sink import Manifest

REPO = Path(__file__).resolve().parents[1]


def _ids(out: Path) -> Counter:
    return Counter(read_output(out)["id"].to_pylist())


def test_rerun_of_a_finished_run_changes_nothing(tmp_path):
    inp = write_table(tmp_path / "in.parquet", bytes_table(9), row_group_size=4)
    out = tmp_path / "out"
    args = ["run", str(inp), *base_args(tmp_path, out), "--rows-per-file", "3"]
    assert invoke(args).exit_code == 0
    files = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert len(files) == 3
    res = invoke(args)
    assert res.exit_code == 0
    assert "complete already" in res.output and "explained 0 images" in res.output
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == files
    assert _ids(out) == Counter({f"in.parquet:{i}": 1 for i in range(9)})


def test_changed_settings_need_overwrite(tmp_path):
    inp = write_table(tmp_path / "in.parquet", bytes_table(5))
    out = tmp_path / "out"
    assert invoke(["run", str(inp), *base_args(tmp_path, out)]).exit_code == 0
    before = sorted(p.name for p in out.iterdir())
    res = invoke(["run", str(inp), *base_args(tmp_path, out), "--top-k", "2"])
    assert res.exit_code == 2 and "pass --overwrite" in res.output
    assert sorted(p.name for p in out.iterdir()) == before
    res = invoke(["run", str(inp), *base_args(tmp_path, out), "--top-k", "2", "--overwrite"])
    assert res.exit_code == 0
    assert read_output(out).num_rows == 10
    assert json.loads((out / "manifest.json").read_text())["totals"]["rows_out"] == 10


def test_uncommitted_files_are_deleted_and_redone(tmp_path):
    inp = write_table(tmp_path / "in.parquet", bytes_table(12), row_group_size=4)
    out = tmp_path / "out"
    args = ["run", str(inp), *base_args(tmp_path, out), "--rows-per-file", "4"]
    assert invoke(args).exit_code == 0
    # Rewind the manifest by one file: as if the run died between renaming the last part file and
    # committing it, with a temp file of the next part half written.
    man_path = out / "manifest.json"
    man = json.loads(man_path.read_text())
    last = man["files"].pop()
    man["status"] = "running"
    man_path.write_text(json.dumps(man))
    (out / ".part-00003.parquet.tmp").write_bytes(b"PAR1 half a file")
    # The writer names each file in the log before it creates it: that makes both files the run's.
    (out / "commits.jsonl").write_text('{"open":"part-00002.parquet"}\n{"open":"part-00003.parquet"}\n')
    # A damaged uncommitted part (a crash mid-rename cannot produce one, but nothing trusts it).
    (out / last["name"]).write_bytes(b"junk")

    res = invoke(args)
    assert res.exit_code == 0, res.output
    assert "explained 4 images" in res.output and "2 units already done" in res.output
    assert not list(out.glob("*.tmp"))
    assert _ids(out) == Counter({f"in.parquet:{i}": 1 for i in range(12)})
    man = json.loads(man_path.read_text())
    assert man["status"] == "complete" and man["totals"]["rows_in"] == 12 and len(man["sessions"]) == 2


def _slow_job(tmp_path: Path, n: int = 60) -> list[str]:
    data = shapes(n)
    table = pa.table({"image": [png_bytes(im) for im in data.images]})
    inp = write_table(tmp_path / "in" / "slow.parquet", table, row_group_size=10)
    out = tmp_path / "out"
    args = [str(inp), *base_args(tmp_path, out, "make_slow"), "--rows-per-file", "10", "--batch-size", "5"]
    return [sys.executable, "-m", "gradcam_batch", "run", *args]


def _run_until_first_commit(cmd: list[str], out: Path, committed_files: int) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "manifest.json").exists():
                try:
                    if len(Manifest.load(out).files) >= committed_files:
                        break
                except ValueError:
                    pass
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_then_rerun_explains_every_row_exactly_once(tmp_path):
    cmd = _slow_job(tmp_path)
    out = tmp_path / "out"
    _run_until_first_commit(cmd, out, committed_files=1)
    man = Manifest.load(out)  # manifest.json plus the commits logged since it was written
    assert man.data["status"] == "running" and 1 <= len(man.files) < 6  # really killed mid-run

    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert re.search(r"\b[1-9]\d* units? already done", done.stdout), done.stdout
    assert _ids(out) == Counter({f"slow.parquet:{i}": 1 for i in range(60)})
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "complete" and man["totals"]["rows_in"] == 60
    assert sorted(Manifest.load(out).completed_units()) == sorted(
        f"slow.parquet:{s}-{s + 10}" for s in range(0, 60, 10)
    )
    assert not list(out.glob("*.tmp"))


@pytest.mark.slow
def test_repeated_sigkills_still_exactly_once(tmp_path):
    cmd = _slow_job(tmp_path)
    out = tmp_path / "out"
    for files in (1, 3, 5):
        _run_until_first_commit(cmd, out, committed_files=files)
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _ids(out) == Counter({f"slow.parquet:{i}": 1 for i in range(60)})


_RSS = """
import resource, sys
from gradcam_batch.cli import cli
try:
    cli.main(sys.argv[1:], standalone_mode=False)
finally:
    print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def _peak_rss_kb(tmp_path: Path, n: int) -> int:
    data = shapes(300, size=64, seed=n)
    images = [png_bytes(im) for im in data.images]
    table = pa.table({"image": [images[i % 300] for i in range(n)]})
    inp = write_table(tmp_path / f"in{n}" / "m.parquet", table, row_group_size=100)
    out = tmp_path / f"out{n}"
    args = [str(inp), "-o", str(out), "--model", base_args(tmp_path, out)[3], "--resize", "64", "--crop", "64"]
    args += ["--batch-size", "32", "--rows-per-file", "500", "--top-k", "2", "--no-progress", "--workers", "2"]
    proc = subprocess.run([sys.executable, "-c", _RSS, "run", *args], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert read_output(out).num_rows == 2 * n
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("PEAK_RSS_KB"))
    return int(line.split()[1])


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_dataset(tmp_path):
    small = _peak_rss_kb(tmp_path, 300)
    large = _peak_rss_kb(tmp_path, 3000)
    # Same settings, 10x the images: the peak may differ by allocator noise, not by the data.
    margin_kb = 0.10 * small + 25_000
    assert large <= small + margin_kb, f"peak RSS {small} kB for 300 images, {large} kB for 3000"


def test_finished_manifest_is_left_untouched_by_a_rerun(tmp_path):
    inp = write_table(tmp_path / "in.parquet", bytes_table(4))
    out = tmp_path / "out"
    args = ["run", str(inp), *base_args(tmp_path, out)]
    assert invoke(args).exit_code == 0
    before = (out / "manifest.json").read_text()
    assert invoke(args).exit_code == 0
    assert (out / "manifest.json").read_text() == before
    assert json.loads(before)["throughput"]["images"] == 4


# -- an interrupt (Ctrl-C) ------------------------------------------------------------------------------

INTERRUPTED = "Error: interrupted; rerun the same command to resume"


def test_an_interrupt_says_how_to_resume_and_keeps_whole_units(tmp_path, monkeypatch):
    from gradcam_batch.engine.job.step import BatchExplainer

    inp = write_table(tmp_path / "in.parquet", bytes_table(12), row_group_size=4)
    out = tmp_path / "out"
    args = ["run", str(inp), *base_args(tmp_path, out), "--rows-per-file", "4", "--batch-size", "4"]
    real_finish, calls = BatchExplainer.finish, []

    def finish(self, pending):
        calls.append(1)
        if len(calls) == 2:  # Ctrl-C while the second batch's results come back
            raise KeyboardInterrupt
        return real_finish(self, pending)

    monkeypatch.setattr(BatchExplainer, "finish", finish)
    res = invoke(args)
    assert res.exit_code == 130
    assert res.output.strip().splitlines() == [INTERRUPTED] and "Aborted" not in res.output
    assert Manifest.load(out).completed_units() == {"in.parquet:0-4"}  # the whole first unit is kept
    monkeypatch.undo()
    res = invoke(args)
    assert res.exit_code == 0 and "1 unit already done" in res.output, res.output
    assert _ids(out) == Counter({f"in.parquet:{i}": 1 for i in range(12)})


def test_an_interrupt_before_the_start_writes_nothing(tmp_path, monkeypatch):
    inp = write_table(tmp_path / "in.parquet", bytes_table(2))
    out = tmp_path / "out"
    args = ["run", str(inp), *base_args(tmp_path, out)]

    def load(self):
        raise KeyboardInterrupt  # Ctrl-C while the model loads

    monkeypatch.setattr("gradcam_batch.engine.job.plan.ModelHandle.get", load)
    res = invoke(args)
    assert res.exit_code == 130 and res.output.strip().splitlines() == [INTERRUPTED]
    assert not out.exists()


@pytest.mark.slow
def test_a_real_sigint_then_rerun_explains_every_row_exactly_once(tmp_path):
    cmd = _slow_job(tmp_path)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if (out / "manifest.json").exists() and Manifest.load(out).files:
                    break
            except ValueError:
                pass
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == INTERRUPTED and "Aborted" not in stderr and "Traceback" not in stderr
    assert Manifest.load(out).data["status"] == "running" and not (out / ".lock").read_text()  # lock released
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert re.search(r"\b[1-9]\d* units? already done", done.stdout), done.stdout
    assert _ids(out) == Counter({f"slow.parquet:{i}": 1 for i in range(60)})
