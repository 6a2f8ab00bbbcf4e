"""One class's evidence, from its maps (and images) to its findings and the split they make.

``measure`` (maps only: attention points, position scores, the position subset, points elsewhere in
the class's support) -> ``read_crops`` (one pass over the input images of a chunk of classes: the
attended and the elsewhere crop of every audited row) -> ``judge`` (pattern scores, the pattern
subset, findings with strengths, the whole-class rule) -> ``carve`` (a flagged finding's rows get a
cluster id of their own) and ``row_scores`` (``clusters.parquet``'s per-image columns). The rules are
in ``evidence.py`` and ``flags.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gradcam_batch.engine.audit import evidence as ev
from gradcam_batch.engine.audit.evidence import permutation_p
from gradcam_batch.engine.audit.flags import Finding, FlagParams, combine

ALIKE = 0.3  # a pattern score (similarity units) at which an image's attended content counts as "alike"


@dataclass
class ClassEvidence:
    points: np.ndarray  # (n, 2) attention points in the small maps' pixels
    ok: np.ndarray  # (n,) bool: the map has an attention point (not all zero)
    position: np.ndarray  # (n,) position scores
    half: int  # the attention window's half-side, small-map pixels
    position_subset: ev.Subset | None
    spot_share: float  # the densest spot's share of the class (a whole class at one spot: its object)
    elsewhere: np.ndarray | None = None  # (n, 2) points elsewhere in the support, small-map pixels
    att: np.ndarray | None = None  # (n, c + 2, c + 2, 3) uint8 attended crops
    els: np.ndarray | None = None
    scored: np.ndarray | None = None  # (n,) bool: both crops read
    boxed: np.ndarray | None = None  # (n,) bool: the elsewhere crop came from the image's box
    pattern: np.ndarray | None = None  # (n,) pattern scores d1 (NaN: not scored)
    similarity: np.ndarray | None = None  # (n,) attended similarity s1
    pattern_subset: ev.Subset | None = None
    findings: list[Finding] = field(default_factory=list)
    size: tuple[int, int] = (0, 0)  # the small maps' (h, w)
    cell: float = 0.0  # one cam cell, in small-map pixels

    @property
    def n(self) -> int:
        return len(self.points)


def attention_half(size: tuple[int, int], cam_side: int | None, params: FlagParams) -> int:
    """The attention window's half-side in small-map pixels: ``cells`` cam cells (a cam cell: side / cam side)."""
    cell = size[0] / cam_side if cam_side else size[0] / 8
    return max(1, int(np.ceil(params.cells * cell)))


def measure(maps: np.ndarray, cam_side: int | None, params: FlagParams, rng: np.random.Generator) -> ClassEvidence:
    """Where the class's maps look: attention points, position scores, the position subset and the densest spot."""
    size = maps.shape[1:]
    half = attention_half(size, cam_side, params)
    points, ok = ev.attention_points(maps, half)
    position = np.full(len(maps), np.nan)
    position[ok] = ev.position_scores(points[ok], size, params)
    subset, spot = ev.position_subset(points, ok, size, params, rng)
    cell = size[0] / cam_side if cam_side else size[0] / 8
    ce = ClassEvidence(points, ok, position, half, subset, spot.share if spot is not None else 0.0)
    ce.size, ce.cell = (int(size[0]), int(size[1])), float(cell)
    return ce


def plan_elsewhere(ce: ClassEvidence, mean_map: np.ndarray, window_small: float, rng: np.random.Generator) -> None:
    """Points elsewhere in the class's mean-map support, 1.5 attended windows away from each attention point."""
    ce.elsewhere = ev.support_points(mean_map, ce.points, 1.5 * window_small, rng)


def read_crops(source, groups: list[tuple[list, ClassEvidence]], size: tuple[int, int], cam_side: int | None,
               params: FlagParams) -> tuple[int, int]:  # fmt: skip
    """Fill each class's ``att``, ``els`` and ``scored`` from one pass over the input images.

    ``groups``: (ids, evidence) per class, the ids of its audited rows in order. Returns (images
    decoded, images that failed to decode or were not found).
    """
    where: dict = {}
    side = ev.patch_side(params.crop)
    for gi, (ids, ce) in enumerate(groups):
        # Patches now, crops from them vectorized after the pass (a per-image crop is Python-bound).
        ce.att = np.zeros((ce.n, side, side, 3), np.uint8)
        ce.els = np.zeros((ce.n, side, side, 3), np.uint8)
        ce.scored = np.zeros(ce.n, bool)
        ce.boxed = np.zeros(ce.n, bool)
        for ri, rid in enumerate(ids):
            if ce.ok[ri]:
                where.setdefault(rid, []).append((gi, ri))

    def each(rid, image: np.ndarray, box: np.ndarray | None) -> None:
        h, w = image.shape[:2]
        window = ev.window_side(min(h, w), cam_side, params)
        sy, sx = h / size[0], w / size[1]
        for gi, ri in where.get(rid, ()):
            ce = groups[gi][1]
            p = (ce.points[ri][0] * sy, ce.points[ri][1] * sx)
            if box is not None:
                q = ev.box_point(box, p, 1.5 * window)
                ce.boxed[ri] = True
            else:
                q = (ce.elsewhere[ri][0] * sy, ce.elsewhere[ri][1] * sx)
            ce.att[ri] = ev.patch_at(image, p, window, params.crop)
            ce.els[ri] = ev.patch_at(image, q, window, params.crop)
            ce.scored[ri] = True

    done, failed = source.read(list(where), each)
    for _, ce in groups:
        ce.att = ev.crops_from_patches(ce.att, params.crop)
        ce.els = ev.crops_from_patches(ce.els, params.crop)
    return done, failed + max(0, len(where) - done - failed)


def _whole_class(ce: ClassEvidence, pointing: np.ndarray | None, params: FlagParams) -> Finding | None:
    """A class that attends to one spot, or one pattern, as a whole: a finding only when its peaks miss its boxes."""
    alike = None
    if ce.spot_share > params.max_share:
        alike = "to one spot"
    elif ce.pattern is not None:
        d = ce.pattern[np.isfinite(ce.pattern)]
        if len(d) >= params.min_rows and (d >= ALIKE).mean() > params.max_share:
            alike = "to one pattern"
    if alike is None or pointing is None:
        return None
    hits = pointing[np.isfinite(pointing)]
    if len(hits) < params.min_rows or hits.mean() >= params.whole_pointing:
        return None
    strength = float(np.clip(1 - hits.mean() / params.whole_pointing, 0, 1))
    figures = {"boxes": {"strength": round(strength, 4), "pointing": round(float(hits.mean()), 4), "alike": alike}}
    members = np.ones(ce.n, bool)
    return Finding(("boxes",), members, strength, strength >= params.threshold, figures, whole_class=True)


def judge(ce: ClassEvidence, pointing: np.ndarray | None, params: FlagParams, rng: np.random.Generator) -> None:
    """Pattern scores and subset (where crops were read), then the class's candidate findings."""
    if ce.att is not None:
        ce.pattern, d2, ce.similarity = ev.pattern_scores(ce.att, ce.els, ce.scored, params, rng)
        ce.pattern_subset = ev.pattern_subset(ce.pattern, d2, ce.similarity, params, rng)
    ce.findings = combine(ce.position_subset, ce.pattern_subset, ce.pattern, params)
    for f in ce.findings:
        _corner_cell_check(ce, f)
    whole = _whole_class(ce, pointing, params)
    if whole is not None:
        ce.findings.append(whole)
    ce.findings.sort(key=lambda f: -f.strength)


def in_corner_cell(point: tuple[float, float], size: tuple[int, int], cell: float) -> bool:
    """Whether a point lies in one of the map's four corner cells (one cam cell from two edges). Points are
    pixel centres, in [0, h] x [0, w]: the cells are [0, cell) and (h - cell, h] on each axis."""
    (y, x), (h, w) = point, size
    return (y < cell or y > h - cell) and (x < cell or x > w - cell)


def _corner_cell_check(ce: ClassEvidence, f: Finding) -> None:
    """A spot in a corner cell with nothing alike there is not flagged on its position alone.

    A map with little signal (a class the model barely knows) can peak where zero padding alone gives
    every convolution an edge response, and the image's extreme corner cell is where that response is
    largest. On the planted benchmark's seed 2, a fifth of one weak class's maps peaked there and
    occluding that corner changed their probability by under 0.01. A real mark at the corner is
    content, and its crops are alike (pattern evidence); so where the crops were read and scored and no
    pattern supports the spot, the position finding stays, with its figures, unflagged. Without images
    (``--no-overlays``) nothing tells the two apart, and the spot is flagged as before. Boxes evidence
    folded in later (``add_kind``) decides afresh.
    """
    if f.kinds != ("position",) or f.location is None or ce.pattern is None:
        return
    scored = np.isfinite(ce.pattern[f.members])
    if scored.mean() < 0.5 or not in_corner_cell(f.location, ce.size, ce.cell):
        return
    f.flagged = False
    f.figures["position"]["corner_cell"] = True
    f.extra["not_flagged"] = (
        "at the image's corner cell, where zero padding alone can put the peak of a map with little signal, and "
        "the content there is not alike from image to image: not flagged on its position alone"
    )


BOX_GAP_FULL = 0.3  # a box-energy gap that counts as full strength


def box_finding(
    energy: np.ndarray, members: np.ndarray, params: FlagParams, rng: np.random.Generator
) -> Finding | None:
    """Box evidence for one cluster: its maps fall outside the labelled boxes, apart from the rest of the class.

    ``energy``: the rows' box energy (NaN: none). The cluster's mean must be below ``box_ratio`` times
    the rest's and ``box_margin`` lower, the cluster a proper subset (``min_share`` to ``max_share``),
    and the two must separate: the rest's 10th percentile above the cluster's 90th (the gap), the
    rest's mean above the cluster's at the permutation p-value ``alpha``. Strength: the gap over
    ``BOX_GAP_FULL``, clipped to [0, 1].
    """
    finite = np.isfinite(energy)
    mine, rest = energy[members & finite], energy[~members & finite]
    if len(mine) < params.min_rows or len(rest) < params.min_rows:
        return None
    share = len(mine) / (len(mine) + len(rest))
    if not params.min_share <= share <= params.max_share:
        return None
    m, r = float(mine.mean()), float(rest.mean())
    if not (m < params.box_ratio * r and r - m >= params.box_margin):
        return None
    gap = float(np.percentile(rest, 10) - np.percentile(mine, 90))
    p = permutation_p(rest, mine, params.permutations, rng)
    if gap <= 0 or p > params.alpha:
        return None
    strength = float(np.clip(gap / BOX_GAP_FULL, 0, 1))
    figures = {
        "boxes": {
            "strength": round(strength, 4),
            "p_value": round(p, 4),
            "share": round(share, 4),
            "box_energy": round(m, 4),
            "rest_box_energy": round(r, 4),
            "gap": round(gap, 4),
        }
    }
    return Finding(("boxes",), members.copy(), strength, strength >= params.threshold, figures)


def carve(labels: np.ndarray, findings: list[Finding]) -> np.ndarray:
    """Labels where each flagged subset finding has a cluster id of its own (unless it is one cluster already).

    New ids follow SpRAy's, strongest finding first; a row already carved stays with the stronger one.
    A whole-class finding carves nothing: it flags every cluster of the class.
    """
    out = labels.copy()
    next_id = int(labels.max()) + 1 if len(labels) else 0
    taken = np.zeros(len(labels), bool)
    for f in findings:
        if not f.flagged or f.whole_class:
            continue
        rows = f.members & ~taken
        if not rows.any():
            f.flagged = False
            continue
        f.members = rows
        ids = np.unique(out[rows])
        if len(ids) == 1 and (out == ids[0]).sum() == rows.sum():
            f.cluster = int(ids[0])
        else:
            out[rows] = next_id
            f.cluster = next_id
            next_id += 1
        taken |= rows
    return out


def row_scores(ce: ClassEvidence, flagged_kind: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the shortcut score and its evidence kind.

    The score is how far the image stands above its class's median on either per-image score
    (position or pattern), the larger one, clipped to [0, 1]; NaN where neither is known. The kind is
    the finding's for a flagged row (``flagged_kind``, "" elsewhere), else the kind behind the score
    (None where the score is 0 or unknown).
    """

    def excess(x: np.ndarray | None) -> np.ndarray:
        if x is None:
            return np.full(ce.n, np.nan)
        finite = np.isfinite(x)
        if not finite.any():
            return np.full(ce.n, np.nan)
        return np.where(finite, np.clip(x - np.median(x[finite]), 0, 1), np.nan)

    pos, pat = excess(ce.position), excess(ce.pattern)
    both = np.stack([np.nan_to_num(pos, nan=-1), np.nan_to_num(pat, nan=-1)], 1)
    score = both.max(1)
    score = np.where(score < 0, np.nan, score)
    kind = np.where(both[:, 1] > both[:, 0], "pattern", "position").astype(object)
    kind[~(score > 0)] = None
    flagged = flagged_kind != ""
    kind[flagged] = flagged_kind[flagged]
    return score, kind


__all__ = [
    "ALIKE",
    "BOX_GAP_FULL",
    "box_finding",
    "ClassEvidence",
    "attention_half",
    "carve",
    "judge",
    "measure",
    "plan_elsewhere",
    "read_crops",
    "row_scores",
]
