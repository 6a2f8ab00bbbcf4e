"""The report's findings section: every flagged finding, strongest first, with its evidence on the page.

A card per finding: its strength and evidence kinds, the sentence that says what the evidence is,
the prototype with the spot marked where there is one, and two rows of pictures, the finding's and
the class's largest unflagged cluster's for contrast: heatmap overlays, then the attended crops (the
square the map looks at, cut from the input image at each map's attention point). A person confirms
or dismisses a finding from the card. Every value from the run is escaped (``report._e``).
"""

from __future__ import annotations

import html

import numpy as np
from PIL import Image, ImageDraw

from gradcam_batch.engine.audit import render

CSS = """
.fcard{border-top:1px solid #eee;padding:12px 0;display:flex;gap:16px;align-items:flex-start}
.fcard:first-of-type{border-top:0}
.strength{display:inline-block;min-width:92px;font-weight:600;color:#a33b00}
.meter{display:inline-block;width:70px;height:8px;background:#eee;border-radius:4px;margin-left:6px;vertical-align:1px}
.meter span{display:block;height:8px;border-radius:4px;background:#D55E00}
.kind{display:inline-block;padding:0 7px;margin-right:4px;border-radius:9px;background:#fde3d3;color:#8a3200;
font-size:12px}
.evrow{display:flex;gap:10px;align-items:center;margin-top:6px}
.evrow .lbl{width:150px;font-size:12px;color:#555}
.evrow.contrast .lbl{color:#1f6f4a}
.sentence{margin:4px 0 2px;max-width:900px}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _img(uri: str, alt: str, title: str = "", cls: str = "px") -> str:
    t = f' title="{_e(title)}"' if title else ""
    return f'<img src="{_e(uri)}" alt="{_e(alt)}" class="{_e(cls)}"{t}>'


def marked_prototype(proto: np.ndarray, location: tuple[float, float] | None, px: int = 120) -> Image.Image:
    """The prototype as a heat picture, with a ring at ``location`` (small-map pixels) when given."""
    img = render.heat_image(proto, px).convert("RGB")
    if location is not None:
        h, w = proto.shape
        y, x = location[0] / h * px, location[1] / w * px
        draw = ImageDraw.Draw(img)
        r = max(5, px // 14)
        draw.ellipse([x - r - 1, y - r - 1, x + r + 1, y + r + 1], outline="#000000", width=1)
        draw.ellipse([x - r, y - r, x + r, y + r], outline="#ffffff", width=2)
    return img


def attended_crop(image: np.ndarray, point: tuple[float, float], window: float, px: int = 64) -> Image.Image:
    """The square of 1.5 ``window`` (image pixels) around ``point`` (y, x, image pixels), at ``px`` pixels."""
    h, w = image.shape[:2]
    side = max(2, int(round(1.5 * window)))
    y0, x0 = int(round(point[0] - side / 2)), int(round(point[1] - side / 2))
    ys = np.clip(np.arange(y0, y0 + side), 0, h - 1)
    xs = np.clip(np.arange(x0, x0 + side), 0, w - 1)
    crop = Image.fromarray(np.ascontiguousarray(image[ys][:, xs]))
    resample = Image.Resampling.NEAREST if side < px else Image.Resampling.BILINEAR
    return crop.resize((px, px), resample)


def _strips(cluster, images: dict, map_size: tuple[int, int], window_share: float, n: int = 6) -> tuple[str, str]:
    """(overlays, attended crops) of a cluster's samples as HTML; a crop needs the sample's image."""
    maps = cluster.sample_maps if cluster.sample_maps is not None else []
    points = cluster.sample_points if cluster.sample_points is not None else np.full((len(maps), 2), np.nan)
    overlays, crops = [], []
    for rid, m, p in list(zip(cluster.sample_ids, maps, points, strict=False))[:n]:
        image = images.get(rid)
        overlays.append(_img(render.png_uri(render.overlay_image(image, m, 64)), "overlay", str(rid)))
        if image is not None and np.isfinite(p).all():
            h, w = image.shape[:2]
            at = (p[0] * h / map_size[0], p[1] * w / map_size[1])
            crops.append(_img(render.png_uri(attended_crop(image, at, window_share * min(h, w))), "attended", str(rid)))
    return "".join(overlays), "".join(crops)


def _row(label: str, overlays: str, crops: str, contrast: bool = False) -> str:
    crops = crops or "<span class=muted>(no input image: no crops)</span>"
    cls = "evrow contrast" if contrast else "evrow"
    return (
        f'<div class="{cls}"><span class=lbl>{label}</span><div class=strip>{overlays}</div>'
        f"<span class=lbl>what the maps look at</span><div class=strip>{crops}</div></div>"
    )


def contrast_cluster(c):
    """The class's largest unflagged cluster, shown beside its findings for contrast (None if all are flagged)."""
    return next((o for o in c.clusters if not o.flagged), None)


def contrast_ids(c, n: int) -> list:
    """The ids of the contrast cluster's first ``n`` samples (their images are read for the card)."""
    k = contrast_cluster(c)
    return [] if k is None else list(k.sample_ids[:n])


def findings_section(result, images: dict, anchor, samples: int = 6) -> str:
    """The findings box: a card per flagged (class, cluster), strongest first, ``samples`` pictures a strip;
    ``anchor(cls)``: a class's section id."""
    s = result.summary
    flagged = result.flagged
    skipped = [n for n in s["notes"] if n.startswith("pattern evidence skipped")]
    kinds = ", ".join(s.get("evidence", {}).get("kinds", []))
    if not flagged:
        out = [
            '<div class="box findings none" id=findings><h2>No finding</h2>'
            f"<p class=muted>No subset of any class looks at a fixed spot or at one pattern apart from the rest of "
            f"its class, nor misses its boxes (evidence looked for: {_e(kinds)}).</p>"
        ]
        out += [f"<p class=muted>{_e(n)}.</p>" for n in skipped]
        return "".join(out) + "</div>"
    window_share = s.get("evidence", {}).get("window", 0.25)
    out = [
        f'<div class="box findings" id=findings><h2>{len(flagged)} finding{"s" if len(flagged) != 1 else ""}: '
        "images whose heatmaps look at something other than their object</h2>"
        f"<p class=muted>Strongest first. Evidence looked for: {_e(kinds)}; a finding is flagged at strength "
        f"{s['flag_rules']['threshold']:.2f}. Each card shows the flagged images and, for contrast, the rest of "
        "their class.</p>"
    ]
    out += [f"<p class=muted>{_e(n)}.</p>" for n in skipped]
    for c, k in flagged:
        f = k.finding
        size = k.prototype.shape
        location = f.location if f is not None and f.location is not None else None
        proto = render.png_uri(marked_prototype(k.prototype, location))
        strength = k.strength or 0.0
        chips = "".join(f"<span class=kind>{_e(kind)}</span>" for kind in (f.kinds if f is not None else ()))
        ov, cr = _strips(k, images, size, window_share, samples)
        rows = [_row(f"flagged: cluster {k.cluster}", ov, cr)]
        contrast = contrast_cluster(c)
        if contrast is not None:
            ov, cr = _strips(contrast, images, size, window_share, samples)
            rows.append(_row(f"contrast: cluster {contrast.cluster} ({contrast.size:,})", ov, cr, contrast=True))
        where = "" if location is None else " (the ring: the spot)"
        out.append(
            f'<div class=fcard data-class="{_e(c.class_index)}" data-cluster="{_e(k.cluster)}" '
            f'data-strength="{strength:.4f}"><figure>{_img(proto, "prototype")}'
            f"<figcaption>prototype{_e(where)}</figcaption></figure><div>"
            f'<span class=strength>strength {strength:.2f}</span><span class=meter><span style="width:'
            f'{round(100 * strength)}%"></span></span> {chips}<br>'
            f'<a href="#{_e(anchor(c))}"><b>{_e(c.title)}</b></a>'
            f"{_e(' · ' + c.method) if len({x.method for x in result.classes}) > 1 else ''}, cluster {k.cluster}: "
            f"{k.size:,} of {c.sampled:,} heatmaps ({k.share:.0%})"
            + "".join(f"<p class=sentence><span class=flag>⚑</span> {_e(r)}</p>" for r in k.flags)
            + "".join(rows)
            + "</div></div>"
        )
    return "".join(out) + "</div>"


__all__ = ["CSS", "attended_crop", "contrast_ids", "findings_section", "marked_prototype"]
