"""Ground-truth segmentation masks of a run (``--mask-column``): one encoded image of class indices per row.

A mask cell is what an image cell can be: encoded bytes, a Hugging Face struct ``{bytes, path}``, or
a path (relative paths from the Parquet file's directory). It is decoded with Pillow as a
single-channel image of class indices (PNG modes ``L``, ``P`` (the palette's indices, as VOC and
Cityscapes store them), ``I;16`` or ``I``), must have the size of its image as shown, and goes through
the run's resize and crop with nearest-neighbour sampling (``Preprocess.mask``), so that it lies on
the model input pixel for pixel. What is wrong with one becomes its row's ``error``, in one line.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from gradcam_batch.engine.errors import first_line
from gradcam_batch.engine.job.decode import check_image_size, pillow_decode_settings
from gradcam_batch.engine.job.errors import DecodeError
from gradcam_batch.engine.job.inputs import InputFile, read_image_bytes
from gradcam_batch.engine.job.preprocess import Preprocess

MASK_MODES = ("1", "L", "P", "I;16", "I;16L", "I;16B", "I")


def decode_mask(
    value,
    kind: str,
    f: InputFile | None,
    image_size: tuple[int, int] | None,
    prep: Preprocess,
    num_classes: int,
    ignore_index: int | None,
    *,
    max_image_pixels: int | None = None,
) -> np.ndarray:
    """One mask cell -> (H, W) int64 class indices at the model input's size; ``DecodeError`` says why not.

    ``image_size``: (W, H) of the row's image as shown; the mask must have it.
    """
    if value is None:
        raise DecodeError("null mask")
    if kind == "path" and f is None:
        raise DecodeError("a mask given as a path needs the run's input files to resolve it")
    try:
        data = read_image_bytes(value, kind, f)
    except DecodeError as exc:
        raise DecodeError(f"mask: {exc}") from None
    with pillow_decode_settings():
        try:
            img = Image.open(io.BytesIO(data))
            check_image_size(*img.size, max_image_pixels)
            img.load()
        except UnidentifiedImageError:
            raise DecodeError("cannot identify the mask's image format (not an image, or corrupt)") from None
        except DecodeError as exc:
            raise DecodeError(f"mask: {exc}") from None
        except Exception as exc:
            raise DecodeError(f"cannot decode the mask: {first_line(exc)}") from None
    if img.mode not in MASK_MODES:
        raise DecodeError(f"the mask is a {img.mode} image; it must be a single-channel image of class indices")
    if image_size is not None and tuple(image_size) != img.size:
        (iw, ih), (mw, mh) = image_size, img.size
        raise DecodeError(f"the mask is {mw}x{mh} and its image {iw}x{ih}; a mask must have its image's size")
    mask = prep.mask(img)
    bad = (mask < 0) | (mask >= num_classes)
    if ignore_index is not None:
        bad &= mask != ignore_index
    if bad.any():
        values = sorted({int(v) for v in np.unique(mask[bad])[:5]})
        hint = "" if ignore_index is not None else "; --mask-ignore-index N marks unlabelled pixels"
        raise DecodeError(
            f"the mask holds class indices {values} that the model does not have (0..{num_classes - 1}){hint}"
        )
    return mask


__all__ = ["MASK_MODES", "decode_mask"]
