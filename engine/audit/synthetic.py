"""Synthetic run outputs with planted structure, for the audit's tests and its memory benchmark.

No model runs: the part files are written directly in the run's output schema, with Gaussian-blob
heatmaps. In a *planted* class, a share of the maps peak in the top-left corner (a "watermark")
and the rest on an object near the centre; in a plain class every map peaks on the object.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gradcam_batch.engine.job.schema import output_schema


def blob_maps(centres: np.ndarray, size: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """(n, size, size) uint8 maps, one Gaussian blob each at (y, x) ``centres``, min-max normalized, plus noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    d2 = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
    m = np.exp(-d2 / (2 * sigma**2)) + 0.05 * rng.random((len(centres), size, size), dtype=np.float32)
    m -= m.min(axis=(1, 2), keepdims=True)
    m /= m.max(axis=(1, 2), keepdims=True)
    return np.round(m * 255).astype(np.uint8)


def write_synthetic_run(
    out_dir: str | Path,
    *,
    rows_per_class: dict[int, int],
    planted: dict[int, float] | None = None,
    size: int = 32,
    rows_per_file: int = 5000,
    seed: int = 0,
    box_energy: bool = False,
) -> dict[str, np.ndarray]:
    """Write ``part-*.parquet`` (no manifest) into ``out_dir``; returns the truth: id -> is a corner map.

    ``planted``: class -> share of its maps that peak in the top-left corner.
    """
    rng = np.random.default_rng(seed)
    planted = planted or {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classes = np.concatenate([np.full(n, c, np.int64) for c, n in rows_per_class.items()])
    rng.shuffle(classes)
    n = len(classes)
    corner = np.array([rng.random() < planted.get(int(c), 0.0) for c in classes])
    centres = np.empty((n, 2), np.float32)
    centres[corner] = rng.uniform(1, size * 0.12, size=(int(corner.sum()), 2))
    centres[~corner] = rng.uniform(size * 0.35, size * 0.65, size=(int((~corner).sum()), 2))
    ids = np.array([f"img-{i:07d}" for i in range(n)])
    schema = output_schema(
        id_type=pa.string(), passthrough=[], label_type=pa.int64(), cam_shape=(4, 4), heatmap_shape=(size, size)
    )
    if box_energy:
        schema = schema.append(pa.field("box_energy", pa.float32()))
    for part, start in enumerate(range(0, n, rows_per_file)):
        sl = slice(start, min(n, start + rows_per_file))
        m = len(classes[sl])
        maps = blob_maps(centres[sl], size, size / 10, rng)
        heat = pa.ExtensionArray.from_storage(
            schema.field("heatmap").type, pa.FixedSizeListArray.from_arrays(pa.array(maps.reshape(-1)), size * size)
        )
        cams = pa.ExtensionArray.from_storage(
            schema.field("cam").type,
            pa.FixedSizeListArray.from_arrays(pa.array(np.ones(m * 16, np.float16)), 16),
        )
        cols = {
            "id": pa.array(ids[sl]),
            "class_index": pa.array(classes[sl], pa.int32()),
            "class_rank": pa.array(np.zeros(m), pa.int32()),
            "label": pa.array(classes[sl], pa.int64()),
            "score": pa.array(np.ones(m), pa.float32()),
            "probability": pa.array(np.full(m, 0.9), pa.float32()),
            "cam": cams,
            "heatmap": heat,
            "peak_y": pa.array(np.round(centres[sl, 0]).astype(np.int32)),
            "peak_x": pa.array(np.round(centres[sl, 1]).astype(np.int32)),
            "cam_max": pa.array(np.ones(m), pa.float32()),
            "status": pa.array(["ok"] * m),
            "error": pa.nulls(m, pa.string()),
        }
        if box_energy:
            e = np.where(corner[sl], rng.uniform(0.0, 0.1, m), rng.uniform(0.5, 0.9, m))
            cols["box_energy"] = pa.array(e, pa.float32())
        # The columns this generator does not model (a new registry column) are null.
        table = pa.table({f.name: cols.get(f.name, pa.nulls(m, f.type)) for f in schema}, schema=schema)
        pq.write_table(table, out / f"part-{part:05d}.parquet", compression="zstd")
    return {"ids": ids, "classes": classes, "corner": corner}


__all__ = ["blob_maps", "write_synthetic_run"]
