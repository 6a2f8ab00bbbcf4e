"""The source under faults: I/O retries, the image-size cap, the decode memory budget, one-unit reads.

Flaky storage is a ``pyarrow.fs.PyFileSystem`` over the local disk that fails a given number of
opens first. The budget tests count the bytes a fake decode holds from inside the held block, so
they check the bound itself, not a timing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import struct
import subprocess
import sys
import threading
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from run_support import bytes_table, png_bytes, write_table

from gradcam_batch.engine.job.decode import PixelBudget, decode_image, decode_memory_estimate, jpeg_fits_device
from gradcam_batch.engine.job.errors import DecodeError, InputReadError
from gradcam_batch.engine.job.inputs import discover_inputs, plan_units
from gradcam_batch.engine.job.preprocess import Preprocess
from gradcam_batch.engine.job.retries import READ_RETRY_DELAY_S, call_with_retries
from gradcam_batch.engine.job.source import ParquetSource

PREP = Preprocess(resize=32, crop=32)
JOIN_S = 60  # a liveness guard for threads, far above any real run; never a timing assertion


class FlakyStorage(pafs.FileSystemHandler):
    """The local disk, except that opening a file named in ``failures`` raises first.

    ``failures[name]`` is how many opens fail before one succeeds; -1 fails every time.
    ``opens`` counts the opens of each name.
    """

    def __init__(self, failures: dict[str, int]):
        self.local = pafs.LocalFileSystem()
        self.failures = dict(failures)
        self.opens: Counter[str] = Counter()
        self.lock = threading.Lock()

    def _open(self, path, opener):
        name = os.path.basename(path)
        with self.lock:
            self.opens[name] += 1
            left = self.failures.get(name, 0)
            if left > 0:
                self.failures[name] = left - 1
        if left != 0:
            raise ConnectionResetError(f"connection reset by peer while reading {name}")
        return opener(path)

    def open_input_stream(self, path):
        return self._open(path, self.local.open_input_stream)

    def open_input_file(self, path):
        return self._open(path, self.local.open_input_file)

    def get_type_name(self):
        return "flaky"

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    # Writing and moving: the source never does.
    def _unused(self, *args, **kwargs):
        raise NotImplementedError

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = _unused
    delete_file = move = copy_file = open_output_stream = open_append_stream = _unused


def _on(storage: FlakyStorage, files):
    fs = pafs.PyFileSystem(storage)
    return [dataclasses.replace(f, filesystem=fs) for f in files]


def _path_dataset(tmp_path: Path, names: list[str]):
    """A Parquet file of relative image paths next to small PNGs (a directory for 'dir.png')."""
    rng = np.random.default_rng(0)
    for name in names:
        if name == "dir.png":
            (tmp_path / name).mkdir()
        elif name != "missing.png":
            (tmp_path / name).write_bytes(png_bytes(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)))
    write_table(tmp_path / "x.parquet", pa.table({"image_path": names}))
    files, _ = discover_inputs([str(tmp_path / "x.parquet")])
    return files


def _decode_all(source, units):
    batches = list(source.batches(units))
    return [e for b in batches for e in b.errors], batches


def header_bomb_png(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims ``width`` x ``height``: what a header check sees as a bomb."""
    data = bytearray(png_bytes(np.zeros((1, 1, 3), np.uint8)))
    at = data.index(b"IHDR")
    data[at + 4 : at + 12] = struct.pack(">II", width, height)
    data[at + 17 : at + 21] = struct.pack(">I", zlib.crc32(bytes(data[at : at + 17])))
    return bytes(data)


# -- retries ----------------------------------------------------------------------------------------


class _Flaky:
    def __init__(self, fail: int, exc: BaseException):
        self.fail, self.exc, self.calls = fail, exc, 0

    def __call__(self):
        self.calls += 1
        if self.calls <= self.fail:
            raise self.exc
        return "data"


def test_retries_transient_errors_with_exponential_backoff():
    sleeps: list[float] = []
    fn = _Flaky(2, ConnectionResetError("reset"))
    assert call_with_retries(fn, attempts=3, delay=0.05, sleep=sleeps.append) == "data"
    assert fn.calls == 3 and sleeps == [0.05, 0.1]

    fn, sleeps = _Flaky(10**6, TimeoutError("timed out")), []
    with pytest.raises(TimeoutError):
        call_with_retries(fn, attempts=6, delay=1.0, max_delay=2.0, sleep=sleeps.append)
    assert fn.calls == 6 and sleeps == [1.0, 2.0, 2.0, 2.0, 2.0]  # capped
    assert READ_RETRY_DELAY_S == 0.05


@pytest.mark.parametrize(
    "exc",
    [
        FileNotFoundError("no such file"),
        PermissionError("denied"),
        OSError("Cannot open for reading: path '/x' is a directory"),
        ValueError("not an I/O error"),
    ],
)
def test_permanent_and_non_io_errors_are_not_retried(exc):
    fn, sleeps = _Flaky(10, exc), []
    with pytest.raises(type(exc)):
        call_with_retries(fn, attempts=3, delay=0.05, sleep=sleeps.append)
    assert fn.calls == 1 and sleeps == []


def test_image_read_retried_until_it_succeeds_or_becomes_an_io_error_row(tmp_path):
    names = ["flaky.png", "dead.png", "missing.png", "dir.png", "fine.png"]
    files = _path_dataset(tmp_path, names)
    storage = FlakyStorage({"flaky.png": 2, "dead.png": -1})
    source = ParquetSource(_on(storage, files), "image_path", [], PREP, workers=2, retry_delay=0)
    errors, batches = _decode_all(source, plan_units(files, 10))
    assert batches[0].ok.tolist() == [True, False, False, False, True]
    assert errors[0] is None and storage.opens["flaky.png"] == 3
    assert errors[1] == (
        "I/O error reading image file dead.png after 3 attempts: connection reset by peer while reading dead.png"
    )
    assert storage.opens["dead.png"] == 3
    # Permanent: one try each, and not called an I/O error.
    assert errors[2] == "image file not found: missing.png" and storage.opens["missing.png"] == 1
    assert errors[3].startswith("cannot read image file dir.png: ") and storage.opens["dir.png"] == 1
    # The retried image is the same image.
    clean = ParquetSource(files, "image_path", [], PREP, workers=1)
    np.testing.assert_array_equal(batches[0].images[0], next(clean.batches(plan_units(files, 10))).images[0])


def test_read_attempts_is_a_setting(tmp_path):
    files = _path_dataset(tmp_path, ["dead.png"])
    storage = FlakyStorage({"dead.png": -1})
    source = ParquetSource(_on(storage, files), "image_path", [], PREP, read_attempts=5, retry_delay=0)
    errors, _ = _decode_all(source, plan_units(files, 10))
    assert (
        errors[0].startswith("I/O error reading image file dead.png after 5 attempts")
        and storage.opens["dead.png"] == 5
    )
    with pytest.raises(ValueError, match="read_attempts"):
        ParquetSource(files, "image_path", [], PREP, read_attempts=0)


@pytest.mark.parametrize("reader", ["batches", "read_unit"])
def test_row_group_read_is_retried_then_raises(tmp_path, reader):
    write_table(tmp_path / "x.parquet", bytes_table(6), row_group_size=4)
    files, _ = discover_inputs([str(tmp_path / "x.parquet")])
    units = plan_units(files, 3)  # 0-3, 3-4 | 4-6

    def read(source):
        if reader == "batches":
            return list(source.batches(units))
        return [b for u in units for b in source.read_unit(u)]

    storage = FlakyStorage({"x.parquet": 2})
    ok = read(ParquetSource(_on(storage, files), "image", [], PREP, workers=1, retry_delay=0))
    assert [b.ok.all() for b in ok] == [True] * len(ok) and sum(b.num_rows for b in ok) == 6

    storage = FlakyStorage({"x.parquet": -1})
    with pytest.raises(InputReadError, match=r"cannot read rows 0-\d \(row group 0\) of .*x\.parquet after 3 attempts"):
        read(ParquetSource(_on(storage, files), "image", [], PREP, workers=1, retry_delay=0))
    assert issubclass(InputReadError, OSError) and storage.opens["x.parquet"] == 3


def test_unit_rows_resume_at_the_unit_a_failed_pass_did_not_finish(tmp_path, monkeypatch):
    """A pass over a row group that breaks mid-stream is tried again from the first unit not yet
    yielded: no unit twice, none lost; a pass that keeps failing raises InputReadError."""
    write_table(tmp_path / "x.parquet", bytes_table(10), row_group_size=10)
    files, _ = discover_inputs([str(tmp_path / "x.parquet")])
    units = plan_units(files, 3)  # 0-3, 3-6, 6-9, 9-10
    base = pq.ParquetFile
    breaks = {"left": 1}

    class Breaking(base):
        def iter_batches(self, *args, **kwargs):
            for i, rb in enumerate(super().iter_batches(*args, **kwargs)):
                if i == 2 and breaks["left"]:
                    breaks["left"] -= 1
                    raise ConnectionResetError("connection reset by peer")
                yield rb

    monkeypatch.setattr(pq, "ParquetFile", Breaking)
    source = ParquetSource(files, "image", [], PREP, workers=1, retry_delay=0)
    got = list(source.unit_rows([units[0], units[2], units[3]], chunk_rows=2))
    assert [u.key for u, _ in got] == [units[0].key, units[2].key, units[3].key] and breaks["left"] == 0
    full = pq.read_table(tmp_path / "x.parquet").column("image").to_pylist()
    assert [t.column("image").to_pylist() for _, t in got] == [full[0:3], full[6:9], full[9:10]]

    breaks["left"] = 99
    with pytest.raises(InputReadError, match=r"cannot read rows 6-9 \(row group 0\) of .*x\.parquet after 3 attempts"):
        list(source.unit_rows([units[0], units[2]], chunk_rows=2))


# -- the size cap ---------------------------------------------------------------------------------


def test_size_cap_refuses_large_images_before_decoding():
    png = png_bytes(np.zeros((48, 64, 3), np.uint8))
    assert decode_image(png, PREP, max_image_pixels=64 * 48).shape == (32, 32, 3)
    with pytest.raises(DecodeError) as err:
        decode_image(png, PREP, max_image_pixels=64 * 48 - 1)
    assert str(err.value) == "image too large: 64 x 48 = 3072 pixels exceeds --max-image-pixels 3071"


def test_size_cap_compares_a_jpeg_after_draft():
    jpeg = png_bytes(np.full((256, 256, 3), 128, np.uint8), "JPEG")
    # resize 32: libjpeg decodes at 1/8 scale, 32 x 32 = 1024 pixels.
    assert decode_image(jpeg, PREP, max_image_pixels=2000).shape == (32, 32, 3)
    with pytest.raises(DecodeError, match="image too large: 256 x 256 = 65536 pixels"):
        decode_image(png_bytes(np.full((256, 256, 3), 128, np.uint8)), PREP, max_image_pixels=2000)
    # Without a resize there is no draft: the stored size counts.
    with pytest.raises(DecodeError, match="image too large: 256 x 256"):
        decode_image(jpeg, Preprocess(resize=None, crop=32), max_image_pixels=2000)


@pytest.mark.parametrize("cap", [None, 10**12, 1000])
def test_bombs_stay_error_rows(cap):
    bomb = header_bomb_png(30000, 30000)
    with pytest.raises(DecodeError, match="image too large"):
        decode_image(bomb, PREP, max_image_pixels=cap)


def test_size_cap_in_the_source_makes_error_rows(tmp_path):
    small, big = np.zeros((20, 20, 3), np.uint8), np.zeros((60, 60, 3), np.uint8)
    images = [png_bytes(small), png_bytes(big), header_bomb_png(30000, 30000), png_bytes(small)]
    write_table(tmp_path / "x.parquet", pa.table({"image": pa.array(images, pa.binary())}))
    files, _ = discover_inputs([str(tmp_path / "x.parquet")])
    source = ParquetSource(files, "image", [], PREP, workers=2, max_image_pixels=1000)
    errors, batches = _decode_all(source, plan_units(files, 10))
    assert batches[0].ok.tolist() == [True, False, False, True] and batches[0].images.shape[0] == 2
    assert errors[1] == "image too large: 60 x 60 = 3600 pixels exceeds --max-image-pixels 1000"
    assert errors[2].startswith("image too large")
    with pytest.raises(ValueError, match="max_image_pixels"):
        ParquetSource(files, "image", [], PREP, max_image_pixels=0)


def test_device_jpeg_route_respects_the_cap(tmp_path):
    big = png_bytes(np.full((256, 256, 3), 90, np.uint8), "JPEG")
    small = png_bytes(np.full((40, 40, 3), 90, np.uint8), "JPEG")
    assert jpeg_fits_device(small, 2000) and not jpeg_fits_device(big, 2000)
    assert jpeg_fits_device(big, None) and jpeg_fits_device(b"\xff\xd8\xff not really", 2000)
    assert not jpeg_fits_device(header_bomb_png(30000, 30000), 10**12)  # Pillow's own limit
    write_table(tmp_path / "x.parquet", pa.table({"image": pa.array([small, big], pa.binary())}))
    files, _ = discover_inputs([str(tmp_path / "x.parquet")])
    source = ParquetSource(files, "image", [], PREP, device_jpeg=True, max_image_pixels=2000)
    batch = next(source.batches(plan_units(files, 10)))
    # The small JPEG waits for the device decoder; the big one was decoded here, drafted, and fits.
    assert batch.ok.tolist() == [True, True] and [slot for slot, _ in batch.jpegs] == [0]


# -- device JPEG decode: its fallbacks are said, an out-of-memory is not a bad image --------------------


def _jpegs(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    return [png_bytes((rng.random((40, 48, 3)) * 255).astype(np.uint8), "JPEG", quality=90) for _ in range(n)]


class FailingDecoder:
    """Stands in for torchvision's ``decode_jpeg``: raises ``batch`` for a list, ``one`` for image ``bad``."""

    def __init__(self, real, *, batch: Exception | None = None, one: Exception | None = None, bad: int = -1):
        self.real, self.batch, self.one, self.bad = real, batch, one, bad
        self.calls: list[str] = []

    def __call__(self, data, **kw):
        if isinstance(data, list):
            self.calls.append("batch")
            if self.batch is not None:
                raise self.batch
            return self.real(data, **kw)
        self.calls.append("one")
        if self.one is not None and self._index(data) == self.bad:
            raise self.one
        return self.real(data, **kw)

    def _index(self, data):
        return self.datas.index(bytes(data.numpy()))


def _decode_with(monkeypatch, decoder: FailingDecoder, jpegs: list[bytes]):
    tvio = pytest.importorskip("torchvision.io")
    import torch

    from gradcam_batch.engine.job.device_jpeg import decode_jpegs_on_device

    decoder.datas = jpegs
    monkeypatch.setattr(tvio, "decode_jpeg", decoder)
    said: list[tuple[str, str]] = []
    images, errors = decode_jpegs_on_device(jpegs, PREP, torch.device("cpu"), warn=lambda k, m: said.append((k, m)))
    return images, errors, said


def test_an_out_of_memory_decodes_the_batch_on_the_host_and_says_so(monkeypatch):
    tvio = pytest.importorskip("torchvision.io")
    import torch

    jpegs = _jpegs(3)
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    decoder = FailingDecoder(tvio.decode_jpeg, batch=oom)
    images, errors, said = _decode_with(monkeypatch, decoder, jpegs)
    assert decoder.calls == ["batch"]  # no image is retried on a device that has no memory
    assert errors == [None] * 3  # not a bad image: every one decoded, on the host
    for img, data in zip(images, jpegs, strict=True):
        np.testing.assert_array_equal(img.numpy(), decode_image(data, PREP))  # Pillow's own output
    assert [k for k, _ in said] == ["jpeg-oom"]
    assert "out of memory" in said[0][1] and "Pillow" in said[0][1] and "--batch-size" in said[0][1]


@pytest.mark.gpu
def test_a_real_device_out_of_memory_decodes_on_the_host_and_says_so():
    """The real condition behind the mock above: the CUDA caching allocator capped at a few kilobytes, so the
    nvJPEG output (or its workspace) cannot be allocated; the batch still decodes, on the host, and says why."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("torchvision.io")
    from gradcam_batch.engine.job.device_jpeg import decode_jpegs_on_device

    rng = np.random.default_rng(0)
    jpegs = [png_bytes((rng.random((512, 512, 3)) * 255).astype(np.uint8), "JPEG", quality=90) for _ in range(2)]
    device = torch.device("cuda")
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    said: list[tuple[str, str]] = []
    torch.cuda.set_per_process_memory_fraction(4096 / total, device)  # 4 KiB: not one 512x512 RGB image
    try:
        decode_jpegs_on_device(jpegs, PREP, device, warn=lambda k, m: said.append((k, m)))
    except torch.OutOfMemoryError:
        pass  # under this cap the host-decoded pixels cannot go back to the device either; what was said first counts
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    kinds = [k for k, _ in said]
    assert kinds[:1] == ["jpeg-oom"], said  # said as an out-of-memory, never as a refused batch or a bad image
    assert "jpeg-image" not in kinds and "jpeg-batch" not in kinds
    assert "out of memory" in said[0][1] and "--batch-size" in said[0][1]


def test_a_refused_batch_and_a_refused_image_are_said_with_their_cause(monkeypatch):
    tvio = pytest.importorskip("torchvision.io")
    jpegs = _jpegs(3)
    decoder = FailingDecoder(
        tvio.decode_jpeg, batch=RuntimeError("nvjpeg batched decode: unsupported"), one=RuntimeError("CMYK"), bad=1
    )
    images, errors, said = _decode_with(monkeypatch, decoder, jpegs)
    assert decoder.calls == ["batch", "one", "one", "one"]
    assert errors == [None] * 3 and all(img is not None for img in images)
    np.testing.assert_array_equal(images[1].numpy(), decode_image(jpegs[1], PREP))  # Pillow took image 1
    assert [k for k, _ in said] == ["jpeg-batch", "jpeg-image"]
    assert "unsupported" in said[0][1] and "CMYK" in said[1][1]


def test_an_out_of_memory_on_one_image_sends_the_rest_to_the_host(monkeypatch):
    tvio = pytest.importorskip("torchvision.io")
    import torch

    jpegs = _jpegs(4)
    decoder = FailingDecoder(
        tvio.decode_jpeg, batch=RuntimeError("batch refused"), one=torch.OutOfMemoryError("out of memory"), bad=1
    )
    images, errors, said = _decode_with(monkeypatch, decoder, jpegs)
    assert decoder.calls == ["batch", "one", "one"]  # images 2 and 3 are not tried on the device
    assert errors == [None] * 4 and all(img is not None for img in images)
    assert [k for k, _ in said] == ["jpeg-batch", "jpeg-oom"]


def test_a_run_says_each_fallback_once(tmp_path, monkeypatch):
    """Three batches meet an out-of-memory: one warning line, and the rows Pillow's path gives."""
    import warnings

    tvio = pytest.importorskip("torchvision.io")
    import torch
    from run_support import base_args, invoke, read_output

    from gradcam_batch.engine.job.config import RunWarning

    inp = write_table(tmp_path / "in.parquet", pa.table({"image": pa.array(_jpegs(6), pa.binary())}))
    monkeypatch.setattr(tvio, "decode_jpeg", FailingDecoder(tvio.decode_jpeg, batch=torch.OutOfMemoryError("oom")))
    args = ["run", str(inp), *base_args(tmp_path, tmp_path / "dev"), "--batch-size", "2", "--device-jpeg"]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        res = invoke(args)
    assert res.exit_code == 0, res.output
    said = [str(w.message) for w in record if issubclass(w.category, RunWarning)]
    assert len(said) == 1 and "out of memory" in said[0]
    res = invoke(["run", str(inp), *base_args(tmp_path, tmp_path / "host"), "--batch-size", "2"])
    dev, host = read_output(tmp_path / "dev"), read_output(tmp_path / "host")
    assert dev["status"].to_pylist() == ["ok"] * 6
    np.testing.assert_array_equal(dev["score"].to_numpy(), host["score"].to_numpy())


# -- the decode budget ------------------------------------------------------------------------------


def _start(target, *args) -> threading.Thread:
    t = threading.Thread(target=target, args=args, daemon=True)
    t.start()
    return t


def _until(condition, what: str) -> None:
    """Wait for another thread to get somewhere (a liveness guard, not a timing assertion)."""
    tick = threading.Event()
    for _ in range(JOIN_S * 1000):
        if condition():
            return
        tick.wait(0.001)
    raise AssertionError(f"never happened: {what}")


def test_budget_request_larger_than_the_budget_runs_alone():
    budget = PixelBudget(10)
    budget.acquire(6)
    got = threading.Event()

    def big():
        with budget.hold(25):
            got.set()
            assert budget.held == 25

    t = _start(big)
    _until(lambda: budget.waiting == 1, "the big request queues")
    assert not got.is_set() and budget.held == 6
    budget.release(6)
    t.join(JOIN_S)
    assert got.is_set() and not t.is_alive() and budget.held == 0 and budget.peak == 25


def test_budget_serves_first_come_first_served():
    budget = PixelBudget(10)
    budget.acquire(6)
    order: list[str] = []
    release_big = threading.Event()

    def take(name, n, hold_until=None):
        with budget.hold(n):
            order.append(name)
            if hold_until is not None:
                hold_until.wait(JOIN_S)

    big = _start(take, "big", 8, release_big)
    _until(lambda: budget.waiting == 1, "the big request queues")
    small = _start(take, "small", 3)  # 6 + 3 would fit now, but it waits behind "big"
    _until(lambda: budget.waiting == 2, "the small request queues")
    assert order == [] and budget.held == 6
    budget.release(6)
    _until(lambda: order == ["big"], "the big request is served")
    # 8 + 3 > 10: the small one waits until the big one is done.
    assert budget.waiting == 1 and budget.held == 8
    release_big.set()
    big.join(JOIN_S)
    small.join(JOIN_S)
    assert order == ["big", "small"] and budget.held == 0 and budget.waiting == 0


def test_budget_bounds_bytes_held_by_concurrent_decodes():
    total = 100
    budget = PixelBudget(total)
    lock = threading.Lock()
    in_use = {"bytes": 0, "max": 0, "violations": []}
    rng = random.Random(0)
    sizes = [rng.choice([1, 5, 20, 40, 60, 99, 100, 150]) for _ in range(400)]

    def fake_decode(chunk):
        for n in chunk:
            with budget.hold(n):
                with lock:
                    in_use["bytes"] += n
                    now = in_use["bytes"]
                    in_use["max"] = max(in_use["max"], now)
                    if now > total and now != n:  # over the budget, yet not alone
                        in_use["violations"].append(now)
                for _ in range(rng.randint(0, 50)):  # "decode": let other threads run
                    pass
                with lock:
                    in_use["bytes"] -= n

    threads = [_start(fake_decode, sizes[i::8]) for i in range(8)]
    for t in threads:
        t.join(JOIN_S)
    assert not any(t.is_alive() for t in threads), "a decode thread never finished (deadlock)"
    assert in_use["violations"] == []
    assert in_use["bytes"] == 0 and budget.held == 0 and budget.waiting == 0
    assert budget.peak == in_use["max"] and 100 <= budget.peak <= 150


def test_budget_gives_bytes_back_when_the_decode_fails():
    budget = PixelBudget(10)
    with pytest.raises(RuntimeError), budget.hold(7):
        raise RuntimeError("decode failed")
    assert budget.held == 0
    with pytest.raises(ValueError):
        PixelBudget(0)
    with pytest.raises(ValueError):
        budget.acquire(-1)


def test_decode_memory_estimate_counts_pillow_buffers():
    assert decode_memory_estimate("RGB", 100, 50) == 100 * 50 * 8
    assert decode_memory_estimate("RGBA", 100, 50) == decode_memory_estimate("L", 100, 50) == 100 * 50 * 16


@pytest.mark.parametrize("decode_memory", [1, 70_000, None])
def test_source_under_a_budget_decodes_the_same_images(tmp_path, decode_memory):
    rng = np.random.default_rng(0)
    images = [png_bytes(rng.integers(0, 255, (64, 64 + i, 3), dtype=np.uint8)) for i in range(12)]
    write_table(tmp_path / "x.parquet", pa.table({"image": pa.array(images, pa.binary())}))
    files, _ = discover_inputs([str(tmp_path / "x.parquet")])
    units = plan_units(files, 5)
    reference = [b.images for b in ParquetSource(files, "image", [], PREP, workers=1).batches(units)]
    source = ParquetSource(files, "image", [], PREP, workers=4, decode_memory=decode_memory)
    got = [b.images for b in source.batches(units)]
    for a, b in zip(reference, got, strict=True):
        np.testing.assert_array_equal(a, b)
    if decode_memory is None:
        assert source.budget is None
        return
    largest = decode_memory_estimate("RGB", 64 + 11, 64)
    # Every image costs 32-38 KB: a budget of 1 byte runs them one at a time, 70 KB at most two.
    assert source.budget.held == 0
    assert source.budget.peak <= max(decode_memory, largest)


# -- one unit at a time -----------------------------------------------------------------------------


def test_read_unit_yields_what_batches_yields(tmp_path):
    table = bytes_table(23).append_column("row", pa.array(range(23)))
    write_table(tmp_path / "x.parquet", table, row_group_size=10)  # row groups 10, 10, 3
    files, _ = discover_inputs([str(tmp_path / "x.parquet")])
    units = plan_units(files, 4)  # 0-4 4-8 8-10 | 10-14 14-18 18-20 | 20-23
    source = ParquetSource(files, "image", ["row"], PREP, batch_size=3, workers=2)
    for unit in units:
        one = list(source.read_unit(unit))
        ref = list(source.batches([unit]))
        assert [(b.unit, b.num_rows, b.unit_done) for b in one] == [(b.unit, b.num_rows, b.unit_done) for b in ref]
        for a, b in zip(one, ref, strict=True):
            assert a.rows.equals(b.rows) and a.errors == b.errors
            np.testing.assert_array_equal(a.row_index, b.row_index)
            np.testing.assert_array_equal(a.images, b.images)
        assert [r for b in one for r in b.rows.column("row").to_pylist()] == list(range(unit.start, unit.stop))
    # A few units of one row group in any order are read once, in the given order.
    picked = [units[5], units[3]]
    got = [r for b in source.batches(picked) for r in b.rows.column("row").to_pylist()]
    assert got == [18, 19, 10, 11, 12, 13]


def test_read_unit_rejects_rows_outside_their_row_group(tmp_path):
    write_table(tmp_path / "x.parquet", bytes_table(6), row_group_size=4)
    files, _ = discover_inputs([str(tmp_path / "x.parquet")])
    bad = dataclasses.replace(plan_units(files, 4)[0], stop=6)
    with pytest.raises(ValueError, match="not inside row group 0"):
        list(ParquetSource(files, "image", [], PREP).read_unit(bad))


# -- huge images, measured ----------------------------------------------------------------------------


@pytest.mark.slow
def test_huge_pngs_decode_within_two_gigabytes():
    """8 PNGs of 12000 x 12000 (144 Mpx) and small JPEGs, 8 workers, default settings."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decode_memory.py"
    out = subprocess.run([sys.executable, str(script), "--workers", "8"], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout[out.stdout.index("{") :])
    assert result["ok"] == {"huge": 8, "small": 4, "bomb": 0}
    assert all(e.startswith("image too large") for e in result["errors"])
    assert result["peak_rss_mb"] < 2048, result


def test_crop_given_as_one_int_decodes_in_the_source(tmp_path):
    # The CLI's "--crop 224": every image used to become "cannot unpack non-iterable int object".
    write_table(tmp_path / "x.parquet", bytes_table(3, size=40))
    files, _ = discover_inputs([str(tmp_path / "x.parquet")])
    source = ParquetSource(files, "image", [], Preprocess(resize=36, crop=32), workers=1)
    batch = next(source.batches(plan_units(files, 10)))
    assert batch.ok.all() and batch.images.shape == (3, 32, 32, 3) and batch.errors == [None] * 3
