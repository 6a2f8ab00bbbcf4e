"""Synthetic run outputs with planted structure, for the audit's tests and its memory benchmark.

No model runs: the part files are written directly in the run's output schema, with Gaussian-blob
heatmaps. ``write_synthetic_run``: maps only; in a *planted* class, a share of the maps peak in the
top-left corner (a "watermark") and the rest on an object near the centre; in a plain class every
map peaks on the object. ``write_image_run``: maps and the images under them, one class of
identical shapes, where the maps look at the shape or, on marked images, at a small checker mark.
"""

from __future__ import annotations

import io
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


IMAGE_CASES = ("anywhere", "centred", "fixed", "moving")
MARK_AT = (14, 27)  # (y, x) of the fixed mark in a 48-pixel image: outside the corners and the border band


def _checker(side: int) -> np.ndarray:
    yy, xx = np.mgrid[0:side, 0:side]
    on = ((yy // 2 + xx // 2) % 2).astype(bool)
    return np.where(on[..., None], (250, 250, 250), (250, 210, 30)).astype(np.uint8)


def write_image_run(
    out_dir: str | Path,
    input_path: str | Path,
    *,
    case: str = "anywhere",
    n: int = 150,
    marked_share: float = 0.4,
    border_share: float = 0.3,
    identical: bool = True,
    size: int = 48,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """An input file of ``n`` PNG images of one class (0) and a run output of their heatmaps, no manifest.

        Every image holds a filled disc on a noisy background: the same disc (radius 7) in every image,
        or with ``identical=False`` one of radius 6 to 9, 30 to 60 levels brighter than its background
    (a harder cue than the mark, as the benchmark's shapes are). ``case``:
        ``anywhere``: the disc at a random place, flush with an edge (part cut off) in ``border_share``
        of the images; ``centred``: the disc at the centre (+-1 pixel); ``fixed``: as ``anywhere``, and a
        6-pixel checker mark at ``MARK_AT`` on ``marked_share`` of the images; ``moving``: the mark at a
        random place instead. The heatmap is a blob (sigma 4) on the mark where there is one, else on
        the disc; the cam is its 12 x 12 block mean. Row ids are ``<input file name>:<row>``, as a run
        without ``--id-column`` names them. Returns the truth: ids, marked.
    """
    if case not in IMAGE_CASES:
        raise ValueError(f"case must be one of {IMAGE_CASES}")
    from PIL import Image

    rng = np.random.default_rng(seed)
    inp, out = Path(input_path), Path(out_dir)
    inp.parent.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size]
    pngs, centres = [], np.zeros((n, 2))
    marked = np.zeros(n, bool)
    if case in ("fixed", "moving"):
        marked[rng.permutation(n)[: round(marked_share * n)]] = True
    mark = _checker(6)
    for i in range(n):
        bg = rng.uniform(40, 120, size=3)
        img = bg[None, None] + rng.normal(0, 12, size=(size, size, 3))
        if case == "centred":
            cy, cx = size / 2 + rng.integers(-1, 2, size=2)
        else:
            cy, cx = rng.uniform(7, size - 7, size=2)
            if rng.random() < border_share:  # flush with an edge, up to 3 pixels cut off
                side = rng.integers(4)
                edge = float(rng.uniform(4, 7))
                if side == 0:
                    cy = edge
                elif side == 1:
                    cy = size - edge
                elif side == 2:
                    cx = edge
                else:
                    cx = size - edge
        radius, colour = (7, (200, 90, 60)) if identical else (rng.uniform(6, 9), bg + rng.uniform(30, 60, size=3))
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        img[disc] = colour
        at = (cy, cx)
        if marked[i]:
            y0, x0 = MARK_AT if case == "fixed" else rng.integers(1, size - 7, size=2)
            img[y0 : y0 + 6, x0 : x0 + 6] = mark
            at = (y0 + 3, x0 + 3)
        centres[i] = at
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    pq.write_table(pa.table({"image": pa.array(pngs, pa.binary())}), inp)
    d2 = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
    heat = np.exp(-d2 / (2 * 4.0**2)) + 0.03 * rng.random((n, size, size))
    heat = (heat - heat.min((1, 2), keepdims=True)) / np.ptp(heat, (1, 2), keepdims=True)
    cam = heat.reshape(n, 12, size // 12, 12, size // 12).mean((2, 4)).astype(np.float16)
    schema = output_schema(
        id_type=pa.string(), passthrough=[], label_type=pa.int64(), cam_shape=(12, 12), heatmap_shape=(size, size)
    )
    ids = np.array([f"{inp.name}:{i}" for i in range(n)])
    cols = {
        "id": pa.array(ids),
        "class_index": pa.array(np.zeros(n), pa.int32()),
        "class_rank": pa.array(np.zeros(n), pa.int32()),
        "label": pa.array(np.zeros(n), pa.int64()),
        "score": pa.array(np.ones(n), pa.float32()),
        "probability": pa.array(np.full(n, 0.9), pa.float32()),
        "cam": pa.ExtensionArray.from_storage(
            schema.field("cam").type, pa.FixedSizeListArray.from_arrays(pa.array(cam.reshape(-1)), 144)
        ),
        "heatmap": pa.ExtensionArray.from_storage(
            schema.field("heatmap").type,
            pa.FixedSizeListArray.from_arrays(pa.array(np.round(heat * 255).astype(np.uint8).reshape(-1)), size * size),
        ),
        "peak_y": pa.array(np.round(centres[:, 0]).astype(np.int32)),
        "peak_x": pa.array(np.round(centres[:, 1]).astype(np.int32)),
        "cam_max": pa.array(np.ones(n), pa.float32()),
        "status": pa.array(["ok"] * n),
        "error": pa.nulls(n, pa.string()),
    }
    # every column the registry declares and this fixture does not fill is null, as in write_synthetic_run
    table = pa.table({f.name: cols.get(f.name, pa.nulls(n, f.type)) for f in schema}, schema=schema)
    pq.write_table(table, out / "part-00000.parquet")
    return {"ids": ids, "marked": marked}


__all__ = ["IMAGE_CASES", "MARK_AT", "blob_maps", "write_image_run", "write_synthetic_run"]
