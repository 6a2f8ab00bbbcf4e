"""The report's pictures and page budget: palette PNGs that equal the colormap, the caps on big runs."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from gradcam_batch.engine.audit import render, report


def _decode(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


def test_heat_uri_is_viridis_at_the_maps_resolution():
    m = np.random.default_rng(0).random((17, 23)) * 3
    np.testing.assert_array_equal(_decode(render.heat_uri(m)), render.colormap(m / m.max()))
    np.testing.assert_array_equal(_decode(render.map_uri(None, m / 3, 72)), render.colormap(m / 3))
    assert _decode(render.heat_uri(np.zeros((4, 4)))).shape == (4, 4, 3)


def test_map_over_an_image_is_a_jpeg_of_the_asked_width():
    img = np.full((30, 60, 3), 128, np.uint8)
    uri = render.map_uri(img, np.ones((8, 8)) * 0.5, 72)
    assert uri.startswith("data:image/jpeg;base64,") and _decode(uri).shape == (36, 72, 3)


def test_page_points_caps():
    shown, thumbs = report.page_points(300, 2)
    assert len(shown) == 300 and len(thumbs) == report.THUMBS_PER_CLASS and set(thumbs) <= set(shown)
    shown, thumbs = report.page_points(5000, 1000)  # 100 a class by the page budget; at least 500
    assert len(shown) == report.MIN_POINTS_PER_CLASS and len(thumbs) == report.THUMBS_PER_PAGE // 1000
    assert (np.diff(shown) > 0).all() and set(thumbs) <= set(shown)
    a, b = report.page_points(5000, 1000, seed=0), report.page_points(5000, 1000, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))  # fixed by the seed


def test_shrink_averages_areas():
    m = np.arange(32 * 32, dtype=np.float64).reshape(32, 32)
    small = render.shrink(m, 16)
    np.testing.assert_allclose(small, m.reshape(16, 2, 16, 2).mean(axis=(1, 3)), rtol=1e-6)
    assert render.shrink(m[:8, :8], 16).shape == (8, 8)
