"""The run's input images, read back for the audit without torch, many at a time.

The run's manifest says where its inputs were, which column held the images, how rows were named
and how images were resized and cropped; ``--images`` points at the inputs where they have moved.
``InputImages.open`` finds the files (a file, a directory of ``.parquet`` files, a glob, or a URI
that ``pyarrow.fs`` opens) and ``read(ids, each)`` locates the ids, reads every row group that holds
one of them once, and decodes each image as the run did: Pillow, a JPEG drafted to the resize
target, EXIF orientation, RGB (alpha over black), resize (the shorter side, or H x W), centre crop.
Where the run had ``--box-column``, each image's largest box comes with it, in the decoded image's
pixels. These are the steps of ``engine/job/source.py`` (``decode_image``, ``Preprocess.geometry``)
and ``engine/job/boxes.py``, which import torch; ``tests/test_audit_evidence.py`` checks that both
give the same pixels.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import posixpath
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

_FILTERS = ("nearest", "bilinear", "bicubic", "lanczos")


class InputsUnavailable(Exception):
    """The inputs cannot be read back; the message says why, in a few words."""


@dataclass(frozen=True)
class _File:
    key: str  # the path relative to the common parent of all inputs, as the run named rows by it
    path: str
    fs: pafs.FileSystem
    is_local: bool
    row_group_rows: tuple[int, ...]

    @property
    def base_dir(self) -> str:
        return os.path.dirname(self.path) if self.is_local else posixpath.dirname(self.path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _expand(spec: str) -> list[tuple[pafs.FileSystem, str, str, bool]]:
    """(filesystem, path, uri, is_local) of the Parquet files one input names."""
    local = pafs.LocalFileSystem()
    if "://" in spec and not os.path.exists(spec):
        fs, path = pafs.FileSystem.from_uri(spec)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            sel = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            paths = sorted(i.path for i in sel if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
        else:
            paths = [path]
        scheme = spec.split("://", 1)[0]
        return [(fs, p, f"{scheme}://{p}" if scheme != "file" else p, scheme == "file") for p in paths]
    if any(c in spec for c in "*?["):
        paths = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    elif os.path.isdir(spec):
        paths = sorted(
            os.path.join(root, n)
            for root, dirs, names in os.walk(spec)
            for n in names
            if n.endswith(".parquet") and not n.startswith((".", "_"))
        )
    else:
        paths = [spec]
    return [(local, os.path.abspath(p), os.path.abspath(p), True) for p in paths]


def _common_parent(uris: list[str]) -> str:
    if len(uris) == 1:
        return uris[0].rsplit("/", 1)[0] + "/" if "/" in uris[0] else ""
    prefix = os.path.commonprefix(uris)
    return prefix[: prefix.rfind("/") + 1]


def _holds_images(t: pa.DataType) -> bool:
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0


def _size(v):
    return None if v is None else (int(v) if isinstance(v, int) else (int(v[0]), int(v[1])))


@dataclass
class InputImages:
    files: list[_File]
    image_column: str
    kind: str  # "bytes", "struct" (Hugging Face image) or "path"
    id_column: str | None
    resize: int | tuple[int, int] | None
    crop: tuple[int, int] | None
    interpolation: str
    max_pixels: int | None
    box_columns: tuple[str, ...] = ()  # the run's --box-column: one column, or four coordinate columns
    box_format: str = "xyxy"

    @classmethod
    def open(cls, config: dict, inputs: Sequence[str] | None = None) -> InputImages:
        """The run's inputs (or ``inputs``); ``InputsUnavailable`` when they cannot be found or read."""
        specs = list(inputs) if inputs else list(config.get("files") or config.get("inputs") or [])
        if not specs:
            raise InputsUnavailable("the run's inputs are not recorded; pass --images")
        found: dict[str, tuple] = {}
        try:
            for spec in specs:
                for item in _expand(str(spec)):
                    found.setdefault(item[2], item)
        except Exception as exc:
            raise InputsUnavailable(_first_line(exc)) from None
        if not found:
            raise InputsUnavailable(f"no Parquet file found at {', '.join(map(str, specs))}")
        common = _common_parent(list(found))
        files, schema = [], None
        for uri, (fs, path, _, is_local) in found.items():
            try:
                with fs.open_input_file(path) as fh:
                    meta = pq.ParquetFile(fh).metadata
            except Exception as exc:
                raise InputsUnavailable(f"{uri}: {_first_line(exc)}") from None
            schema = schema or meta.schema.to_arrow_schema()
            key = uri[len(common) :].lstrip("/") if common else uri
            rows = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
            files.append(_File(key or posixpath.basename(uri), path, fs, is_local, rows))
        column = config.get("image_column")
        if column is None:  # no manifest: the one column that can hold encoded images
            cands = [f.name for f in schema if _holds_images(f.type)]
            if len(cands) != 1:
                raise InputsUnavailable("the run's image column is not recorded and the inputs do not name one")
            column = cands[0]
        if column not in schema.names:
            raise InputsUnavailable(f"the inputs have no image column {column!r}")
        t = schema.field(column).type
        if pa.types.is_struct(t):
            kind = "struct"
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            kind = "path"
        else:
            kind = "bytes"
        crop = _size(config.get("crop"))
        boxes = tuple(c.strip() for c in str(config.get("box_column") or "").split(",") if c.strip())
        if any(c not in schema.names for c in boxes) or len(boxes) not in (0, 1, 4):
            boxes = ()  # the inputs changed: the images alone
        return cls(
            files=files,
            image_column=column,
            kind=kind,
            id_column=config.get("id_column"),
            resize=_size(config.get("resize")),
            crop=(crop, crop) if isinstance(crop, int) else crop,
            interpolation=config.get("interpolation") or "bilinear",
            max_pixels=config.get("max_image_pixels"),
            box_columns=boxes,
            box_format=config.get("box_format") or "xyxy",
        )

    def locate(self, ids: Iterable) -> dict:
        """{id: (file index, row)} for the ids found in the inputs."""
        wanted = list(dict.fromkeys(ids))
        where: dict = {}
        if self.id_column is None:
            keys = {f.key: i for i, f in enumerate(self.files)}
            for rid in wanted:
                key, _, row = str(rid).rpartition(":")
                if key in keys and row.isdigit() and int(row) < sum(self.files[keys[key]].row_group_rows):
                    where[rid] = (keys[key], int(row))
            return where
        want = {v for v in wanted if v is not None}
        for fi, f in enumerate(self.files):
            with f.fs.open_input_file(f.path) as fh:
                col = pq.ParquetFile(fh).read(columns=[self.id_column]).column(self.id_column)
            values = _value_set(col, want)
            hits = np.flatnonzero(pc.is_in(col, value_set=values).to_numpy(zero_copy_only=False))
            for row, v in zip(hits.tolist(), col.take(hits).to_pylist(), strict=True):
                where.setdefault(v, (fi, row))
        return where

    def read(self, ids: Iterable, each: Callable[[object, np.ndarray, np.ndarray | None], None]) -> tuple[int, int]:
        """Call ``each(id, (H, W, 3) uint8 image, box)`` for every id found; returns (decoded, failed).

        ``box``: the image's largest box as (x0, y0, x1, y1) in the decoded image's pixels, or None.
        Each row group that holds a wanted row is read once (its image and box columns only). An
        image that cannot be read or decoded counts as failed and is skipped.
        """
        where = self.locate(ids)
        by_group: dict[tuple[int, int], list[tuple[int, object]]] = {}
        for rid, (fi, row) in where.items():
            starts = np.cumsum([0, *self.files[fi].row_group_rows])
            rg = int(np.searchsorted(starts, row, side="right") - 1)
            by_group.setdefault((fi, rg), []).append((row - int(starts[rg]), rid))
        done = failed = 0
        for (fi, rg), rows in sorted(by_group.items(), key=lambda kv: kv[0]):
            f = self.files[fi]
            try:
                with f.fs.open_input_file(f.path) as fh:
                    t = pq.ParquetFile(fh).read_row_group(
                        rg, columns=list({self.image_column: 0, **dict.fromkeys(self.box_columns)})
                    )
            except Exception:
                failed += len(rows)
                continue
            col = t.column(self.image_column)
            for offset, rid in sorted(rows, key=lambda r: r[0]):
                try:
                    image, geometry = self.decode(self._encoded(col[offset].as_py(), f), with_geometry=True)
                    box = self._box(t, offset, geometry, image.shape[:2])
                except Exception:
                    failed += 1
                    continue
                each(rid, image, box)
                done += 1
        return done, failed

    def _box(self, t: pa.Table, row: int, geometry, shape: tuple[int, int]) -> np.ndarray | None:
        """The row's largest box in the decoded image's pixels (clipped to it), or None."""
        if not self.box_columns:
            return None
        if len(self.box_columns) == 4:
            v = [t.column(c)[row].as_py() for c in self.box_columns]
            boxes = [v] if all(isinstance(x, (int, float)) for x in v) else []
        else:
            v = t.column(self.box_columns[0])[row].as_py()
            if isinstance(v, dict):
                v = v.get("bbox")
            if not v:
                return None
            boxes = [v] if all(isinstance(x, (int, float)) for x in v) else [b for b in v if b is not None]
        arr = np.asarray([b for b in boxes if len(b) == 4 and all(x is not None for x in b)], np.float64)
        if not len(arr) or not np.isfinite(arr).all():
            return None
        if self.box_format == "coco":
            arr[:, 2:] += arr[:, :2]
        sx, sy, ox, oy = geometry
        arr = arr * np.array([sx, sy, sx, sy]) - np.array([ox, oy, ox, oy])
        h, w = shape
        arr[:, [0, 2]] = arr[:, [0, 2]].clip(0, w)
        arr[:, [1, 3]] = arr[:, [1, 3]].clip(0, h)
        area = (arr[:, 2] - arr[:, 0]) * (arr[:, 3] - arr[:, 1])
        if not (area > 0).any():
            return None
        return arr[int(np.argmax(area))]

    def _encoded(self, value, f: _File) -> bytes:
        if self.kind == "struct":
            data = value.get("bytes") if value else None
            if data is not None:
                return data
            value = value.get("path") if value else None
        elif self.kind == "bytes":
            return value
        if not value:
            raise ValueError("no image")
        if "://" in value:
            fs, p = pafs.FileSystem.from_uri(value)
        elif f.is_local:
            fs, p = f.fs, value if os.path.isabs(value) else os.path.join(f.base_dir, value)
        else:
            fs, p = f.fs, value if value.startswith("/") else posixpath.join(f.base_dir, value)
        with fs.open_input_stream(p) as fh:
            return fh.read()

    def _target(self, w: int, h: int) -> tuple[int, int] | None:
        """(W, H) after the resize step."""
        if self.resize is None:
            return None
        if isinstance(self.resize, tuple):
            return self.resize[1], self.resize[0]
        s = self.resize
        return (s, max(1, round(h * s / w))) if w <= h else (max(1, round(w * s / h)), s)

    def decode(self, data: bytes, *, with_geometry: bool = False):
        """Encoded bytes -> (H, W, 3) uint8 after the run's resize and centre crop.

        With ``with_geometry``, also (sx, sy, ox, oy): a point (x, y) of the stored image lands at
        (x sx - ox, y sy - oy) of the result (``Preprocess.geometry``).
        """
        from PIL import Image, ImageOps

        filt = getattr(Image.Resampling, self.interpolation.upper())
        img = Image.open(io.BytesIO(data))
        if img.format == "JPEG" and self.resize is not None:
            target = self._target(*img.size)
            if target is not None:
                img.draft("RGB", target)
        if self.max_pixels is not None and img.size[0] * img.size[1] > self.max_pixels:
            raise ValueError("image too large")
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
        img = _rgb(img)
        w0, h0 = img.size
        target = self._target(*img.size)
        if target is not None and img.size != target:
            img = img.resize(target, filt, reducing_gap=3.0)
        left = top = 0
        if self.crop is not None:
            ch, cw = self.crop
            w, h = img.size
            if w < cw or h < ch:
                s = max(cw / w, ch / h)
                img = img.resize((max(cw, round(w * s)), max(ch, round(h * s))), filt)
                w, h = img.size
            left, top = (w - cw) // 2, (h - ch) // 2
            img = img.crop((left, top, left + cw, top + ch))
        out = np.asarray(img, dtype=np.uint8)
        if not with_geometry:
            return out
        # The scale is that of the resized image before the crop (the crop's own size is not it).
        rw, rh = (img.size[0] + 2 * left, img.size[1] + 2 * top) if self.crop is None else (w, h)
        return out, (rw / w0, rh / h0, float(left), float(top))


def _rgb(img):
    """Any Pillow mode -> RGB, as the run does: alpha over black, 16-bit and float greys scaled."""
    from PIL import Image

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


def _value_set(col, want: set):
    typ = col.type
    vals = list(want)
    try:
        return pa.array(vals, typ)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([str(v) for v in vals], pa.string()).cast(typ, safe=False)


def read_images(config: dict, ids: Sequence, inputs: Sequence[str] | None = None) -> tuple[dict, str | None]:
    """{id: image} for the ids found, and a note when none could be read (the overlays' entry point)."""
    if not ids:
        return {}, None
    try:
        src = InputImages.open(config, inputs)
    except InputsUnavailable as exc:
        return {}, f"input images not reachable ({exc})"
    out: dict = {}
    with contextlib.suppress(Exception):
        src.read(ids, lambda rid, image, _box: out.__setitem__(rid, image))
    return out, None if out else "no input image could be found for the sampled rows; pass --images"


__all__ = ["InputImages", "InputsUnavailable", "read_images"]
