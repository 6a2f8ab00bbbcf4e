"""The Parquet source: input discovery, image-column detection, streaming, decode and resize.

- ``discover_inputs`` turns the command line's INPUT arguments (files, directories, globs and
  URIs that ``pyarrow.fs`` understands) into a sorted list of ``InputFile``; every file is opened
  once to check that it is Parquet and to read its row-group layout.
- ``detect_image_column`` picks the column that holds the images: encoded bytes, a Hugging Face
  ``struct<bytes, path>`` image, or a string column of paths / URIs.
- ``plan_units`` cuts the files into *units*: fixed row ranges that never cross a row group.
  A unit is what the resume logic records as done.
- ``ParquetSource`` streams the pending units a row group at a time, projecting only the
  needed columns, and decodes + resizes + crops the images in a thread pool (Pillow releases
  the GIL while decoding and resampling) into (n, H, W, 3) uint8 arrays.

Normalization (mean/std) is *not* done here: it runs on the device, on uint8 input, which
moves 4x fewer bytes from host to device than float32 would.
"""

from __future__ import annotations

import glob
import io
import os
import posixpath
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

IMAGE_KINDS = ("bytes", "struct", "path")
_IMAGE_NAME_HINTS = ("image", "img", "picture", "photo")
_PATH_NAME_HINTS = ("path", "file", "filename", "uri", "url")
_GLOB_CHARS = "*?["
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_JPEG_MAGIC = b"\xff\xd8\xff"
# A truncated file must become an error row, not a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class SourceError(ValueError):
    """The inputs cannot be read as asked (missing file, not Parquet, missing column, ...)."""


class DecodeError(Exception):
    """One image could not be read or decoded; the message becomes the row's ``error``."""


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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


@dataclass(frozen=True)
class Preprocess:
    """Resize, then center-crop; the result is always ``out_size``.

    ``resize``: an int resizes the shorter side to it (aspect kept), (H, W) resizes exactly,
    None keeps the size. ``crop``: (H, W) center crop, or None. One of the two must fix the
    output size, so that images batch together.
    """

    resize: int | tuple[int, int] | None = 256
    crop: tuple[int, int] | None = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if self.crop is None and not isinstance(self.resize, tuple):
            raise ValueError("without a crop, the resize must be HxW so that every image has the same size")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need three values (R, G, B)")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")

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

    def __call__(self, img: Image.Image) -> np.ndarray:
        target = self._resize_target(*img.size)
        if target is not None and img.size != target:
            img = img.resize(target, Image.Resampling.BILINEAR, reducing_gap=3.0)
        if self.crop is not None:
            ch, cw = self.crop
            w, h = img.size
            if w < cw or h < ch:
                # Smaller than the crop: scale up so that the crop fits, then crop.
                s = max(cw / w, ch / h)
                img = img.resize((max(cw, round(w * s)), max(ch, round(h * s))), Image.Resampling.BILINEAR)
                w, h = img.size
            left, top = (w - cw) // 2, (h - ch) // 2
            img = img.crop((left, top, left + cw, top + ch))
        arr = np.asarray(img, dtype=np.uint8)
        if arr.shape[:2] != self.out_size:
            raise DecodeError(f"preprocessing produced {arr.shape[:2]}, expected {self.out_size}")
        return arr


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


def decode_image(data: bytes, prep: Preprocess) -> np.ndarray:
    """Encoded bytes -> (H, W, 3) uint8 after resize and crop; ``DecodeError`` with the reason."""
    if len(data) == 0:
        raise DecodeError("empty image (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        if img.format == "JPEG" and prep.resize is not None:
            # Let libjpeg decode at a reduced scale (still >= the target) instead of full size.
            w, h = img.size
            target = prep._resize_target(w, h)
            if target is not None:
                img.draft("RGB", target)
        img.load()
        img = ImageOps.exif_transpose(img) or img
        img = to_rgb(img)
        return prep(img)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("cannot identify image format (not an image, or corrupt)") from None
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"image too large: {_first_line(exc)}") from None
    except Exception as exc:
        raise DecodeError(f"cannot decode image: {_first_line(exc)}") from None


def decode_jpegs_on_device(
    jpegs: Sequence[bytes], prep: Preprocess, device: torch.device
) -> tuple[list[torch.Tensor | None], list[str | None]]:
    """Decode JPEGs with torchvision on ``device`` (nvJPEG on CUDA), then resize and crop there.

    Returns per image an (H, W, 3) uint8 tensor on ``device`` or None with the reason. A batch that
    nvJPEG refuses as a whole is retried image by image; an image it cannot decode (CMYK,
    unusual sampling, corrupt) falls back to Pillow on the host.
    """
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg

    datas = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in jpegs]
    try:
        decoded = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    except Exception:
        decoded = []
        for d in datas:
            try:
                decoded.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True))
            except Exception:
                decoded.append(None)
    out: list[torch.Tensor | None] = []
    errors: list[str | None] = []
    for raw, img in zip(jpegs, decoded, strict=True):
        if img is None:
            try:
                out.append(torch.from_numpy(decode_image(raw, prep)).to(device))
                errors.append(None)
            except DecodeError as exc:
                out.append(None)
                errors.append(str(exc))
            continue
        _, h, w = img.shape
        x = img.unsqueeze(0).float()
        target = prep._resize_target(w, h)
        if target is not None and (w, h) != target:
            x = F.interpolate(x, size=(target[1], target[0]), mode="bilinear", antialias=True, align_corners=False)
        if prep.crop is not None:
            ch, cw = prep.crop
            h2, w2 = x.shape[-2:]
            if h2 < ch or w2 < cw:
                s = max(cw / w2, ch / h2)
                size = (max(ch, round(h2 * s)), max(cw, round(w2 * s)))
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
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

    @property
    def num_rows(self) -> int:
        return len(self.ok)


def assemble_images(
    results: Sequence[tuple[object, str | None]], out_size: tuple[int, int]
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
    for arr, _ in results:
        if isinstance(arr, bytes):
            jpegs.append((j, arr))
            j += 1
        elif arr is not None:
            images[j] = arr
            j += 1
    return images, ok, jpegs


class ParquetSource:
    """Streams the given units as ``DecodedBatch`` objects.

    Reads one row group at a time (only the needed columns), then decodes its rows in a thread
    pool of ``workers`` threads. Memory is one row group plus the batches the consumer holds.
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
    ):
        self.files = list(files)
        # Also pass the image column itself on (useful for path columns).
        self.keep_image = image_column in columns
        self.image_column = image_column
        self.columns = [c for c in dict.fromkeys(columns) if c != image_column]
        self.prep = prep
        self.device_jpeg = device_jpeg
        self.batch_size = batch_size
        self.workers = workers or min(8, os.cpu_count() or 1)
        self.kind = image_kind(self.files[0].schema.field(image_column).type)
        if self.kind is None:
            t = self.files[0].schema.field(image_column).type
            raise SourceError(
                f"column {image_column!r} has type {t}; images must be binary, struct<bytes, path> or string paths"
            )

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
        data = self._encoded(value, f)
        if self.device_jpeg and data[:3] == _JPEG_MAGIC:
            return bytes(data)  # decoded later, on the compute device
        return decode_image(data, self.prep)

    def _read_path(self, path: str, f: InputFile) -> bytes:
        try:
            if "://" in path:
                fs, p = pafs.FileSystem.from_uri(path)
            elif f.is_local:
                fs, p = f.filesystem, path if os.path.isabs(path) else os.path.join(f.base_dir, path)
            else:
                fs, p = f.filesystem, path if path.startswith("/") else posixpath.join(f.base_dir, path)
            with fs.open_input_stream(p) as fh:
                return fh.read()
        except FileNotFoundError:
            raise DecodeError(f"image file not found: {path}") from None
        except Exception as exc:
            raise DecodeError(f"cannot read image file {path}: {_first_line(exc)}") from None

    def _decode_one(self, args) -> tuple[np.ndarray | bytes | None, str | None]:
        value, f = args
        try:
            return self._load(value, f), None
        except DecodeError as exc:
            return None, str(exc)

    def batches(self, units: Sequence[Unit]) -> Iterator[DecodedBatch]:
        by_group: dict[tuple[int, int], list[Unit]] = {}
        for u in units:
            by_group.setdefault((u.file_index, u.row_group), []).append(u)
        h, w = self.prep.out_size
        with ThreadPoolExecutor(self.workers, thread_name_prefix="gradcam-decode") as pool:
            for (fi, rg), group in by_group.items():
                f = self.files[fi]
                rg_start = sum(f.row_group_rows[:rg])
                with f.filesystem.open_input_file(f.path) as fh:
                    table = pq.ParquetFile(fh).read_row_group(rg, columns=[self.image_column, *self.columns])
                for unit in group:
                    for b0 in range(unit.start, unit.stop, self.batch_size):
                        b1 = min(b0 + self.batch_size, unit.stop)
                        part = table.slice(b0 - rg_start, b1 - b0)
                        values = part.column(self.image_column).to_pylist()
                        results = list(pool.map(self._decode_one, [(v, f) for v in values]))
                        images, ok, jpegs = assemble_images(results, (h, w))
                        yield DecodedBatch(
                            unit=unit,
                            unit_done=b1 == unit.stop,
                            rows=part if self.keep_image else part.drop_columns([self.image_column]),
                            row_index=np.arange(b0, b1, dtype=np.int64),
                            images=images,
                            ok=ok,
                            errors=[r[1] for r in results],
                            jpegs=jpegs,
                        )
                del table


__all__ = [
    "IMAGENET_MEAN",
    "assemble_images",
    "IMAGENET_STD",
    "DecodeError",
    "DecodedBatch",
    "InputFile",
    "ParquetSource",
    "Preprocess",
    "SourceError",
    "Unit",
    "check_columns",
    "decode_image",
    "decode_jpegs_on_device",
    "detect_image_column",
    "discover_inputs",
    "image_kind",
    "plan_units",
    "to_rgb",
]
