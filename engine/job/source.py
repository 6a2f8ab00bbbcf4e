"""The Parquet source: reads a run's units and decodes their images into batches, for both runners.

- The local runner streams ``ParquetSource.batches(units)``: each row group is read once (the span
  of its pending units, the needed columns only) and its rows are decoded, resized and cropped in a
  thread pool (Pillow releases the GIL while decoding and resampling) into ``DecodedBatch``es of
  (n, H, W, 3) uint8 images.
- The Ray runner's stages read each unit's rows undecoded (``unit_rows``), decode cells of the
  image column (``decode_values``) and stack them (``assemble_images``).

Failure policy: a transient ``OSError`` while reading (an image file, a row group) is retried
with exponential backoff (``retries.py``); an image that still cannot be read, or cannot be
decoded, or is larger than ``max_image_pixels``, becomes an error row. A row group that cannot be
read raises ``InputReadError``: a unit never turns into error rows silently.

What it builds on lives beside it: the inputs and units in ``inputs.py``, the geometry in
``preprocess.py``, the decode and its memory budget in ``decode.py``, the retries in ``retries.py``
and the errors in ``errors.py``. With ``device_jpeg``, JPEGs stay encoded in the batch and the batch
step decodes them on the device (``device_jpeg.py``). No torch here. The README's
``gradcam-batch run`` section is the user's guide to inputs and error rows.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gradcam_batch.engine.errors import first_line
from gradcam_batch.engine.job.decode import (
    DEFAULT_DECODE_MEMORY,
    DEFAULT_MAX_IMAGE_PIXELS,
    PixelBudget,
    decode_image,
    jpeg_fits_device,
    oriented_size,
)
from gradcam_batch.engine.job.errors import DecodeError, InputReadError, SourceError
from gradcam_batch.engine.job.inputs import InputFile, Unit, image_kind, read_image_bytes
from gradcam_batch.engine.job.preprocess import Preprocess
from gradcam_batch.engine.job.retries import (
    READ_ATTEMPTS,
    READ_RETRY_DELAY_S,
    READ_RETRY_MAX_DELAY_S,
    call_with_retries,
    is_permanent_os_error,
)

_JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass
class DecodedBatch:
    """Up to ``batch_size`` consecutive rows of one unit, decoded."""

    unit: Unit
    unit_done: bool  # the last batch of its unit
    rows: pa.Table  # the projected non-image columns of every row, in input order
    row_index: np.ndarray  # (n,) int64 row index within the input file
    images: np.ndarray  # (m, H, W, 3) uint8, the rows that decoded
    ok: np.ndarray  # (n,) bool
    errors: list[str | None]  # (n,) the reason for rows that did not decode
    # With device JPEG decode: (position in ``images``, encoded bytes) of the rows still to decode.
    jpegs: list[tuple[int, bytes]] = field(default_factory=list)
    # (n, 2) int64 (W, H) of each image as shown (EXIF orientation applied), -1 where not read;
    # None unless the source was asked for sizes.
    sizes: np.ndarray | None = None

    @property
    def num_rows(self) -> int:
        return len(self.ok)


class DecodeResult(NamedTuple):
    """One row's decode: its pixels, or its JPEG left for the device decoder, or None with the error."""

    pixels: np.ndarray | bytes | None
    error: str | None
    size: tuple[int, int] | None  # (W, H) as shown, when the source was asked for sizes


def result_sizes(results: Sequence[DecodeResult]) -> np.ndarray:
    """The (n, 2) sizes of ``decode_value`` results, -1 for rows without one."""
    return np.array([r[2] if len(r) > 2 and r[2] is not None else (-1, -1) for r in results], np.int64).reshape(-1, 2)


def assemble_images(
    results: Sequence[tuple], out_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, bytes]]]:
    """Stack decode results ``(array | jpeg bytes | None, error)`` into one batch.

    Returns the decoded images (n_ok, H, W, 3) uint8, the per-row ok flags, and the JPEGs left
    for the device decoder as (slot in images, bytes).
    """
    h, w = out_size
    ok = np.array([r[0] is not None for r in results], dtype=bool)
    images = np.empty((int(ok.sum()), h, w, 3), dtype=np.uint8)
    jpegs: list[tuple[int, bytes]] = []
    j = 0
    for r in results:
        arr = r[0]
        if isinstance(arr, bytes):
            jpegs.append((j, arr))
            j += 1
        elif arr is not None:
            images[j] = arr
            j += 1
    return images, ok, jpegs


class ParquetSource:
    """Streams the given units as ``DecodedBatch`` objects.

    ``batches(units)`` reads each row group once, the rows its pending units span (only the
    needed columns); ``read_unit(unit)`` reads that one unit's rows only.
    Rows are decoded in a thread pool of ``workers`` threads. Memory is the rows read plus the
    batches the consumer holds, plus at most ``decode_memory`` bytes of full-size decoded pixels.

    ``max_image_pixels``: larger images (after JPEG draft) become error rows; None leaves only
    Pillow's limit. ``decode_memory``: the ``PixelBudget`` of the decode threads, in bytes; None
    for no bound. ``read_attempts``, ``retry_delay``: tries and first backoff for a transient
    ``OSError`` (see ``call_with_retries``).
    """

    def __init__(
        self,
        files: Sequence[InputFile],
        image_column: str,
        columns: Sequence[str],
        prep: Preprocess,
        *,
        batch_size: int = 64,
        workers: int | None = None,
        device_jpeg: bool = False,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        decode_memory: int | None = DEFAULT_DECODE_MEMORY,
        read_attempts: int = READ_ATTEMPTS,
        retry_delay: float = READ_RETRY_DELAY_S,
        want_sizes: bool = False,
    ):
        if max_image_pixels is not None and max_image_pixels < 1:
            raise ValueError("max_image_pixels must be positive (or None for Pillow's limit)")
        if read_attempts < 1:
            raise ValueError("read_attempts must be at least 1")
        if retry_delay < 0:
            raise ValueError("retry_delay must not be negative")
        self.files = list(files)
        # Also pass the image column itself on (useful for path columns).
        self.keep_image = image_column in columns
        self.image_column = image_column
        self.columns = [c for c in dict.fromkeys(columns) if c != image_column]
        self.prep = prep
        self.device_jpeg = device_jpeg
        self.batch_size = batch_size
        self.workers = workers or min(8, os.cpu_count() or 1)
        self.max_image_pixels = max_image_pixels
        self.budget = PixelBudget(decode_memory) if decode_memory is not None else None
        self.read_attempts = read_attempts
        self.retry_delay = retry_delay
        self.want_sizes = want_sizes  # record each image's (W, H) as shown (for box geometry)
        self.kind = image_kind(self.files[0].schema.field(image_column).type)
        if self.kind is None:
            t = self.files[0].schema.field(image_column).type
            raise SourceError(
                f"column {image_column!r} has type {t}; images must be binary, struct<bytes, path> or string paths"
            )

    # -- one image --

    def decode_value(self, value, f: InputFile) -> DecodeResult:
        """One cell of the image column of ``f``, decoded: never raises for a bad image, says why instead.

        A JPEG that the device decoder is to decode stays encoded; ``size`` is filled when the
        source was asked for sizes.
        """
        try:
            data = read_image_bytes(value, self.kind, f, attempts=self.read_attempts, retry_delay=self.retry_delay)
            if self.device_jpeg and data[:3] == _JPEG_MAGIC and jpeg_fits_device(data, self.max_image_pixels):
                pixels = bytes(data)  # decoded later, on the compute device
            else:
                pixels = decode_image(data, self.prep, max_image_pixels=self.max_image_pixels, budget=self.budget)
            return DecodeResult(pixels, None, oriented_size(data) if self.want_sizes else None)
        except DecodeError as exc:
            return DecodeResult(None, str(exc), None)

    # -- rows --

    def _read_rows(self, f: InputFile, row_group: int, start: int, stop: int) -> pa.Table:
        """Rows [start, stop) of the file (inside ``row_group``), the needed columns only.

        A whole row group is read in one call; a part of one is streamed and the stream stops
        after ``stop``, so rows past the part are never decoded and only the part is kept.
        Transient errors are retried; then ``InputReadError``.
        """
        columns = [self.image_column, *self.columns]
        rg_start = sum(f.row_group_rows[:row_group])
        lo, hi = start - rg_start, stop - rg_start
        if not 0 <= lo < hi <= f.row_group_rows[row_group]:
            raise ValueError(f"rows {start}-{stop} are not inside row group {row_group} of {f.uri}")

        def read() -> pa.Table:
            with f.filesystem.open_input_file(f.path) as fh:
                pf = pq.ParquetFile(fh)
                if lo == 0 and hi == f.row_group_rows[row_group]:
                    return pf.read_row_group(row_group, columns=columns)
                parts: list[pa.RecordBatch] = []
                at = 0  # row within the row group of the next batch
                with contextlib.closing(
                    pf.iter_batches(batch_size=hi - lo, row_groups=[row_group], columns=columns)
                ) as it:
                    for rb in it:
                        first, last = max(lo, at), min(hi, at + rb.num_rows)
                        if last > first:
                            parts.append(rb.slice(first - at, last - first))
                        at += rb.num_rows
                        if at >= hi:
                            break
                return pa.Table.from_batches(parts)

        try:
            return call_with_retries(read, attempts=self.read_attempts, delay=self.retry_delay)
        except OSError as exc:
            tries = "" if is_permanent_os_error(exc) else f" after {self.read_attempts} attempts"
            raise InputReadError(
                f"cannot read rows {start}-{stop} (row group {row_group}) of {f.uri}{tries}: {first_line(exc)}"
            ) from exc

    def unit_rows(self, units: Sequence[Unit], *, chunk_rows: int = 4096) -> Iterator[tuple[Unit, pa.Table]]:
        """Each unit's rows, undecoded (the image column first, then the needed columns), in the given order.

        Units that follow each other in one row group are read in one pass over it, streamed in
        chunks of ``chunk_rows`` rows: each row up to the last such unit's end is read once, and
        only the unit being filled and one chunk are held. A transient ``OSError`` is tried again,
        ``read_attempts`` tries in a row at most, each pass resuming at the first unit not yet
        yielded (rows before it are read again: once per attempt); then ``InputReadError``.
        """
        i = 0
        while i < len(units):
            j = i + 1
            while (
                j < len(units)
                and (units[j].file_index, units[j].row_group) == (units[i].file_index, units[i].row_group)
                and units[j].start >= units[j - 1].stop
            ):
                j += 1
            yield from self._unit_pass(list(units[i:j]), chunk_rows)
            i = j

    def _unit_pass(self, units: list[Unit], chunk_rows: int) -> Iterator[tuple[Unit, pa.Table]]:
        """``unit_rows`` for units of one row group, in row order."""
        f = self.files[units[0].file_index]
        rg = units[0].row_group
        rg_start = sum(f.row_group_rows[:rg])
        columns = [self.image_column, *self.columns]
        for u in units:
            if not rg_start <= u.start < u.stop <= rg_start + f.row_group_rows[rg]:
                raise ValueError(f"rows {u.start}-{u.stop} are not inside row group {rg} of {f.uri}")
        todo = list(units)
        attempt = 0
        while todo:
            try:
                with f.filesystem.open_input_file(f.path) as fh:
                    batches = pq.ParquetFile(fh).iter_batches(
                        batch_size=max(1, min(chunk_rows, units[-1].stop - rg_start)),
                        row_groups=[rg],
                        columns=columns,
                        use_threads=False,
                    )
                    with contextlib.closing(batches) as it:
                        at = rg_start  # file row of the next chunk's first row
                        parts: list[pa.RecordBatch] = []
                        for rb in it:
                            while todo and rb.num_rows:
                                u = todo[0]
                                lo, hi = max(u.start, at), min(u.stop, at + rb.num_rows)
                                if hi > lo:
                                    parts.append(rb.slice(lo - at, hi - lo))
                                if at + rb.num_rows < u.stop:
                                    break  # the unit goes on in the next chunk
                                yield u, pa.Table.from_batches(parts, schema=rb.schema)
                                parts = []
                                todo.pop(0)
                                attempt = 0
                            at += rb.num_rows
                            if not todo:
                                break
                if todo:
                    raise OSError(f"row group {rg} of {f.uri} ended before row {todo[0].stop}")
            except OSError as exc:
                attempt += 1
                if attempt >= self.read_attempts or is_permanent_os_error(exc):
                    u = todo[0]
                    tries = "" if is_permanent_os_error(exc) else f" after {self.read_attempts} attempts"
                    raise InputReadError(
                        f"cannot read rows {u.start}-{u.stop} (row group {rg}) of {f.uri}{tries}: {first_line(exc)}"
                    ) from exc
                time.sleep(min(READ_RETRY_MAX_DELAY_S, self.retry_delay * 2 ** (attempt - 1)))

    def decode_values(self, values: Sequence, files: Sequence[InputFile]) -> list[DecodeResult]:
        """``decode_value`` over cells of the image column (with the file each came from), in the decode thread pool."""
        if len(values) != len(files):
            raise ValueError(f"{len(values)} values but {len(files)} files")
        with self._pool() as pool:
            return list(pool.map(self.decode_value, values, files))

    def _decode_unit(self, unit: Unit, table: pa.Table, table_start: int, pool) -> Iterator[DecodedBatch]:
        """The unit's rows of ``table`` (whose first row is file row ``table_start``), in batches."""
        f = self.files[unit.file_index]
        for b0 in range(unit.start, unit.stop, self.batch_size):
            b1 = min(b0 + self.batch_size, unit.stop)
            part = table.slice(b0 - table_start, b1 - b0)
            values = part.column(self.image_column).to_pylist()
            results = list(pool.map(self.decode_value, values, [f] * len(values)))
            images, ok, jpegs = assemble_images(results, self.prep.out_size)
            yield DecodedBatch(
                unit=unit,
                unit_done=b1 == unit.stop,
                rows=part if self.keep_image else part.drop_columns([self.image_column]),
                row_index=np.arange(b0, b1, dtype=np.int64),
                images=images,
                ok=ok,
                errors=[r[1] for r in results],
                jpegs=jpegs,
                sizes=result_sizes(results) if self.want_sizes else None,
            )

    def _pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(self.workers, thread_name_prefix="gradcam-decode")

    def batches(self, units: Sequence[Unit]) -> Iterator[DecodedBatch]:
        """The units' rows, decoded, in batches of at most ``batch_size`` rows of one unit.

        Units are grouped by row group (in the order of their first appearance), and each row
        group is read once: the span from its first pending row to its last.
        """
        by_group: dict[tuple[int, int], list[Unit]] = {}
        for u in units:
            by_group.setdefault((u.file_index, u.row_group), []).append(u)
        with self._pool() as pool:
            for (fi, rg), group in by_group.items():
                lo, hi = min(u.start for u in group), max(u.stop for u in group)
                table = self._read_rows(self.files[fi], rg, lo, hi)
                for unit in group:
                    yield from self._decode_unit(unit, table, lo, pool)
                del table

    def read_unit(self, unit: Unit) -> Iterator[DecodedBatch]:
        """One unit's rows, decoded: what ``batches([unit])`` yields, reading only that unit's rows."""
        with self._pool() as pool:
            table = self._read_rows(self.files[unit.file_index], unit.row_group, unit.start, unit.stop)
            yield from self._decode_unit(unit, table, unit.start, pool)


__all__ = ["DecodeResult", "DecodedBatch", "ParquetSource", "assemble_images", "result_sizes"]
