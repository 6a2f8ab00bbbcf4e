"""Pillow's process-wide settings: a decode sets what it needs while it runs, and importing sets nothing.

The decode needs two of Pillow's globals: ``ImageFile.LOAD_TRUNCATED_IMAGES`` off (a truncated
file is an error row, not a half-grey image) and a block size of ``PILLOW_BLOCK_SIZE`` (freed large
images go back to the system). The caller's values come back once the last decode has ended.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image, ImageFile
from run_support import png_bytes

from gradcam_batch.engine.job import decode
from gradcam_batch.engine.job.decode import PILLOW_BLOCK_SIZE, decode_image
from gradcam_batch.engine.job.errors import DecodeError
from gradcam_batch.engine.job.preprocess import Preprocess

PREP = Preprocess(resize=32, crop=32)
JOIN_S = 60  # a liveness guard for threads, far above any real run; never a timing assertion
SMALL_BLOCKS = 1 << 20


def _truncated_jpeg() -> bytes:
    """A JPEG cut in half: its header is whole, its scan data is not."""
    jpeg = png_bytes(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8), "JPEG")
    return jpeg[: len(jpeg) // 2]


@pytest.fixture
def small_blocks(monkeypatch):
    """The process asks Pillow for 1 MiB blocks (its own choice); put back after the test."""
    monkeypatch.delenv("PILLOW_BLOCK_SIZE", raising=False)
    before = Image.core.get_block_size()
    Image.core.set_block_size(SMALL_BLOCKS)
    yield
    Image.core.set_block_size(before)


def _spy_block_size(monkeypatch, seen: list, hold=None):
    """Record Pillow's block size from inside each decode (after the pixels were allocated)."""
    real = decode.to_rgb

    def spy(img):
        seen.append(Image.core.get_block_size())
        if hold is not None:
            hold()
        return real(img)

    monkeypatch.setattr(decode, "to_rgb", spy)


def test_importing_the_package_leaves_pillows_settings_alone():
    code = (
        "import importlib, json, pkgutil\n"
        "from PIL import Image, ImageFile\n"
        "ImageFile.LOAD_TRUNCATED_IMAGES = True\n"
        "Image.core.set_block_size(1 << 20)\n"
        "Image.MAX_IMAGE_PIXELS = 1234567\n"
        "def state():\n"
        "    return [ImageFile.LOAD_TRUNCATED_IMAGES, Image.core.get_block_size(), Image.MAX_IMAGE_PIXELS]\n"
        "before = state()\n"
        "import gradcam_batch, gradcam_batch.cli, gradcam_batch.engine.audit, gradcam_batch.engine.job\n"
        "names = []\n"
        "for pkg in (gradcam_batch.engine.job, gradcam_batch.engine.audit, gradcam_batch.cli):\n"
        "    for m in pkgutil.iter_modules(pkg.__path__):\n"
        "        names.append(importlib.import_module(f'{pkg.__name__}.{m.name}').__name__)\n"
        "print(json.dumps({'before': before, 'after': state(), 'modules': names}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PILLOW_BLOCK_SIZE"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert "gradcam_batch.engine.job.decode" in got["modules"]
    assert "gradcam_batch.engine.job.source" in got["modules"]
    assert got["after"] == got["before"] == [True, 1 << 20, 1234567]


def test_a_truncated_image_is_an_error_even_where_the_process_loads_truncated_images(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    cut = _truncated_jpeg()
    Image.open(io.BytesIO(cut)).load()  # Pillow itself, as the process asked, fills in grey
    with pytest.raises(DecodeError, match="cannot decode image"):
        decode_image(cut, PREP)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the process's own choice, back


def test_the_size_cap_holds_whatever_pillows_own_limit_is(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # Pillow's own bomb check is off
    png = png_bytes(np.zeros((48, 64, 3), np.uint8))
    assert decode_image(png, PREP, max_image_pixels=64 * 48).shape == (32, 32, 3)
    with pytest.raises(DecodeError, match="image too large"):
        decode_image(png, PREP, max_image_pixels=64 * 48 - 1)
    assert Image.MAX_IMAGE_PIXELS is None


def test_a_decode_allocates_in_large_blocks_and_gives_the_block_size_back(monkeypatch, small_blocks):
    seen: list[int] = []
    _spy_block_size(monkeypatch, seen)
    decode_image(png_bytes(np.zeros((40, 40, 3), np.uint8)), PREP)
    assert seen == [PILLOW_BLOCK_SIZE]
    assert Image.core.get_block_size() == SMALL_BLOCKS


def test_pillow_block_size_in_the_environment_wins(monkeypatch, small_blocks):
    monkeypatch.setenv("PILLOW_BLOCK_SIZE", "1m")  # Pillow read it at its import: the 1 MiB in place
    seen: list[int] = []
    _spy_block_size(monkeypatch, seen)
    decode_image(png_bytes(np.zeros((40, 40, 3), np.uint8)), PREP)
    assert seen == [SMALL_BLOCKS] and Image.core.get_block_size() == SMALL_BLOCKS


def test_the_settings_hold_until_the_last_of_concurrent_decodes_ends(monkeypatch, small_blocks):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    inside, release = threading.Event(), threading.Event()

    def hold_the_slow_one():
        if threading.current_thread().name == "slow":
            inside.set()
            release.wait(JOIN_S)

    seen: list[int] = []
    _spy_block_size(monkeypatch, seen, hold_the_slow_one)
    slow = threading.Thread(target=decode_image, args=(png_bytes(np.zeros((40, 40, 3), np.uint8)), PREP), name="slow")
    slow.start()
    try:
        assert inside.wait(JOIN_S), "the slow decode started"
        with pytest.raises(DecodeError):  # a second decode, in and out while the first is inside
            decode_image(_truncated_jpeg(), PREP)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is False and Image.core.get_block_size() == PILLOW_BLOCK_SIZE
    finally:
        release.set()
        slow.join(JOIN_S)
    assert not slow.is_alive()
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True and Image.core.get_block_size() == SMALL_BLOCKS
