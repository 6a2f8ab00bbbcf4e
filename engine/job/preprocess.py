"""How an image becomes the model's input size: ``Preprocess`` (resize, then centre crop) and its geometry.

``Preprocess`` resizes and crops a Pillow image; ``Preprocess.geometry`` maps a point of the
original image to the model input's pixels (the boxes go through it), and ``resize_target`` is
the size the resize step asks for (a JPEG is drafted to it, and the device decoder resizes to it).
Normalization (mean/std) is not done here: it runs on the device, on uint8 input, which moves 4x
fewer bytes from host to device than float32 would; ``mean`` and ``std`` ride along for it.
Pillow and numpy alone, no torch. The audit repeats this geometry (``engine/audit/images.py``),
and ``tests/test_audit_images.py`` holds the copy to it pixel for pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from gradcam_batch.engine.job.errors import DecodeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
_PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Preprocess:
    """Resize, then center-crop; the result is always ``out_size``.

    ``resize``: an int resizes the shorter side to it (aspect kept), (H, W) resizes exactly,
    None keeps the size. ``crop``: N or (H, W) center crop (N means NxN, as on the command
    line; stored as (N, N)), or None. One of the two must fix the output size, so that images
    batch together. Sizes must be positive integers (``ValueError`` otherwise). ``interpolation``:
    the resize filter, one of ``INTERPOLATIONS`` (timm and Transformers models ask for bicubic).
    """

    resize: int | tuple[int, int] | None = 256
    crop: int | tuple[int, int] | None = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self):
        # Frozen: normalize through object.__setattr__. An int crop becomes (N, N); an int resize
        # stays an int (it means the shorter side, not NxN).
        if self.resize is not None:
            object.__setattr__(self, "resize", _size(self.resize, "resize"))
        if self.crop is not None:
            crop = _size(self.crop, "crop")
            object.__setattr__(self, "crop", (crop, crop) if isinstance(crop, int) else crop)
        if self.crop is None and not isinstance(self.resize, tuple):
            raise ValueError("without a crop, the resize must be HxW so that every image has the same size")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need three values (R, G, B)")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")

    @property
    def out_size(self) -> tuple[int, int]:
        return self.crop if self.crop is not None else self.resize  # type: ignore[return-value]

    def resize_target(self, w: int, h: int) -> tuple[int, int] | None:
        """(W, H) after the resize step."""
        if self.resize is None:
            return None
        if isinstance(self.resize, tuple):
            return self.resize[1], self.resize[0]
        s = self.resize
        if w <= h:
            return s, max(1, round(h * s / w))
        return max(1, round(w * s / h)), s

    def geometry(self, w: int, h: int) -> tuple[float, float, float, float]:
        """(sx, sy, ox, oy): a point (x, y) of a w x h image lands at (x * sx - ox, y * sy - oy).

        The same resize and center crop as ``__call__``, for boxes given in the original
        image's pixels (continuous coordinates: pixel (y, x) covers [x, x+1) x [y, y+1)).
        """
        target = self.resize_target(w, h) or (w, h)
        tw, th = target
        sx, sy = tw / w, th / h
        ox = oy = 0.0
        if self.crop is not None:
            ch, cw = self.crop
            if tw < cw or th < ch:
                s = max(cw / tw, ch / th)
                nw, nh = max(cw, round(tw * s)), max(ch, round(th * s))
                sx, sy = sx * nw / tw, sy * nh / th
                tw, th = nw, nh
            ox, oy = float((tw - cw) // 2), float((th - ch) // 2)
        return sx, sy, ox, oy

    def _geometry(self, img: Image.Image, resample, reducing_gap: float | None) -> Image.Image:
        """The resize and the center crop, with ``resample``."""
        target = self.resize_target(*img.size)
        if target is not None and img.size != target:
            img = img.resize(target, resample, reducing_gap=reducing_gap)
        if self.crop is not None:
            ch, cw = self.crop
            w, h = img.size
            if w < cw or h < ch:
                # Smaller than the crop: scale up so that the crop fits, then crop.
                s = max(cw / w, ch / h)
                img = img.resize((max(cw, round(w * s)), max(ch, round(h * s))), resample)
                w, h = img.size
            left, top = (w - cw) // 2, (h - ch) // 2
            img = img.crop((left, top, left + cw, top + ch))
        return img

    def mask(self, img: Image.Image) -> np.ndarray:
        """A mask of class indices (a single-channel image of the input image's size) through the same
        resize and crop, with nearest-neighbour sampling so that no index is blended: (H, W) int64."""
        arr = np.asarray(self._geometry(img, Image.Resampling.NEAREST, None)).astype(np.int64)
        if arr.shape[:2] != self.out_size:
            raise DecodeError(f"preprocessing produced {arr.shape[:2]}, expected {self.out_size}")
        return arr

    def __call__(self, img: Image.Image) -> np.ndarray:
        img = self._geometry(img, _PIL_FILTERS[self.interpolation], 3.0)
        arr = np.asarray(img, dtype=np.uint8)
        if arr.shape[:2] != self.out_size:
            raise DecodeError(f"preprocessing produced {arr.shape[:2]}, expected {self.out_size}")
        return arr


def _size(value, what: str) -> int | tuple[int, int]:
    """A positive int, or a pair of positive ints as a tuple; ``ValueError`` naming ``what``."""

    def positive(v) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0

    if positive(value):
        return int(value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(positive(v) for v in value):
        return int(value[0]), int(value[1])
    raise ValueError(f"{what} must be a positive integer N or a pair (H, W) of positive integers, got {value!r}")


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "INTERPOLATIONS", "Preprocess"]
