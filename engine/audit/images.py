"""The input images behind output rows, for the report's overlays and the audit's pattern evidence,
with Pillow and numpy alone.

The run's manifest says where its inputs were, which column held the images, how rows were named
and how images were resized and cropped; ``--images`` points at the inputs where they have moved.
An image is decoded exactly as the run decoded it (``engine/job/source.py``: JPEG draft to the
resize target, EXIF orientation, any mode to RGB, resize with the run's filter, centre crop), so
an overlay sits exactly under its heatmap. That module imports torch, which would take the audit
from about 200 MB to about 800 MB: the few lines of geometry are repeated here, and
``tests/test_audit_images.py`` holds them to the run's pixels. Each row group that holds a wanted
image is read once. Anything unreachable leaves the report with heatmaps alone, never an error.
``InputImages`` streams many images (a whole class's, for the evidence) with each image's largest
box where the run had ``--box-column``, mapped into the decoded image's pixels as
``engine/job/boxes.py`` maps it; ``load_images`` is the overlays' entry point on top of it.
"""

from __future__ import annotations

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
from PIL import Image, ImageOps

from gradcam_batch.engine.audit.inputs import InputFile, find_inputs
from gradcam_batch.engine.errors import first_line

_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970  # the run's default (Pillow's DecompressionBombError threshold)


@dataclass(frozen=True)
class Geometry:
    """The run's resize and centre crop (``source.Preprocess``), from its manifest's config."""

    resize: int | tuple[int, int] | None = 256  # int: the shorter side; (H, W): exact
    crop: tuple[int, int] | None = (224, 224)
    interpolation: str = "bilinear"

    @classmethod
    def from_config(cls, config: dict) -> Geometry:
        def size(v):
            return v if v is None or isinstance(v, int) else (int(v[0]), int(v[1]))

        crop = size(config.get("crop", (224, 224)))
        return cls(
            resize=size(config.get("resize", 256)),
            crop=(crop, crop) if isinstance(crop, int) else crop,
            interpolation=config.get("interpolation") or "bilinear",
        )

    def resize_target(self, w: int, h: int) -> tuple[int, int] | None:
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
        return self.apply(img)[0]

    def apply(self, img: Image.Image) -> tuple[np.ndarray, tuple[float, float, float, float]]:
        """The preprocessed image, and (sx, sy, ox, oy): a point (x, y) of ``img`` lands at
        (x sx - ox, y sy - oy) of the result (``Preprocess.geometry``)."""
        w0, h0 = img.size
        target = self.resize_target(*img.size)
        filt = _FILTERS[self.interpolation]
        if target is not None and img.size != target:
            img = img.resize(target, filt, reducing_gap=3.0)
        if self.crop is not None:
            ch, cw = self.crop
            w, h = img.size
            if w < cw or h < ch:  # smaller than the crop: scaled up so that the crop fits
                s = max(cw / w, ch / h)
                img = img.resize((max(cw, round(w * s)), max(ch, round(h * s))), filt)
                w, h = img.size
            left, top = (w - cw) // 2, (h - ch) // 2
            img = img.crop((left, top, left + cw, top + ch))
            # The scale is that of the resized image before the crop (the crop's own size is not it).
            return np.asarray(img, dtype=np.uint8), (w / w0, h / h0, float(left), float(top))
        w, h = img.size
        return np.asarray(img, dtype=np.uint8), (w / w0, h / h0, 0.0, 0.0)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB as the run does it: alpha over black, 16-bit and float greys scaled."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        grey = np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def decode(
    data: bytes,
    geometry: Geometry,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    *,
    with_geometry: bool = False,
):
    """Encoded bytes -> (H, W, 3) uint8, as the run's ``decode_image`` gives them; raises on a bad image.

    With ``with_geometry``, also (sx, sy, ox, oy) of ``Geometry.apply``."""
    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG" and geometry.resize is not None:
        target = geometry.resize_target(*img.size)
        if target is not None:
            img.draft("RGB", target)
    if max_image_pixels is not None and img.size[0] * img.size[1] > max_image_pixels:
        raise ValueError("image too large")
    img.load()
    ImageOps.exif_transpose(img, in_place=True)
    out, where = geometry.apply(to_rgb(img))
    return (out, where) if with_geometry else out


def _image_kind(dtype: pa.DataType) -> str | None:
    if pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype) or pa.types.is_binary_view(dtype):
        return "bytes"
    if pa.types.is_struct(dtype):
        return "struct"
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype):
        return "path"
    return None


def _read_path(path: str, f: InputFile) -> bytes:
    if "://" in path:
        fs, p = pafs.FileSystem.from_uri(path)
    elif f.is_local:
        fs, p = f.filesystem, path if os.path.isabs(path) else os.path.join(f.base_dir, path)
    else:
        fs, p = f.filesystem, path if path.startswith("/") else posixpath.join(f.base_dir, path)
    with fs.open_input_stream(p) as fh:
        return fh.read()


def _encoded(value, kind: str, f: InputFile) -> bytes | None:
    if value is None:
        return None
    if kind == "struct":
        if value.get("bytes") is not None:
            return value["bytes"]
        return _read_path(value["path"], f) if value.get("path") else None
    return _read_path(value, f) if kind == "path" else value


class InputsUnavailable(Exception):
    """The inputs cannot be found or read back; the message says why, in a few words."""


@dataclass
class InputImages:
    """The run's input images, found once and read back many at a time."""

    files: list[InputFile]
    image_column: str
    kind: str  # "bytes", "struct" (Hugging Face image) or "path"
    id_column: str | None
    geometry: Geometry
    max_pixels: int | None
    box_columns: tuple[str, ...] = ()  # the run's --box-column: one column, or four coordinate columns
    box_format: str = "xyxy"

    @classmethod
    def open(cls, config: dict, inputs: Sequence[str] | None = None) -> InputImages:
        """The run's inputs (or ``inputs``); ``InputsUnavailable`` when they cannot be found or read."""
        specs = list(inputs) if inputs else list(config.get("files") or config.get("inputs") or [])
        if not specs:
            raise InputsUnavailable("the run's inputs are not recorded; pass --images")
        image_column = config.get("image_column")
        try:
            files = find_inputs(specs)
            # No manifest (``config`` empty): the images as stored, in the one column that can hold them.
            geometry = Geometry.from_config(config) if config else Geometry(resize=None, crop=None)
            if image_column is None and not config:
                cands = [f.name for f in files[0].schema if _image_kind(f.type) in ("bytes", "struct")]
                image_column = cands[0] if len(cands) == 1 else None
            if image_column is None or image_column not in files[0].schema.names:
                raise ValueError(f"the run's image column {image_column!r} is not in {files[0].uri}")
            kind = _image_kind(files[0].schema.field(image_column).type)
            if kind is None:
                raise ValueError(f"column {image_column!r} holds no images")
        except Exception as exc:
            raise InputsUnavailable(first_line(exc)) from None
        names = files[0].schema.names
        boxes = tuple(c.strip() for c in str(config.get("box_column") or "").split(",") if c.strip())
        if any(c not in names for c in boxes) or len(boxes) not in (0, 1, 4):
            boxes = ()  # the inputs changed: the images alone
        return cls(
            files=files,
            image_column=image_column,
            kind=kind,
            id_column=config.get("id_column"),
            geometry=geometry,
            max_pixels=config.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS),
            box_columns=boxes,
            box_format=config.get("box_format") or "xyxy",
        )

    def read(self, ids: Iterable, each: Callable[[object, np.ndarray, np.ndarray | None], None]) -> tuple[int, int]:
        """Call ``each(id, (H, W, 3) uint8 image, box)`` for every id found; returns (decoded, failed).

        ``box``: the image's largest box as (x0, y0, x1, y1) in the decoded image's pixels, or None.
        Each row group that holds a wanted row is read once (its image and box columns only). An
        image that cannot be read or decoded counts as failed and is skipped.
        """
        where = _locate(self.files, list(dict.fromkeys(ids)), self.id_column)
        # file -> row group -> [(row in the group, id)]
        plan: dict[int, dict[int, list]] = {}
        for rid, (fi, row) in where.items():
            starts = np.cumsum([0, *self.files[fi].row_group_rows])
            if row >= starts[-1]:
                continue
            rg = int(np.searchsorted(starts, row, side="right") - 1)
            plan.setdefault(fi, {}).setdefault(rg, []).append((row - int(starts[rg]), rid))
        columns = list(dict.fromkeys([self.image_column, *self.box_columns]))
        done = failed = 0
        for fi, groups in sorted(plan.items()):
            f = self.files[fi]
            before = done + failed
            try:
                with f.filesystem.open_input_file(f.path) as fh:
                    pf = pq.ParquetFile(fh)
                    for rg, rows in sorted(groups.items()):
                        t = pf.read_row_group(rg, columns=columns)
                        col = t.column(self.image_column)
                        for r, rid in sorted(rows, key=lambda x: x[0]):
                            try:
                                data = _encoded(col[r].as_py(), self.kind, f)
                                if not data:
                                    raise ValueError("no image")
                                image, geo = decode(data, self.geometry, self.max_pixels, with_geometry=True)
                                box = self._box(t, r, geo, image.shape[:2])
                            except Exception:
                                failed += 1  # this image is missing or broken
                                continue
                            each(rid, image, box)
                            done += 1
            except Exception:
                # This file went away or is damaged: its images not yet reached fail.
                failed += sum(len(rows) for rows in groups.values()) - (done + failed - before)
                continue
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


def load_images(
    config: dict, ids: Sequence, inputs: Sequence[str] | None = None, *, max_side: int | None = None
) -> tuple[dict, str | None]:
    """{id: (H, W, 3) uint8 preprocessed image} for the ids that could be found, and a note when none were.

    ``max_side``: images larger than that are scaled down to it, whole (the heatmap still fits them).
    """
    wanted = list(dict.fromkeys(ids))
    inputs = list(inputs) if inputs else list(config.get("files") or config.get("inputs") or [])
    if not wanted:
        return {}, None
    if not inputs:
        return {}, "the run's inputs are not recorded; pass --images to show overlays"
    try:
        source = InputImages.open(config, inputs)
    except InputsUnavailable as exc:  # unreachable or changed inputs: the report goes on without overlays
        return {}, f"input images not reachable ({exc})"
    source.box_columns = ()  # an overlay needs no box
    out: dict = {}
    source.read(wanted, lambda rid, image, _box: out.__setitem__(rid, _shrink(image, max_side)))
    note = None if out else "no input image could be found for the sampled rows; pass --images to show overlays"
    return out, note


def _shrink(img: np.ndarray, max_side: int | None) -> np.ndarray:
    h, w = img.shape[:2]
    if max_side is None or max(h, w) <= max_side:
        return img
    s = max_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BOX))


def _locate(files: list[InputFile], wanted: list, id_column: str | None) -> dict:
    """{id: (file index, row in the file)} for the wanted ids that are there."""
    where: dict = {}
    if id_column is None:  # the run named rows "<file key>:<row>"
        keys = {f.key: i for i, f in enumerate(files)}
        for rid in wanted:
            key, _, row = str(rid).rpartition(":")
            if key in keys and row.isdigit():
                where[rid] = (keys[key], int(row))
        return where
    want = set(wanted)
    for fi, f in enumerate(files):
        try:
            with f.filesystem.open_input_file(f.path) as fh:
                col = pq.ParquetFile(fh).read(columns=[id_column]).column(id_column)
        except Exception:
            continue
        hits = np.flatnonzero(pc.is_in(col, value_set=_value_set(col, want)).to_numpy(zero_copy_only=False))
        for row, v in zip(hits.tolist(), col.take(hits).to_pylist(), strict=True):
            where.setdefault(v, (fi, row))
    return where


def _value_set(col, want: set):
    typ = col.type
    vals = [v for v in want if v is not None]
    try:
        return pa.array(vals, typ)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([str(v) for v in vals], pa.string()).cast(typ, safe=False)


__all__ = ["Geometry", "InputImages", "InputsUnavailable", "decode", "load_images", "to_rgb"]
