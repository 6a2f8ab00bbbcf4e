"""Flags: which clusters look like a model that cheats, and why, in words.

A prototype (a cluster's mean map) is read as a distribution of mass: divided by its sum. Regions
of the s x s grid: the four corners (squares of a quarter of the side) and the border band (the
outer eighth of the side all round); the centre is the rest.

- **location**: a cluster is flagged when its mass sits where the rest of its class's mass does
  not. "The rest" is the class's other clusters (size-weighted); for a class with one cluster, the
  other classes' mean maps. The rule: the two share less than ``max_overlap`` of their mass
  (sum of the element-wise minimum), and some corner or the border band holds at least
  ``min_share`` of the cluster's mass, at least ``min_ratio`` times the rest's share there.
- **box energy** (when the run has ``box_energy``): the cluster's mean is below ``box_ratio``
  times that of the class's other clusters and at least ``box_margin`` lower.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

CORNERS = ("top-left corner", "top-right corner", "bottom-left corner", "bottom-right corner")
BAND = "border band"
CENTRE = "centre"


@dataclass(frozen=True)
class FlagParams:
    max_overlap: float = 0.6
    min_share: float = 0.25
    min_ratio: float = 2.0
    box_ratio: float = 0.5
    box_margin: float = 0.15
    min_rows: int = 3  # a cluster smaller than this is never flagged

    def to_dict(self) -> dict:
        return asdict(self)


def region_masks(h: int, w: int) -> dict[str, np.ndarray]:
    """Boolean (h, w) masks of the corners, the border band and the centre."""
    ch, cw = max(1, round(h / 4)), max(1, round(w / 4))
    bh, bw = max(1, round(h / 8)), max(1, round(w / 8))
    masks = {}
    for name, (ys, xs) in zip(
        CORNERS,
        [
            (slice(0, ch), slice(0, cw)),
            (slice(0, ch), slice(w - cw, w)),
            (slice(h - ch, h), slice(0, cw)),
            (slice(h - ch, h), slice(w - cw, w)),
        ],
        strict=True,
    ):
        m = np.zeros((h, w), bool)
        m[ys, xs] = True
        masks[name] = m
    band = np.ones((h, w), bool)
    band[bh : h - bh, bw : w - bw] = False
    masks[BAND] = band
    masks[CENTRE] = ~band
    return masks


def where(shares: dict[str, float]) -> tuple[str, float]:
    """The region whose share of the mass is largest relative to its area, and that share."""
    masks = region_masks(32, 32)
    area = {k: m.mean() for k, m in masks.items()}
    best = max(shares, key=lambda r: (shares[r] / area[r], r))
    return best, shares[best]


def mass(p: np.ndarray) -> np.ndarray:
    total = float(p.sum())
    return p / total if total > 0 else np.full_like(p, 1.0 / p.size, dtype=np.float64)


def region_shares(p: np.ndarray) -> dict[str, float]:
    """The share of a map's mass in each region."""
    q = mass(np.asarray(p, np.float64))
    return {name: float(q[m].sum()) for name, m in region_masks(*q.shape).items()}


def overlap(p: np.ndarray, r: np.ndarray) -> float:
    """Histogram intersection of two maps' mass distributions, in [0, 1]."""
    return float(np.minimum(mass(np.asarray(p, np.float64)), mass(np.asarray(r, np.float64))).sum())


def location_flag(proto: np.ndarray, rest: np.ndarray, params: FlagParams, rest_name: str) -> str | None:
    """The reason, in words, when ``proto``'s mass sits where ``rest``'s does not; else None."""
    ov = overlap(proto, rest)
    if ov >= params.max_overlap:
        return None
    mine, theirs = region_shares(proto), region_shares(rest)
    best = max((*CORNERS, BAND), key=lambda r: (mine[r] - theirs[r], r))
    if mine[best] < params.min_share or mine[best] < params.min_ratio * theirs[best]:
        return None
    return (
        f"{mine[best]:.0%} of its heatmap mass lies in the {best}, where {rest_name} put {theirs[best]:.0%}; "
        f"it shares only {ov:.0%} of its mass with them"
    )


def box_flag(mine: float | None, rest: float | None, params: FlagParams) -> str | None:
    if mine is None or rest is None:
        return None
    if mine < params.box_ratio * rest and rest - mine >= params.box_margin:
        return (
            f"its mean box energy is {mine:.2f}, against {rest:.2f} for the class's other clusters: "
            "its heatmaps mostly fall outside the labelled boxes"
        )
    return None


__all__ = [
    "BAND",
    "CENTRE",
    "CORNERS",
    "FlagParams",
    "box_flag",
    "location_flag",
    "overlap",
    "region_masks",
    "region_shares",
    "where",
]
