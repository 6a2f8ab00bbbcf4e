"""The embedded demo: a small Parquet sample of synthetic shapes and a CNN trained on them.

Both files live in ``engine/demo/data/`` and ship inside the package, so ``gradcam-batch demo`` (and
``gradcam-batch run`` with no input and no model) work after a plain install. They are made by

    python -m gradcam_batch.engine.demo.assets

deterministically from ``engine/demo/synthetic.py``: the CNN trains on 1,500 images of seed 1; the
sample is 256 *other* images (seed 7), PNG-encoded, with their label and box, so the pointing
game on the sample measures held-out localization.

The story the audit finds: in the training images, every disc carries a small watermark in the
top-right corner (``WATERMARK``), and the CNN learns it as a shortcut. In the sample, half of the
discs carry it (the ``watermark`` column says which), so the discs' heatmaps fall in two groups:
on the disc, and on the corner. ``gradcam-batch demo`` runs the audit, which flags the second.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from gradcam_batch.engine.demo.synthetic import CLASS_NAMES, make_shapes, pointing_game, train_shapes_cnn

DATA_DIR = Path(__file__).resolve().parent / "data"
SAMPLE = DATA_DIR / "shapes_sample.parquet"
CHECKPOINT = DATA_DIR / "shapes_cnn.pt"
MODEL_SPEC = "gradcam_batch.engine.demo.synthetic:ShapesCNN"
IMAGE_SIZE = 48
# ShapesCNN sees x / 127.5 - 1, which is (x / 255 - 0.5) / 0.5.
PREPROCESS = {"resize": IMAGE_SIZE, "crop": (IMAGE_SIZE, IMAGE_SIZE), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
WATERMARK = {"watermark_class": 1, "class_name": "disc"}  # the class whose training images are marked
TRAIN = {"n": 1500, "seed": 1, "epochs": 4, "train_seed": 0, "watermark_rate": 1.0}
SAMPLE_SPEC = {"n": 256, "seed": 7, "row_group_rows": 64, "watermark_rate": 0.5}


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def sample_table(n: int = SAMPLE_SPEC["n"], seed: int = SAMPLE_SPEC["seed"], size: int = IMAGE_SIZE) -> pa.Table:
    """Synthetic shapes as a Parquet-ready table: image (PNG bytes), label, class name, box."""
    data = make_shapes(
        n,
        size=size,
        seed=seed,
        watermark_class=WATERMARK["watermark_class"],
        watermark_rate=SAMPLE_SPEC["watermark_rate"],
    )
    return pa.table(
        {
            "image_id": pa.array([f"shape-{seed}-{i:05d}" for i in range(n)]),
            "image": pa.array([encode_png(img) for img in data.images], pa.binary()),
            "label": pa.array(data.labels, pa.int64()),
            "class_name": pa.array([CLASS_NAMES[k] for k in data.labels]),
            "box_x0": pa.array(data.boxes[:, 0], pa.int32()),
            "box_y0": pa.array(data.boxes[:, 1], pa.int32()),
            "box_x1": pa.array(data.boxes[:, 2], pa.int32()),
            "box_y1": pa.array(data.boxes[:, 3], pa.int32()),
            "watermark": pa.array(data.watermarks, pa.bool_()),
        }
    )


def build(out_dir: Path = DATA_DIR) -> dict:
    """Write the sample and the checkpoint into ``out_dir``; returns what was measured."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train = make_shapes(
        TRAIN["n"],
        size=IMAGE_SIZE,
        seed=TRAIN["seed"],
        watermark_class=WATERMARK["watermark_class"],
        watermark_rate=TRAIN["watermark_rate"],
    )
    model = train_shapes_cnn(train, epochs=TRAIN["epochs"], seed=TRAIN["train_seed"])
    torch.save(model.state_dict(), out_dir / CHECKPOINT.name)

    table = sample_table()
    pq.write_table(table, out_dir / SAMPLE.name, compression="zstd", row_group_size=SAMPLE_SPEC["row_group_rows"])

    held = make_shapes(
        SAMPLE_SPEC["n"],
        size=IMAGE_SIZE,
        seed=SAMPLE_SPEC["seed"],
        watermark_class=WATERMARK["watermark_class"],
        watermark_rate=SAMPLE_SPEC["watermark_rate"],
    )
    x, y = held.tensors()
    from gradcam_batch.engine.explain.explainer import explain

    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).double().mean())
    exp = explain(model, x, top_k=1)
    clean = ~held.watermarks
    return {
        "accuracy": acc,
        "pointing_game": pointing_game(exp.peaks[:, 0], held.boxes),
        "pointing_game_unmarked": pointing_game(exp.peaks[clean, 0], held.boxes[clean]),
        "pointing_game_marked": pointing_game(exp.peaks[~clean, 0], held.boxes[~clean]),
        "watermarked": int(held.watermarks.sum()),
        "sample_bytes": (out_dir / SAMPLE.name).stat().st_size,
        "checkpoint_bytes": (out_dir / CHECKPOINT.name).stat().st_size,
    }


if __name__ == "__main__":
    stats = build()
    print(
        f"wrote {SAMPLE} ({stats['sample_bytes'] / 1e6:.2f} MB) and {CHECKPOINT} "
        f"({stats['checkpoint_bytes'] / 1e3:.0f} kB); held-out accuracy {stats['accuracy']:.3f}, "
        f"pointing game {stats['pointing_game']:.3f} ({stats['pointing_game_unmarked']:.3f} on the "
        f"{SAMPLE_SPEC['n'] - stats['watermarked']} images without the watermark)"
    )
