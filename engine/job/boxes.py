"""Ground-truth boxes from an input column (``--box-column``), in the saliency's coordinates.

Layouts of the box column (x0, y0, x1, y1 in the original image's pixels unless said otherwise):

- ``list<list<float>[4]>``: several boxes per image;
- ``list<float>[4]``: one box per image;
- ``struct<bbox: list<list<float>>, category: list<int>>``: the Hugging Face object-detection
  layout; ``--box-format coco`` reads each box as (x, y, width, height);
- four numeric columns named together, ``--box-column x0,y0,x1,y1``: one box per image.

A null (or empty) box list gives null box columns for that image, never an error. A malformed
box (not four coordinates, a null or non-finite coordinate, x1 < x0 or y1 < y0, zero area) gives
the image null box columns too, and a note in its rows' ``error`` that starts with ``BOX_NOTE``
(the rows stay ``status="ok"``; the summary counts these images). With
categories, a class's boxes are those whose category is the class index. Boxes go through the
image's own resize and center crop (``Preprocess.geometry``) into the model input's pixels,
where the saliency lives; a box outside the crop is clipped to it, or dropped when nothing is left.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from gradcam_batch.engine.job.config import RunSetupError
from gradcam_batch.engine.job.preprocess import Preprocess

BOX_FORMATS = ("xyxy", "coco")
BOX_NOTE = "malformed box"  # how the note on an image with a malformed box starts (counted in the summary)


@dataclass(frozen=True)
class BoxSpec:
    """Where a run's boxes come from (checked against the input schema by ``box_spec``)."""

    columns: tuple[str, ...]  # one box column, or the four coordinate columns
    layout: str  # "list", "single", "hf" or "columns"
    box_format: str  # "xyxy" or "coco"


def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _list_of(t: pa.DataType):
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return t.value_type
    return None


def box_spec(schema: pa.Schema, column: str, box_format: str = "xyxy") -> BoxSpec:
    """Check ``--box-column`` against the input schema and name its layout; ``RunSetupError`` otherwise."""
    if box_format not in BOX_FORMATS:
        raise RunSetupError(f"box format must be one of {', '.join(BOX_FORMATS)}, got {box_format!r}")
    names = [c.strip() for c in column.split(",") if c.strip()]
    for name in names:
        if name not in schema.names:
            raise RunSetupError(f"box column {name!r} not found; the input's columns are: {', '.join(schema.names)}")
    if len(names) == 4:
        bad = [n for n in names if not _numeric(schema.field(n).type)]
        if bad:
            t = schema.field(bad[0]).type
            raise RunSetupError(f"box coordinate column {bad[0]!r} has type {t}; numbers are needed")
        return BoxSpec(tuple(names), "columns", box_format)
    if len(names) != 1:
        raise RunSetupError("--box-column takes one column of boxes, or four coordinate columns x0,y0,x1,y1")
    t = schema.field(names[0]).type
    inner = _list_of(t)
    if inner is not None and _numeric(inner):
        return BoxSpec((names[0],), "single", box_format)
    if inner is not None and _list_of(inner) is not None and _numeric(_list_of(inner)):
        return BoxSpec((names[0],), "list", box_format)
    if pa.types.is_struct(t) and t.get_field_index("bbox") >= 0:
        bbox = t.field("bbox").type
        if _list_of(bbox) is not None and _list_of(_list_of(bbox)) is not None:
            return BoxSpec((names[0],), "hf", box_format)
    raise RunSetupError(
        f"box column {names[0]!r} has type {t}; expected list<list<float>[4]>, list<float>[4], "
        "struct<bbox: list<list<float>>, category: list<int>>, or four coordinate columns"
    )


def read_boxes(
    rows: pa.Table, spec: BoxSpec
) -> tuple[list[np.ndarray | None], list[np.ndarray | None], list[str | None]]:
    """Per row: the (n, 4) xyxy boxes in original pixels (None: no boxes), their categories (or None),
    and a note when a box is malformed (its row then has no boxes; ``BOX_NOTE`` starts the note)."""
    n = rows.num_rows
    cats: list[np.ndarray | None] = [None] * n
    notes: list[str | None] = [None] * n
    if spec.layout == "columns":
        coords = [rows.column(c).to_pylist() for c in spec.columns]
        raw = [None if any(v[i] is None for v in coords) else [[v[i] for v in coords]] for i in range(n)]
    else:
        raw = []
        for i, v in enumerate(rows.column(spec.columns[0]).to_pylist()):
            if spec.layout == "hf" and v is not None:
                cat = v.get("category")
                cats[i] = None if cat is None else np.asarray([-1 if c is None else c for c in cat], np.int64)
                v = v.get("bbox")
            if v is None or len(v) == 0:
                raw.append(None)
                continue
            raw.append([v] if spec.layout == "single" else [b for b in v if b is not None])
    boxes: list[np.ndarray | None] = []
    for i, arr in enumerate(raw):
        if not arr:
            boxes.append(None)
            continue
        why = next((w for b in arr if (w := _malformed(b, spec.box_format)) is not None), None)
        if why is not None:
            boxes.append(None)  # the rows keep their other columns; box metrics need every box
            cats[i] = None
            notes[i] = f"{BOX_NOTE} {why}; this image has no box metrics"
            continue
        boxes.append(_to_xyxy(np.asarray(arr, float), spec.box_format))
    return boxes, cats, notes


def _malformed(box, fmt: str) -> str | None:
    """What is wrong with one box as given (xyxy, or coco's x, y, width, height); None when nothing."""
    shown = "[" + ", ".join("null" if v is None else f"{v:g}" for v in box) + "]"
    if len(box) != 4:
        return f"{shown}: {len(box)} coordinates, not 4"
    if any(v is None for v in box):
        return f"{shown}: a null coordinate"
    x0, y0, a, b = (float(v) for v in box)
    if not all(np.isfinite((x0, y0, a, b))):
        return f"{shown}: a coordinate is not finite"
    w, h = (a, b) if fmt == "coco" else (a - x0, b - y0)
    if w < 0 or h < 0:
        return f"{shown}: reversed ({'width or height < 0' if fmt == 'coco' else 'x1 < x0 or y1 < y0'})"
    if w == 0 or h == 0:
        return f"{shown}: zero area"
    return None


def _to_xyxy(b: np.ndarray | None, fmt: str) -> np.ndarray | None:
    if b is None:
        return None
    if fmt == "coco":
        b = b.copy()
        b[:, 2:] += b[:, :2]
    return b


def to_input_frame(
    boxes: np.ndarray | None, cats: np.ndarray | None, size: tuple[int, int], prep: Preprocess
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Boxes of a ``size`` = (W, H) image into the model input's pixels, clipped to it."""
    if boxes is None or size[0] <= 0:
        return None, None
    sx, sy, ox, oy = prep.geometry(int(size[0]), int(size[1]))
    out_h, out_w = prep.out_size
    b = boxes * np.array([sx, sy, sx, sy]) - np.array([ox, oy, ox, oy])
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, out_w)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, out_h)
    keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    if not keep.any():
        return None, None
    return b[keep], (cats[keep] if cats is not None and len(cats) == len(boxes) else None)


__all__ = ["BOX_FORMATS", "BOX_NOTE", "BoxSpec", "box_spec", "read_boxes", "to_input_frame"]
