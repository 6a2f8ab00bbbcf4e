"""The Parquet source: input discovery, image-column detection, streaming, decode and resize.

- ``discover_inputs`` turns the command line's INPUT arguments (files, directories, globs and
  URIs that ``pyarrow.fs`` understands) into a sorted list of ``InputFile``; every file is opened
  once to check that it is Parquet and to read its row-group layout.
- ``detect_image_column`` picks the column that holds the images: encoded bytes, a Hugging Face
  ``struct<bytes, path>`` image, or a string column of paths / URIs.
- ``plan_units`` cuts the files into *units*: fixed row ranges that never cross a row group.
  A unit is what the resume logic records as done.
- ``ParquetSource`` streams the pending units a row group at a time (or one unit, for a Ray
  task), projecting only the needed columns, and decodes + resizes + crops the images in a
  thread pool (Pillow releases the GIL while decoding and resampling) into (n, H, W, 3) uint8
  arrays.
- Failure policy: a transient ``OSError`` while reading (an image file, a row group) is retried
  with exponential backoff; an image that still cannot be read, or cannot be decoded, or is
  larger than ``max_image_pixels``, becomes an error row. A row group that cannot be read raises
  ``InputReadError``: a unit never turns into error rows silently.
- Memory: ``PixelBudget`` bounds the bytes of full-size decoded pixels that the decode threads
  hold at once, so a file of huge images is decoded a few (or one) at a time.

Normalization (mean/std) is *not* done here: it runs on the device, on uint8 input, which
moves 4x fewer bytes from host to device than float32 would.

One module, past 500 lines, because discovery, units, decode and streaming share the failure
policy above and the ``InputFile``/``Unit`` types. The README's ``gradcam-batch run`` section is
the user's guide to inputs and error rows.

One module past 500 lines because discovery, decode and streaming share the retry, pixel-budget and
size-cap rules; split, each part would import the others.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import posixpath
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from gradcam_batch.engine.errors import first_line as _first_line

IMAGE_KINDS = ("bytes", "struct", "path")
_IMAGE_NAME_HINTS = ("image", "img", "picture", "photo")
_PATH_NAME_HINTS = ("path", "file", "filename", "uri", "url")
_GLOB_CHARS = "*?["
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_JPEG_MAGIC = b"\xff\xd8\xff"
# A truncated file must become an error row, not a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Pillow allocates a large image in blocks of this many bytes. Its default, 16 MiB, is under
# glibc's largest dynamic mmap threshold (32 MiB): once one block is freed, later blocks come from
# the malloc arena of the decode thread that asked, and each thread's arena keeps the pages of the
# largest image it decoded, so the decode budget bounds nothing. Blocks over 32 MiB are always
# mmap'd and go back to the system when the image is freed. Small images (one block of their own
# size) are not affected; PILLOW_BLOCK_SIZE, when set, wins.
PILLOW_BLOCK_SIZE = 64 << 20
if "PILLOW_BLOCK_SIZE" not in os.environ and Image.core.get_block_size() < PILLOW_BLOCK_SIZE:
    Image.core.set_block_size(PILLOW_BLOCK_SIZE)

# The largest image (width x height, after JPEG draft) that is decoded; larger ones become error
# rows. The default is Pillow's own DecompressionBombError threshold (2 x Image.MAX_IMAGE_PIXELS),
# written out so that it does not move with Pillow's version or with a caller that changes
# Image.MAX_IMAGE_PIXELS: lowering it is the user's choice, raising it above Pillow's threshold
# has no effect (Pillow refuses such images when it opens them). Memory is bounded separately,
# by the decode budget, not by this cap.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970
# Bytes of full-size decoded pixels that the decode threads may hold at once (as counted by
# ``decode_memory_estimate``, 8 bytes a pixel for RGB). 1 GiB lets eight threads decode 12 Mpx
# PNGs side by side (96 MB each), two images over ~67 Mpx never overlap, and one over ~134 Mpx
# decodes alone; at the default cap, that one holds at most ~0.7 GiB (Pillow's 4 bytes a pixel).
DEFAULT_DECODE_MEMORY = 1 << 30
# A transient OSError while reading is tried again, READ_ATTEMPTS tries in all, waiting
# READ_RETRY_DELAY_S, then twice as long each time, at most READ_RETRY_MAX_DELAY_S.
READ_ATTEMPTS = 3
READ_RETRY_DELAY_S = 0.05
READ_RETRY_MAX_DELAY_S = 2.0

_T = TypeVar("_T")


class SourceError(ValueError):
    """The inputs cannot be read as asked (missing file, not Parquet, missing column, ...)."""


class DecodeError(Exception):
    """One image could not be read or decoded; the message becomes the row's ``error``."""


class InputReadError(OSError):
    """Rows of an input file could not be read (after retries); the original error is the cause.

    Raised, never turned into error rows: the unit stays pending and a rerun resumes it.
    """


# -- I/O retries ----------------------------------------------------------------------------------


def is_permanent_os_error(exc: OSError) -> bool:
    """True for errors that another try cannot fix: missing, not a file, no permission."""
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return True
    # pyarrow reports a directory as a plain OSError.
    text = str(exc).lower()
    return "is a directory" in text or "not a file" in text


def call_with_retries(
    fn: Callable[[], _T],
    *,
    attempts: int = READ_ATTEMPTS,
    delay: float = READ_RETRY_DELAY_S,
    max_delay: float = READ_RETRY_MAX_DELAY_S,
    sleep: Callable[[float], object] = time.sleep,
) -> _T:
    """``fn()``, tried up to ``attempts`` times while it raises a transient ``OSError``.

    Waits ``delay``, ``2 * delay``, ... (at most ``max_delay``) between tries. A permanent error
    (``is_permanent_os_error``) and the last try's error are raised as they are, so a transient
    error that escapes has always been tried ``attempts`` times.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except OSError as exc:
            if attempt == attempts or is_permanent_os_error(exc):
                raise
            sleep(min(max_delay, delay * 2 ** (attempt - 1)))
    raise AssertionError("unreachable")


# -- discovery --------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputFile:
    """One Parquet file of the input."""

    key: str  # stable name: the path relative to the common parent of all inputs
    path: str  # path inside ``filesystem``
    filesystem: pafs.FileSystem = field(compare=False, repr=False)
    uri: str  # what to print and record (a local path or the URI)
    is_local: bool
    row_group_rows: tuple[int, ...]
    schema: pa.Schema = field(compare=False, repr=False)

    @property
    def num_rows(self) -> int:
        return sum(self.row_group_rows)

    @property
    def base_dir(self) -> str:
        """Directory that relative image paths are resolved against."""
        return posixpath.dirname(self.path) if not self.is_local else os.path.dirname(self.path)


def _is_uri(spec: str) -> bool:
    return "://" in spec and not os.path.exists(spec)


def _has_glob(spec: str) -> bool:
    return any(ch in spec for ch in _GLOB_CHARS)


def _visible(name: str) -> bool:
    # Spark/Hive side files (_SUCCESS, _metadata, .crc) are not data.
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(("_", "."))


def _expand_local(spec: str) -> tuple[list[str], str | None]:
    """(files, input directory or None) for one local INPUT argument."""
    if _has_glob(spec):
        files = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p) and _visible(p))
        if not files:
            raise SourceError(f"no files match {spec!r}")
        base = spec[: min(spec.index(c) for c in _GLOB_CHARS if c in spec)]
        return [os.path.abspath(p) for p in files], os.path.abspath(os.path.dirname(base) or ".")
    if os.path.isdir(spec):
        files = []
        for root, dirs, names in os.walk(spec):
            dirs[:] = sorted(d for d in dirs if _visible(d))
            files += [os.path.join(root, n) for n in sorted(names) if n.endswith(".parquet") and _visible(n)]
        if not files:
            raise SourceError(f"no .parquet files in directory {spec}")
        return sorted(os.path.abspath(p) for p in files), os.path.abspath(spec)
    if os.path.isfile(spec):
        return [os.path.abspath(spec)], None
    raise SourceError(f"input not found: {spec}")


def _expand_uri(spec: str) -> tuple[pafs.FileSystem, list[str]]:
    glob_at = min((spec.index(c) for c in _GLOB_CHARS if c in spec), default=-1)
    base = spec if glob_at < 0 else spec[: spec.rfind("/", 0, glob_at)]
    try:
        fs, path = pafs.FileSystem.from_uri(base)
    except Exception as exc:
        raise SourceError(f"cannot open {spec}: {_first_line(exc)}") from None
    if glob_at >= 0:
        import fnmatch

        pattern = path.rstrip("/") + spec[len(base) :]
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        depth = pattern.count("/")

        def matches(p: str) -> bool:
            # fnmatch's * also matches '/', so outside of ** the depth must be the pattern's.
            return fnmatch.fnmatch(p, pattern) and _visible(p) and ("**" in pattern or p.count("/") == depth)

        files = sorted(i.path for i in infos if i.type == pafs.FileType.File and matches(i.path))
        if not files:
            raise SourceError(f"no files match {spec!r}")
        return fs, files
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        files = sorted(
            i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet") and _visible(i.path)
        )
        if not files:
            raise SourceError(f"no .parquet files under {spec}")
        return fs, files
    if info.type == pafs.FileType.File:
        return fs, [path]
    raise SourceError(f"input not found: {spec}")


def discover_inputs(inputs: Sequence[str]) -> tuple[list[InputFile], list[str]]:
    """Resolve INPUT arguments to Parquet files.

    Returns (files, input directories). The input directories are the local directories named
    as inputs (or the fixed part of a glob): the output may not be written inside them.
    Raises ``SourceError`` for anything missing, unreadable or not Parquet.
    """
    if not inputs:
        raise SourceError("no input given")
    found: list[tuple[pafs.FileSystem, str, str, bool]] = []  # fs, path, uri, is_local
    input_dirs: list[str] = []
    local = pafs.LocalFileSystem()
    for spec in inputs:
        if _is_uri(spec):
            fs, paths = _expand_uri(spec)
            scheme = spec.split("://", 1)[0]
            found += [(fs, p, f"{scheme}://{p}" if scheme != "file" else p, scheme == "file") for p in paths]
        else:
            paths, in_dir = _expand_local(spec)
            if in_dir is not None:
                input_dirs.append(in_dir)
            found += [(local, p, p, True) for p in paths]
    seen: set[str] = set()
    unique = []
    for item in found:
        if item[2] not in seen:
            seen.add(item[2])
            unique.append(item)
    common = _common_parent([u for _, _, u, _ in unique])
    files = []
    for fs, path, uri, is_local in unique:
        try:
            with fs.open_input_file(path) as fh:
                meta = pq.ParquetFile(fh).metadata
                schema = meta.schema.to_arrow_schema()
                rg_rows = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        except Exception as exc:
            raise SourceError(f"{uri}: not a readable Parquet file ({_first_line(exc)})") from None
        key = uri[len(common) :].lstrip("/") if common else uri
        files.append(InputFile(key or posixpath.basename(uri), path, fs, uri, is_local, rg_rows, schema))
    return files, input_dirs


def _common_parent(uris: list[str]) -> str:
    if not uris:
        return ""
    if len(uris) == 1:
        return uris[0].rsplit("/", 1)[0] + "/" if "/" in uris[0] else ""
    prefix = os.path.commonprefix(uris)
    return prefix[: prefix.rfind("/") + 1]


# -- columns ------------------------------------------------------------------------------------


def image_kind(dtype: pa.DataType) -> str | None:
    """'bytes', 'struct' (Hugging Face image), 'path', or None when the type cannot hold images."""
    if pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype) or pa.types.is_binary_view(dtype):
        return "bytes"
    if pa.types.is_struct(dtype):
        names = [dtype.field(i).name for i in range(dtype.num_fields)]
        if "bytes" in names and image_kind(dtype.field("bytes").type) == "bytes":
            return "struct"
        return None
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype):
        return "path"
    return None


def detect_image_column(schema: pa.Schema) -> str:
    """The column holding the images, or ``SourceError`` asking for ``--image-column``."""

    def hinted(name: str, hints: tuple[str, ...]) -> bool:
        low = name.lower()
        return any(h in low for h in hints)

    order = {"struct": 0, "bytes": 1, "path": 2}
    cands = []
    for f in schema:
        kind = image_kind(f.type)
        if kind is None or (kind == "path" and not hinted(f.name, _IMAGE_NAME_HINTS + _PATH_NAME_HINTS)):
            continue
        cands.append((order[kind], not hinted(f.name, _IMAGE_NAME_HINTS), f.name))
    if not cands:
        cols = ", ".join(schema.names)
        raise SourceError(f"no image column found among: {cols}; pass --image-column")
    cands.sort(key=lambda c: (c[1], c[0]))
    best = cands[0]
    rivals = [c for c in cands[1:] if c[:2] == best[:2]]
    if rivals:
        names = ", ".join(c[2] for c in [best, *rivals])
        raise SourceError(f"several columns could hold the images ({names}); pass --image-column")
    return best[2]


def check_columns(files: Sequence[InputFile], columns: dict[str, str | None]) -> None:
    """Every named column (role -> name) must exist in every file."""
    for role, name in columns.items():
        if name is None:
            continue
        for f in files:
            if name not in f.schema.names:
                raise SourceError(
                    f"column {name!r} ({role}) not found in {f.uri}; its columns are: {', '.join(f.schema.names)}"
                )


# -- units ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """Rows [start, stop) of one input file, inside one row group."""

    file_index: int
    row_group: int
    start: int  # row index within the file
    stop: int
    key: str  # "<file key>:<start>-<stop>", what the manifest records

    @property
    def rows(self) -> int:
        return self.stop - self.start


def plan_units(files: Sequence[InputFile], unit_rows: int, limit: int | None = None) -> list[Unit]:
    """Cut the files into units of at most ``unit_rows`` rows; ``limit`` keeps the first N rows."""
    if unit_rows < 1:
        raise ValueError("unit_rows must be positive")
    units: list[Unit] = []
    remaining = limit if limit is not None else None
    for fi, f in enumerate(files):
        offset = 0
        for rg, n in enumerate(f.row_group_rows):
            for start in range(offset, offset + n, unit_rows):
                stop = min(start + unit_rows, offset + n)
                if remaining is not None:
                    if remaining <= 0:
                        return units
                    stop = min(stop, start + remaining)
                    remaining -= stop - start
                units.append(Unit(fi, rg, start, stop, f"{f.key}:{start}-{stop}"))
            offset += n
    return units


# -- preprocessing ------------------------------------------------------------------------------


INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
_PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Preprocess:
    """Resize, then center-crop; the result is always ``out_size``.

    ``resize``: an int resizes the shorter side to it (aspect kept), (H, W) resizes exactly,
    None keeps the size. ``crop``: N or (H, W) center crop (N means NxN, as on the command
    line; stored as (N, N)), or None. One of the two must fix the output size, so that images
    batch together. Sizes must be positive integers (``ValueError`` otherwise). ``interpolation``:
    the resize filter, one of ``INTERPOLATIONS`` (timm and Transformers models ask for bicubic).
    """

    resize: int | tuple[int, int] | None = 256
    crop: int | tuple[int, int] | None = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self):
        # Frozen: normalize through object.__setattr__. An int crop becomes (N, N); an int resize
        # stays an int (it means the shorter side, not NxN).
        if self.resize is not None:
            object.__setattr__(self, "resize", _size(self.resize, "resize"))
        if self.crop is not None:
            crop = _size(self.crop, "crop")
            object.__setattr__(self, "crop", (crop, crop) if isinstance(crop, int) else crop)
        if self.crop is None and not isinstance(self.resize, tuple):
            raise ValueError("without a crop, the resize must be HxW so that every image has the same size")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need three values (R, G, B)")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")

    @property
    def out_size(self) -> tuple[int, int]:
        return self.crop if self.crop is not None else self.resize  # type: ignore[return-value]

    def _resize_target(self, w: int, h: int) -> tuple[int, int] | None:
        """(W, H) after the resize step."""
        if self.resize is None:
            return None
        if isinstance(self.resize, tuple):
            return self.resize[1], self.resize[0]
        s = self.resize
        if w <= h:
            return s, max(1, round(h * s / w))
        return max(1, round(w * s / h)), s

    def geometry(self, w: int, h: int) -> tuple[float, float, float, float]:
        """(sx, sy, ox, oy): a point (x, y) of a w x h image lands at (x * sx - ox, y * sy - oy).

        The same resize and center crop as ``__call__``, for boxes given in the original
        image's pixels (continuous coordinates: pixel (y, x) covers [x, x+1) x [y, y+1)).
        """
        target = self._resize_target(w, h) or (w, h)
        tw, th = target
        sx, sy = tw / w, th / h
        ox = oy = 0.0
        if self.crop is not None:
            ch, cw = self.crop
            if tw < cw or th < ch:
                s = max(cw / tw, ch / th)
                nw, nh = max(cw, round(tw * s)), max(ch, round(th * s))
                sx, sy = sx * nw / tw, sy * nh / th
                tw, th = nw, nh
            ox, oy = float((tw - cw) // 2), float((th - ch) // 2)
        return sx, sy, ox, oy

    def __call__(self, img: Image.Image) -> np.ndarray:
        target = self._resize_target(*img.size)
        if target is not None and img.size != target:
            img = img.resize(target, _PIL_FILTERS[self.interpolation], reducing_gap=3.0)
        if self.crop is not None:
            ch, cw = self.crop
            w, h = img.size
            if w < cw or h < ch:
                # Smaller than the crop: scale up so that the crop fits, then crop.
                s = max(cw / w, ch / h)
                img = img.resize((max(cw, round(w * s)), max(ch, round(h * s))), _PIL_FILTERS[self.interpolation])
                w, h = img.size
            left, top = (w - cw) // 2, (h - ch) // 2
            img = img.crop((left, top, left + cw, top + ch))
        arr = np.asarray(img, dtype=np.uint8)
        if arr.shape[:2] != self.out_size:
            raise DecodeError(f"preprocessing produced {arr.shape[:2]}, expected {self.out_size}")
        return arr


def _size(value, what: str) -> int | tuple[int, int]:
    """A positive int, or a pair of positive ints as a tuple; ``ValueError`` naming ``what``."""

    def positive(v) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0

    if positive(value):
        return int(value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(positive(v) for v in value):
        return int(value[0]), int(value[1])
    raise ValueError(f"{what} must be a positive integer N or a pair (H, W) of positive integers, got {value!r}")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB. Alpha is composited over black; 16-bit and float greys are scaled."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        grey = np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return img.convert("RGB")


# -- decode memory ------------------------------------------------------------------------------


class PixelBudget:
    """Bytes of full-size decoded pixels that the decode threads may hold at once.

    ``hold(n)`` waits until ``n`` more bytes fit, holds them for the ``with`` block, then gives
    them back. Requests are served first come, first served, so a stream of small images cannot
    starve a large one; a request larger than the whole budget is served once nothing else is
    held: it runs alone, and never deadlocks. ``peak`` is the most bytes ever held at once.
    """

    def __init__(self, total: int):
        if total < 1:
            raise ValueError("the decode memory budget must be positive")
        self.total = int(total)
        self.held = 0
        self.peak = 0
        self._cond = threading.Condition()
        self._line: deque[object] = deque()  # tickets of the waiting requests, oldest first

    @property
    def waiting(self) -> int:
        """Requests not yet served."""
        with self._cond:
            return len(self._line)

    def acquire(self, n: int) -> None:
        if n < 0:
            raise ValueError("cannot hold a negative number of bytes")
        with self._cond:
            ticket = object()
            self._line.append(ticket)
            try:
                self._cond.wait_for(lambda: self._line[0] is ticket and (self.held == 0 or self.held + n <= self.total))
            finally:
                self._line.remove(ticket)
                self._cond.notify_all()  # the next in line may fit as well (or the line moved)
            self.held += n
            self.peak = max(self.peak, self.held)

    def release(self, n: int) -> None:
        with self._cond:
            self.held -= n
            self._cond.notify_all()

    @contextlib.contextmanager
    def hold(self, n: int) -> Iterator[None]:
        self.acquire(n)
        try:
            yield
        finally:
            self.release(n)


def decode_memory_estimate(mode: str, width: int, height: int) -> int:
    """Bytes a decode of a ``width`` x ``height`` image in Pillow ``mode`` holds at its peak.

    Pillow stores RGB (and every 3-4 band mode) in 4 bytes a pixel. An RGB image may hold one
    full-size copy besides (an EXIF rotation): 8 bytes a pixel. Any other mode is also converted
    to RGB, and alpha is composited over black through a few full-size RGBA images: 16 bytes a
    pixel. An estimate: what matters is that it grows with the pixel count and is not below it.
    """
    return width * height * (8 if mode == "RGB" else 16)


def check_image_size(width: int, height: int, max_image_pixels: int | None) -> None:
    """``DecodeError`` when the image has more than ``max_image_pixels`` pixels (None: no cap)."""
    if max_image_pixels is not None and width * height > max_image_pixels:
        raise DecodeError(
            f"image too large: {width} x {height} = {width * height} pixels exceeds "
            f"--max-image-pixels {max_image_pixels}"
        )


def decode_image(
    data: bytes,
    prep: Preprocess,
    *,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    budget: PixelBudget | None = None,
) -> np.ndarray:
    """Encoded bytes -> (H, W, 3) uint8 after resize and crop; ``DecodeError`` with the reason.

    The size is checked from the header, before any pixel is decoded: an image with more than
    ``max_image_pixels`` pixels (None: only Pillow's own limit) is refused. A JPEG is compared at
    the size libjpeg will decode it to after ``draft``, which can be 1/8 of the stored size. With
    a ``budget``, the full-size pixels are decoded only once the budget holds their bytes, and
    given back once the image is resized.
    """
    if len(data) == 0:
        raise DecodeError("empty image (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))  # lazy: reads the header only
        if img.format == "JPEG" and prep.resize is not None:
            # Let libjpeg decode at a reduced scale (still >= the target) instead of full size.
            w, h = img.size
            target = prep._resize_target(w, h)
            if target is not None:
                img.draft("RGB", target)
        check_image_size(*img.size, max_image_pixels)
        cost = decode_memory_estimate(img.mode, *img.size)
        with budget.hold(cost) if budget is not None else contextlib.nullcontext():
            img.load()
            # In place: without an orientation tag, exif_transpose would return a full-size copy.
            ImageOps.exif_transpose(img, in_place=True)
            img = to_rgb(img)
            out = prep(img)
            del img  # the full-size pixels go before the budget is given back
        return out
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("cannot identify image format (not an image, or corrupt)") from None
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"image too large: {_first_line(exc)}") from None
    except Exception as exc:
        raise DecodeError(f"cannot decode image: {_first_line(exc)}") from None


def jpeg_fits_device(data: bytes, max_image_pixels: int | None) -> bool:
    """Whether a JPEG may go to the device decoder, which decodes at full size (no draft).

    One whose header size is over the cap goes to Pillow instead, which decodes it drafted (and
    makes it an error row if even that is over the cap). A header Pillow cannot read goes to the
    device, whose Pillow fallback reports the reason.
    """
    if max_image_pixels is None:
        return True
    try:
        w, h = Image.open(io.BytesIO(data)).size
    except Image.DecompressionBombError:
        return False
    except Exception:
        return True
    return w * h <= max_image_pixels


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says that the device ran out of memory (torch's error, or nvJPEG's allocator's)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "allocator_failure" in text


def decode_jpegs_on_device(
    jpegs: Sequence[bytes],
    prep: Preprocess,
    device: torch.device,
    *,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    warn: Callable[[str, str], object] | None = None,
) -> tuple[list[torch.Tensor | None], list[str | None]]:
    """Decode JPEGs with torchvision on ``device`` (nvJPEG on CUDA), then resize and crop there.

    Returns per image an (H, W, 3) uint8 tensor on ``device`` or None with the reason. What does
    not decode on the device falls back to Pillow on the host, which decides whether the image is
    bad (an error row) or only beyond the device decoder (CMYK, unusual sampling). Each fallback
    is reported through ``warn(kind, message)``, which the batch step says once per run per kind:

    - ``"jpeg-oom"``: the device ran out of memory. That says nothing about the images, so none is
      retried on the device (one by one would fail the same way) and the batch decodes on the host:
      the output is right, only slower. Failing the batch instead would stop the run, and a rerun
      would meet the same batch at the same memory.
    - ``"jpeg-batch"``: the batched call refused the batch; the images are retried one at a time.
    - ``"jpeg-image"``: an image failed on the device; Pillow decodes it, or makes it an error row.
    """
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg

    def say(kind: str, message: str) -> None:
        if warn is not None:
            warn(kind, message)

    def out_of_memory(exc: BaseException) -> None:
        say(
            "jpeg-oom",
            f"device JPEG decode ran out of memory on {device} ({_first_line(exc)}); those batches were "
            "decoded by Pillow on the host instead (slower, same output; a smaller --batch-size keeps "
            "them on the device)",
        )

    datas = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in jpegs]
    decoded: list[torch.Tensor | None]
    try:
        decoded = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    except Exception as exc:
        decoded = [None] * len(datas)
        if is_out_of_memory(exc):
            out_of_memory(exc)
        else:
            say(
                "jpeg-batch",
                f"device JPEG decode refused a batch ({_first_line(exc)}); its images were decoded one at a time",
            )
            for i, d in enumerate(datas):
                try:
                    decoded[i] = decode_jpeg(d, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
                except Exception as one:
                    if is_out_of_memory(one):
                        out_of_memory(one)
                        break  # the rest of the batch goes to the host
                    say(
                        "jpeg-image",
                        f"device JPEG decode failed on some images (first: {_first_line(one)}); Pillow decoded "
                        "them on the host, or made them error rows",
                    )
    out: list[torch.Tensor | None] = []
    errors: list[str | None] = []
    for raw, img in zip(jpegs, decoded, strict=True):
        if img is None:
            try:
                out.append(torch.from_numpy(decode_image(raw, prep, max_image_pixels=max_image_pixels)).to(device))
                errors.append(None)
            except DecodeError as exc:
                out.append(None)
                errors.append(str(exc))
            continue
        _, h, w = img.shape
        # torch has no Lanczos filter: bicubic is the closest it has.
        mode = "bicubic" if prep.interpolation == "lanczos" else prep.interpolation
        corners = None if mode == "nearest" else False
        x = img.unsqueeze(0).float()
        target = prep._resize_target(w, h)
        if target is not None and (w, h) != target:
            size = (target[1], target[0])
            x = F.interpolate(x, size=size, mode=mode, antialias=mode != "nearest", align_corners=corners)
        if prep.crop is not None:
            ch, cw = prep.crop
            h2, w2 = x.shape[-2:]
            if h2 < ch or w2 < cw:
                s = max(cw / w2, ch / h2)
                size = (max(ch, round(h2 * s)), max(cw, round(w2 * s)))
                x = F.interpolate(x, size=size, mode=mode, align_corners=corners)
                h2, w2 = size
            top, left = (h2 - ch) // 2, (w2 - cw) // 2
            x = x[..., top : top + ch, left : left + cw]
        out.append(x[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0))
        errors.append(None)
    return out, errors


# -- streaming --------------------------------------------------------------------------------------


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


def oriented_size(data: bytes) -> tuple[int, int]:
    """(W, H) of an encoded image as shown, from its header: EXIF orientations 5 to 8 swap them.

    ``DecodeError`` when the header cannot be read: a JPEG left for the device decoder reaches here
    before any decode, and a corrupt one must become its row's error, not the run's.
    """
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise DecodeError("cannot identify image format (not an image, or corrupt)") from None
    except Exception as exc:
        raise DecodeError(f"cannot read the image header: {_first_line(exc)}") from None
    w, h = img.size
    with contextlib.suppress(Exception):
        if img.getexif().get(0x0112) in (5, 6, 7, 8):
            w, h = h, w
    return w, h


def result_sizes(results: Sequence[tuple]) -> np.ndarray:
    """The (n, 2) sizes of ``_decode_one`` results, -1 for rows without one."""
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
    needed columns); ``read_unit(unit)`` reads one unit's rows, for a task that owns one unit.
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

    def _retry(self, fn: Callable[[], _T]) -> _T:
        return call_with_retries(fn, attempts=self.read_attempts, delay=self.retry_delay)

    def _encoded(self, value, f: InputFile) -> bytes:
        if value is None:
            raise DecodeError("null image")
        if self.kind == "struct":
            data, path = value.get("bytes"), value.get("path")
            if data is not None:
                return data
            if path:
                return self._read_path(path, f)
            raise DecodeError("null image (struct with neither bytes nor path)")
        if self.kind == "path":
            return self._read_path(value, f)
        return value

    def _load(self, value, f: InputFile) -> np.ndarray | bytes:
        return self._decode(self._encoded(value, f))

    def _decode(self, data: bytes) -> np.ndarray | bytes:
        if self.device_jpeg and data[:3] == _JPEG_MAGIC and jpeg_fits_device(data, self.max_image_pixels):
            return bytes(data)  # decoded later, on the compute device
        return decode_image(data, self.prep, max_image_pixels=self.max_image_pixels, budget=self.budget)

    def _read_path(self, path: str, f: InputFile) -> bytes:
        try:
            if "://" in path:
                fs, p = pafs.FileSystem.from_uri(path)
            elif f.is_local:
                fs, p = f.filesystem, path if os.path.isabs(path) else os.path.join(f.base_dir, path)
            else:
                fs, p = f.filesystem, path if path.startswith("/") else posixpath.join(f.base_dir, path)
        except Exception as exc:
            raise DecodeError(f"cannot read image file {path}: {_first_line(exc)}") from None

        def read() -> bytes:
            with fs.open_input_stream(p) as fh:
                return fh.read()

        try:
            return self._retry(read)
        except FileNotFoundError:
            raise DecodeError(f"image file not found: {path}") from None
        except OSError as exc:
            if is_permanent_os_error(exc):
                raise DecodeError(f"cannot read image file {path}: {_first_line(exc)}") from None
            raise DecodeError(
                f"I/O error reading image file {path} after {self.read_attempts} attempts: {_first_line(exc)}"
            ) from None
        except Exception as exc:
            raise DecodeError(f"cannot read image file {path}: {_first_line(exc)}") from None

    def _decode_one(self, args) -> tuple[np.ndarray | bytes | None, str | None, tuple[int, int] | None]:
        """(pixels, or JPEG bytes left for the device, or None; the error; the (W, H) when asked)."""
        value, f = args
        try:
            data = self._encoded(value, f)
            return self._decode(data), None, oriented_size(data) if self.want_sizes else None
        except DecodeError as exc:
            return None, str(exc), None

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
            return self._retry(read)
        except OSError as exc:
            tries = "" if is_permanent_os_error(exc) else f" after {self.read_attempts} attempts"
            raise InputReadError(
                f"cannot read rows {start}-{stop} (row group {row_group}) of {f.uri}{tries}: {_first_line(exc)}"
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
                        f"cannot read rows {u.start}-{u.stop} (row group {rg}) of {f.uri}{tries}: {_first_line(exc)}"
                    ) from exc
                time.sleep(min(READ_RETRY_MAX_DELAY_S, self.retry_delay * 2 ** (attempt - 1)))

    def decode_values(self, values: Sequence, files: Sequence[InputFile]) -> list[tuple]:
        """``_decode_one`` over encoded values (with the file each came from), in the decode thread pool."""
        with self._pool() as pool:
            return list(pool.map(self._decode_one, zip(values, files, strict=True)))

    def _decode_unit(self, unit: Unit, table: pa.Table, table_start: int, pool) -> Iterator[DecodedBatch]:
        """The unit's rows of ``table`` (whose first row is file row ``table_start``), in batches."""
        f = self.files[unit.file_index]
        for b0 in range(unit.start, unit.stop, self.batch_size):
            b1 = min(b0 + self.batch_size, unit.stop)
            part = table.slice(b0 - table_start, b1 - b0)
            values = part.column(self.image_column).to_pylist()
            results = list(pool.map(self._decode_one, [(v, f) for v in values]))
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


__all__ = [
    "DEFAULT_DECODE_MEMORY",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "READ_ATTEMPTS",
    "READ_RETRY_DELAY_S",
    "DecodeError",
    "DecodedBatch",
    "InputFile",
    "InputReadError",
    "ParquetSource",
    "PixelBudget",
    "INTERPOLATIONS",
    "Preprocess",
    "SourceError",
    "Unit",
    "assemble_images",
    "call_with_retries",
    "check_columns",
    "check_image_size",
    "decode_image",
    "decode_memory_estimate",
    "decode_jpegs_on_device",
    "detect_image_column",
    "discover_inputs",
    "image_kind",
    "is_out_of_memory",
    "is_permanent_os_error",
    "jpeg_fits_device",
    "plan_units",
    "to_rgb",
]
