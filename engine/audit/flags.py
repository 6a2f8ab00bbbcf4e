"""Findings: the images of a class that look at a shortcut, how strongly, and why, in one sentence.

The evidence (``evidence.py``) names images, never a region:

- **position**: a proper subset of the class attends to one spot while the rest looks elsewhere;
- **pattern**: a proper subset attends to nearly the same content, far more than crops elsewhere in
  the same images are alike (needs the input images);
- **boxes** (with the run's box metrics): a SpRAy cluster whose mean box energy is below
  ``box_ratio`` times that of the class's other clusters and ``box_margin`` lower; or a class that
  attends to one spot or one pattern as a whole (its object, by default) while fewer than
  ``whole_pointing`` of its peaks fall inside its boxes.

A position and a pattern subset that overlap (Jaccard >= ``match``) are one finding. Its members are
the pattern subset's, with those of the position subset whose pattern score is above the rest of
the class's 90th percentile or unknown (the content is the finer evidence: an image attending the
spot with nothing of the pattern there is not the same thing; one with part of it is).
Strength: 1 - prod(1 - s) over the kinds that support the finding; a finding is flagged at
``threshold``. A class is never flagged because its maps sit elsewhere than other classes'. The
corners and the border band are words for where a spot is ("near the top-left corner"), not rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gradcam_batch.engine.audit.evidence import FlagParams, Subset

CORNERS = ("top-left corner", "top-right corner", "bottom-left corner", "bottom-right corner")
BAND = "border band"
CENTRE = "centre"


def region_masks(h: int, w: int) -> dict[str, np.ndarray]:
    """Boolean (h, w) masks of the corners (a quarter of each side), the border band (an eighth) and the centre."""
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
    """The share of a map's mass in each region (a description of the map, never a flag)."""
    q = mass(np.asarray(p, np.float64))
    return {name: float(q[m].sum()) for name, m in region_masks(*q.shape).items()}


def place_words(point: tuple[float, float], size: tuple[int, int]) -> str:
    """Where a point lies, in words: "near the top-left corner", "in the border band" or "inside the image"."""
    h, w = size
    y, x = point
    top, left = y < h / 4, x < w / 4
    bottom, right = y >= h - h / 4, x >= w - w / 4
    for name, (a, b) in zip(CORNERS, [(top, left), (top, right), (bottom, left), (bottom, right)], strict=True):
        if a and b:
            return f"near the {name}"
    if y < h / 8 or y >= h - h / 8 or x < w / 8 or x >= w - w / 8:
        return "in the border band"
    return "inside the image"


@dataclass
class Finding:
    """A subset of one class's audited rows, the kinds of evidence for it, and its strength."""

    kinds: tuple[str, ...]  # "position", "pattern", "boxes"
    members: np.ndarray  # bool (n,) over the class's audited (sampled) rows
    strength: float  # in [0, 1]
    flagged: bool  # strength >= threshold
    figures: dict  # per kind: p_value, share, strength and the figures behind them
    location: tuple[float, float] | None = None  # (y, x) in the map's pixels: the spot, where there is one
    sentence: str = ""
    cluster: int | None = None  # the cluster its members carry (set by the pipeline)
    whole_class: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "+".join(self.kinds)

    def to_dict(self, scale: tuple[float, float]) -> dict:
        loc = (
            None
            if self.location is None
            else [round(self.location[0] * scale[0], 2), round(self.location[1] * scale[1], 2)]
        )
        return {
            "cluster": self.cluster,
            "evidence": self.kind,
            "strength": round(self.strength, 4),
            "flagged": self.flagged,
            "rows": int(self.members.sum()),
            "whole_class": self.whole_class,
            "location": loc,
            "sentence": self.sentence,
            "figures": self.figures,
        }


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0


def _figures(s: Subset) -> dict:
    return {"strength": round(s.strength, 4), "p_value": round(s.p_value, 4), "share": round(s.share, 4), **s.figures}


def combine(position: Subset | None, pattern: Subset | None, scores: np.ndarray | None,
            params: FlagParams) -> list[Finding]:  # fmt: skip
    """One or two findings from a class's position and pattern subsets (see the module's rules).

    ``scores``: the per-image pattern scores the pattern subset was split on (NaN: not scored).
    """
    found = []
    if position is not None and pattern is not None and _jaccard(position.members, pattern.members) >= params.match:
        d = np.nan_to_num(scores, nan=-np.inf)
        some = (d > pattern.figures["rest_high"]) | ~np.isfinite(scores)
        members = pattern.members | (position.members & some)
        strength = 1 - (1 - position.strength) * (1 - pattern.strength)
        figures = {"position": _figures(position), "pattern": _figures(pattern)}
        found.append(Finding(("position", "pattern"), members, strength, strength >= params.threshold, figures))
    else:
        for s in (position, pattern):
            if s is not None:
                found.append(
                    Finding((s.kind,), s.members, s.strength, s.strength >= params.threshold, {s.kind: _figures(s)})
                )
    for f in found:
        if "position" in f.kinds:
            c = f.figures["position"]["centre"]
            f.location = (float(c[0]), float(c[1]))
    found.sort(key=lambda f: -f.strength)
    return found


def add_kind(f: Finding, other: Finding, params: FlagParams) -> None:
    """Fold ``other``'s evidence (for the same rows) into ``f``: its kinds, figures and strength."""
    f.kinds = (*f.kinds, *other.kinds)
    f.figures.update(other.figures)
    f.strength = 1 - (1 - f.strength) * (1 - other.strength)
    f.flagged = f.strength >= params.threshold


def describe(f: Finding, n: int, size: tuple[int, int], scale: tuple[float, float], map_shape: tuple[int, int]) -> str:
    """The finding's evidence in one sentence (``size``: the small maps' side; ``scale``: to the map's pixels)."""
    k = int(f.members.sum())
    head = f"{k:,} of {n:,} heatmaps ({k / max(n, 1):.0%})"
    parts = []
    if "position" in f.kinds:
        p = f.figures["position"]
        y, x = f.location
        parts.append(
            f"look at one spot, (y {y * scale[0]:.0f}, x {x * scale[1]:.0f}) of the {map_shape[0]} x {map_shape[1]} "
            f"map {place_words((y, x), size)} (spread {p['spread'] * scale[0]:.1f} px), while the rest of the class "
            f"looks elsewhere (spread {p['rest_spread'] * scale[0]:.1f} px; {p['rest_near']:.0%} of it near the spot)"
        )
    if "pattern" in f.kinds:
        p = f.figures["pattern"]
        what = "the content they attend to is" if "position" in f.kinds else "attend to content that is"
        where_ = "there" if "position" in f.kinds else "wherever it sits in the image"
        parts.append(
            f"{what} nearly the same from image to image {where_} (correlation {p['correlation']:.2f} between "
            f"their attended crops; {p['elsewhere_correlation']:.2f} for crops elsewhere on the object in the same "
            f"images; {p['rest_correlation']:.2f} for the attended crops of the rest of the class)"
        )
    if "boxes" in f.kinds:
        b = f.figures["boxes"]
        if f.whole_class:
            parts.append(
                f"attend {b['alike']} as a whole, and only {b['pointing']:.0%} of their peaks fall inside the "
                "labelled boxes"
            )
        else:
            parts.append(
                f"put {b['box_energy']:.0%} of their mass inside the labelled boxes on average, against "
                f"{b['rest_box_energy']:.0%} for the rest of the class"
            )
    sentence = f"{head} {', and '.join(parts)}."
    if not f.flagged and f.extra.get("not_flagged"):
        sentence += f" It is {f.extra['not_flagged']}."
    return sentence


__all__ = [
    "BAND",
    "CENTRE",
    "CORNERS",
    "FlagParams",
    "Finding",
    "add_kind",
    "combine",
    "describe",
    "place_words",
    "region_masks",
    "region_shares",
    "where",
]
