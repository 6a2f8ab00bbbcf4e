"""Encoded image bytes to the model's input pixels on the host, with Pillow, within a size cap and a memory budget.

- ``decode_image`` reads the size from the header first: an image over ``max_image_pixels`` (a
  JPEG compared after ``draft``) is refused before any pixel is decoded; then it decodes, applies
  the EXIF orientation, converts any mode to RGB (``to_rgb``) and runs the ``Preprocess``. What
  goes wrong is a ``DecodeError`` with the reason, which becomes the row's ``error``.
- ``PixelBudget`` bounds the bytes of full-size decoded pixels that the decode threads hold at
  once, so a file of huge images is decoded a few (or one) at a time.
- ``jpeg_fits_device`` and ``oriented_size`` read headers only: whether a JPEG may go to the
  device decoder, and the size of an image as shown.
- Pillow's process-wide settings that a decode needs (truncated files refused, large blocks) are
  set while a decode runs and put back after it (``pillow_decode_settings``), never at import.

Pillow and numpy alone, no torch. The audit repeats this decode (``engine/audit/images.py``), and
``tests/test_audit_images.py`` holds the copy to ``decode_image`` pixel for pixel.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from collections import deque
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from gradcam_batch.engine.errors import first_line
from gradcam_batch.engine.job.errors import DecodeError
from gradcam_batch.engine.job.preprocess import Preprocess

# Pillow allocates a large image in blocks of this many bytes. Its default, 16 MiB, is under
# glibc's largest dynamic mmap threshold (32 MiB): once one block is freed, later blocks come from
# the malloc arena of the decode thread that asked, and each thread's arena keeps the pages of the
# largest image it decoded, so the decode budget bounds nothing. Blocks over 32 MiB are always
# mmap'd and go back to the system when the image is freed. Small images (one block of their own
# size) are not affected; PILLOW_BLOCK_SIZE, when set, wins.
PILLOW_BLOCK_SIZE = 64 << 20

# The largest image (width x height, after JPEG draft) that is decoded; larger ones become error
# rows. The default is Pillow's own DecompressionBombError threshold (2 x Image.MAX_IMAGE_PIXELS),
# written out so that it does not move with Pillow's version or with a caller that changes
# Image.MAX_IMAGE_PIXELS: lowering it is the user's choice, raising it above Pillow's threshold
# has no effect (Pillow refuses such images when it opens them). Memory is bounded separately,
# by the decode budget, not by this cap.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970
# Bytes of full-size decoded pixels that the decode threads may hold at once (as counted by
# ``decode_memory_estimate``, 8 bytes a pixel for RGB). 1 GiB lets eight threads decode 12 Mpx
# PNGs side by side (96 MB each), two images over ~67 Mpx never overlap, and one over ~134 Mpx
# decodes alone; at the default cap, that one holds at most ~0.7 GiB (Pillow's 4 bytes a pixel).
DEFAULT_DECODE_MEMORY = 1 << 30


class _PillowSettings:
    """Pillow's process-wide settings that a decode needs, set while decodes run.

    Pillow has them as globals only, with no per-image switch: ``ImageFile.LOAD_TRUNCATED_IMAGES``
    off, so that a truncated file is an error row, not a half-grey image; and the block size
    (``PILLOW_BLOCK_SIZE``). The first decode to enter sets them, the last to leave puts the
    process's own values back; importing sets nothing. Code of the same process that reads them
    while a decode runs sees the decode's values.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._users = 0
        self._saved: tuple[bool, int | None] = (False, None)  # the process's values, while held

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                block = Image.core.get_block_size()
                grow = "PILLOW_BLOCK_SIZE" not in os.environ and block < PILLOW_BLOCK_SIZE
                self._saved = (ImageFile.LOAD_TRUNCATED_IMAGES, block if grow else None)
                ImageFile.LOAD_TRUNCATED_IMAGES = False
                if grow:
                    Image.core.set_block_size(PILLOW_BLOCK_SIZE)
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    truncated, block = self._saved
                    ImageFile.LOAD_TRUNCATED_IMAGES = truncated
                    if block is not None:
                        Image.core.set_block_size(block)


_PILLOW = _PillowSettings()


def pillow_decode_settings() -> contextlib.AbstractContextManager[None]:
    """A ``with`` block in which Pillow refuses truncated images and allocates in large blocks.

    Every decode here runs in one; re-entrant and thread-safe (see ``_PillowSettings``).
    """
    return _PILLOW.held()


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB. Alpha is composited over black; 16-bit and float greys are scaled."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        grey = np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return img.convert("RGB")


# -- decode memory ------------------------------------------------------------------------------


class PixelBudget:
    """Bytes of full-size decoded pixels that the decode threads may hold at once.

    ``hold(n)`` waits until ``n`` more bytes fit, holds them for the ``with`` block, then gives
    them back. Requests are served first come, first served, so a stream of small images cannot
    starve a large one; a request larger than the whole budget is served once nothing else is
    held: it runs alone, and never deadlocks. ``peak`` is the most bytes ever held at once.
    """

    def __init__(self, total: int):
        if total < 1:
            raise ValueError("the decode memory budget must be positive")
        self.total = int(total)
        self.held = 0
        self.peak = 0
        self._cond = threading.Condition()
        self._line: deque[object] = deque()  # tickets of the waiting requests, oldest first

    @property
    def waiting(self) -> int:
        """Requests not yet served."""
        with self._cond:
            return len(self._line)

    def acquire(self, n: int) -> None:
        if n < 0:
            raise ValueError("cannot hold a negative number of bytes")
        with self._cond:
            ticket = object()
            self._line.append(ticket)
            try:
                self._cond.wait_for(lambda: self._line[0] is ticket and (self.held == 0 or self.held + n <= self.total))
            finally:
                self._line.remove(ticket)
                self._cond.notify_all()  # the next in line may fit as well (or the line moved)
            self.held += n
            self.peak = max(self.peak, self.held)

    def release(self, n: int) -> None:
        with self._cond:
            self.held -= n
            self._cond.notify_all()

    @contextlib.contextmanager
    def hold(self, n: int) -> Iterator[None]:
        self.acquire(n)
        try:
            yield
        finally:
            self.release(n)


def decode_memory_estimate(mode: str, width: int, height: int) -> int:
    """Bytes a decode of a ``width`` x ``height`` image in Pillow ``mode`` holds at its peak.

    Pillow stores RGB (and every 3-4 band mode) in 4 bytes a pixel. An RGB image may hold one
    full-size copy besides (an EXIF rotation): 8 bytes a pixel. Any other mode is also converted
    to RGB, and alpha is composited over black through a few full-size RGBA images: 16 bytes a
    pixel. An estimate: what matters is that it grows with the pixel count and is not below it.
    """
    return width * height * (8 if mode == "RGB" else 16)


def check_image_size(width: int, height: int, max_image_pixels: int | None) -> None:
    """``DecodeError`` when the image has more than ``max_image_pixels`` pixels (None: no cap)."""
    if max_image_pixels is not None and width * height > max_image_pixels:
        raise DecodeError(
            f"image too large: {width} x {height} = {width * height} pixels exceeds "
            f"--max-image-pixels {max_image_pixels}"
        )


def decode_image(
    data: bytes,
    prep: Preprocess,
    *,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    budget: PixelBudget | None = None,
) -> np.ndarray:
    """Encoded bytes -> (H, W, 3) uint8 after resize and crop; ``DecodeError`` with the reason.

    The size is checked from the header, before any pixel is decoded: an image with more than
    ``max_image_pixels`` pixels (None: only Pillow's own limit) is refused. A JPEG is compared at
    the size libjpeg will decode it to after ``draft``, which can be 1/8 of the stored size. With
    a ``budget``, the full-size pixels are decoded only once the budget holds their bytes, and
    given back once the image is resized.
    """
    if len(data) == 0:
        raise DecodeError("empty image (0 bytes)")
    with pillow_decode_settings():
        try:
            img = Image.open(io.BytesIO(data))  # lazy: reads the header only
            if img.format == "JPEG" and prep.resize is not None:
                # Let libjpeg decode at a reduced scale (still >= the target) instead of full size.
                w, h = img.size
                target = prep.resize_target(w, h)
                if target is not None:
                    img.draft("RGB", target)
            check_image_size(*img.size, max_image_pixels)
            cost = decode_memory_estimate(img.mode, *img.size)
            with budget.hold(cost) if budget is not None else contextlib.nullcontext():
                img.load()
                # In place: without an orientation tag, exif_transpose would return a full-size copy.
                ImageOps.exif_transpose(img, in_place=True)
                img = to_rgb(img)
                out = prep(img)
                del img  # the full-size pixels go before the budget is given back
            return out
        except DecodeError:
            raise
        except UnidentifiedImageError:
            raise DecodeError("cannot identify image format (not an image, or corrupt)") from None
        except Image.DecompressionBombError as exc:
            raise DecodeError(f"image too large: {first_line(exc)}") from None
        except Exception as exc:
            raise DecodeError(f"cannot decode image: {first_line(exc)}") from None


def jpeg_fits_device(data: bytes, max_image_pixels: int | None) -> bool:
    """Whether a JPEG may go to the device decoder, which decodes at full size (no draft).

    One whose header size is over the cap goes to Pillow instead, which decodes it drafted (and
    makes it an error row if even that is over the cap). A header Pillow cannot read goes to the
    device, whose Pillow fallback reports the reason.
    """
    if max_image_pixels is None:
        return True
    with pillow_decode_settings():
        try:
            w, h = Image.open(io.BytesIO(data)).size
        except Image.DecompressionBombError:
            return False
        except Exception:
            return True
        return w * h <= max_image_pixels


def oriented_size(data: bytes) -> tuple[int, int]:
    """(W, H) of an encoded image as shown, from its header: EXIF orientations 5 to 8 swap them.

    ``DecodeError`` when the header cannot be read: a JPEG left for the device decoder reaches here
    before any decode, and a corrupt one must become its row's error, not the run's.
    """
    with pillow_decode_settings():
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise DecodeError("cannot identify image format (not an image, or corrupt)") from None
        except Exception as exc:
            raise DecodeError(f"cannot read the image header: {first_line(exc)}") from None
        w, h = img.size
        with contextlib.suppress(Exception):
            if img.getexif().get(0x0112) in (5, 6, 7, 8):
                w, h = h, w
        return w, h


__all__ = [
    "DEFAULT_DECODE_MEMORY",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "PILLOW_BLOCK_SIZE",
    "PixelBudget",
    "check_image_size",
    "decode_image",
    "decode_memory_estimate",
    "jpeg_fits_device",
    "oriented_size",
    "pillow_decode_settings",
    "to_rgb",
]
