"""The Parquet sink: the output schema, ``HeatmapWriter`` and the run manifest.

Output rows: one per explained (image, class), plus one ``status="error"`` row per image that
could not be decoded. Files are zstd Parquet named ``part-NNNNN.parquet``.

Exactly-once writing (what makes ``--resume`` safe after a SIGKILL at any moment):

1. A file is written as ``.part-NNNNN.parquet.tmp``, closed, fsynced, then renamed to
   ``part-NNNNN.parquet`` (``os.replace`` is atomic on one filesystem).
2. A file only ever holds whole input *units*; after the rename, ``manifest.json`` is rewritten
   (temp file + atomic rename) with the new file and its units. That rewrite is the commit
   point: a part file that the manifest does not list is not part of the output.
3. On restart, temp files and unlisted part files are deleted, and the units the manifest
   lists are skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
FORMAT = "gradcam-batch/1"
_PART_RE = re.compile(r"^part-(\d{5,})\.parquet$")
# Names that the sink itself puts in an output directory; nothing else is ever deleted.
_OWN_RE = re.compile(r"^(part-\d{5,}\.parquet|\.part-\d{5,}\.parquet\.tmp|manifest\.json|\.manifest\.json\.tmp)$")
RESULT_COLUMNS = (
    "class_index",
    "class_rank",
    "label",
    "score",
    "probability",
    "cam",
    "heatmap",
    "peak_y",
    "peak_x",
    "cam_max",
    "status",
    "error",
)
HEATMAP_DTYPES = {"uint8": (pa.uint8(), np.uint8), "float16": (pa.float16(), np.float16)}


def output_schema(
    *,
    id_type: pa.DataType,
    passthrough: list[pa.Field],
    label_type: pa.DataType | None,
    cam_shape: tuple[int, int],
    heatmap_shape: tuple[int, int] | None,
    heatmap_dtype: str = "uint8",
) -> pa.Schema:
    """The schema of every output file.

    ``label`` is present only with a label column, ``heatmap`` only when a heatmap size is set.
    """
    fields = [pa.field("id", id_type)]
    fields += passthrough
    fields += [pa.field("class_index", pa.int32()), pa.field("class_rank", pa.int8())]
    if label_type is not None:
        fields.append(pa.field("label", label_type))
    fields += [
        pa.field("score", pa.float32()),
        pa.field("probability", pa.float32()),
        pa.field("cam", pa.fixed_shape_tensor(pa.float16(), list(cam_shape))),
    ]
    if heatmap_shape is not None:
        fields.append(pa.field("heatmap", pa.fixed_shape_tensor(HEATMAP_DTYPES[heatmap_dtype][0], list(heatmap_shape))))
    fields += [
        pa.field("peak_y", pa.int32()),
        pa.field("peak_x", pa.int32()),
        pa.field("cam_max", pa.float32()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
    ]
    return pa.schema(fields)


@dataclass
class ResultBatch:
    """The explained rows of one ``DecodedBatch``, on the host.

    ``rows`` holds the per-image output columns that come from the input (``id``, the passed
    through columns, ``label``) for all n images; the arrays hold the m decoded ones.
    """

    unit_key: str | None  # set on the last batch of a unit
    rows: pa.Table  # (n,) id, passthrough, label
    ok: np.ndarray  # (n,) bool
    errors: list[str | None]  # (n,) decode errors
    classes: np.ndarray  # (m, C) int64
    keep: np.ndarray  # (m, C) bool: False for duplicates and invalid label slots
    scores: np.ndarray  # (m, C) float32
    probabilities: np.ndarray  # (m, C) float32
    cams: np.ndarray  # (m, C, h, w) float16
    heatmaps: np.ndarray | None  # (m, C, H, W) uint8/float16
    cam_max: np.ndarray  # (m, C) float32
    peaks: np.ndarray  # (m, C, 2) int64
    notes: list[str | None]  # (m,) a remark for decoded rows (e.g. a label out of range)

    @property
    def num_images(self) -> int:
        return len(self.ok)


def _ranks(scores: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Rank 0 = highest score among the kept classes of each image."""
    masked = np.where(keep, scores, -np.inf)
    order = np.argsort(-masked, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(order.shape[1])[None, :].repeat(order.shape[0], 0), axis=1)
    return ranks


def _tensor_column(values: np.ndarray, valid: np.ndarray, shape: tuple[int, ...], typ: pa.DataType) -> pa.Array:
    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    storage = pa.FixedSizeListArray.from_arrays(flat, int(np.prod(shape)), mask=pa.array(~valid))
    return pa.ExtensionArray.from_storage(typ, storage)


def build_table(batch: ResultBatch, schema: pa.Schema) -> pa.Table:
    """Arrow rows for one batch, in input order, then class rank within an image."""
    n = batch.num_images
    ok_index = np.flatnonzero(batch.ok)
    m, c = batch.classes.shape if len(ok_index) else (0, 0)
    # Explained rows: (image, slot) pairs that are kept.
    ranks = _ranks(batch.scores, batch.keep) if m else np.zeros((0, 0), np.int64)
    img_of, slot_of = np.nonzero(batch.keep) if m else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    row_ok = ok_index[img_of]
    rank_ok = ranks[img_of, slot_of]
    row_err = np.flatnonzero(~batch.ok)
    row_all = np.concatenate([row_ok, row_err])
    rank_all = np.concatenate([rank_ok, np.zeros(len(row_err), np.int64)])
    order = np.lexsort((rank_all, row_all))
    n_ok, n_out = len(row_ok), len(row_all)
    is_ok = order < n_ok
    src = np.where(is_ok, order, 0)  # index into the explained rows (meaningless where not ok)
    i_img, i_slot = img_of[src] if n_ok else src, slot_of[src] if n_ok else src

    def pick(arr: np.ndarray | None, fill=0) -> np.ndarray:
        if arr is None or n_ok == 0:
            return None
        return arr[i_img, i_slot]

    def col(values, typ):
        if values is None:
            return pa.nulls(n_out, typ)
        return pa.array(values, type=typ, mask=~is_ok)

    taken = batch.rows.take(pa.array(row_all[order], pa.int64())) if n else batch.rows
    arrays: dict[str, pa.Array] = {name: taken.column(name) for name in taken.column_names}
    arrays["class_index"] = col(pick(batch.classes), pa.int32())
    arrays["class_rank"] = col(rank_all[order], pa.int8())
    arrays["score"] = col(pick(batch.scores), pa.float32())
    arrays["probability"] = col(pick(batch.probabilities), pa.float32())
    cam_type = schema.field("cam").type
    cam_shape = tuple(cam_type.shape)
    cams = pick(batch.cams)
    if cams is None:
        cams = np.zeros((n_out, *cam_shape), np.float16)
    arrays["cam"] = _tensor_column(
        np.where(is_ok[:, None, None], cams, 0).astype(np.float16), is_ok, cam_shape, cam_type
    )
    if "heatmap" in schema.names:
        heat_type = schema.field("heatmap").type
        heat_shape = tuple(heat_type.shape)
        heat_np = HEATMAP_DTYPES["uint8" if heat_type.value_type == pa.uint8() else "float16"][1]
        heat = pick(batch.heatmaps)
        if heat is None:
            heat = np.zeros((n_out, *heat_shape), heat_np)
        heat = np.where(is_ok[:, None, None], heat, 0).astype(heat_np)
        arrays["heatmap"] = _tensor_column(heat, is_ok, heat_shape, heat_type)
    peaks = pick(batch.peaks)
    arrays["peak_y"] = col(None if peaks is None else peaks[:, 0], pa.int32())
    arrays["peak_x"] = col(None if peaks is None else peaks[:, 1], pa.int32())
    arrays["cam_max"] = col(pick(batch.cam_max), pa.float32())
    row_sorted = row_all[order]
    arrays["status"] = pa.array(np.where(is_ok, "ok", "error").astype(object), pa.string())
    ok_pos = np.full(n, -1, np.int64)
    ok_pos[ok_index] = np.arange(len(ok_index))
    errors = [
        (batch.notes[ok_pos[r]] if ok else batch.errors[r])
        for r, ok in zip(row_sorted.tolist(), is_ok.tolist(), strict=True)
    ]
    arrays["error"] = pa.array(errors, pa.string())
    return pa.Table.from_arrays([arrays[f.name] for f in schema], schema=schema)


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


def atomic_write_json(path: Path, data: dict) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


class Manifest:
    """``manifest.json``: config, versions, counts, throughput and the committed files and units."""

    def __init__(self, out_dir: Path, data: dict):
        self.out_dir = Path(out_dir)
        self.data = data
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self.out_dir / MANIFEST

    @classmethod
    def load(cls, out_dir: Path) -> Manifest | None:
        path = Path(out_dir) / MANIFEST
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path} is not a readable manifest ({exc}); use --overwrite to start over") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("files"), list):
            raise ValueError(f"{path} was not written by this version of gradcam-batch; use --overwrite")
        manifest = cls(out_dir, data)
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
            "completed_units": [],
        }
        return cls(out_dir, data)

    def save(self) -> None:
        with self._lock:
            atomic_write_json(self.path, self.data)

    @property
    def files(self) -> list[dict]:
        return self.data["files"]

    def completed_units(self) -> set[str]:
        return {u for f in self.files for u in f["units"]}

    def commit_file(self, name: str, *, rows: int, images: int, errors: int, units: list[str]) -> None:
        with self._lock:
            self.data["files"].append({"name": name, "rows": rows, "images": images, "errors": errors, "units": units})
            self._derive()
            atomic_write_json(self.path, self.data)

    def _derive(self) -> None:
        """Totals and the unit list always follow from the committed files."""
        files = self.data["files"]
        images = sum(f["images"] for f in files)
        errors = sum(f["errors"] for f in files)
        self.data["completed_units"] = [u for f in files for u in f["units"]]
        self.data["totals"] = {
            "rows_in": images,
            "images_ok": images - errors,
            "errors": errors,
            "rows_out": sum(f["rows"] for f in files),
            "files": len(files),
        }


def own_files(out_dir: Path) -> list[Path]:
    """Files in ``out_dir`` that the sink writes (parts, temp parts, the manifest)."""
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir() if p.is_file() and _OWN_RE.match(p.name))


def clean_uncommitted(out_dir: Path, manifest: Manifest) -> list[str]:
    """Delete temp files and part files that the manifest does not list; returns their names."""
    listed = {f["name"] for f in manifest.files}
    removed = []
    for p in own_files(out_dir):
        if p.name == MANIFEST:
            continue
        if p.name.endswith(".tmp") or (_PART_RE.match(p.name) and p.name not in listed):
            p.unlink()
            removed.append(p.name)
    missing = [name for name in listed if not (out_dir / name).exists()]
    if missing:
        raise ValueError(f"{out_dir}: the manifest lists {missing[0]}, which is missing; use --overwrite to start over")
    return removed


def next_part_index(manifest: Manifest) -> int:
    nums = [int(m.group(1)) for f in manifest.files if (m := _PART_RE.match(f["name"]))]
    return max(nums, default=-1) + 1


# -- writer ----------------------------------------------------------------------------------------------


class HeatmapWriter:
    """A background thread that turns ``ResultBatch`` objects into Parquet files.

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
    ):
        self.out_dir = Path(out_dir)
        self.schema = schema
        self.manifest = manifest
        self.rows_per_file = rows_per_file
        self.row_group_bytes = row_group_bytes
        self.compression_level = compression_level
        self.on_commit = on_commit
        self._queue: queue.Queue = queue.Queue(maxsize=queue_depth)
        self._part = first_part
        self._error: BaseException | None = None
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        self._pending: list[pa.Table] = []
        self._pending_bytes = 0
        self._file_rows = self._file_images = self._file_errors = 0
        self._file_units: list[str] = []
        self.rows_written = 0
        self.write_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="gradcam-writer", daemon=True)
        self._thread.start()

    # -- producer side --
    def put(self, batch: ResultBatch) -> None:
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(batch, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Write what is left, commit the last file and stop the thread."""
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
            if self._error is None:
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

    def _write(self, batch: ResultBatch) -> None:
        table = build_table(batch, self.schema)
        if self._writer is None:
            self._tmp = self.out_dir / f".part-{self._part:05d}.parquet.tmp"
            self._writer = pq.ParquetWriter(
                self._tmp, self.schema, compression="zstd", compression_level=self.compression_level
            )
        self._pending.append(table)
        self._pending_bytes += table.nbytes
        self._file_rows += table.num_rows
        self._file_images += batch.num_images
        self._file_errors += int((~batch.ok).sum())
        if self._pending_bytes >= self.row_group_bytes:
            self._flush()
        if batch.unit_key is not None:
            self._file_units.append(batch.unit_key)
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
        os.replace(self._tmp, self.out_dir / name)
        self._tmp = None
        fsync_path(self.out_dir)
        self.manifest.commit_file(
            name, rows=self._file_rows, images=self._file_images, errors=self._file_errors, units=self._file_units
        )
        if self.on_commit is not None:
            self.on_commit(name)
        self._part += 1
        self._file_rows = self._file_images = self._file_errors = 0
        self._file_units = []


__all__ = [
    "HEATMAP_DTYPES",
    "MANIFEST",
    "RESULT_COLUMNS",
    "HeatmapWriter",
    "Manifest",
    "ResultBatch",
    "atomic_write_json",
    "build_table",
    "clean_uncommitted",
    "next_part_index",
    "output_schema",
    "own_files",
]
