"""The audit on runs that are damaged, unfinished, foreign or hostile: one ``Error:`` line and exit 2,
or a result that says what it skipped; files closed; nothing half-written; every attribute escaped.

Most runs here are synthetic part files (``engine/audit/synthetic.py``); ``real_run`` is a tiny
two-method run with labels and two undecodable images, cut into three units.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import warnings
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from run_support import base_args, bytes_table, invoke, write_table

from gradcam_batch.engine.audit import AuditInputError, AuditOutputError, audit
from gradcam_batch.engine.audit.synthetic import write_synthetic_run
from gradcam_batch.engine.job.sink import Manifest

FAST = {"spray": {"view": "spectral"}}
CLI_FAST = ["--view", "spectral", "--no-overlays"]


@pytest.fixture
def synthetic(tmp_path):
    out = tmp_path / "run"
    write_synthetic_run(out, rows_per_class={0: 40, 1: 30}, planted={0: 0.5}, rows_per_file=30, seed=2)
    return out


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """``--method gradcam,layercam --label-column label``; images 3 (label 1) and 7 (label 0) do not decode."""
    tmp = tmp_path_factory.mktemp("real")
    t = bytes_table(12)
    images = t.column("image").to_pylist()
    images[3], images[7] = b"not an image", b"\x89PNG broken"
    t = t.set_column(0, "image", pa.array(images, pa.binary()))
    inp = write_table(tmp / "in" / "in.parquet", t, row_group_size=4)
    out = tmp / "run"
    args = [*base_args(tmp, out), "--method", "gradcam,layercam", "--label-column", "label", "--rows-per-file", "4"]
    res = invoke(["run", str(inp), *args])
    assert res.exit_code == 0, res.output
    return out


def _one_error_line(res, *fragments: str) -> str:
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# -- item 16: files closed, none unlinked while open, no temporary file left behind ---------------


def test_every_parquet_file_is_closed_and_none_is_unlinked_while_open(synthetic, tmp_path, monkeypatch):
    opened: list[tuple[Path, pq.ParquetFile]] = []

    class Tracked(pq.ParquetFile):
        def __init__(self, source, *args, **kwargs):
            super().__init__(source, *args, **kwargs)
            if isinstance(source, (str, os.PathLike)):
                opened.append((Path(source), self))

    real_unlink = Path.unlink

    def unlink(self, *args, **kwargs):
        still_open = [p for p, f in opened if p == self and not f.closed]
        assert not still_open, f"{self} unlinked while open"
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(pq, "ParquetFile", Tracked)
    monkeypatch.setattr(Path, "unlink", unlink)
    audit(synthetic, tmp_path / "rep", **FAST)
    assert {p.name for p, _ in opened} >= {"part-00000.parquet", "part-00002.parquet"}
    assert [p.name for p, f in opened if not f.closed] == []


@pytest.mark.parametrize("existing", [False, True], ids=["new-dir", "earlier-report"])
def test_an_exception_midway_leaves_nothing_behind(synthetic, tmp_path, monkeypatch, existing):
    from gradcam_batch.engine.audit import pipeline

    rep = tmp_path / "rep"
    if existing:
        audit(synthetic, rep, classes=[1], **FAST)
    before = _tree(rep) if existing else None
    real, calls = pipeline.spray, []

    def failing(maps, params):
        calls.append(1)
        if len(calls) == 2:  # the first class's clusters are in the temporary file by now
            raise RuntimeError("boom")
        return real(maps, params)

    monkeypatch.setattr(pipeline, "spray", failing)
    with pytest.raises(RuntimeError, match="boom"):
        audit(synthetic, rep, **FAST)
    if existing:
        assert _tree(rep) == before  # the earlier report, whole and untouched
    else:
        assert not rep.exists()


# -- item 17: bad input ends in one line, exit 2, nothing written ----------------------------------


def test_truncated_part_file(synthetic, tmp_path):
    part = synthetic / "part-00001.parquet"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    res = invoke(["audit", str(synthetic), "-o", str(tmp_path / "rep"), *CLI_FAST])
    _one_error_line(res, "part-00001.parquet")
    assert not (tmp_path / "rep").exists()


def test_corrupt_map_column_found_in_the_second_pass(synthetic, tmp_path):
    """A damaged page of the heatmap column (the footer intact): the first pass reads past it."""
    part = synthetic / "part-00001.parquet"
    meta = pq.ParquetFile(part).metadata
    names = [meta.schema.column(i).path for i in range(meta.num_columns)]
    chunk = meta.row_group(0).column(next(i for i, n in enumerate(names) if n.startswith("heatmap")))
    data = bytearray(part.read_bytes())
    at = chunk.data_page_offset + chunk.total_compressed_size // 2
    data[at : at + 64] = b"\xff" * 64
    part.write_bytes(bytes(data))
    with pytest.raises((pa.ArrowException, OSError)):  # the damage is real: pyarrow cannot read the column
        pq.read_table(part, columns=["heatmap"])
    pq.read_table(part, columns=["class_index", "status", "label"])  # and pass 1's columns read fine
    res = invoke(["audit", str(synthetic), "-o", str(tmp_path / "rep"), *CLI_FAST])
    _one_error_line(res, "part-00001.parquet")
    assert not (tmp_path / "rep").exists()


def test_class_names_file_not_utf8(synthetic, tmp_path):
    names = tmp_path / "names.txt"
    names.write_bytes(b"cat\n\xff\xfed\x00o\x00g\x00\n")
    res = invoke(["audit", str(synthetic), "-o", str(tmp_path / "rep"), "--class-names", str(names), *CLI_FAST])
    _one_error_line(res, "names.txt", "UTF-8")
    assert not (tmp_path / "rep").exists()


def test_report_dir_below_a_file(synthetic, tmp_path):
    (tmp_path / "a_file").write_text("x")
    res = invoke(["audit", str(synthetic), "-o", str(tmp_path / "a_file" / "rep"), *CLI_FAST])
    _one_error_line(res, "a_file")
    assert (tmp_path / "a_file").read_text() == "x"


@pytest.mark.parametrize(
    "exc",
    [OSError(errno.EROFS, "Read-only file system"), PermissionError(errno.EACCES, "Permission denied")],
    ids=["erofs", "eacces"],
)
@pytest.mark.parametrize("existing", [False, True], ids=["new-dir", "earlier-report"])
def test_unwritable_report_dir(synthetic, tmp_path, monkeypatch, exc, existing):
    """The last file of the report fails to write (a read-only mount, injected): all or nothing."""
    from gradcam_batch.engine.audit import report

    rep = tmp_path / "rep"
    if existing:
        audit(synthetic, rep, classes=[1], **FAST)
    before = _tree(rep) if existing else None

    def refuse(path, *args, **kwargs):
        raise type(exc)(exc.errno, exc.strerror, str(path))

    monkeypatch.setattr(report, "write_report", refuse)
    res = invoke(["audit", str(synthetic), "-o", str(rep), *CLI_FAST])
    _one_error_line(res, str(rep), exc.strerror)
    if existing:
        assert _tree(rep) == before
    else:
        assert not rep.exists()


def _read_only_mount_command() -> list[str] | None:
    """``unshare`` flags that may mount a read-only tmpfs here (a private mount namespace), or None."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return None
    for flags in (["-m"], ["-r", "-m"]):
        probe = subprocess.run(
            ["unshare", *flags, "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o ro none $d && ! touch $d/x"],
            capture_output=True,
        )
        if probe.returncode == 0:
            return ["unshare", *flags]
    return None


@pytest.mark.slow
def test_report_on_a_real_read_only_mount(synthetic, tmp_path):
    unshare = _read_only_mount_command()
    if unshare is None:
        pytest.skip("no privileges to mount a read-only file system here")
    ro = tmp_path / "ro"
    ro.mkdir()
    audit_cmd = [sys.executable, "-m", "gradcam_batch", "audit", str(synthetic), "-o", str(ro / "rep"), *CLI_FAST]
    script = f'mount -t tmpfs -o ro none "{ro}" && exec "$@"'
    res = subprocess.run([*unshare, "sh", "-c", script, "sh", *audit_cmd], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "Read-only file system" in res.stderr
    assert res.stderr.startswith("Error: ") and res.stdout == ""


# -- a report directory holding files this tool did not write -----------------------------------------


@pytest.mark.parametrize(
    "files",
    [
        {"index.html": "<p>my own page</p>"},
        {"clusters.parquet": "not ours"},
        {"summary.json": '{"format": "something-else/1"}', "index.html": "<p>mine</p>"},
        {"summary.json": "not json at all", "notes.txt": "x"},
        {"summary.json": '["gradcam-batch-audit/1"]'},
    ],
    ids=["foreign-index", "foreign-clusters", "foreign-summary-format", "summary-not-json", "summary-not-object"],
)
def test_a_report_dir_with_files_this_tool_did_not_write_is_refused(synthetic, tmp_path, files):
    rep = tmp_path / "rep"
    rep.mkdir()
    for name, text in files.items():
        (rep / name).write_text(text)
    before = _tree(rep)
    res = invoke(["audit", str(synthetic), "-o", str(rep), *CLI_FAST])
    line = _one_error_line(res, str(rep), "not written by gradcam-batch audit")
    assert next(iter(files)) in line
    assert _tree(rep) == before
    with pytest.raises(AuditOutputError, match="not written by gradcam-batch audit"):
        audit(synthetic, rep, **FAST)
    assert _tree(rep) == before


def test_an_earlier_report_is_replaced_and_other_files_are_left_alone(synthetic, tmp_path):
    rep = tmp_path / "rep"
    rep.mkdir()
    (rep / "notes.txt").write_text("mine")
    audit(synthetic, rep, classes=[1], **FAST)
    assert json.loads((rep / "summary.json").read_text())["selection"]["classes"] == [1]
    audit(synthetic, rep, **FAST)  # an earlier report of this tool: replaced
    assert json.loads((rep / "summary.json").read_text())["selection"]["classes"] is None
    assert (rep / "notes.txt").read_text() == "mine"


# -- item 18: answers that mislead -------------------------------------------------------------------


def test_a_method_the_run_lacks_is_an_error(real_run, tmp_path):
    res = invoke(["audit", str(real_run), "-o", str(tmp_path / "rep"), "--method", "gradcam++", *CLI_FAST])
    _one_error_line(res, "gradcam++", "gradcam, layercam")
    assert not (tmp_path / "rep").exists()
    with pytest.raises(AuditInputError, match="gradcam, layercam"):
        audit(real_run, None, method="xgradcam", **FAST)
    # A method the run has still works.
    assert {c.method for c in audit(real_run, None, method="layercam", **FAST).classes} == {"layercam"}


def test_a_method_a_one_method_run_lacks_is_an_error(synthetic, tmp_path):
    res = invoke(["audit", str(synthetic), "-o", str(tmp_path / "rep"), "--method", "layercam", *CLI_FAST])
    _one_error_line(res, "'layercam'", "its methods: gradcam")
    assert audit(synthetic, None, method="gradcam", **FAST).summary["totals"]["audited_rows"] == 70


def test_classes_the_run_lacks_are_an_error(real_run, synthetic, tmp_path):
    res = invoke(["audit", str(real_run), "-o", str(tmp_path / "rep"), "--classes", "0,4,9", *CLI_FAST])
    _one_error_line(res, "4, 9")
    assert not (tmp_path / "rep").exists()
    res = invoke(["audit", str(synthetic), "-o", str(tmp_path / "rep"), "--classes", "7", *CLI_FAST])
    _one_error_line(res, "7")


def _rewind(run: Path, dest: Path, *, keep: int, logged: int = 0) -> Path:
    """A copy of ``run`` as a killed run leaves it: ``keep`` files in the manifest, ``logged`` more in the log."""
    shutil.copytree(run, dest)
    man = json.loads((dest / "manifest.json").read_text())
    files = man["files"]
    man["files"], man["status"] = files[:keep], "running"
    (dest / "manifest.json").write_text(json.dumps(man))
    lines = [json.dumps({"seq": man["log_seq"] + i + 1, **f}) for i, f in enumerate(files[keep : keep + logged])]
    (dest / "commits.jsonl").write_text("".join(line + "\n" for line in lines))
    for f in files[keep + logged :]:
        (dest / f["name"]).unlink()  # killed before it was written
    return dest


def test_a_partial_run_says_so_everywhere(real_run, tmp_path):
    out = _rewind(real_run, tmp_path / "killed", keep=1, logged=1)
    assert len(Manifest.load(out).files) == 2
    rep = tmp_path / "rep"
    res = invoke(["audit", str(out), "-o", str(rep), *CLI_FAST])
    assert res.exit_code == 0, res.output
    assert "partial: 2 of 3 units" in res.output.splitlines()[0]
    summary = json.loads((rep / "summary.json").read_text())
    assert summary["run"]["partial"] == {"units_done": 2, "units_total": 3}
    page = (rep / "index.html").read_text()
    assert "partial: 2 of 3 units" in page
    assert page.index("partial: 2 of 3 units") < page.index("id=findings")


def test_a_complete_run_is_not_partial(real_run, tmp_path):
    res = invoke(["audit", str(real_run), "-o", str(tmp_path / "rep"), *CLI_FAST])
    assert res.exit_code == 0 and "partial" not in res.output
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["run"]["partial"] is None
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "partial:" not in page and "id=partial" not in page


def test_a_partial_runs_total_comes_from_its_manifest_wherever_its_inputs_are(real_run, tmp_path):
    out = _rewind(real_run, tmp_path / "killed", keep=2)
    man = json.loads((out / "manifest.json").read_text())
    assert man["units_total"] == 3
    man["config"]["files"] = [str(tmp_path / "nowhere.parquet")]
    (out / "manifest.json").write_text(json.dumps(man))
    assert audit(out, None, **FAST).summary["run"]["partial"] == {"units_done": 2, "units_total": 3}


def test_a_partial_run_whose_inputs_moved(real_run, tmp_path):
    """A run of a version that did not record ``units_total``: the audit plans its units again."""
    out = _rewind(real_run, tmp_path / "killed", keep=2)
    man = json.loads((out / "manifest.json").read_text())
    del man["units_total"]
    (out / "manifest.json").write_text(json.dumps(man))
    config = man["config"]
    moved = tmp_path / "elsewhere" / "in.parquet"
    moved.parent.mkdir()
    shutil.copy(config["files"][0], moved)
    config_files = config["files"][0]
    os.rename(config_files, config_files + ".gone")
    try:
        result = audit(out, None, **FAST)
        assert result.summary["run"]["partial"] == {"units_done": 2, "units_total": None}
        res = invoke(["audit", str(out), "-o", str(tmp_path / "rep"), *CLI_FAST])
        assert res.exit_code == 0, res.output
        first = res.output.splitlines()[0]
        assert first.startswith("partial: 2 units committed, of a total not known") and "--images" in first
        res = invoke(["audit", str(out), "-o", str(tmp_path / "rep"), "--images", str(moved), *CLI_FAST])
        assert res.output.startswith("partial: 2 of 3 units")
        result = audit(out, None, images=[str(moved)], **FAST)
        assert result.summary["run"]["partial"] == {"units_done": 2, "units_total": 3}
    finally:
        os.rename(config_files + ".gone", config_files)


def _float_cam_run(out: Path, bad: dict[int, str]) -> None:
    """A synthetic run without a heatmap column: the audit reads float16 ``cam`` maps, some not finite."""
    write_synthetic_run(out, rows_per_class={0: 40, 1: 30}, planted={0: 0.5}, rows_per_file=30, seed=2)
    for path in sorted(out.glob("part-*.parquet")):
        t = pq.read_table(path)
        maps = t["heatmap"].combine_chunks().to_numpy_ndarray().astype(np.float16) / np.float16(255)
        base = int(path.stem.split("-")[1]) * 30
        for row, kind in bad.items():
            if base <= row < base + len(maps):
                maps[row - base, 3, 4] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}[kind]
                if kind == "nan":
                    maps[row - base, 10:] = np.nan
        typ = pa.fixed_shape_tensor(pa.float16(), [32, 32])
        cam = pa.ExtensionArray.from_storage(typ, pa.FixedSizeListArray.from_arrays(pa.array(maps.reshape(-1)), 1024))
        t = t.set_column(t.schema.get_field_index("cam"), pa.field("cam", typ), cam).drop_columns(["heatmap"])
        pq.write_table(t, path)


def test_nonfinite_maps_are_skipped_counted_and_reported(tmp_path):
    out = tmp_path / "run"
    bad = {0: "nan", 1: "inf", 31: "-inf", 45: "nan"}
    _float_cam_run(out, bad)
    t = pq.read_table(sorted(out.glob("part-*.parquet")), columns=["class_index"])
    cls = t["class_index"].to_numpy()
    bad_per_class = {c: sum(1 for r in bad if cls[r] == c) for c in (0, 1)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning leaks out of the arithmetic
        result = audit(out, tmp_path / "rep", **FAST)
    for c in (0, 1):
        assert result[c].rows == int((cls == c).sum()) - bad_per_class[c]
        assert result[c].nonfinite == bad_per_class[c]
        assert np.isfinite(result[c].mean_heatmap).all()
        assert sum(k.size for k in result[c].clusters) == result[c].rows
    assert result.summary["totals"]["nonfinite_maps"] == 4
    assert any("4 maps with NaN or Inf values were skipped" in n for n in result.summary["notes"])
    res = invoke(["audit", str(out), "-o", str(tmp_path / "rep2"), *CLI_FAST])
    assert res.exit_code == 0 and "4 maps with NaN or Inf values were skipped" in res.output
    assert "4 maps with NaN or Inf values were skipped" in (tmp_path / "rep2" / "index.html").read_text()


@pytest.mark.parametrize(
    "text",
    ["{not json", json.dumps({"format": "someone-else/1", "files": []}), json.dumps({"format": "gradcam-batch/2"})],
    ids=["not-json", "foreign-format", "no-files"],
)
def test_corrupt_manifest_gives_no_run_advice(synthetic, tmp_path, text):
    (synthetic / "manifest.json").write_text(text)
    res = invoke(["audit", str(synthetic), "-o", str(tmp_path / "rep"), *CLI_FAST])
    line = _one_error_line(res, "manifest.json")
    assert "--overwrite" not in line
    assert not (tmp_path / "rep").exists()


def test_manifest_with_malformed_file_entries(synthetic, tmp_path):
    man = {"format": "gradcam-batch/2", "status": "complete", "files": [{"name": "part-00000.parquet"}]}
    (synthetic / "manifest.json").write_text(json.dumps(man))
    res = invoke(["audit", str(synthetic), "-o", str(tmp_path / "rep"), *CLI_FAST])
    _one_error_line(res, "manifest.json")


# -- item 20: every attribute escaped ----------------------------------------------------------------

HOSTILE = "x\"><img src=x onerror=alert(1)><svg onload=alert(2)><b data-pwn='1'>"


class _Page(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: str) -> _Page:
    p = _Page()
    p.feed(page)
    p.close()
    return p


def _hostile_run(root: Path) -> Path:
    """Two hostile methods, hostile ids and class names, in a directory with a hostile name and model."""
    src = root / "src"
    write_synthetic_run(src, rows_per_class={0: 24, 1: 16}, planted={0: 0.5}, seed=4)
    t = pq.read_table(src / "part-00000.parquet")
    n = t.num_rows
    methods = pa.DictionaryArray.from_arrays(
        pa.array(np.arange(2 * n) % 2, pa.int32()), pa.array([f"m1{HOSTILE}", f"m2{HOSTILE}"])
    )
    both = pa.concat_tables([t, t])
    order = np.argsort(np.r_[np.arange(n), np.arange(n)], kind="stable")
    both = both.take(pa.array(order))
    ids = [f"{HOSTILE}{i}" for i in range(n) for _ in range(2)]
    names = [f"class {c}{HOSTILE}" for c in both["class_index"].to_pylist()]
    both = both.set_column(0, "id", pa.array(ids)).append_column("method", methods)
    both = both.append_column("class_name", pa.array(names))
    out = root / HOSTILE
    out.mkdir()
    pq.write_table(both, out / "part-00000.parquet")
    manifest = Manifest.new(out, fingerprint="f", config={"model": f"model{HOSTILE}", "method": "a,b"}, versions={})
    manifest.commit_file("part-00000.parquet", rows=2 * n, images=n, errors=0, units=["u"])
    manifest.data["status"] = "complete"
    manifest.save()
    return out


def _check_page(page: str, expect_in_text: list[str], expect_in_attrs: list[str]) -> None:
    p = _parse(page)
    clean = {"html", "head", "meta", "title", "style", "script", "body", "main", "h1", "h2", "h3", "p", "code"}
    clean |= {"div", "span", "a", "b", "br", "img", "table", "thead", "tbody", "tr", "th", "td", "figure"}
    clean |= {"figcaption", "section", "canvas", "button", "textarea"}  # the interactive 2-D views
    assert {t for t, _ in p.tags} <= clean
    scripts = [a for t, a in p.tags if t == "script"]
    assert sum(1 for a in scripts if "type" not in a) == 2  # the page's own two, inline
    assert all(a.get("type", "application/json") == "application/json" for a in scripts)  # the rest: data
    for tag, attrs in p.tags:
        assert not [a for a in attrs if a.startswith("on") or a == "data-pwn"], (tag, attrs)
        if tag == "img" and attrs.get("alt") != "overlay":  # the hover card's image gets its src from the script
            assert attrs["src"].startswith(("data:image/png;base64,", "data:image/jpeg;base64,")), attrs
    ids = [a["id"] for _, a in p.tags if "id" in a]
    assert len(ids) == len(set(ids))
    for _, a in p.tags:  # every link lands on an element of the page
        if a.get("href", "").startswith("#"):
            assert a["href"][1:] in ids, a["href"]
    text = "".join(p.text)
    for value in expect_in_text:
        assert value in text
    values = [v for _, a in p.tags for v in a.values() if v]
    for value in expect_in_attrs:
        assert value in values


def test_hostile_values_reach_the_page_as_text_only(tmp_path):
    out = _hostile_run(tmp_path)
    rep = tmp_path / "rep"
    result = audit(out, rep, **FAST)
    assert {c.method for c in result.classes} == {f"m1{HOSTILE}", f"m2{HOSTILE}"}
    assert result.classes[0].clusters[0].sample_ids[0].startswith(HOSTILE)
    page = (rep / "index.html").read_text()
    _check_page(
        page,
        expect_in_text=[f"m1{HOSTILE}", f"class 0{HOSTILE}", HOSTILE, f"model{HOSTILE}"],
        expect_in_attrs=[str(out), result.classes[0].clusters[0].sample_ids[0]],
    )
    # --class-names takes the names' place; they are escaped the same way.
    names = tmp_path / "names.txt"
    names.write_text(f"zero{HOSTILE}\none{HOSTILE}\n")
    audit(out, rep, class_names=names.read_text().splitlines(), **FAST)
    page = (rep / "index.html").read_text()
    _check_page(page, expect_in_text=[f"zero{HOSTILE}", f"one{HOSTILE}"], expect_in_attrs=[])


# -- item 21: no phantom groups ----------------------------------------------------------------------


def test_error_rows_of_a_multi_method_run_count_against_each_method(real_run):
    result = audit(real_run, None, **FAST)
    keys = {(c.class_index, c.method) for c in result.classes}
    assert keys == {(c, m) for c in (0, 1, 2, 3) for m in ("gradcam", "layercam")}
    assert all(c.rows > 0 for c in result.classes)
    # Image 7 (label 0) and image 3 (label 1) could not be explained, by either method.
    errors = {(c.class_index, c.method): c.errors for c in result.classes}
    assert errors == {(c, m): int(c in (0, 1)) for c in (0, 1, 2, 3) for m in ("gradcam", "layercam")}
    assert result.summary["totals"]["classes"] == 8
    one = audit(real_run, None, method="layercam", **FAST)
    assert {(c.class_index, c.errors) for c in one.classes} == {(0, 1), (1, 1), (2, 0), (3, 0)}
