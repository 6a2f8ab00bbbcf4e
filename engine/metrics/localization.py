"""Localization: the pointing game, energy inside boxes, the Grad-CAM paper's box and its IoU.

Coordinates are continuous saliency-pixel coordinates: pixel (y, x) covers [x, x + 1) x [y, y + 1) and its
centre is (x + 0.5, y + 0.5); a box is (x0, y0, x1, y1). A pixel is inside a box when its centre is in
[x0, x1) x [y0, y1). The peak is the first-ranked pixel of the ranking rule (saliency descending, ties to the
lower flat index ``y * W + x``), see ``gradcam_batch.engine.metrics``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _stack_boxes(
    boxes: list[torch.Tensor | None],
    categories: list[torch.Tensor | None] | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad per-image boxes to (B, N, 4) float32, with (B, N) validity and (B, N) categories (-1 = none)."""
    b = len(boxes)
    n = max((0 if bx is None else len(bx) for bx in boxes), default=0)
    gt = torch.zeros(b, n, 4, dtype=torch.float32)
    valid = torch.zeros(b, n, dtype=torch.bool)
    cats = torch.full((b, n), -1, dtype=torch.long)
    for i, bx in enumerate(boxes):
        if bx is None or len(bx) == 0:
            continue
        bx = torch.as_tensor(bx, dtype=torch.float32).reshape(-1, 4)
        gt[i, : len(bx)] = bx.cpu()
        valid[i, : len(bx)] = True
        if categories is not None and categories[i] is not None:
            cat = torch.as_tensor(categories[i], dtype=torch.long).reshape(-1).cpu()
            if len(cat) != len(bx):
                raise ValueError(f"image {i}: {len(bx)} boxes but {len(cat)} categories")
            cats[i, : len(bx)] = cat
    return gt.to(device), valid.to(device), cats.to(device)


def _foreground(saliency: torch.Tensor, threshold: float) -> torch.Tensor:
    """(M, H, W) maps -> pixels at or above ``threshold`` x the map's max; nothing for an all-zero map."""
    peak = saliency.flatten(1).amax(dim=1).view(-1, 1, 1)
    return (saliency >= threshold * peak) & (peak > 0)


def _boxes_scipy(fg: torch.Tensor) -> torch.Tensor:
    from scipy import ndimage

    m = fg.shape[0]
    out = np.full((m, 4), -1, dtype=np.int32)
    # One call for the whole stack: 8-connectivity within a map, none across maps. Labels are numbered in
    # raster order, so among equal sizes the lowest label is the component whose first pixel comes first.
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    labels, n = ndimage.label(fg.cpu().numpy(), structure=structure)
    if n == 0:
        return torch.from_numpy(out)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    objects = ndimage.find_objects(labels)
    map_of = np.array([sl[0].start for sl in objects])
    order = np.lexsort((np.arange(n), -sizes, map_of))
    maps, first = np.unique(map_of[order], return_index=True)
    for map_index, label_index in zip(maps, order[first], strict=True):
        _, ys, xs = objects[label_index]
        out[map_index] = (xs.start, ys.start, xs.stop, ys.stop)
    return torch.from_numpy(out)


def _boxes_torch(fg: torch.Tensor, check_every: int = 8) -> torch.Tensor:
    """Label propagation on the maps' device: each pixel takes the smallest (flat index + 1) among its
    foreground 8-neighbours until nothing changes; a component ends labelled by its first pixel in raster
    order, the same tie rule as scipy's numbering."""
    m, h, w = fg.shape
    big = float(h * w + 1)
    labels = torch.arange(1, h * w + 1, device=fg.device, dtype=torch.float32).view(1, h, w).expand(m, h, w)
    labels = torch.where(fg, labels, big).unsqueeze(1)
    mask = fg.unsqueeze(1)
    while True:
        before = labels
        for _ in range(check_every):
            labels = torch.where(mask, -F.max_pool2d(-labels, 3, stride=1, padding=1), big)
        if torch.equal(labels, before):
            break
    labels = torch.where(mask, labels, 0.0).squeeze(1).long()  # 0 = background
    keys = (torch.arange(m, device=fg.device).view(m, 1, 1) * (h * w + 1) + labels).flatten()
    sizes = torch.bincount(keys, minlength=m * (h * w + 1)).view(m, h * w + 1)
    sizes[:, 0] = 0
    best = sizes.argmax(dim=1)  # the first maximum: the lowest label among equal sizes
    comp = (labels == best.view(m, 1, 1)) & (best.view(m, 1, 1) > 0)
    rows, cols = comp.any(dim=2), comp.any(dim=1)
    ar_h, ar_w = torch.arange(h, device=fg.device), torch.arange(w, device=fg.device)
    y0 = torch.where(rows, ar_h, h).amin(dim=1)
    y1 = torch.where(rows, ar_h + 1, 0).amax(dim=1)
    x0 = torch.where(cols, ar_w, w).amin(dim=1)
    x1 = torch.where(cols, ar_w + 1, 0).amax(dim=1)
    out = torch.stack([x0, y0, x1, y1], dim=1).int()
    return torch.where((best > 0).view(m, 1), out, -1)


def largest_component_boxes(saliency: torch.Tensor, threshold: float = 0.15, *, backend: str = "scipy") -> torch.Tensor:
    """The Grad-CAM paper's localization box (Selvaraju et al. 2017, arXiv:1610.02391, section 4.1).

    Threshold each (H, W) map at ``threshold`` x its max (``>=``; default 0.15, the paper's 15%), take the
    largest 8-connected component (ties: the one whose first pixel in raster order comes first) and return
    its bounding box (x0, y0, x1, y1), x1 and y1 exclusive, as (..., 4) int32 on the maps' device; all -1 for
    an all-zero map. ``backend``: ``"scipy"`` (``scipy.ndimage.label`` on the CPU, the default: faster on a
    CPU, see RESULTS.md) or ``"torch"`` (label propagation on the maps' device).
    """
    lead, (h, w) = saliency.shape[:-2], saliency.shape[-2:]
    fg = _foreground(saliency.reshape(-1, h, w).float(), threshold)
    if backend == "scipy":
        out = _boxes_scipy(fg)
    elif backend == "torch":
        out = _boxes_torch(fg)
    else:
        raise ValueError(f"backend must be 'scipy' or 'torch', got {backend!r}")
    return out.to(saliency.device).view(*lead, 4)


def box_metrics(
    saliency: torch.Tensor,
    boxes: list[torch.Tensor | None],
    *,
    tolerance: float = 15,
    threshold: float = 0.15,
    categories: list[torch.Tensor | None] | None = None,
    classes: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Localization of (B, C, H, W) maps against ground-truth boxes; a dict of (B, C[, 4]) tensors.

    ``boxes``: B entries, each (n_i, 4) x0, y0, x1, y1 in saliency pixels, or None. With ``categories`` (B
    entries of (n_i,) int64) and ``classes`` (B, C), a class's boxes are those of its category; otherwise
    every box of the image.

    - ``pointing_hit`` bool: the peak's centre is within ``tolerance`` pixels (Euclidean; 0 inside a box) of
      a box. Pointing game, Zhang et al. 2016 (arXiv:1608.00507); default 15 px, the protocol's tolerance.
      An all-zero map has no peak (the run writes its ``peak_y``/``peak_x`` as null): it is a miss.
    - ``box_energy`` float32: sum of the map over pixels inside the union of boxes / sum of the map.
      Energy-based pointing game, Score-CAM, Wang et al. 2020 (arXiv:1910.01279). NaN when the map sums to 0.
    - ``pred_box`` int32 (B, C, 4): ``largest_component_boxes(saliency, threshold)``; default 0.15 (Grad-CAM).
    - ``box_iou`` float32: best IoU of ``pred_box`` with a box (0 when ``pred_box`` is all -1). Grad-CAM's
      localization counts IoU >= 0.5 as correct.
    - ``has_boxes`` bool: the class had at least one box. Where False: ``pointing_hit`` False, ``box_energy``
      and ``box_iou`` NaN (``pred_box`` is still computed).
    """
    if saliency.dim() != 4:
        raise ValueError(f"saliency must be (B, C, H, W), got {tuple(saliency.shape)}")
    b, n_classes, h, w = saliency.shape
    if len(boxes) != b:
        raise ValueError(f"boxes must have one entry per image ({b}), got {len(boxes)}")
    if (categories is None) != (classes is None):
        raise ValueError("categories and classes go together")
    device = saliency.device
    sal = saliency.float()
    gt, valid, cats = _stack_boxes(boxes, categories, device)
    applicable = valid.unsqueeze(1).expand(b, n_classes, -1)  # (B, C, N)
    if classes is not None:
        if classes.shape != (b, n_classes):
            raise ValueError(f"classes must be (B, C) = {(b, n_classes)}, got {tuple(classes.shape)}")
        applicable = applicable & (cats.unsqueeze(1) == classes.to(device).unsqueeze(2))
    has_boxes = applicable.any(dim=2)
    x0, y0, x1, y1 = (gt[..., k].unsqueeze(1) for k in range(4))  # (B, 1, N)

    peak = sal.flatten(2).argmax(dim=2)  # the first maximum: ties to the lower flat index
    cx = (peak % w).float().unsqueeze(2) + 0.5
    cy = (peak // w).float().unsqueeze(2) + 0.5
    dx = torch.maximum(x0 - cx, cx - x1).clamp_min(0)
    dy = torch.maximum(y0 - cy, cy - y1).clamp_min(0)
    has_peak = sal.flatten(2).amax(dim=2) > 0
    pointing_hit = ((torch.hypot(dx, dy) <= tolerance) & applicable).any(dim=2) & has_peak

    centres_x = torch.arange(w, device=device, dtype=torch.float32) + 0.5
    centres_y = torch.arange(h, device=device, dtype=torch.float32) + 0.5
    in_x = (gt[..., 0:1] <= centres_x) & (centres_x < gt[..., 2:3])  # (B, N, W)
    in_y = (gt[..., 1:2] <= centres_y) & (centres_y < gt[..., 3:4])  # (B, N, H)
    cover = torch.einsum("bcn,bnh,bnw->bchw", applicable.float(), in_y.float(), in_x.float())
    total = sal.sum(dim=(2, 3))
    inside = (sal * (cover > 0)).sum(dim=(2, 3))
    nan = torch.tensor(float("nan"), device=device)
    box_energy = torch.where(has_boxes & (total > 0), inside / total, nan)

    pred_box = largest_component_boxes(sal, threshold)
    p = pred_box.float().unsqueeze(2)  # (B, C, 1, 4)
    px0, py0, px1, py1 = p.unbind(-1)
    inter_w = (torch.minimum(px1, x1) - torch.maximum(px0, x0)).clamp_min(0)
    inter_h = (torch.minimum(py1, y1) - torch.maximum(py0, y0)).clamp_min(0)
    inter = inter_w * inter_h
    union = (px1 - px0) * (py1 - py0) + (x1 - x0) * (y1 - y0) - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1e-12), 0.0)
    iou = torch.where(applicable, iou, -1.0).amax(dim=2) if iou.shape[2] else torch.zeros(b, n_classes, device=device)
    box_iou = torch.where(has_boxes, iou, nan)

    return {
        "pointing_hit": pointing_hit,
        "box_energy": box_energy.float(),
        "pred_box": pred_box,
        "box_iou": box_iou.float(),
        "has_boxes": has_boxes,
    }


def mask_metrics(
    saliency: torch.Tensor, true_masks: torch.Tensor, classes: torch.Tensor, *, threshold: float = 0.15
) -> dict[str, torch.Tensor]:
    """Localization of (B, C, H, W) maps against ground-truth segmentation masks; a dict of (B, C) tensors.

    ``true_masks``: (B, H, W) integer class indices at the saliency's resolution (any index that is not an
    explained class, an ignore index included, simply never matches). ``classes``: (B, C) the class of each map.

    - ``mask_energy`` float32: sum of the map over the pixels of its class in the true mask / sum of the map;
      the box energy of Score-CAM (Wang et al. 2020) with the mask in place of the boxes. NaN when the map
      sums to 0 or the true mask has no pixel of the class.
    - ``mask_iou`` float32: IoU of the pixels at or above ``threshold`` x the map's max (default 0.15, the
      Grad-CAM paper's box threshold, without its largest-component step: a mask need not be one piece) with
      the class's true pixels. An all-zero map has no such pixels: IoU 0. NaN when the true mask has no pixel
      of the class.
    - ``in_true_mask`` bool: the true mask has at least one pixel of the class.
    """
    if saliency.dim() != 4:
        raise ValueError(f"saliency must be (B, C, H, W), got {tuple(saliency.shape)}")
    b, c, h, w = saliency.shape
    if true_masks.shape != (b, h, w):
        raise ValueError(f"true_masks must be (B, H, W) = {(b, h, w)}, got {tuple(true_masks.shape)}")
    if classes.shape != (b, c):
        raise ValueError(f"classes must be (B, C) = {(b, c)}, got {tuple(classes.shape)}")
    sal = saliency.float()
    truth = true_masks.to(sal.device).long().unsqueeze(1) == classes.to(sal.device).long()[:, :, None, None]
    present = truth.flatten(2).any(dim=2)
    total = sal.sum(dim=(2, 3))
    inside = (sal * truth).sum(dim=(2, 3))
    nan = torch.tensor(float("nan"), device=sal.device)
    energy = torch.where(present & (total > 0), inside / total.clamp_min(1e-30), nan)
    fg = _foreground(sal.flatten(0, 1), threshold).view(b, c, h, w)
    inter = (fg & truth).flatten(2).sum(dim=2).float()
    union = (fg | truth).flatten(2).sum(dim=2).float()
    iou = torch.where(present, inter / union.clamp_min(1), nan)
    return {"mask_energy": energy.float(), "mask_iou": iou.float(), "in_true_mask": present}
