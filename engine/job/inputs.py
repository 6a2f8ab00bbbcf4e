"""A run's inputs: which Parquet files, which column holds the images, and the units they are cut into.

- ``discover_inputs`` turns the command line's INPUT arguments (files, directories, globs and
  URIs that ``pyarrow.fs`` understands) into a sorted list of ``InputFile``; every file is opened
  once to check that it is Parquet and to read its row-group layout.
- ``detect_image_column`` picks the column that holds the images: encoded bytes, a Hugging Face
  ``struct<bytes, path>`` image, or a string column of paths / URIs (``image_kind``).
- ``plan_units`` cuts the files into *units*: fixed row ranges that never cross a row group.
  A unit is what the resume logic records as done.
- ``read_image_bytes`` gives one image cell's encoded bytes, reading the file a path names.

pyarrow alone, no torch. The audit finds a run's inputs again with its own copy of these rules
(``engine/audit/inputs.py``), which ``tests/test_audit_images.py`` holds to these functions. The
README's ``gradcam-batch run`` section is the user's guide to inputs.
"""

from __future__ import annotations

import glob
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from gradcam_batch.engine.errors import first_line
from gradcam_batch.engine.job.errors import DecodeError, SourceError
from gradcam_batch.engine.job.retries import READ_ATTEMPTS, READ_RETRY_DELAY_S, call_with_retries, is_permanent_os_error

IMAGE_KINDS = ("bytes", "struct", "path")
_IMAGE_NAME_HINTS = ("image", "img", "picture", "photo")
_PATH_NAME_HINTS = ("path", "file", "filename", "uri", "url")
_GLOB_CHARS = "*?["

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
        raise SourceError(f"cannot open {spec}: {first_line(exc)}") from None
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
            raise SourceError(f"{uri}: not a readable Parquet file ({first_line(exc)})") from None
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


# -- image bytes ------------------------------------------------------------------------------------


def read_image_bytes(
    value, kind: str, f: InputFile, *, attempts: int = READ_ATTEMPTS, retry_delay: float = READ_RETRY_DELAY_S
) -> bytes:
    """The encoded image of one cell of ``f``'s image column, whose ``image_kind`` is ``kind``.

    Bytes are the image; a struct gives its bytes, or else reads its path; a path (or URI) is read,
    a relative one from ``f.base_dir``. A transient ``OSError`` is tried ``attempts`` times
    (``call_with_retries``). ``DecodeError`` with the reason when there is no image to be had.
    """
    if value is None:
        raise DecodeError("null image")
    if kind == "struct":
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            return data
        if path:
            return _read_image_file(path, f, attempts, retry_delay)
        raise DecodeError("null image (struct with neither bytes nor path)")
    if kind == "path":
        return _read_image_file(value, f, attempts, retry_delay)
    return value


def _read_image_file(path: str, f: InputFile, attempts: int, retry_delay: float) -> bytes:
    try:
        if "://" in path:
            fs, p = pafs.FileSystem.from_uri(path)
        elif f.is_local:
            fs, p = f.filesystem, path if os.path.isabs(path) else os.path.join(f.base_dir, path)
        else:
            fs, p = f.filesystem, path if path.startswith("/") else posixpath.join(f.base_dir, path)
    except Exception as exc:
        raise DecodeError(f"cannot read image file {path}: {first_line(exc)}") from None

    def read() -> bytes:
        with fs.open_input_stream(p) as fh:
            return fh.read()

    try:
        return call_with_retries(read, attempts=attempts, delay=retry_delay)
    except FileNotFoundError:
        raise DecodeError(f"image file not found: {path}") from None
    except OSError as exc:
        if is_permanent_os_error(exc):
            raise DecodeError(f"cannot read image file {path}: {first_line(exc)}") from None
        raise DecodeError(f"I/O error reading image file {path} after {attempts} attempts: {first_line(exc)}") from None
    except Exception as exc:
        raise DecodeError(f"cannot read image file {path}: {first_line(exc)}") from None


__all__ = [
    "IMAGE_KINDS",
    "InputFile",
    "SourceError",
    "Unit",
    "check_columns",
    "detect_image_column",
    "discover_inputs",
    "image_kind",
    "plan_units",
    "read_image_bytes",
]
