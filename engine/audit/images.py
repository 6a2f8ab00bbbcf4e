"""The input images behind a few output rows, for the report's overlays.

The run's manifest says where its inputs were, which column held the images, how rows were
named and how images were resized and cropped; ``--images`` points at the inputs where they have
moved. Images are decoded with the run's own ``Preprocess``, so an overlay sits exactly under its
heatmap. Anything unreachable leaves the report with heatmaps alone, never an error.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq


def load_images(config: dict, ids: Sequence, inputs: Sequence[str] | None = None) -> tuple[dict, str | None]:
    """{id: (H, W, 3) uint8 preprocessed image} for the ids that could be found, and a note when none were."""
    wanted = list(dict.fromkeys(ids))
    inputs = list(inputs) if inputs else list(config.get("files") or config.get("inputs") or [])
    if not wanted:
        return {}, None
    if not inputs:
        return {}, "the run's inputs are not recorded; pass --images to show overlays"
    try:
        from gradcam_batch.engine.job.source import ParquetSource, Preprocess, discover_inputs

        files, _ = discover_inputs(inputs)
        prep = Preprocess(
            resize=_size(config.get("resize", 256)),
            crop=_size(config.get("crop", (224, 224))),
        )
        image_column = config.get("image_column")
        if image_column is None:
            from gradcam_batch.engine.job.source import detect_image_column

            image_column = detect_image_column(files[0].schema)
        src = ParquetSource(files, image_column, [], prep, workers=1)
    except Exception as exc:  # unreachable or changed inputs: the report goes on without overlays
        return {}, f"input images not reachable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"

    id_column = config.get("id_column")
    where: dict = {}  # id -> (file index, row)
    if id_column is None:
        keys = {f.key: i for i, f in enumerate(files)}
        for rid in wanted:
            key, _, row = str(rid).rpartition(":")
            if key in keys and row.isdigit():
                where[rid] = (keys[key], int(row))
    else:
        want = set(wanted)
        for fi, f in enumerate(files):
            with f.filesystem.open_input_file(f.path) as fh:
                col = pq.ParquetFile(fh).read(columns=[id_column]).column(id_column)
            hits = np.flatnonzero(pc.is_in(col, value_set=_value_set(col, want)).to_numpy(zero_copy_only=False))
            values = col.take(hits).to_pylist()
            for row, v in zip(hits.tolist(), values, strict=True):
                where.setdefault(v, (fi, row))
    out = {}
    for rid, (fi, row) in where.items():
        f = files[fi]
        try:
            with f.filesystem.open_input_file(f.path) as fh:
                pf = pq.ParquetFile(fh)
                starts = np.cumsum([0, *f.row_group_rows])
                rg = int(np.searchsorted(starts, row, side="right") - 1)
                value = pf.read_row_group(rg, columns=[image_column]).column(0)[row - int(starts[rg])].as_py()
            img = src._load(value, f)
            if isinstance(img, np.ndarray):
                out[rid] = img
        except Exception:
            continue  # this image is missing or broken: its overlay shows the heatmap alone
    note = None if out else "no input image could be found for the sampled rows; pass --images to show overlays"
    return out, note


def _size(v):
    if v is None or isinstance(v, int):
        return v
    return tuple(v)


def _value_set(col, want: set):
    import pyarrow as pa

    typ = col.type
    vals = [v for v in want if v is not None]
    try:
        return pa.array(vals, typ)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([str(v) for v in vals], pa.string()).cast(typ, safe=False)


__all__ = ["load_images"]
