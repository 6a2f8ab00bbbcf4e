"""The output schema and the one function that turns a batch's results into its Arrow rows.

Both follow the column registry (``engine/job/columns.py``): ``output_schema`` lists the columns a
run's ``Layout`` enables, and ``build_table`` encodes each value column by its Arrow type. One row
per explained (image, class), then one ``status="error"`` row per image that could not be
explained, in input order and, within an image, by ``class_rank``. The README's "Output schema"
section documents every column.

- ``class_rank`` is int32: any top-k fits.
- A value column is null on error rows, where a float is NaN, where a host array is masked, and
  where its column's ``valid`` rule says so (a peak or a predicted box of -1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from gradcam_batch.engine.job.columns import BY_NAME, CAM_DTYPES, HEATMAP_DTYPES, INPUT, TABLE, Layout, columns_of


def output_schema(layout: Layout | None = None, /, **fields) -> pa.Schema:
    """The schema of every output file: the registry's columns that ``layout`` enables, in its order.

    Keywords build the layout (``output_schema(id_type=pa.string(), cam_shape=(7, 7), ...)``).
    """
    if layout is None:
        fields["passthrough"] = tuple(fields.get("passthrough", ()))
        fields["methods"] = tuple(fields.get("methods") or ("gradcam",))
        layout = Layout(**fields)
    return pa.schema([f for c in columns_of(layout) for f in c.fields(layout)])


@dataclass
class ResultBatch:
    """The explained rows of one decoded batch, on the host.

    ``rows`` holds the per-image output columns that come from the input (``id``, the passed
    through columns, ``label``) for all n images; ``values`` the value columns of the m explained
    ones, by column name, each (m, C, ...).
    """

    rows: pa.Table  # (n,) id, passthrough, label
    ok: np.ndarray  # (n,) bool: explained (False: an error row)
    errors: list[str | None]  # (n,) why a row is an error row
    keep: np.ndarray  # (m, C) bool: False for duplicates and invalid label slots
    notes: list[str | None]  # (m,) a remark for explained rows (e.g. a label out of range)
    values: dict[str, np.ndarray] = field(default_factory=dict)  # needs class_index and score
    # Several methods: the C slots are method-major, C / len(methods) classes per method.
    methods: tuple[str, ...] = ()
    # (m, C) object: a remark for one explained (image, class), joined after the image's note (a
    # segmentation class with no predicted pixel); None: none
    slot_notes: np.ndarray | None = None

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


def numpy_dtype(typ: pa.DataType) -> np.dtype:
    """The numpy dtype of a fixed-width Arrow type. (``DataType.to_pandas_dtype`` needs pandas on pyarrow 16,
    the lowest supported, and pandas is no dependency.)"""
    return pa.array([], type=typ).to_numpy(zero_copy_only=False).dtype


def _tensor_column(values: np.ndarray, valid: np.ndarray, shape: tuple[int, ...], typ: pa.DataType) -> pa.Array:
    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    storage = pa.FixedSizeListArray.from_arrays(flat, int(np.prod(shape)), mask=pa.array(~valid))
    return pa.ExtensionArray.from_storage(typ, storage)


def _rowwise(mask: np.ndarray) -> np.ndarray:
    return mask.reshape(len(mask), -1).any(axis=1) if mask.ndim > 1 else mask


def encode(values: np.ndarray | None, ok: np.ndarray, typ: pa.DataType, column=None) -> pa.Array:
    """One value column's Arrow array: ``values`` (rows, ...) where ``ok``, null elsewhere (see the
    module docstring); ``values`` None: every row null."""
    n = len(ok)
    if isinstance(typ, pa.FixedShapeTensorType):
        np_type = numpy_dtype(typ.value_type)
        if values is None:
            return _tensor_column(np.zeros((n, *typ.shape), np_type), np.zeros(n, bool), tuple(typ.shape), typ)
        valid = ok & ~_rowwise(np.ma.getmaskarray(values))
        valid &= column.valid(np.ma.getdata(values)) if column is not None and column.valid else True
        data = np.where(valid.reshape(-1, *[1] * (values.ndim - 1)), np.ma.getdata(values), 0)
        return _tensor_column(data.astype(np_type), valid, tuple(typ.shape), typ)
    if values is None:
        return pa.nulls(n, typ)
    data = np.ma.getdata(values)
    valid = ok & ~_rowwise(np.ma.getmaskarray(values))
    if data.dtype.kind == "f":
        valid &= ~_rowwise(np.isnan(data))
    if column is not None and column.valid is not None:
        valid &= column.valid(data)
    if pa.types.is_fixed_size_list(typ):
        np_type = numpy_dtype(typ.value_type)
        flat = np.where(valid[:, None], data.reshape(n, -1), 0).astype(np_type).reshape(-1)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat), typ.list_size, mask=pa.array(~valid))
    np_type = numpy_dtype(typ)
    return pa.array(np.where(valid, data, 0).astype(np_type), typ, mask=~valid)


def build_table(batch: ResultBatch, schema: pa.Schema) -> tuple[pa.Table, np.ndarray]:
    """Arrow rows for one batch, in input order, then class rank within an image.

    Returns the table and, per output row, the index of its image in ``batch.rows``.
    """
    n = batch.num_images
    ok_index = np.flatnonzero(batch.ok)
    m = len(ok_index)
    # Explained rows: (image, slot) pairs that are kept.
    groups = max(1, len(batch.methods))
    per_method = batch.keep.shape[1] // groups if m else 1
    # class_rank ranks the classes: each method's block of slots is ranked on its own.
    ranks = (
        _ranks(batch.values["score"].reshape(m * groups, -1), batch.keep.reshape(m * groups, -1)).reshape(m, -1)
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
    n_ok = len(row_ok)
    is_ok = order < n_ok
    src = np.where(is_ok, order, 0)  # index into the explained rows (meaningless where not ok)
    i_img, i_slot = (img_of[src], slot_of[src]) if n_ok else (src, src)

    row_sorted = row_all[order]
    taken = batch.rows.take(pa.array(row_sorted, pa.int64())) if n else batch.rows
    arrays: dict[str, pa.Array] = {name: taken.column(name) for name in taken.column_names}
    arrays["class_rank"] = pa.array(rank_all[order], pa.int32(), mask=~is_ok)
    if "method" in schema.names:
        idx = pa.array(method_all[order], pa.int32(), mask=~is_ok)
        arrays["method"] = pa.DictionaryArray.from_arrays(idx, pa.array(list(batch.methods), pa.string()))
    arrays["status"] = pa.array(np.where(is_ok, "ok", "error").astype(object), pa.string())
    ok_pos = np.full(n, -1, np.int64)
    ok_pos[ok_index] = np.arange(len(ok_index))
    errors = [
        (batch.notes[ok_pos[r]] if ok else batch.errors[r])
        for r, ok in zip(row_sorted.tolist(), is_ok.tolist(), strict=True)
    ]
    if batch.slot_notes is not None and n_ok:
        slot = batch.slot_notes[i_img, i_slot]
        errors = [
            "; ".join(t for t in (e, sn if ok else None) if t) or None
            for e, sn, ok in zip(errors, slot.tolist(), is_ok.tolist(), strict=True)
        ]
    arrays["error"] = pa.array(errors, pa.string())
    for f in schema:
        column = BY_NAME.get(f.name)
        if f.name in arrays or column is None or column.origin in (INPUT, TABLE):
            continue
        values = batch.values.get(f.name)
        picked = values[i_img, i_slot] if values is not None and n_ok else None
        arrays[f.name] = encode(picked, is_ok, f.type, column)
    return pa.Table.from_arrays([arrays[f.name] for f in schema], schema=schema), row_sorted


__all__ = ["CAM_DTYPES", "HEATMAP_DTYPES", "ResultBatch", "build_table", "encode", "output_schema"]
