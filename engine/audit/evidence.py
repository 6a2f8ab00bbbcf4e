"""Evidence that part of a class looks at a shortcut: where its maps look, and what they see there.

Plain functions over one class's arrays; ``pipeline.py`` feeds them and ``findings.py`` turns their
results into findings. Per image:

- **attention point**: the centroid of the map's mass above half its maximum, in a window of
  ``cells`` cam cells around the peak (the peak alone wanders over a plateau of Grad-CAM's coarse
  cells; the centroid of the plateau does not);
- **position score**: how many of the class's attention points fall within ``radius`` of this one,
  against how many the surrounding square of ``surround`` would put there if its points were spread
  evenly. 0: spread like their surroundings; 1: every neighbour at the same spot;
- **pattern score**: the attended crop's similarity to the crops its class-mates attend to
  (zero-mean normalized correlation with a one-pixel shift tolerance; the mean of the ``top``
  highest over ``references`` class-mates), minus the same statistic for crops taken elsewhere in
  the class's mean-map support in the same images. "All discs look alike" cancels out; a mark the
  maps find on part of the class does not. A crop whose spread is under ``flat_std`` grey levels is
  not scored.

Coordinates are (y, x) in the map's pixels, continuous: pixel (i, j) covers [i, i+1) x [j, j+1).
The README's "Auditing a model" explains the rules and their thresholds.

One module past 500 lines: the measurements and the separation tests that judge them share
``FlagParams``, the grid and the coordinate rules above; split, each half would restate them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class FlagParams:
    """The parameters of the evidence and flag rules (``summary.json``'s ``flag_rules``)."""

    radius: float = 1 / 16  # a spot: attention points within this share of the side of each other (square)
    surround: float = 1 / 4  # ... compared with the square of this half-side around it
    min_share: float = 0.05  # evidence only for a proper subset of a class: at least this share of it
    max_share: float = 0.8  # ... and at most this share (a whole class that looks alike is its object)
    max_rest_near: float = 0.5  # a spot: at most this share of the rest of the class attends near it
    cells: float = 1.5  # attention point: the window around the peak, in cam cells each side
    window: float = 3.0  # pattern: the attended window's side in cam cells (clipped to [1/8, 1/4] of the side)
    crop: int = 12  # pattern: crops are compared at crop x crop pixels (the window's scale)
    references: int = 64  # pattern: class-mates each crop is compared with
    top: int = 3  # pattern: the mean of this many highest similarities
    flat_std: float = 3.0  # pattern: a crop with less spread (grey levels) is flat: not scored
    permutations: int = 500
    alpha: float = 0.01  # a subset must separate from the rest at this permutation p-value
    threshold: float = 0.35  # a finding's strength at which it is flagged (calibrated: README, "Auditing a model")
    min_rows: int = 3  # a subset smaller than this is never flagged
    match: float = 0.5  # a position and a pattern subset are one finding at this Jaccard overlap
    box_ratio: float = 0.5  # boxes: a cluster's mean box energy below this times the class's other clusters'
    box_margin: float = 0.15  # ... and at least this much lower
    whole_pointing: float = 0.5  # boxes: a class alike as a whole is flagged when fewer of its peaks hit its boxes
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


# -- where the maps look ---------------------------------------------------------------------------


def attention_points(maps: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 2) attention points of (n, h, w) maps, and which maps have one (an all-zero map has none).

    The centroid of ``max(map - max/2, 0)`` over the (2 half + 1)^2 window around the argmax.
    """
    n, h, w = maps.shape
    if n == 0:
        return np.zeros((0, 2)), np.zeros(0, bool)
    flat = maps.reshape(n, -1)
    arg = flat.argmax(1)
    top = flat[np.arange(n), arg].astype(np.float64)
    ay, ax = np.divmod(arg, w)
    off = np.arange(-half, half + 1)
    ys = np.clip(ay[:, None] + off[None], 0, h - 1)  # (n, k)
    xs = np.clip(ax[:, None] + off[None], 0, w - 1)
    inside_y = (ay[:, None] + off[None] >= 0) & (ay[:, None] + off[None] < h)
    inside_x = (ax[:, None] + off[None] >= 0) & (ax[:, None] + off[None] < w)
    win = maps[np.arange(n)[:, None, None], ys[:, :, None], xs[:, None, :]].astype(np.float64)
    wgt = np.maximum(win - top[:, None, None] / 2, 0) * (inside_y[:, :, None] & inside_x[:, None, :])
    total = wgt.sum((1, 2))
    ok = top > 0
    safe = np.where(total > 0, total, 1.0)
    cy = (wgt.sum(2) * (ys + 0.5)).sum(1) / safe
    cx = (wgt.sum(1) * (xs + 0.5)).sum(1) / safe
    pts = np.stack([np.where(total > 0, cy, ay + 0.5), np.where(total > 0, cx, ax + 0.5)], 1)
    return pts, ok


def _grid_counts(points: np.ndarray, size: tuple[int, int], bins: int) -> tuple[np.ndarray, np.ndarray]:
    """A (bins, bins) histogram of the points and each point's bin (row, col)."""
    h, w = size
    by = np.clip((points[:, 0] / h * bins).astype(np.int64), 0, bins - 1)
    bx = np.clip((points[:, 1] / w * bins).astype(np.int64), 0, bins - 1)
    hist = np.bincount(by * bins + bx, minlength=bins * bins).reshape(bins, bins)
    return hist, np.stack([by, bx], 1)


def _densest(points: np.ndarray, size: tuple[int, int], half: int) -> np.ndarray:
    """(b,) the largest count in any (2 half + 1)^2 square of each of b point sets (b, n, 2)."""
    b, n = points.shape[:2]
    h, w = size
    by = np.clip((points[..., 0] / h * BINS).astype(np.int64), 0, BINS - 1)
    bx = np.clip((points[..., 1] / w * BINS).astype(np.int64), 0, BINS - 1)
    flat = (np.arange(b)[:, None] * BINS + by) * BINS + bx
    hist = np.bincount(flat.ravel(), minlength=b * BINS * BINS).reshape(b, BINS, BINS)
    c = np.zeros((b, BINS + 1, BINS + 1), np.int64)
    c[:, 1:, 1:] = hist.cumsum(1).cumsum(2)
    lo = np.clip(np.arange(BINS) - half, 0, BINS)
    hi = np.clip(np.arange(BINS) + half + 1, 0, BINS)
    sums = c[:, hi][:, :, hi] - c[:, lo][:, :, hi] - c[:, hi][:, :, lo] + c[:, lo][:, :, lo]
    return sums.reshape(b, -1).max(1)


def _box_sum(hist: np.ndarray, half: int) -> np.ndarray:
    """Per bin, the sum of ``hist`` over the (2 half + 1)^2 square around it (clipped at the edges)."""
    b = hist.shape[0]
    c = np.zeros((b + 1, b + 1), np.int64)
    c[1:, 1:] = hist.cumsum(0).cumsum(1)
    lo = np.clip(np.arange(b) - half, 0, b)
    hi = np.clip(np.arange(b) + half + 1, 0, b)
    return c[hi][:, hi] - c[lo][:, hi] - c[hi][:, lo] + c[lo][:, lo]


BINS = 64  # the grid on which attention points are counted


def _halves(params: FlagParams) -> tuple[int, int]:
    r = max(1, round(params.radius * BINS))
    big = max(r + 1, round(params.surround * BINS))
    return r, big


def position_scores(points: np.ndarray, size: tuple[int, int], params: FlagParams) -> np.ndarray:
    """Per point, in [0, 1]: the excess of class-mates at its spot over what its surroundings predict.

    With n_r the other points within ``radius`` and n_R those within ``surround`` (squares), and
    a = (2r + 1)^2 / (2R + 1)^2 the area ratio: (n_r / n_R - a) / (1 - a), clipped to [0, 1]; 0 when
    fewer than three points are around.
    """
    if len(points) == 0:
        return np.zeros(0)
    r, big = _halves(params)
    hist, at = _grid_counts(points, size, BINS)
    near = _box_sum(hist, r)[at[:, 0], at[:, 1]] - 1
    around = _box_sum(hist, big)[at[:, 0], at[:, 1]] - 1
    a = (2 * r + 1) ** 2 / (2 * big + 1) ** 2
    score = (near / np.maximum(around, 1) - a) / (1 - a)
    return np.where(around >= 3, np.clip(score, 0, 1), 0.0)


@dataclass
class Spot:
    """The densest spot of a class's attention points, and how it stands against the rest."""

    centre: tuple[float, float]  # (y, x) in map pixels: the members' mean
    members: np.ndarray  # bool (n,): points within ``radius`` of the spot
    share: float  # members / points
    rest_near: float  # share of the other points within ``surround`` of the spot
    spread: float  # RMS distance of the members to their centre, in map pixels
    rest_spread: float  # RMS distance of the other points to their own centre
    count: int  # points in the spot's square


def find_spot(points: np.ndarray, size: tuple[int, int], params: FlagParams) -> Spot | None:
    """The densest ``radius`` square of the points, or None with fewer than ``min_rows`` points."""
    n = len(points)
    if n < params.min_rows:
        return None
    h, w = size
    r, big = _halves(params)
    hist, _ = _grid_counts(points, size, BINS)
    dense = _box_sum(hist, r)
    by, bx = np.unravel_index(int(dense.argmax()), dense.shape)
    count = int(dense[by, bx])
    cy, cx = (by + 0.5) * h / BINS, (bx + 0.5) * w / BINS
    ry, rx = (r + 0.5) * h / BINS, (r + 0.5) * w / BINS
    members = (np.abs(points[:, 0] - cy) <= ry) & (np.abs(points[:, 1] - cx) <= rx)
    centre = points[members].mean(0) if members.any() else np.array([cy, cx])
    rest = points[~members]
    Ry, Rx = (big + 0.5) * h / BINS, (big + 0.5) * w / BINS
    rest_near = float(((np.abs(rest[:, 0] - cy) <= Ry) & (np.abs(rest[:, 1] - cx) <= Rx)).mean()) if len(rest) else 1.0
    spread = float(np.sqrt(((points[members] - centre) ** 2).sum(1).mean())) if members.any() else 0.0
    rest_spread = float(np.sqrt(((rest - rest.mean(0)) ** 2).sum(1).mean())) if len(rest) else 0.0
    return Spot(
        centre=(float(centre[0]), float(centre[1])),
        members=members,
        share=float(members.mean()),
        rest_near=rest_near,
        spread=spread,
        rest_spread=rest_spread,
        count=count,
    )


def spot_p_value(points: np.ndarray, size: tuple[int, int], spot: Spot, params: FlagParams,
                 rng: np.random.Generator) -> float:  # fmt: skip
    """Randomization test of a spot's count: each point moved uniformly within its ``surround`` square,
    ``permutations`` times; the share of draws whose densest square holds as many points (+1 smoothing).

    Stops early once the p-value cannot fall to ``alpha`` any more: a spot of chance costs a few draws.
    """
    n = len(points)
    h, w = size
    r, big = _halves(params)
    reach = np.array([(big + 0.5) * h / BINS, (big + 0.5) * w / BINS])
    exceed, done, batch = 0, 0, 16
    limit = params.alpha * (1 + params.permutations) - 1  # more exceedances than this: not significant
    while done < params.permutations and exceed <= limit:
        b = min(batch, params.permutations - done, max(1, (1 << 21) // max(n, 1)))
        moved = np.clip(points[None] + rng.uniform(-1, 1, size=(b, n, 2)) * reach, 0, np.array([h, w]) - 1e-6)
        exceed += int((_densest(moved, size, r) >= spot.count).sum())
        done += b
        batch *= 4
    if done < params.permutations:  # stopped early: as if every remaining draw had exceeded too
        exceed += params.permutations - done
    return (1 + exceed) / (1 + params.permutations)


# -- what the maps see -----------------------------------------------------------------------------


def window_side(image_side: int, cam_side: int | None, params: FlagParams) -> int:
    """The attended window's side in image pixels: ``window`` cam cells, within [1/8, 1/4] of the side."""
    cell = image_side / cam_side if cam_side else image_side / 8
    return int(round(np.clip(params.window * cell, image_side / 8, image_side / 4)))


def support_points(mean_map: np.ndarray, points: np.ndarray, keep_out: float, rng: np.random.Generator) -> np.ndarray:
    """Per attention point, a point elsewhere in the class's mean-map support, at least ``keep_out`` away.

    The support: the map's pixels holding the top 80% of its mass. Each point draws uniformly among
    the support's pixels farther than ``keep_out`` (Chebyshev, map pixels) from it; where none is
    that far, among all of the map's pixels that are.
    """
    h, w = mean_map.shape
    flat = np.asarray(mean_map, np.float64).ravel()
    order = np.argsort(-flat, kind="stable")
    csum = np.cumsum(flat[order])
    total = csum[-1] if len(csum) and csum[-1] > 0 else 0.0
    k = int(np.searchsorted(csum, 0.8 * total) + 1) if total > 0 else len(flat)
    support = np.zeros(h * w, bool)
    support[order[:k]] = True
    yy, xx = np.divmod(np.arange(h * w), w)
    centres = np.stack([yy + 0.5, xx + 0.5], 1)
    pool = np.flatnonzero(support)
    # Sixteen draws from the support per point, vectorized; the first far enough is kept.
    draws = pool[rng.integers(0, len(pool), size=(len(points), 16))]
    far = np.abs(centres[draws] - points[:, None, :]).max(2) > keep_out
    out = centres[draws[np.arange(len(points)), far.argmax(1)]].astype(np.float64)
    for i in np.flatnonzero(~far.any(1)):  # rare: the support hugs the point; draw among all far pixels
        p = points[i]
        far_all = np.abs(centres - p).max(1) > keep_out
        cand = np.flatnonzero(support & far_all)
        if not len(cand):
            cand = np.flatnonzero(far_all)
        if not len(cand):
            cand = np.arange(h * w)
        out[i] = centres[rng.choice(cand)]
    return out


def box_point(box: np.ndarray, point: tuple[float, float], keep_out: float) -> tuple[float, float]:
    """A point elsewhere on the object: inside ``box`` (x0, y0, x1, y1), away from ``point`` (y, x).

    The candidates are the box's centre, then the points at a quarter and three quarters of its
    sides, the farthest from ``point`` first; the first at least ``keep_out`` away (Chebyshev), else
    the farthest. Deterministic, and inside the object rather than at its box's corners.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    fy, fx = np.meshgrid([0.25, 0.5, 0.75], [0.25, 0.5, 0.75], indexing="ij")
    cand = np.stack([y0 + fy.ravel() * (y1 - y0), x0 + fx.ravel() * (x1 - x0)], 1)
    dist = np.abs(cand - np.asarray(point, np.float64)).max(1)
    order = [4, *[int(i) for i in np.argsort(-dist, kind="stable") if i != 4]]
    for i in order:
        if dist[i] >= keep_out:
            return float(cand[i, 0]), float(cand[i, 1])
    i = int(np.argmax(dist))
    return float(cand[i, 0]), float(cand[i, 1])


def _resampled(patch: np.ndarray, out: int) -> np.ndarray:
    """(side, side, 3) -> (out, out, 3) float32: area averaging when shrinking, bilinear when growing."""
    from gradcam_batch.engine.audit.reader import resample_matrix

    side = patch.shape[0]
    if side == out:
        return patch.astype(np.float32)
    m = resample_matrix(side, out).astype(np.float32)
    # m @ patch @ m.T per channel, as two matrix products (a plain three-operand einsum loops in Python's
    # order of its indices, and was three quarters of an audit that reads 50,000 images).
    rows = (m @ patch.astype(np.float32).reshape(side, -1)).reshape(out, side, -1)  # (out, side, 3)
    return np.matmul(rows.transpose(0, 2, 1), m.T).transpose(0, 2, 1)  # (out, out, 3)


PATCH = 1.5  # the square searched for the crop, in attended windows (2 lost more to nearby object edges)


def patch_side(crop: int) -> int:
    """The side of the square searched for a crop, at the crop's scale."""
    return max(crop + 2, int(round(PATCH * crop)))


def patch_at(image: np.ndarray, centre: tuple[float, float], window: int, crop: int) -> np.ndarray:
    """The (s, s, 3) uint8 square of ``PATCH`` windows around ``centre`` (image pixels), at the crop's scale.

    Edge pixels repeat past the border; ``crop`` pixels stand for ``window`` (no resampling when equal).
    """
    h, w = image.shape[:2]
    side = max(3, int(round(PATCH * window)))
    y0, x0 = int(round(centre[0] - side / 2)), int(round(centre[1] - side / 2))
    ys = np.clip(np.arange(y0, y0 + side), 0, h - 1)
    xs = np.clip(np.arange(x0, x0 + side), 0, w - 1)
    patch = _resampled(image[ys][:, xs], patch_side(crop))
    return np.clip(np.round(patch), 0, 255).astype(np.uint8)


def crops_from_patches(patches: np.ndarray, crop: int) -> np.ndarray:
    """(n, crop + 2, crop + 2, 3) uint8: in each patch, the crop that a pattern score compares.

    The part of the patch that holds the most detail (the largest sum of squared high-pass values;
    ties to the centre), re-centred on the centroid of that detail, so that one mark seen at
    different offsets from a coarse map's attention point lines up. One pixel of margin on each side
    serves the shift tolerance. Vectorized over the patches.
    """
    n, big = patches.shape[:2]
    k = crop + 2
    if n == 0:
        return np.zeros((0, k, k, 3), np.uint8)
    energy = (high_pass(patches) ** 2).sum(3)  # (n, big, big)
    c = np.zeros((n, big + 1, big + 1))
    c[:, 1:, 1:] = energy.cumsum(1).cumsum(2)
    sums = c[:, k:, k:] - c[:, :-k, k:] - c[:, k:, :-k] + c[:, :-k, :-k]  # every k x k window's detail
    m = sums.shape[1]
    off = np.abs(np.arange(m) - (m - 1) / 2)
    best = (sums - 1e-9 * (off[:, None] + off[None, :])).reshape(n, -1).argmax(1)
    a, b = np.divmod(best, m)
    idx = np.arange(k)
    rows = np.arange(n)[:, None, None]
    e = energy[rows, (a[:, None] + idx)[:, :, None], (b[:, None] + idx)[:, None, :]]  # (n, k, k)
    total = e.sum((1, 2))
    g = idx + 0.5
    safe = np.where(total > 0, total, 1.0)
    cy = np.where(total > 0, (e.sum(2) * g).sum(1) / safe, k / 2)
    cx = np.where(total > 0, (e.sum(1) * g).sum(1) / safe, k / 2)
    a = np.clip(np.round(a + cy - k / 2).astype(int), 0, big - k)
    b = np.clip(np.round(b + cx - k / 2).astype(int), 0, big - k)
    return patches[rows, (a[:, None] + idx)[:, :, None], (b[:, None] + idx)[:, None, :]]


def crop_at(image: np.ndarray, centre: tuple[float, float], window: int, crop: int) -> np.ndarray:
    """The (crop + 2, crop + 2, 3) uint8 crop around ``centre``: ``crops_from_patches`` of ``patch_at``."""
    return crops_from_patches(patch_at(image, centre, window, crop)[None], crop)[0]


def high_pass(crops: np.ndarray) -> np.ndarray:
    """(n, s, s, 3) float32: each crop minus its 3x3 box blur (edges repeated), per channel."""
    x = crops.astype(np.float32)
    p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    s = x.shape[1]
    blur = sum(p[:, dy : dy + s, dx : dx + s] for dy in range(3) for dx in range(3)) / 9.0
    return x - blur


def _normalized(vectors: np.ndarray) -> np.ndarray:
    """Rows zero-mean and unit-norm (float32; a constant row stays zero)."""
    x = vectors.astype(np.float32)
    x = x - x.mean(-1, keepdims=True)
    norm = np.sqrt((x**2).sum(-1, keepdims=True))
    return x / np.where(norm > 0, norm, 1.0)


def _shifted(crops: np.ndarray) -> np.ndarray:
    """(n, 9, crop * crop * 3): each (crop + 2)^2 crop's nine crop x crop windows (shifts of -1, 0, 1)."""
    n, s = crops.shape[0], crops.shape[1] - 2
    views = [crops[:, dy : dy + s, dx : dx + s].reshape(n, -1) for dy in range(3) for dx in range(3)]
    return np.stack(views, 1)


Z_CLIP = 0.995  # correlations are clipped here before Fisher's z (z <= 3.0)


def similarity_top(crops: np.ndarray, refs: np.ndarray, top: int, flat_std: float) -> tuple[np.ndarray, np.ndarray]:
    """Per crop: the mean of its ``top`` highest similarities to the crops at indices ``refs``, and validity.

    Similarity: zero-mean normalized correlation of the crop's centre window (high-passed: minus
    its 3x3 blur, so that shared edges and shading count less than shared detail) with each
    reference's nine shifted windows, the best shift kept, on Fisher's z scale (arctanh). A crop
    is never compared with itself, nor with a flat reference (pixel standard deviation under
    ``flat_std`` grey levels). ``crops``: (n, crop + 2, crop + 2, 3) uint8. NaN where the crop is flat.
    """
    n = len(crops)
    if n == 0:
        return np.zeros(0), np.zeros(0, bool)
    raw = crops[:, 1:-1, 1:-1].reshape(n, -1).astype(np.float32)
    ok = raw.std(1) >= flat_std
    hp = high_pass(crops)
    centre = _normalized(_shifted(hp)[:, 4])
    shifted = _normalized(_shifted(hp[refs]))
    ref_ok = ok[refs]
    m = len(refs)
    out = np.full(n, np.nan)
    step = max(1, (32 << 20) // max(1, 9 * m * 4))
    for a in range(0, n, step):
        sim = (centre[a : a + step] @ shifted.reshape(m * 9, -1).T).reshape(-1, m, 9).max(2)
        sim[:, ~ref_ok] = -np.inf
        sim[np.arange(a, min(n, a + step))[:, None] == refs[None, :]] = -np.inf
        k = min(top, m)
        best = -np.sort(-sim, axis=1)[:, :k]
        # Fisher's z: correlations near 1 ("nearly the same") spread out, and differences of z compare
        # fairly at any level (0.99 against 0.8 is a larger step than 0.6 against 0.4).
        best = np.where(np.isfinite(best), np.arctanh(np.clip(best, -Z_CLIP, Z_CLIP)), np.nan)
        with np.errstate(invalid="ignore"):
            out[a : a + step] = np.nanmean(best, axis=1) if k else np.nan
    out[~ok] = np.nan
    return out, ok & np.isfinite(out)


# -- a subset that separates from the rest of its class ----------------------------------------------


def two_groups(scores: np.ndarray, min_share: float, max_share: float) -> float | None:
    """Otsu's threshold on 1-D scores: the cut maximizing the between-group variance, with the upper
    group holding between ``min_share`` and ``max_share`` of the scores; None when no cut qualifies."""
    x = np.sort(np.asarray(scores, np.float64))
    n = len(x)
    if n < 4:
        return None
    # Cut after position i (lower group x[:i]); the upper group has n - i scores.
    i = np.arange(1, n)
    upper = n - i
    allowed = (upper >= max(1, int(np.ceil(min_share * n)))) & (upper <= int(np.floor(max_share * n)))
    allowed &= x[i] > x[i - 1]  # a cut between equal scores would split ties
    if not allowed.any():
        return None
    c = np.cumsum(x)
    mean_lo = c[i - 1] / i
    mean_hi = (c[-1] - c[i - 1]) / upper
    between = i * upper * (mean_hi - mean_lo) ** 2
    between[~allowed] = -1
    k = int(np.argmax(between))
    return float((x[k] + x[k + 1]) / 2)


def permutation_p(inside: np.ndarray, outside: np.ndarray, permutations: int, rng: np.random.Generator) -> float:
    """One-sided permutation test: is the mean of ``inside`` above that of ``outside``?"""
    a = np.asarray(inside, np.float64)
    b = np.asarray(outside, np.float64)
    if not len(a) or not len(b):
        return 1.0
    pooled = np.concatenate([a, b])
    observed = a.mean() - b.mean()
    k = len(a)
    keys = rng.random((permutations, len(pooled)))
    picks = np.argsort(keys, axis=1)[:, :k]
    sums = pooled[picks].sum(1)
    diffs = sums / k - (pooled.sum() - sums) / (len(pooled) - k)
    return float((1 + (diffs >= observed - 1e-12).sum()) / (1 + permutations))


@dataclass
class Subset:
    """One kind of evidence for a proper subset of a class: its members, figures and strength."""

    kind: str  # "position" or "pattern"
    members: np.ndarray  # bool (n,) over the class's audited rows
    strength: float  # in [0, 1]
    p_value: float
    share: float  # members / rows the kind could score
    figures: dict  # the numbers behind the strength, for summary.json and the sentence


def position_subset(points: np.ndarray, ok: np.ndarray, size: tuple[int, int], params: FlagParams,
                    rng: np.random.Generator) -> tuple[Subset | None, Spot | None]:  # fmt: skip
    """The images whose attention sits at one spot, when the rest of the class looks elsewhere; and the spot.

    Strength: sqrt(tightness x excess). Tightness: 1 - the members' RMS distance to their centre over
    that of points spread evenly in the spot's square (1: one point; 0: no tighter than even).
    Excess: the spot's count over what the surrounding square predicts, scaled to [0, 1] (0: as
    predicted; 1: no neighbour outside the spot). None unless the spot holds ``min_share`` to
    ``max_share`` of the class, at most ``max_rest_near`` of the rest attends within ``surround`` of it,
    and the randomization p-value (``spot_p_value``) is at most ``alpha``.
    """
    idx = np.flatnonzero(ok)
    spot = find_spot(points[idx], size, params)
    if spot is None:
        return None, None
    proper = params.min_share <= spot.share <= params.max_share and spot.count >= params.min_rows
    if not proper or spot.rest_near > params.max_rest_near:
        return None, spot
    p_value = spot_p_value(points[idx], size, spot, params, rng)
    if p_value > params.alpha:
        return None, spot
    members = np.zeros(len(points), bool)
    members[idx[spot.members]] = True
    r, big = _halves(params)
    a = (2 * r + 1) ** 2 / (2 * big + 1) ** 2
    around = spot.count + spot.rest_near * (len(idx) - spot.count)
    excess = float(np.clip((spot.count / max(around * a, 1e-12) - 1) / (1 / a - 1), 0, 1))
    even = (r + 0.5) * np.sqrt(2 / 3) * np.hypot(size[0], size[1]) / np.sqrt(2) / BINS
    tight = float(np.clip(1 - spot.spread / even, 0, 1))
    figures = {
        "centre": [round(spot.centre[0], 2), round(spot.centre[1], 2)],
        "spread": round(spot.spread, 3),
        "rest_spread": round(spot.rest_spread, 3),
        "rest_near": round(spot.rest_near, 4),
        "tightness": round(tight, 4),
        "excess": round(excess, 4),
    }
    return Subset("position", members, float(np.sqrt(tight * excess)), p_value, spot.share, figures), spot


GAP_FULL = 2.0  # a pattern gap (Fisher z units) that counts as full strength


def pattern_scores(att: np.ndarray, els: np.ndarray, scored: np.ndarray, params: FlagParams,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Per image, the pattern score against two disjoint reference sets: (d1, d2, attended similarity 1).

    ``att``, ``els``: (n, crop + 2, crop + 2, 3) uint8 crops, attended and elsewhere; ``scored``: which
    images have crops. NaN where an image is not scored (no crop, or a flat one).
    """
    n = len(att)
    d1 = np.full(n, np.nan)
    d2 = np.full(n, np.nan)
    s1 = np.full(n, np.nan)
    idx = np.flatnonzero(scored)
    if len(idx) < 2 * params.min_rows:
        return d1, d2, s1
    perm = rng.permutation(idx)
    m = min(params.references, len(perm) // 2)
    refs = (perm[:m], perm[m : 2 * m])
    out = []
    for r in refs:
        a, _ = similarity_top(att[idx], np.searchsorted(idx, r), params.top, params.flat_std)
        e, _ = similarity_top(els[idx], np.searchsorted(idx, r), params.top, params.flat_std)
        out.append((a, a - e))
    s1[idx], d1[idx] = out[0]
    d2[idx] = out[1][1]
    return d1, d2, s1


def pattern_subset(d1: np.ndarray, d2: np.ndarray, s1: np.ndarray, params: FlagParams,
                   rng: np.random.Generator) -> Subset | None:  # fmt: skip
    """The images whose attended content is alike beyond crops elsewhere, separated from the rest.

    The subset is the upper group of Otsu's split of ``d1`` (the score against the first reference
    set), holding ``min_share`` to ``max_share`` of the scored images. It is tested on ``d2`` (the
    second, disjoint reference set), so that a split of noise does not confirm itself: the gap is the
    subset's first quartile of ``d2`` minus the rest's third (positive: most of the two do not
    overlap; quartiles rather than deciles, because a few members the split left in the rest must not
    hide a clear separation), and the p-value a permutation test of the mean ``d2`` of the subset
    against the rest. Strength: the gap over ``GAP_FULL``, clipped to [0, 1].
    """
    ok = np.isfinite(d1) & np.isfinite(d2)
    if ok.sum() < 2 * params.min_rows:
        return None
    cut = two_groups(d1[ok], params.min_share, params.max_share)
    if cut is None:
        return None
    members = ok & (d1 >= cut)
    rest = ok & (d1 < cut)
    if members.sum() < params.min_rows:
        return None
    gap = float(np.percentile(d2[members], 25) - np.percentile(d2[rest], 75))
    p = permutation_p(d2[members], d2[rest], params.permutations, rng)
    figures = {
        "gap": round(gap, 4),
        "rest_high": round(float(np.percentile(d1[rest], 90)), 4),  # the rest's 90th percentile of d1
        "score": round(float(np.median(d1[members])), 4),
        "rest_score": round(float(np.median(d1[rest])), 4),
        # The same on the correlation scale, for people: attended, elsewhere in the same images, the rest.
        "correlation": round(float(np.tanh(np.median(s1[members]))), 4),
        "elsewhere_correlation": round(float(np.tanh(np.median((s1 - d1)[members]))), 4),
        "rest_correlation": round(float(np.tanh(np.median(s1[rest]))), 4),
        "scored": int(ok.sum()),
    }
    if p > params.alpha or gap <= 0:
        return None
    share = float(members.sum() / ok.sum())
    return Subset("pattern", members, float(np.clip(gap / GAP_FULL, 0, 1)), p, share, figures)


__all__ = [
    "BINS",
    "FlagParams",
    "Spot",
    "GAP_FULL",
    "Subset",
    "attention_points",
    "box_point",
    "crop_at",
    "crops_from_patches",
    "patch_at",
    "patch_side",
    "find_spot",
    "pattern_scores",
    "pattern_subset",
    "permutation_p",
    "position_subset",
    "spot_p_value",
    "two_groups",
    "position_scores",
    "similarity_top",
    "support_points",
    "window_side",
]
