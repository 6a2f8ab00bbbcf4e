"""Peak memory of ``ParquetSource`` on a file of huge images: the decode budget at work.

    python benchmarks/bench_decode_memory.py --workers 8
    python benchmarks/bench_decode_memory.py --max-image-pixels none --decode-memory none

Writes one Parquet file: ``--huge`` PNGs of ``--side`` x ``--side`` pixels (mostly one flat
colour, so the file stays small while the decoded image is not), ``--small`` small JPEGs and one
PNG whose header claims 30000 x 30000 (a decompression bomb). A child process then streams it
through ``ParquetSource(...).batches(...)`` and reports its own peak RSS (``getrusage``), the
RSS before the first decode, the budget's peak, and which rows decoded. ``--source FILE`` loads
another version of ``engine/job/source.py`` (e.g. the previous commit's) for a before/after
comparison; the new keyword arguments are passed only when given. Prints JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import resource
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from gradcam_batch.engine.job.inputs import discover_inputs, plan_units
from gradcam_batch.engine.job.preprocess import Preprocess

BOMB_SIDE = 30000


def huge_png(side: int) -> bytes:
    """A side x side RGB PNG: a flat background with a few shapes, which deflate squeezes well."""
    img = Image.new("RGB", (side, side), (40, 90, 160))
    draw = ImageDraw.Draw(img)
    draw.rectangle((side // 8, side // 8, side // 2, side // 3), fill=(220, 200, 30))
    draw.ellipse((side // 2, side // 2, side - side // 8, side - side // 10), fill=(200, 40, 60))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR says ``width`` x ``height``: a bomb as far as any header check sees."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


def small_jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def write_input(path: Path, side: int, huge: int, small: int) -> list[str]:
    """Write the file; returns the kind of each row."""
    big = huge_png(side)
    images = [big] * huge + [small_jpeg(i) for i in range(small)] + [png_claiming_size(BOMB_SIDE, BOMB_SIDE)]
    kinds = ["huge"] * huge + ["small"] * small + ["bomb"]
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "kind": kinds}), path)
    return kinds


def _source_module(path: str | None):
    if path is None:
        from gradcam_batch.engine.job import source

        return source
    spec = importlib.util.spec_from_file_location("source_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(args: argparse.Namespace) -> dict:
    """Runs in its own process, so that ru_maxrss is this measurement's alone."""
    src = _source_module(args.source)
    # A source.py from before the split by concern carries its own discovery and Preprocess.
    discover = getattr(src, "discover_inputs", discover_inputs)
    files, _ = discover([args.child])
    units = getattr(src, "plan_units", plan_units)(files, unit_rows=64)
    kwargs = {}
    for name in ("max_image_pixels", "decode_memory"):
        value = getattr(args, name)
        if value != "default":
            kwargs[name] = None if value == "none" else int(value)
    prep = getattr(src, "Preprocess", Preprocess)(resize=256, crop=(224, 224))
    source = src.ParquetSource(files, "image", ["kind"], prep, batch_size=64, workers=args.workers, **kwargs)
    before = _peak_rss_mb()
    t0 = time.perf_counter()
    rows = []
    for batch in source.batches(units):
        kinds = batch.rows.column("kind").to_pylist()
        rows += [{"kind": k, "ok": bool(o), "error": e} for k, o, e in zip(kinds, batch.ok, batch.errors, strict=True)]
    budget = getattr(source, "budget", None)
    return {
        "workers": source.workers,
        "kwargs": kwargs,
        "peak_rss_mb": round(_peak_rss_mb()),
        "rss_before_decode_mb": round(before),
        "budget_peak_mb": round(budget.peak / 2**20) if budget is not None else None,
        "seconds": round(time.perf_counter() - t0, 1),
        "ok": {k: sum(r["ok"] for r in rows if r["kind"] == k) for k in dict.fromkeys(r["kind"] for r in rows)},
        "errors": sorted({r["error"] for r in rows if r["error"]}),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--side", type=int, default=12000)
    p.add_argument("--huge", type=int, default=8)
    p.add_argument("--small", type=int, default=4)
    p.add_argument("--max-image-pixels", default="default", help="pixels, 'none', or 'default'")
    p.add_argument("--decode-memory", default="default", help="bytes, 'none', or 'default'")
    p.add_argument("--source", default=None, help="a source.py to load instead of the installed one")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        result = child(args)
        print(json.dumps(result))
        return result
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "huge.parquet"
        write_input(path, args.side, args.huge, args.small)
        passed = list(argv if argv is not None else sys.argv[1:])
        out = subprocess.run(
            [sys.executable, __file__, *passed, "--child", str(path)], capture_output=True, text=True, check=False
        )
    if out.returncode != 0:
        raise SystemExit(f"the measuring process failed ({out.returncode}):\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["file"] = {"side": args.side, "huge": args.huge, "small": args.small, "bomb": f"{BOMB_SIDE}^2 header"}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
