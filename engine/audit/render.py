"""Pictures for the report, drawn with numpy and Pillow, returned as PNG data URIs.

The colormap is viridis, interpolated linearly between its ten published key colours (the hex
stops in ``VIRIDIS_STOPS``): perceptually ordered, readable in greyscale and by colour-blind
readers. Cluster colours are the Okabe-Ito palette.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, ImageDraw

VIRIDIS_STOPS = (
    "#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725",
)  # fmt: skip
CLUSTER_COLOURS = (
    "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000", "#999999", "#882255",
)  # fmt: skip


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    h = hex_colour.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def _table(stops: tuple[str, ...], n: int = 256) -> np.ndarray:
    keys = np.array([_rgb(s) for s in stops], np.float64)
    at = np.linspace(0, 1, len(stops))
    x = np.linspace(0, 1, n)
    return np.stack([np.interp(x, at, keys[:, c]) for c in range(3)], -1).round().astype(np.uint8)


VIRIDIS = _table(VIRIDIS_STOPS)


def cluster_colour(i: int) -> str:
    return CLUSTER_COLOURS[i % len(CLUSTER_COLOURS)]


def colormap(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> (..., 3) uint8 viridis."""
    idx = np.clip(np.nan_to_num(np.asarray(x, np.float64)) * 255 + 0.5, 0, 255).astype(np.int64)
    return VIRIDIS[idx]


def png_uri(img: Image.Image | np.ndarray, compress_level: int = 6) -> str:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def jpeg_uri(img: Image.Image | np.ndarray, quality: int = 85) -> str:
    """For overlays on photographs: a third of the PNG's bytes at the sizes the report shows."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def map_uri(image: np.ndarray | None, m: np.ndarray, px: int) -> str:
    """A map over its image as a ``px``-wide JPEG, or without an image the map alone at its own
    resolution as a PNG (the page scales it up: a tenth of the pixels to encode and to send)."""
    if image is None:
        return heat_uri(m, normalize=False)
    return jpeg_uri(overlay_image(image, m, px))


def shrink(m: np.ndarray, side: int) -> np.ndarray:
    """A map area-averaged down to at most ``side`` x ``side`` (as it is when already that small)."""
    m = np.asarray(m, np.float32)
    if max(m.shape) <= side:
        return m
    s = side / max(m.shape)
    size = (max(1, round(m.shape[1] * s)), max(1, round(m.shape[0] * s)))
    return np.asarray(Image.fromarray(m, "F").resize(size, Image.Resampling.BOX))


def heat_uri(m: np.ndarray, *, normalize: bool = True) -> str:
    """A map at its own resolution as a palette PNG (one byte a pixel, viridis as the palette): the
    page scales it up. Scaled to its own maximum by default, else taken as values in [0, 1]."""
    x = _normalized(m) if normalize else np.clip(np.nan_to_num(np.asarray(m, np.float64)), 0, 1)
    img = Image.fromarray((x * 255 + 0.5).astype(np.uint8), "L").convert("P")
    img.putpalette(VIRIDIS.reshape(-1).tolist())
    return png_uri(img, compress_level=9)


def _normalized(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    hi = m.max() if m.size else 0.0
    return m / hi if hi > 0 else np.zeros_like(m)


def heat_image(m: np.ndarray, px: int | None = 96, *, normalize: bool = True) -> Image.Image:
    """A map as a ``px`` x ``px`` viridis picture (bilinear), scaled to its own maximum by default.

    ``px=None``: at the map's own resolution, for the browser to scale (much cheaper to encode).
    """
    img = Image.fromarray(colormap(_normalized(m) if normalize else m))
    return img if px is None else img.resize((px, px), Image.Resampling.BILINEAR)


def overlay_image(image: np.ndarray | None, m: np.ndarray, px: int = 96) -> Image.Image:
    """The map over the image (the map alone without one): hot pixels opaque, cold ones see-through."""
    if image is None:
        return heat_image(m, px, normalize=False)
    h, w = image.shape[:2]
    heat = np.asarray(Image.fromarray(np.asarray(m, np.float32)).resize((w, h), Image.Resampling.BILINEAR))
    heat = np.clip(heat, 0, 1)
    alpha = (0.15 + 0.65 * heat)[..., None]
    blend = (1 - alpha) * image.astype(np.float64) + alpha * colormap(heat).astype(np.float64)
    out = Image.fromarray(np.clip(blend, 0, 255).astype(np.uint8))
    resample = Image.Resampling.NEAREST if max(h, w) < px else Image.Resampling.BILINEAR
    return out.resize((px, round(px * h / w)), resample)


def legend_image(width: int = 240, height: int = 14) -> Image.Image:
    bar = colormap(np.linspace(0, 1, width))[None, :, :].repeat(height, 0)
    return Image.fromarray(bar)


def scatter_image(xy: np.ndarray, labels: np.ndarray, flagged: set[int], px: int = 300) -> Image.Image:
    """Points of the 2-D view coloured by cluster; flagged clusters drawn last, with a dark ring."""
    img = Image.new("RGB", (px, px), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, px - 1, px - 1], outline="#cccccc")
    if len(xy) == 0:
        return img
    lo, hi = xy.min(0), xy.max(0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    pts = 10 + (xy - lo) / span * (px - 20)
    r = 3 if len(xy) <= 2000 else 2
    order = np.argsort([1 if int(c) in flagged else 0 for c in labels], kind="stable")
    for i in order:
        x, y = pts[i]
        c = int(labels[i])
        ring = "#222222" if c in flagged else None
        draw.ellipse([x - r, y - r, x + r, y + r], fill=cluster_colour(c), outline=ring)
    return img


def eigen_image(values: np.ndarray, k: int, width: int = 300, height: int = 120) -> Image.Image:
    """The Laplacian's smallest eigenvalues as dots, with a line after the k-th (the chosen gap)."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, width - 1, height - 1], outline="#cccccc")
    n = len(values)
    if n == 0:
        return img
    top = max(float(np.max(values)), 1e-9)
    xs = 10 + np.arange(n) * (width - 20) / max(n - 1, 1)
    ys = height - 10 - np.asarray(values) / top * (height - 20)
    if 1 < k < n:
        gx = (xs[k - 1] + xs[k]) / 2
        draw.line([gx, 4, gx, height - 4], fill="#D55E00", width=2)
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        fill = "#0072B2" if i < k else "#888888"
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=fill)
    return img


__all__ = [
    "VIRIDIS",
    "VIRIDIS_STOPS",
    "cluster_colour",
    "colormap",
    "eigen_image",
    "heat_image",
    "heat_uri",
    "jpeg_uri",
    "legend_image",
    "map_uri",
    "overlay_image",
    "png_uri",
    "scatter_image",
    "shrink",
]
