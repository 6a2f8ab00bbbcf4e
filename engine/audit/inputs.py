"""The run's input files as the audit finds them again, with pyarrow alone (no torch).

The run names its inputs in its manifest (``config["files"]``, each file's URI), and ``--images``
says where they are now. ``find_inputs`` resolves either to the files, each with the key that the
run gave it (its path relative to the common parent of all inputs), its row groups and its
schema: the same answer as the run's ``engine/job/source.discover_inputs`` (files, directories,
globs and URIs; hidden and ``_``-prefixed files skipped), which imports torch and so is not used
here (``tests/test_audit_images.py`` holds the two to the same keys). ``count_units`` plans a
run's units again the way ``source.plan_units`` does, to say how far a partial run got.
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

from gradcam_batch.engine.errors import first_line as _first_line

_GLOB_CHARS = "*?["


class InputsError(ValueError):
    """The inputs cannot be found or read; the message is one line."""


@dataclass(frozen=True)
class InputFile:
    key: str  # the run's name for it: the path relative to the common parent of all inputs
    path: str  # path inside ``filesystem``
    filesystem: pafs.FileSystem = field(compare=False, repr=False)
    uri: str
    is_local: bool
    row_group_rows: tuple[int, ...]
    schema: pa.Schema = field(compare=False, repr=False)

    @property
    def base_dir(self) -> str:
        """The directory that relative image paths in this file are resolved against."""
        return os.path.dirname(self.path) if self.is_local else posixpath.dirname(self.path)


def _visible(name: str) -> bool:
    return not name.rsplit("/", 1)[-1].startswith(("_", "."))


def _expand_local(spec: str) -> list[str]:
    if any(ch in spec for ch in _GLOB_CHARS):
        files = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p) and _visible(p))
        if not files:
            raise InputsError(f"no files match {spec!r}")
        return [os.path.abspath(p) for p in files]
    if os.path.isdir(spec):
        files = []
        for root, dirs, names in os.walk(spec):
            dirs[:] = sorted(d for d in dirs if _visible(d))
            files += [os.path.join(root, n) for n in sorted(names) if n.endswith(".parquet") and _visible(n)]
        if not files:
            raise InputsError(f"no .parquet files in directory {spec}")
        return sorted(os.path.abspath(p) for p in files)
    if os.path.isfile(spec):
        return [os.path.abspath(spec)]
    raise InputsError(f"input not found: {spec}")


def _expand_uri(spec: str) -> tuple[pafs.FileSystem, list[str]]:
    import fnmatch

    glob_at = min((spec.index(c) for c in _GLOB_CHARS if c in spec), default=-1)
    base = spec if glob_at < 0 else spec[: spec.rfind("/", 0, glob_at)]
    try:
        fs, path = pafs.FileSystem.from_uri(base)
    except Exception as exc:
        raise InputsError(f"cannot open {spec}: {_first_line(exc)}") from None
    if glob_at >= 0:
        pattern = path.rstrip("/") + spec[len(base) :]
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        depth = pattern.count("/")
        files = sorted(
            i.path
            for i in infos
            if i.type == pafs.FileType.File
            and fnmatch.fnmatch(i.path, pattern)
            and _visible(i.path)
            and ("**" in pattern or i.path.count("/") == depth)
        )
        if not files:
            raise InputsError(f"no files match {spec!r}")
        return fs, files
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        files = sorted(
            i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet") and _visible(i.path)
        )
        if not files:
            raise InputsError(f"no .parquet files under {spec}")
        return fs, files
    if info.type == pafs.FileType.File:
        return fs, [path]
    raise InputsError(f"input not found: {spec}")


def _common_parent(uris: list[str]) -> str:
    if not uris:
        return ""
    if len(uris) == 1:
        return uris[0].rsplit("/", 1)[0] + "/" if "/" in uris[0] else ""
    prefix = os.path.commonprefix(uris)
    return prefix[: prefix.rfind("/") + 1]


def find_inputs(specs: Sequence[str]) -> list[InputFile]:
    """The Parquet files that ``specs`` (files, directories, globs, URIs) name, keyed as the run keyed them."""
    if not specs:
        raise InputsError("no input given")
    found: list[tuple[pafs.FileSystem, str, str, bool]] = []  # fs, path, uri, is_local
    local = pafs.LocalFileSystem()
    for spec in specs:
        if "://" in spec and not os.path.exists(spec):
            fs, paths = _expand_uri(spec)
            scheme = spec.split("://", 1)[0]
            found += [(fs, p, f"{scheme}://{p}" if scheme != "file" else p, scheme == "file") for p in paths]
        else:
            found += [(local, p, p, True) for p in _expand_local(spec)]
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
                rows = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        except Exception as exc:
            raise InputsError(f"{uri}: not a readable Parquet file ({_first_line(exc)})") from None
        key = uri[len(common) :].lstrip("/") if common else uri
        files.append(InputFile(key or posixpath.basename(uri), path, fs, uri, is_local, rows, schema))
    return files


def unit_keys(files: Sequence[InputFile], unit_rows: int, limit: int | None = None) -> list[str]:
    """The keys of the run's units: rows cut into pieces of at most ``unit_rows`` inside each row group,
    the first ``limit`` rows only (``source.plan_units``)."""
    if unit_rows < 1:
        raise ValueError("unit_rows must be positive")
    keys: list[str] = []
    remaining = limit
    for f in files:
        offset = 0
        for n in f.row_group_rows:
            for start in range(offset, offset + n, unit_rows):
                stop = min(start + unit_rows, offset + n)
                if remaining is not None:
                    if remaining <= 0:
                        return keys
                    stop = min(stop, start + remaining)
                    remaining -= stop - start
                keys.append(f"{f.key}:{start}-{stop}")
            offset += n
    return keys


__all__ = ["InputFile", "InputsError", "find_inputs", "unit_keys"]
