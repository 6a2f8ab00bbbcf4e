"""Float64 references of the metrics in ``gradcam_batch.engine.metrics``, written for clarity, not speed.

One image, one class, one step at a time, in numpy float64 with the model cast to float64. Numbered
semantics:

1. Ranking: flat pixels ``p = y * W + x`` sorted by (-saliency[p], p).
2. Step counts: point i of steps + 1 perturbs min(HW, i * ceil(HW / steps)) top-ranked pixels.
3. Deletion: those pixels set to 0 in every channel. Insertion: those pixels from the image, the rest from the
   blurred image (RISE's kernel: scipy's gaussian_filter of a centred delta; zero padding).
4. Curve: softmax probability of the class. AUC: the trapezoid over fractions i / steps.
5. Confidence: Y on the image, O on image * map; drop = max(0, Y - O) / Y, increase = O > Y.
6. Boxes: a pixel is inside a box when its centre (x + .5, y + .5) is in [x0, x1) x [y0, y1). Pointing: the
   peak (rank 0) centre's Euclidean distance to the nearest box <= tolerance (an all-zero map misses).
   Energy: mass inside the union / total mass. Predicted box: pixels >= threshold * max, largest
   8-connected component (flood fill; ties to the component met first in raster order), its bounding box
   with exclusive x1, y1. IoU: best over boxes.
"""

from __future__ import annotations

import copy
import math
from collections import deque

import numpy as np
import torch
from scipy import ndimage


def ranking(saliency_map: np.ndarray) -> list[int]:
    flat = saliency_map.reshape(-1)
    return sorted(range(flat.size), key=lambda p: (-float(flat[p]), p))


def rise_kernel(size: int, sigma: float) -> np.ndarray:
    """RISE's ``gkern``: a centred delta through scipy's Gaussian filter."""
    delta = np.zeros((size, size))
    delta[size // 2, size // 2] = 1.0
    return ndimage.gaussian_filter(delta, sigma)


def blur(image: np.ndarray, size: int, sigma: float) -> np.ndarray:
    kernel = rise_kernel(size, sigma)
    return np.stack([ndimage.correlate(ch, kernel, mode="constant", cval=0.0) for ch in image])


def probability(model64, image: np.ndarray, cls: int) -> float:
    with torch.no_grad():
        logits = model64(torch.from_numpy(image[None]))
    logits = getattr(logits, "logits", logits)
    return float(torch.softmax(logits[0], dim=0)[cls])


def curves(model, images, saliency, classes, steps=20, blur_args=(11, 5.0)):
    """Deletion and insertion curves, (B, C, steps + 1) float64."""
    model64 = copy.deepcopy(model).double()
    images = images.detach().double().cpu().numpy()
    saliency = saliency.detach().double().cpu().numpy()
    classes = classes.cpu().numpy()
    b, n_classes, h, w = saliency.shape
    hw = h * w
    step = math.ceil(hw / steps)
    deletion = np.zeros((b, n_classes, steps + 1))
    insertion = np.zeros((b, n_classes, steps + 1))
    for i in range(b):
        image = images[i]
        substrate = blur(image, *blur_args) if blur_args is not None else np.zeros_like(image)
        for c in range(n_classes):
            order = ranking(saliency[i, c])
            for k in range(steps + 1):
                top = order[: min(hw, k * step)]
                deleted = image.reshape(3, hw).copy()
                deleted[:, top] = 0.0
                inserted = substrate.reshape(3, hw).copy()
                inserted[:, top] = image.reshape(3, hw)[:, top]
                deletion[i, c, k] = probability(model64, deleted.reshape(3, h, w), int(classes[i, c]))
                insertion[i, c, k] = probability(model64, inserted.reshape(3, h, w), int(classes[i, c]))
    return deletion, insertion


def auc(curve: np.ndarray) -> np.ndarray:
    steps = curve.shape[-1] - 1
    return np.trapezoid(curve, dx=1.0 / steps, axis=-1)


def confidence(model, images, saliency, classes):
    model64 = copy.deepcopy(model).double()
    images = images.detach().double().cpu().numpy()
    saliency = saliency.detach().double().cpu().numpy()
    b, n_classes = classes.shape
    drop = np.zeros((b, n_classes))
    increase = np.zeros((b, n_classes), dtype=bool)
    for i in range(b):
        for c in range(n_classes):
            cls = int(classes[i, c])
            y = probability(model64, images[i], cls)
            o = probability(model64, images[i] * saliency[i, c][None], cls)
            drop[i, c] = max(0.0, y - o) / y
            increase[i, c] = o > y
    return drop, increase


def inside(box, x: int, y: int) -> bool:
    x0, y0, x1, y1 = box
    return x0 <= x + 0.5 < x1 and y0 <= y + 0.5 < y1


def distance(box, px: float, py: float) -> float:
    x0, y0, x1, y1 = box
    dx = max(x0 - px, 0.0, px - x1)
    dy = max(y0 - py, 0.0, py - y1)
    return math.hypot(dx, dy)


def largest_component_box(saliency_map: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    h, w = saliency_map.shape
    peak = saliency_map.max()
    if peak <= 0:
        return (-1, -1, -1, -1)
    fg = saliency_map >= threshold * peak
    seen = np.zeros_like(fg)
    best: list[tuple[int, int]] = []
    for y in range(h):
        for x in range(w):
            if not fg[y, x] or seen[y, x]:
                continue
            component, queue = [], deque([(y, x)])
            seen[y, x] = True
            while queue:
                cy, cx = queue.popleft()
                component.append((cy, cx))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < h and 0 <= nx < w and fg[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            queue.append((ny, nx))
            if len(component) > len(best):  # strictly larger: ties keep the one met first
                best = component
    ys = [p[0] for p in best]
    xs = [p[1] for p in best]
    return (min(xs), min(ys), max(xs) + 1, max(ys) + 1)


def iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def boxes(saliency, gt_boxes, tolerance=15, threshold=0.15, categories=None, classes=None):
    """The box metrics, one map at a time: a dict of numpy arrays keyed as ``box_metrics``'s."""
    saliency = saliency.detach().double().cpu().numpy()
    b, n_classes, h, w = saliency.shape
    out = {
        "pointing_hit": np.zeros((b, n_classes), dtype=bool),
        "box_energy": np.full((b, n_classes), np.nan),
        "pred_box": np.zeros((b, n_classes, 4), dtype=np.int64),
        "box_iou": np.full((b, n_classes), np.nan),
        "has_boxes": np.zeros((b, n_classes), dtype=bool),
    }
    for i in range(b):
        for c in range(n_classes):
            m = saliency[i, c]
            pred = largest_component_box(m, threshold)
            out["pred_box"][i, c] = pred
            mine = [] if gt_boxes[i] is None else [list(map(float, bx)) for bx in gt_boxes[i]]
            if categories is not None and mine:
                mine = [bx for bx, cat in zip(mine, categories[i], strict=True) if int(cat) == int(classes[i, c])]
            if not mine:
                continue
            out["has_boxes"][i, c] = True
            peak = ranking(m)[0]
            px, py = peak % w + 0.5, peak // w + 0.5
            # An all-zero map has no peak: a miss.
            out["pointing_hit"][i, c] = m.max() > 0 and min(distance(bx, px, py) for bx in mine) <= tolerance
            total = m.sum()
            if total > 0:
                mass = sum(m[y, x] for y in range(h) for x in range(w) if any(inside(bx, x, y) for bx in mine))
                out["box_energy"][i, c] = mass / total
            out["box_iou"][i, c] = max(iou(pred, bx) for bx in mine)
    return out
