"""The output schema and the one function that turns a batch's results into its Arrow rows.

One row per explained (image, class), then one ``status="error"`` row per image that could not be
explained, in input order and, within an image, by ``class_rank``. The README's "Output schema"
section documents every column; a new column is one field in ``output_schema``, one array in
``ResultBatch`` and one line in ``build_table``.

- ``class_rank`` is int32: any top-k fits.
- ``peak_y``/``peak_x`` are null where the map is all zero (``cam_max == 0``): such a map has no
  peak, and (0, 0) would read as a real one in the top-left corner.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

METRIC_COLUMNS = ("deletion_auc", "insertion_auc", "confidence_drop", "confidence_increase")
BOX_COLUMNS = ("pointing_hit", "box_energy", "pred_box", "box_iou")
RESULT_COLUMNS = (
    "class_index",
    "class_rank",
    "method",
    "label",
    "score",
    "probability",
    "cam",
    "heatmap",
    "guided",
    "peak_y",
    "peak_x",
    "cam_max",
    "status",
    "error",
    *METRIC_COLUMNS,
    *BOX_COLUMNS,
)
# The type of each metric column; which are present follows the run's metrics and boxes.
EXTRA_TYPES = {
    "deletion_auc": pa.float32(),
    "insertion_auc": pa.float32(),
    "confidence_drop": pa.float32(),
    "confidence_increase": pa.bool_(),
    "pointing_hit": pa.bool_(),
    "box_energy": pa.float32(),
    "pred_box": pa.list_(pa.int32(), 4),
    "box_iou": pa.float32(),
}
_BY_METRIC = {"deletion": ("deletion_auc",), "insertion": ("insertion_auc",), "confidence": METRIC_COLUMNS[2:]}
METHOD_TYPE = pa.dictionary(pa.int32(), pa.string())
HEATMAP_DTYPES = {"uint8": (pa.uint8(), np.uint8), "float16": (pa.float16(), np.float16)}
CAM_DTYPES = {"float16": (pa.float16(), np.float16), "float32": (pa.float32(), np.float32)}


def output_schema(
    *,
    id_type: pa.DataType,
    passthrough: list[pa.Field],
    label_type: pa.DataType | None,
    cam_shape: tuple[int, int],
    heatmap_shape: tuple[int, int] | None,
    heatmap_dtype: str = "uint8",
    cam_dtype: str = "float16",
    metrics: tuple[str, ...] = (),
    boxes: bool = False,
    methods: tuple[str, ...] = (),
    guided_shape: tuple[int, int] | None = None,
) -> pa.Schema:
    """The schema of every output file.

    ``label`` is present only with a label column, ``heatmap`` only when a heatmap size is set,
    the metric columns only for the metrics asked for, the box columns only with boxes.
    """
    fields = [pa.field("id", id_type)]
    fields += passthrough
    fields += [pa.field("class_index", pa.int32()), pa.field("class_rank", pa.int32())]
    if len(methods) > 1:  # one row per (image, class, method)
        fields.append(pa.field("method", METHOD_TYPE))
    if label_type is not None:
        fields.append(pa.field("label", label_type))
    fields += [
        pa.field("score", pa.float32()),
        pa.field("probability", pa.float32()),
        pa.field("cam", pa.fixed_shape_tensor(CAM_DTYPES[cam_dtype][0], list(cam_shape))),
    ]
    if heatmap_shape is not None:
        fields.append(pa.field("heatmap", pa.fixed_shape_tensor(HEATMAP_DTYPES[heatmap_dtype][0], list(heatmap_shape))))
    if guided_shape is not None:  # Guided Grad-CAM at the input size, 3 channels, min-max normalized per map
        fields.append(pa.field("guided", pa.fixed_shape_tensor(pa.uint8(), [3, *guided_shape])))
    fields += [
        pa.field("peak_y", pa.int32()),
        pa.field("peak_x", pa.int32()),
        pa.field("cam_max", pa.float32()),
    ]
    fields += [pa.field(name, EXTRA_TYPES[name]) for m in metrics for name in _BY_METRIC[m]]
    if boxes:
        fields += [pa.field(name, EXTRA_TYPES[name]) for name in BOX_COLUMNS]
    fields += [
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
    ]
    return pa.schema(fields)


@dataclass
class ResultBatch:
    """The explained rows of one decoded batch, on the host.

    ``rows`` holds the per-image output columns that come from the input (``id``, the passed
    through columns, ``label``) for all n images; the arrays hold the m explained ones.
    """

    rows: pa.Table  # (n,) id, passthrough, label
    ok: np.ndarray  # (n,) bool: explained (False: an error row)
    errors: list[str | None]  # (n,) why a row is an error row
    classes: np.ndarray  # (m, C) int64
    keep: np.ndarray  # (m, C) bool: False for duplicates and invalid label slots
    scores: np.ndarray  # (m, C) float32
    probabilities: np.ndarray  # (m, C) float32
    cams: np.ndarray  # (m, C, h, w) float16 or float32
    heatmaps: np.ndarray | None  # (m, C, H, W) uint8/float16
    cam_max: np.ndarray  # (m, C) float32
    peaks: np.ndarray  # (m, C, 2) int64
    notes: list[str | None]  # (m,) a remark for explained rows (e.g. a label out of range)
    # Metric columns by name: (m, C) values (pred_box: (m, C, 4)); NaN (or has_boxes False) -> null.
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    # Several methods: the C slots are method-major, C / len(methods) classes per method.
    methods: tuple[str, ...] = ()
    guided: np.ndarray | None = None  # (m, C, 3, H, W) uint8

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


def build_table(batch: ResultBatch, schema: pa.Schema) -> tuple[pa.Table, np.ndarray]:
    """Arrow rows for one batch, in input order, then class rank within an image.

    Returns the table and, per output row, the index of its image in ``batch.rows``.
    """
    n = batch.num_images
    ok_index = np.flatnonzero(batch.ok)
    m = len(ok_index)
    # Explained rows: (image, slot) pairs that are kept.
    groups = max(1, len(batch.methods))
    per_method = batch.classes.shape[1] // groups
    # class_rank ranks the classes: each method's block of slots is ranked on its own.
    ranks = (
        _ranks(batch.scores.reshape(m * groups, -1), batch.keep.reshape(m * groups, -1)).reshape(m, -1)
        if m
        else np.zeros((0, 0), np.int64)
    )
    img_of, slot_of = np.nonzero(batch.keep) if m else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    row_ok = ok_index[img_of]
    rank_ok = ranks[img_of, slot_of]
    row_err = np.flatnonzero(~batch.ok)
    row_all = np.concatenate([row_ok, row_err])
    rank_all = np.concatenate([rank_ok, np.zeros(len(row_err), np.int64)])
    method_all = np.concatenate([slot_of // max(1, per_method), np.zeros(len(row_err), np.int64)])
    order = np.lexsort((method_all, rank_all, row_all))
    n_ok, n_out = len(row_ok), len(row_all)
    is_ok = order < n_ok
    src = np.where(is_ok, order, 0)  # index into the explained rows (meaningless where not ok)
    i_img, i_slot = (img_of[src], slot_of[src]) if n_ok else (src, src)

    def pick(arr: np.ndarray | None) -> np.ndarray | None:
        if arr is None or n_ok == 0:
            return None
        return arr[i_img, i_slot]

    def col(values, typ, valid=is_ok):
        if values is None:
            return pa.nulls(n_out, typ)
        return pa.array(values, type=typ, mask=~valid)

    row_sorted = row_all[order]
    taken = batch.rows.take(pa.array(row_sorted, pa.int64())) if n else batch.rows
    arrays: dict[str, pa.Array] = {name: taken.column(name) for name in taken.column_names}
    arrays["class_index"] = col(pick(batch.classes), pa.int32())
    arrays["class_rank"] = col(rank_all[order], pa.int32())
    arrays["score"] = col(pick(batch.scores), pa.float32())
    arrays["probability"] = col(pick(batch.probabilities), pa.float32())
    cam_type = schema.field("cam").type
    cam_shape = tuple(cam_type.shape)
    cam_np = CAM_DTYPES["float32" if cam_type.value_type == pa.float32() else "float16"][1]
    cams = pick(batch.cams)
    if cams is None:
        cams = np.zeros((n_out, *cam_shape), cam_np)
    arrays["cam"] = _tensor_column(np.where(is_ok[:, None, None], cams, 0).astype(cam_np), is_ok, cam_shape, cam_type)
    if "heatmap" in schema.names:
        heat_type = schema.field("heatmap").type
        heat_shape = tuple(heat_type.shape)
        heat_np = HEATMAP_DTYPES["uint8" if heat_type.value_type == pa.uint8() else "float16"][1]
        heat = pick(batch.heatmaps)
        if heat is None:
            heat = np.zeros((n_out, *heat_shape), heat_np)
        heat = np.where(is_ok[:, None, None], heat, 0).astype(heat_np)
        arrays["heatmap"] = _tensor_column(heat, is_ok, heat_shape, heat_type)
    if "method" in schema.names:
        idx = pa.array(method_all[order], pa.int32(), mask=~is_ok)
        arrays["method"] = pa.DictionaryArray.from_arrays(idx, pa.array(list(batch.methods), pa.string()))
    if "guided" in schema.names:
        g_type = schema.field("guided").type
        g = pick(batch.guided)
        g = np.zeros((n_out, *g_type.shape), np.uint8) if g is None else np.where(is_ok[:, None, None, None], g, 0)
        arrays["guided"] = _tensor_column(g.astype(np.uint8), is_ok, tuple(g_type.shape), g_type)
    peaks = pick(batch.peaks)
    cam_max = pick(batch.cam_max)
    has_peak = is_ok & (cam_max > 0) if cam_max is not None else is_ok
    arrays["peak_y"] = col(None if peaks is None else peaks[:, 0], pa.int32(), has_peak)
    arrays["peak_x"] = col(None if peaks is None else peaks[:, 1], pa.int32(), has_peak)
    arrays["cam_max"] = col(cam_max, pa.float32())
    valid_box = pick(batch.extras.get("has_boxes"))
    for name in EXTRA_TYPES:
        if name not in schema.names:
            continue
        values = pick(batch.extras.get(name))
        valid = is_ok.copy()
        if values is not None and values.dtype.kind == "f":
            valid &= ~(np.isnan(values).any(axis=-1) if values.ndim > 1 else np.isnan(values))
        if name in BOX_COLUMNS and valid_box is not None:
            valid &= valid_box
        if name == "pred_box" and values is not None:
            valid &= (values >= 0).all(axis=-1)
            flat = pa.array(np.where(valid[:, None], values, 0).astype(np.int32).reshape(-1))
            arrays[name] = pa.FixedSizeListArray.from_arrays(flat, 4, mask=pa.array(~valid))
        else:
            arrays[name] = col(values, EXTRA_TYPES[name], valid)
    arrays["status"] = pa.array(np.where(is_ok, "ok", "error").astype(object), pa.string())
    ok_pos = np.full(n, -1, np.int64)
    ok_pos[ok_index] = np.arange(len(ok_index))
    errors = [
        (batch.notes[ok_pos[r]] if ok else batch.errors[r])
        for r, ok in zip(row_sorted.tolist(), is_ok.tolist(), strict=True)
    ]
    arrays["error"] = pa.array(errors, pa.string())
    return pa.Table.from_arrays([arrays[f.name] for f in schema], schema=schema), row_sorted


__all__ = [
    "BOX_COLUMNS",
    "CAM_DTYPES",
    "EXTRA_TYPES",
    "HEATMAP_DTYPES",
    "METRIC_COLUMNS",
    "RESULT_COLUMNS",
    "ResultBatch",
    "build_table",
    "output_schema",
]
