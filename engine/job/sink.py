"""The Parquet sink: ``HeatmapWriter``, the run manifest and the output directory's lock.

Files are zstd Parquet named ``part-NNNNN.parquet`` (schema: ``engine/job/schema.py``).

Exactly-once writing (what makes resuming safe after a SIGKILL at any moment):

1. A file is written as ``.part-NNNNN.parquet.tmp``, closed, fsynced, then renamed to
   ``part-NNNNN.parquet`` (``os.replace`` is atomic on one filesystem).
2. A file only ever holds whole input *units*. After the rename, one line naming the file and
   its units is appended to ``commits.jsonl`` and fsynced. That line is the commit point: a part
   file that neither the manifest nor the log lists is not part of the output. A commit costs
   the same whatever the run's length (the log is append-only). The line also carries the file's
   ``tally`` (sums and counts that the run's summary adds up), so that closing a run reads no
   part file back.
3. ``manifest.json`` (config, versions, totals, the committed files) is rewritten, temp file and
   atomic rename, when a run starts and when it ends; each rewrite folds the log in and then
   empties it. Log lines carry a sequence number, so a crash between the two folds nothing twice.
4. Before a part file is created, an ``{"open": name}`` line is appended to the log. On restart,
   the temp and part files that such a line names and no commit lists are deleted, and the
   committed units are skipped. A torn last log line (a crash mid-append) is ignored.

Which files of an output directory are the tool's own, and may be deleted: ``engine/job/outdir.py``.

One module past 500 lines because the writer, the manifest and the commit log are one protocol:
the order of their writes is what makes a commit exactly-once, and it reads best in one place.

One run at a time: ``OutputLock`` holds an exclusive ``flock`` on ``OUT/.lock`` for the whole
run, local or Ray, and a second run stops at once with the holder's pid and host.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from gradcam_batch.engine.errors import first_line as first_line_of

MANIFEST = "manifest.json"
COMMIT_LOG = "commits.jsonl"
LOCK = ".lock"
# Format 3: commit lines and file entries carry a ``tally``; the schema gained ``entropy``.
# Older formats are read (the audit reads them), never resumed (``outdir.output_problem``).
FORMAT = "gradcam-batch/3"
_READABLE_FORMATS = ("gradcam-batch/1", "gradcam-batch/2", FORMAT)
MANIFEST_TMP = ".manifest.json.tmp"
PART_RE = re.compile(r"^part-(\d{5,})\.parquet$")


# -- manifest -----------------------------------------------------------------------------------------


def fsync_path(path: Path) -> None:
    """fsync a file or a directory; a no-op where the filesystem does not support it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not every filesystem supports fsync on a directory
    finally:
        os.close(fd)


def atomic_write_json(path: Path, data: dict) -> int:
    """Write ``data`` as JSON through a temp file and an atomic rename; returns the bytes written."""
    tmp = path.with_name("." + path.name + ".tmp")
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)
    return len(text.encode())


class Manifest:
    """``manifest.json`` and its commit log: config, versions, counts, throughput, committed files."""

    def __init__(self, out_dir: Path, data: dict, *, seq: int | None = None):
        self.out_dir = Path(out_dir)
        self.data = data
        self._seq = data.get("log_seq", 0) if seq is None else seq  # the last commit's sequence number
        self._lock = threading.Lock()
        self.bytes_written = 0  # manifest and log bytes this object wrote (RESULTS.md measures it)

    @property
    def path(self) -> Path:
        return self.out_dir / MANIFEST

    @property
    def log_path(self) -> Path:
        return self.out_dir / COMMIT_LOG

    @classmethod
    def load(cls, out_dir: Path) -> Manifest | None:
        """The manifest with every logged commit folded in; None when there is none. Writes nothing.

        ``NotARun`` (a ValueError) when ``manifest.json`` is not a manifest of this tool (of a format
        this version reads): then the directory holds no run, whatever its file names.
        """
        path = Path(out_dir) / MANIFEST
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise NotARun(f"{path} is not a gradcam-batch manifest ({first_line_of(exc)})") from None
        problem = manifest_problem(data)
        if problem is not None:
            raise NotARun(f"{path} is not a gradcam-batch manifest ({problem})")
        data.pop("completed_units", None)  # format 1 kept the unit list twice
        seq = data.get("log_seq", 0)
        for entry in _read_log(Path(out_dir) / COMMIT_LOG):
            if entry["seq"] > seq:
                keys = ("name", "rows", "images", "errors", "units", "tally")
                data["files"].append({k: entry[k] for k in keys if k in entry})
                seq = entry["seq"]
        manifest = cls(out_dir, data, seq=seq)
        manifest._derive()
        return manifest

    @classmethod
    def new(cls, out_dir: Path, *, fingerprint: str, config: dict, versions: dict) -> Manifest:
        data = {
            "format": FORMAT,
            "status": "running",
            "fingerprint": fingerprint,
            "config": config,
            "versions": versions,
            "totals": {"rows_in": 0, "images_ok": 0, "errors": 0, "rows_out": 0, "files": 0},
            "throughput": None,
            "sessions": [],
            "files": [],
            "log_seq": 0,
        }
        return cls(out_dir, data, seq=0)

    def save(self) -> None:
        """Rewrite ``manifest.json`` with every commit folded in, then empty the log."""
        with self._lock:
            # The format key leads the file: survey() recognises the manifest's temp file by it.
            self.data = {"format": FORMAT, **{k: v for k, v in self.data.items() if k != "format"}}
            self.data["log_seq"] = self._seq
            self.bytes_written += atomic_write_json(self.path, self.data)
            if self.log_path.exists():
                with open(self.log_path, "r+b") as fh:
                    fh.truncate(0)
                    os.fsync(fh.fileno())

    @property
    def files(self) -> list[dict]:
        return self.data["files"]

    def completed_units(self) -> set[str]:
        return {u for f in self.files for u in f["units"]}

    def commit_file(
        self, name: str, *, rows: int, images: int, errors: int, units: list[str], tally: dict | None = None
    ) -> None:
        """The commit point of one part file: one fsynced line appended to the log."""
        entry = {"name": name, "rows": rows, "images": images, "errors": errors, "units": list(units)}
        if tally is not None:
            entry["tally"] = dict(tally)
        with self._lock:
            self._append({"seq": self._seq + 1, **entry})
            self._seq += 1
            self.data["files"].append(entry)
            self._add(entry)

    def note_open(self, name: str) -> None:
        """Record, before its temp file exists, that this run writes part file ``name`` (one fsynced line).

        It is what lets a resume or an overwrite delete the file, or its temp file, when no commit
        lists it. Readers of the commits skip the line: it has no sequence number.
        """
        with self._lock:
            self._append({"open": name})

    def opened_files(self) -> set[str]:
        """The part files named by an open line of the log (committed or not)."""
        return {e["open"] for e in _log_lines(self.log_path) if isinstance(e.get("open"), str)}

    def _append(self, record: dict) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with open(self.log_path, "ab") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        self.bytes_written += len(line)

    def _add(self, entry: dict) -> None:
        t = self.data["totals"]
        t["rows_in"] += entry["images"]
        t["images_ok"] += entry["images"] - entry["errors"]
        t["errors"] += entry["errors"]
        t["rows_out"] += entry["rows"]
        t["files"] += 1

    def _derive(self) -> None:
        """Totals always follow from the committed files."""
        self.data["totals"] = {"rows_in": 0, "images_ok": 0, "errors": 0, "rows_out": 0, "files": 0}
        for entry in self.data["files"]:
            self._add(entry)


class NotARun(ValueError):
    """``manifest.json`` is not a manifest of this tool: the directory holds no gradcam-batch run."""


def manifest_problem(data) -> str | None:
    """Why parsed JSON is not a run manifest of a format this version reads; None when it is one."""
    if not isinstance(data, dict):
        return "not a JSON object"
    if data.get("format") not in _READABLE_FORMATS:
        fmt = data.get("format")
        return "no format key" if fmt is None else f"format {fmt!r} is not one this version reads"
    if not isinstance(data.get("fingerprint"), str):
        return "no fingerprint"
    files = data.get("files")
    if not isinstance(files, list):
        return "no file list"
    for f in files:
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not PART_RE.match(f["name"]):
            return f"it lists {f.get('name') if isinstance(f, dict) else f!r}, which is not a part file's name"
        if not isinstance(f.get("units"), list) or not all(
            isinstance(f.get(k), int) and not isinstance(f.get(k), bool) for k in ("rows", "images", "errors")
        ):
            return f"its entry of {f['name']} lacks counts or units"
    if not isinstance(data.get("log_seq", 0), int):
        return "no log sequence number"
    return None


def _log_lines(path: Path) -> list[dict]:
    """The complete JSON-object lines of a log; a torn last line (a crash mid-append) is dropped."""
    try:
        raw_lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        return []
    entries = []
    for raw in raw_lines:
        try:
            entry = json.loads(raw)
        except ValueError:
            continue  # the torn tail, or an empty line
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def _read_log(path: Path) -> list[dict]:
    """The commits of a log: lines with a sequence number, a part file's name, counts and units."""
    return [
        e
        for e in _log_lines(path)
        if isinstance(e.get("seq"), int)
        and isinstance(e.get("units"), list)
        and isinstance(e.get("name"), str)
        and PART_RE.match(e["name"])
        and all(isinstance(e.get(k), int) for k in ("rows", "images", "errors"))
        and _is_tally(e.get("tally", {}))
    ]


def _is_tally(t) -> bool:
    """A commit's tally: names to numbers."""
    return isinstance(t, dict) and all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in t.items()
    )


class OutputLock:
    """An exclusive ``flock`` on ``OUT/.lock``, held while a run writes to ``OUT``."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LOCK
        self._fh = None

    def acquire(self) -> None:
        import fcntl

        from gradcam_batch.engine.job.config import OutputBusy

        fh = open(self.path, "a+")  # noqa: SIM115  (held open for the whole run: the lock lives on it)
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().split()
            fh.close()
            who = f" (pid {holder[0]} on {holder[1]})" if len(holder) >= 2 else ""
            out = self.path.parent
            raise OutputBusy(f"{out} is in use by another gradcam-batch run{who}") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()} {socket.gethostname()}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            import fcntl

            with contextlib.suppress(OSError):
                self._fh.truncate(0)
                fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def next_part_index(manifest: Manifest) -> int:
    nums = [int(m.group(1)) for f in manifest.files if (m := PART_RE.match(f["name"]))]
    return max(nums, default=-1) + 1


# -- writer ----------------------------------------------------------------------------------------------


@dataclass
class WriteItem:
    """The output rows of one batch, and what they count for."""

    table: pa.Table
    images: int  # input images the rows stand for
    errors: int  # of which error rows
    unit_key: str | None = None  # set when this item ends a unit


class HeatmapWriter:
    """A background thread that writes ``WriteItem`` tables into Parquet files and commits them.

    ``put`` blocks when ``queue_depth`` batches wait (backpressure on the compute stage). A file
    is closed and committed once it holds at least ``rows_per_file`` rows and a unit has ended.
    Row groups are flushed every ``row_group_bytes`` so that the writer never holds a whole file.
    """

    _STOP = object()

    def __init__(
        self,
        out_dir: Path,
        schema: pa.Schema,
        manifest: Manifest,
        *,
        rows_per_file: int = 10_000,
        queue_depth: int = 4,
        first_part: int = 0,
        row_group_bytes: int = 32 << 20,
        compression_level: int | None = None,
        on_commit=None,
        tally=None,
    ):
        self.out_dir = Path(out_dir)
        self.schema = schema
        self.manifest = manifest
        self.rows_per_file = rows_per_file
        self.row_group_bytes = row_group_bytes
        self.compression_level = compression_level
        self.on_commit = on_commit
        self.tally = tally  # table -> {name: number}: what each file adds to the summary, kept on its commit
        self._file_tally: dict[str, float] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=queue_depth)
        self._part = first_part
        self._error: BaseException | None = None
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        self._pending: list[pa.Table] = []
        self._pending_bytes = 0
        self._file_rows = self._file_images = self._file_errors = 0
        self._file_units: list[str] = []
        self._unit_open = False  # the last item written did not end its unit
        self.rows_written = 0
        self.write_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="gradcam-writer", daemon=True)
        self._thread.start()

    # -- producer side --
    def put(self, item: WriteItem) -> None:
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Write what is queued, commit the last file if it ends at a unit's end, and stop the thread.

        Also the way out after a failure upstream: the whole units already handed over are kept,
        and the rows of a unit that did not end are never committed.
        """
        self.put(self._STOP)  # type: ignore[arg-type]
        self._thread.join()
        self._raise_if_failed()

    def abort(self) -> None:
        """Stop without committing; the temp file is removed."""
        self._error = self._error or RuntimeError("aborted")
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._queue.put(self._STOP)
        self._thread.join(timeout=30)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            if isinstance(self._error, OSError):  # a full disk or an I/O error: the runner says "rerun"
                raise self._error
            raise RuntimeError(f"the Parquet writer failed: {self._error}") from self._error

    # -- writer thread --
    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is self._STOP:
                    break
                if self._error is not None:
                    continue
                t0 = time.perf_counter()
                self._write(item)
                self.write_seconds += time.perf_counter() - t0
            if self._error is None and not self._unit_open:
                self._finish_file()
        except BaseException as exc:  # surfaced to the producer by put()/close()
            self._error = exc
        finally:
            if self._writer is not None:
                with contextlib.suppress(Exception):
                    self._writer.close()
                self._writer = None
            if self._tmp is not None and self._tmp.exists():
                self._tmp.unlink()

    def _write(self, item: WriteItem) -> None:
        table = item.table
        if self._writer is None:
            name = f"part-{self._part:05d}.parquet"
            tmp = self.out_dir / f".{name}.tmp"
            final = self.out_dir / name
            if os.path.lexists(final):  # the output checks keep foreign files out of the tool's names
                raise FileExistsError(errno.EEXIST, "a file has the name of the next part file", str(final))
            self.manifest.note_open(name)
            with open(tmp, "xb"):  # created here, or FileExistsError: never another's file
                pass
            self._tmp = tmp
            self._writer = pq.ParquetWriter(
                tmp, self.schema, compression="zstd", compression_level=self.compression_level
            )
        if table.num_rows:
            self._pending.append(table)
            self._pending_bytes += table.nbytes
        self._file_rows += table.num_rows
        self._file_images += item.images
        self._file_errors += item.errors
        if self.tally is not None and table.num_rows:
            for k, v in self.tally(table).items():
                self._file_tally[k] = self._file_tally.get(k, 0) + v
        self._unit_open = item.unit_key is None
        if self._pending_bytes >= self.row_group_bytes:
            self._flush()
        if item.unit_key is not None:
            self._file_units.append(item.unit_key)
            if self._file_rows >= self.rows_per_file:
                self._finish_file()

    def _flush(self) -> None:
        if self._pending and self._writer is not None:
            self._writer.write_table(pa.concat_tables(self._pending), row_group_size=1 << 30)
            self.rows_written += sum(t.num_rows for t in self._pending)
        self._pending, self._pending_bytes = [], 0

    def _finish_file(self) -> None:
        if self._writer is None:
            return
        self._flush()
        self._writer.close()
        self._writer = None
        assert self._tmp is not None
        with open(self._tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        name = f"part-{self._part:05d}.parquet"
        if os.path.lexists(self.out_dir / name):
            raise FileExistsError(errno.EEXIST, "a file took the part file's name while it was written", name)
        os.replace(self._tmp, self.out_dir / name)
        self._tmp = None
        fsync_path(self.out_dir)
        self.manifest.commit_file(
            name,
            rows=self._file_rows,
            images=self._file_images,
            errors=self._file_errors,
            units=self._file_units,
            tally=self._file_tally if self.tally is not None else None,
        )
        if self.on_commit is not None:
            self.on_commit(name)
        self._part += 1
        self._file_rows = self._file_images = self._file_errors = 0
        self._file_units = []
        self._file_tally = {}


__all__ = [
    "COMMIT_LOG",
    "LOCK",
    "MANIFEST",
    "HeatmapWriter",
    "Manifest",
    "MANIFEST_TMP",
    "PART_RE",
    "NotARun",
    "OutputLock",
    "WriteItem",
    "atomic_write_json",
    "first_line_of",
    "fsync_path",
    "manifest_problem",
    "next_part_index",
]
