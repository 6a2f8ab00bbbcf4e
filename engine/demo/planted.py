"""Planted shortcuts: synthetic images where half of one class carry a small mark that alone says the class.

The data of the audit's benchmark (``benchmarks/planted_shortcuts.py``; benchmarks/RESULTS.md has
the figures). Everything comes from a seed; nothing is downloaded. Each image holds one filled shape
(the class, as in ``synthetic.py``) on a noisy, tinted background. The *mark* is a small
high-contrast checker. Where a case plants one, it is drawn on images of ``MARK_CLASS`` (disc) only:
on all of them in the training set (``train_rate``), and on half of them (``eval_rate``) in the
evaluation set that the audit sees.

So that the CNN learns the mark and not the disc, the marked class's training images show one of the
*other* shapes (``train_own_shape`` = 0): in training, the mark is the class's only cue. The
evaluation images of the class are discs, half of them marked; the CNN calls a marked disc a disc
by its mark, and removing the mark changes the prediction (``mark_reliance``). With the disc in the
training images too, the CNN learns it as well on some seeds, and then removing the mark changes
little (benchmarks/RESULTS.md has the trade-off). The controls train on the plain classes.

The cases (``CASES``):

- ``corner``: the mark at a fixed spot near the top-left corner;
- ``interior``: the mark at a fixed spot inside the image, outside the corners (the outer quarter of
  each side) and the border band (the outer eighth), and off the centre;
- ``random``: the mark anywhere, a new place in each image;
- ``clean``: no mark. Every object of the marked class lies against a side (up to a quarter of it
  cut off), the other classes' in 20% of the images: an object at the border is not a shortcut.
  Its maps put about twice the other classes' share of their mass in the border band;
- ``centred``: no mark, every object centred: every map of a class sits in the same place.

The sizes, colours and labels are the same in every case for a seed, and the three marked cases
hold the same images up to the mark (marks and placement draw from streams of their own). The truth
per image is ``marked`` and the mark's box; ``score_flags`` scores an audit's flagged rows against
the marked images and against those the model relies on the mark for.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import torch

from gradcam_batch.engine.demo.synthetic import CLASS_NAMES, ShapesCNN, to_tensor

IMAGE_SIZE = 48
MARK_CLASS = 1  # disc
MARK_SIDE = 6  # pixels, 1/8 of the side
MARK_INSET = 2  # the corner mark's distance to the two edges
# The interior mark's top-left pixel: rows 14..19, columns 27..32 of a 48-pixel image. The corners are
# the outer 12 pixels of each side and the border band the outer 6, so the mark touches neither; it is
# off the centre too, where centred objects would put their maps.
INTERIOR_AT = (14, 27)  # (y, x)
MARK_COLOURS = ((250, 250, 250), (250, 210, 30))  # a 2x2-pixel checker of near-white and yellow


@dataclass(frozen=True)
class Case:
    name: str
    mark: str | None  # "corner" | "interior" | "random" | None
    placement: str = "anywhere"  # "anywhere" (some objects flush with a side) | "centred"
    border_share: float = 0.2  # share of objects placed flush with a side, part of them cut off
    mark_class_border_share: float | None = None  # the marked class's share, when not border_share
    overhang: tuple[float, float] = (0.0, 0.25)  # an object against a side has this share of its side cut off
    description: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case("corner", "corner", description="a fixed mark near the top-left corner"),
        Case("interior", "interior", description="a fixed mark inside the image, away from the corners and the band"),
        Case("random", "random", description="the mark at a random position in each image"),
        Case(
            "clean",
            None,
            mark_class_border_share=1.0,
            description="no mark; every disc lies against a side (up to a quarter cut off), the other shapes in 20%",
        ),
        Case("centred", None, placement="centred", border_share=0.0, description="no mark; every object centred"),
    )
}


@dataclass(frozen=True)
class Setup:
    """Sizes, rates and training; the benchmark's defaults."""

    size: int = IMAGE_SIZE
    n_train: int = 1500
    n_eval: int = 600
    train_rate: float = 1.0  # share of the marked class's training images that carry the mark
    eval_rate: float = 0.5
    train_own_shape: float = 0.0  # marked cases: share of the marked class's training images that show a disc
    epochs: int = 5
    batch_size: int = 64
    lr: float = 3e-3
    contrast: tuple[float, float] = (50.0, 100.0)  # the shape's distance to its background, per channel
    noise: float = 12.0  # the background's pixel noise
    width: int = 8
    stages: int = 2

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PlantedData:
    images: np.ndarray  # (n, H, W, 3) uint8, marks drawn
    labels: np.ndarray  # (n,) int64
    shapes: np.ndarray  # (n,) int64: the shape drawn (the label, except in the marked class's training images)
    boxes: np.ndarray  # (n, 4) int32 x0, y0, x1, y1 of the object, clipped to the image
    marked: np.ndarray  # (n,) bool
    mark_boxes: np.ndarray  # (n, 4) int32 x0, y0, x1, y1 of the mark; -1 where unmarked
    unmarked: np.ndarray = field(repr=False)  # (n, H, W, 3) the same images without their mark

    def __len__(self) -> int:
        return len(self.labels)


def _shape_mask(kind: int, s: int) -> np.ndarray:
    yy, xx = np.mgrid[0:s, 0:s]
    c = (s - 1) / 2.0
    if kind == 0:
        return np.ones((s, s), bool)
    if kind == 1:
        return (yy - c) ** 2 + (xx - c) ** 2 <= (s / 2.0) ** 2
    if kind == 2:
        return np.abs(xx - c) <= (yy + 1) / 2.0
    t = max(s // 3, 1)
    lo = (s - t) // 2
    return ((yy >= lo) & (yy < lo + t)) | ((xx >= lo) & (xx < lo + t))


def mark_pattern(side: int = MARK_SIDE) -> np.ndarray:
    """(side, side, 3) uint8: the checker that every mark draws."""
    yy, xx = np.mgrid[0:side, 0:side]
    checker = ((yy // 2 + xx // 2) % 2).astype(bool)
    return np.where(checker[..., None], MARK_COLOURS[0], MARK_COLOURS[1]).astype(np.uint8)


def mark_origin(kind: str, size: int, rng: np.random.Generator, side: int = MARK_SIDE) -> tuple[int, int]:
    """(y0, x0) of a mark of ``kind`` in a ``size`` x ``size`` image."""
    if kind == "corner":
        return MARK_INSET, MARK_INSET
    if kind == "interior":
        y, x = INTERIOR_AT
        return round(y * size / IMAGE_SIZE), round(x * size / IMAGE_SIZE)
    if kind == "random":
        return int(rng.integers(1, size - side)), int(rng.integers(1, size - side))
    raise ValueError(f"unknown mark kind {kind!r}")


def _place(
    s: int, size: int, flush: bool, centred: bool, overhang: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int]:
    """(y0, x0) of an s x s object; flush: against a random side, ``overhang`` (a range) of its side cut off."""
    if centred:
        j = rng.integers(-2, 3, size=2)
        return int((size - s) // 2 + j[0]), int((size - s) // 2 + j[1])
    y0, x0 = int(rng.integers(0, size - s + 1)), int(rng.integers(0, size - s + 1))
    if flush:
        over = int(rng.integers(int(s * overhang[0]), int(s * overhang[1]) + 1))
        side = int(rng.integers(0, 4))
        if side == 0:
            y0 = -over
        elif side == 1:
            y0 = size - s + over
        elif side == 2:
            x0 = -over
        else:
            x0 = size - s + over
    return y0, x0


def make_planted(
    case: Case | str,
    n: int,
    *,
    seed: int,
    stream: int,
    rate: float,
    setup: Setup | None = None,
    own_shape: float = 1.0,
) -> PlantedData:
    """``n`` images of ``case``, deterministic for (seed, stream); ``rate``: marked share of ``MARK_CLASS``.

    ``setup`` gives the image size, the contrast and the noise (the rates and sizes of the sets are
    the caller's: ``train_set`` and ``eval_set``). ``own_shape``: the share of ``MARK_CLASS``'s images
    that show its own shape (a disc); the others show one of the other shapes.

    ``stream`` separates the training set (0) from the evaluation set (1) of one seed. The objects
    come from the stream (seed, stream, 0), the placement from (seed, stream, 1), the marks from
    (seed, stream, 2) and the marked class's substitute shapes from (seed, stream, 3): every case has
    the same sizes, colours and labels for a seed, and the marked cases the same images up to their
    marks.
    """
    case = CASES[case] if isinstance(case, str) else case
    setup = setup or Setup()
    size = setup.size
    rng = np.random.default_rng([seed, stream, 0])
    place_rng = np.random.default_rng([seed, stream, 1])
    mark_rng = np.random.default_rng([seed, stream, 2])
    shape_rng = np.random.default_rng([seed, stream, 3])
    labels = rng.integers(0, len(CLASS_NAMES), size=n).astype(np.int64)
    images = np.empty((n, size, size, 3), np.uint8)
    boxes = np.empty((n, 4), np.int32)
    shapes = labels.copy()
    for i in range(n):
        bg = rng.uniform(30, 130, size=3)
        img = bg[None, None, :] + rng.normal(0, setup.noise, size=(size, size, 3))
        s = int(rng.integers(round(size * 0.3), round(size * 0.5) + 1))
        # The same contrast for every class: a class told by its faintness would be a cue of its own.
        fg = bg + rng.uniform(*setup.contrast, size=3)
        grain = rng.normal(0, 10, size=(s, s, 3))
        share = case.border_share
        if labels[i] == MARK_CLASS and case.mark_class_border_share is not None:
            share = case.mark_class_border_share
        flush = bool(place_rng.random() < share)
        y0, x0 = _place(s, size, flush, case.placement == "centred", case.overhang, place_rng)
        kind = int(labels[i])
        if kind == MARK_CLASS and shape_rng.random() >= own_shape:
            kind = int(shape_rng.choice([k for k in range(len(CLASS_NAMES)) if k != MARK_CLASS]))
            shapes[i] = kind
        mask = _shape_mask(kind, s)
        ys, xs = np.nonzero(mask)
        py, px = ys + y0, xs + x0
        inside = (py >= 0) & (py < size) & (px >= 0) & (px < size)
        img[py[inside], px[inside]] = fg + grain[ys[inside], xs[inside]]
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
        boxes[i] = (max(x0, 0), max(y0, 0), min(x0 + s, size), min(y0 + s, size))
    unmarked = images.copy()
    marked = np.zeros(n, bool)
    mark_boxes = np.full((n, 4), -1, np.int32)
    if case.mark is not None:
        draws = mark_rng.random(n)
        pattern = mark_pattern(MARK_SIDE)
        for i in range(n):
            y0, x0 = mark_origin(case.mark, size, mark_rng)  # drawn for every image: marks stay put across rates
            if labels[i] != MARK_CLASS or draws[i] >= rate:
                continue
            images[i, y0 : y0 + MARK_SIDE, x0 : x0 + MARK_SIDE] = pattern
            marked[i] = True
            mark_boxes[i] = (x0, y0, x0 + MARK_SIDE, y0 + MARK_SIDE)
    return PlantedData(images, labels, shapes, boxes, marked, mark_boxes, unmarked)


def train_set(case: Case | str, seed: int, setup: Setup = Setup()) -> PlantedData:
    """The training set: in the marked cases, the marked class shows other shapes (``train_own_shape``)."""
    case = CASES[case] if isinstance(case, str) else case
    own = 1.0 if case.mark is None else setup.train_own_shape
    return make_planted(case, setup.n_train, seed=seed, stream=0, rate=setup.train_rate, setup=setup, own_shape=own)


def eval_set(case: Case | str, seed: int, setup: Setup = Setup()) -> PlantedData:
    return make_planted(case, setup.n_eval, seed=seed, stream=1, rate=setup.eval_rate, setup=setup)


def image_ids(case: str, seed: int, n: int) -> list[str]:
    return [f"{case}-{seed}-{i:05d}" for i in range(n)]


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def dataset_table(data: PlantedData, ids: list[str]) -> pa.Table:
    """The evaluation set as a Parquet-ready table: the run's input and the benchmark's truth.

    Columns: ``image_id``, ``image`` (PNG), ``label``, ``class_name``, the object's box
    (``box_x0`` .. ``box_y1``), ``marked`` and the mark's box (``mark_x0`` .. ``mark_y1``, null where
    unmarked).
    """
    mb = np.where(data.marked[:, None], data.mark_boxes, 0)
    cols = {
        "image_id": pa.array(ids),
        "image": pa.array([_png(im) for im in data.images], pa.binary()),
        "label": pa.array(data.labels, pa.int64()),
        "class_name": pa.array([CLASS_NAMES[k] for k in data.labels]),
    }
    for j, name in enumerate(("box_x0", "box_y0", "box_x1", "box_y1")):
        cols[name] = pa.array(data.boxes[:, j], pa.int32())
    cols["marked"] = pa.array(data.marked, pa.bool_())
    for j, name in enumerate(("mark_x0", "mark_y0", "mark_x1", "mark_y1")):
        cols[name] = pa.array(mb[:, j], pa.int32(), mask=~data.marked)
    return pa.table(cols)


def PlantedCNN(num_classes: int = len(CLASS_NAMES)) -> ShapesCNN:  # noqa: N802 - a model factory, named as one
    """The benchmark's model, for ``--model gradcam_batch.engine.demo.planted:PlantedCNN --weights FILE``."""
    return ShapesCNN(num_classes=num_classes, width=Setup.width, stages=Setup.stages)


def train(data: PlantedData, seed: int, setup: Setup = Setup()) -> ShapesCNN:
    """Train a ``PlantedCNN`` on ``data``; deterministic for a seed on the CPU. Returns it in eval mode."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ShapesCNN(width=setup.width, stages=setup.stages)
    x, y = to_tensor(data.images), torch.from_numpy(data.labels)
    opt = torch.optim.Adam(model.parameters(), lr=setup.lr)
    steps = setup.epochs * -(-len(y) // setup.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=setup.lr, total_steps=steps)
    model.train()
    for _ in range(setup.epochs):
        perm = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), setup.batch_size):
            idx = perm[start : start + setup.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def predict(model: torch.nn.Module, images: np.ndarray, batch: int = 256) -> np.ndarray:
    return np.concatenate(
        [model(to_tensor(images[i : i + batch])).argmax(1).numpy() for i in range(0, len(images), batch)]
    )


def mark_reliance(model: torch.nn.Module, data: PlantedData) -> dict[str, np.ndarray]:
    """Per image: the prediction, the prediction with the mark removed, and whether the model relies on it.

    ``relies`` is true for a marked image whose prediction changes when its mark is removed (the
    same image drawn without it); false for every unmarked image.
    """
    pred = predict(model, data.images)
    pred_unmarked = pred.copy()
    idx = np.flatnonzero(data.marked)
    if len(idx):
        pred_unmarked[idx] = predict(model, data.unmarked[idx])
    return {"pred": pred, "pred_unmarked": pred_unmarked, "relies": data.marked & (pred != pred_unmarked)}


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def score_flags(flagged: np.ndarray, marked: np.ndarray, relies: np.ndarray, classes: np.ndarray) -> dict:
    """Score flagged rows against the truth; all four arrays align row by row.

    Returns, against the marked images and against those the model relies on (``*_relied``):
    precision (flagged rows that are positives, over flagged rows; None when nothing is flagged),
    recall (None when there is no positive), and the false-flag share (flagged rows without a mark
    over all rows without a mark), overall and per class (rows of classes with no mark at all are the
    "unmarked classes").
    """
    flagged, marked, relies = (np.asarray(a, bool) for a in (flagged, marked, relies))
    classes = np.asarray(classes)
    nf = int(flagged.sum())

    def against(pos: np.ndarray) -> dict:
        tp = int((flagged & pos).sum())
        return {
            "positives": int(pos.sum()),
            "true_flags": tp,
            "precision": _ratio(tp, nf),
            "recall": _ratio(tp, int(pos.sum())),
        }

    marked_classes = set(np.unique(classes[marked]).tolist())
    per_class = {}
    for c in np.unique(classes).tolist():
        sel = classes == c
        clean = sel & ~marked
        per_class[int(c)] = {
            "rows": int(sel.sum()),
            "marked": int((sel & marked).sum()),
            "flagged": int((sel & flagged).sum()),
            "false_flag_share": _ratio(int((clean & flagged).sum()), int(clean.sum())),
        }
    unmarked_classes = ~np.isin(classes, list(marked_classes))
    return {
        "rows": len(flagged),
        "flagged": nf,
        "against_marked": against(marked),
        "against_relied": against(relies),
        "false_flag_share": _ratio(int((flagged & ~marked).sum()), int((~marked).sum())),
        "false_flag_share_unmarked_classes": _ratio(
            int((flagged & unmarked_classes).sum()), int(unmarked_classes.sum())
        ),
        "per_class": per_class,
    }


def best_cluster(keys: list, marked: np.ndarray) -> dict | None:
    """The cluster that best isolates the marked rows (largest F1), flagged or not, with its purity and recall.

    ``keys`` name each row's cluster (e.g. (class_index, cluster)); None when no row is marked. This
    scores the clustering alone (did SpRAy separate the marked images?), apart from the flag rule.
    """
    marked = np.asarray(marked, bool)
    total = int(marked.sum())
    if not total:
        return None
    groups: dict = {}
    for k, m in zip(keys, marked.tolist(), strict=True):
        g = groups.setdefault(k, [0, 0])
        g[0] += 1
        g[1] += m
    best = max(groups.items(), key=lambda kv: (2 * kv[1][1] / (kv[1][0] + total), -kv[1][0]))
    (key, (size, tp)) = best
    return {
        "cluster": list(key) if isinstance(key, tuple) else key,
        "size": size,
        "purity": tp / size,
        "recall": tp / total,
    }


__all__ = [
    "CASES",
    "CLASS_NAMES",
    "IMAGE_SIZE",
    "MARK_CLASS",
    "MARK_SIDE",
    "Case",
    "PlantedCNN",
    "PlantedData",
    "Setup",
    "best_cluster",
    "dataset_table",
    "eval_set",
    "image_ids",
    "make_planted",
    "mark_pattern",
    "mark_reliance",
    "predict",
    "score_flags",
    "train",
    "train_set",
]
