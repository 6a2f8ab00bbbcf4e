"""Wall-clock time of the whole ``gradcam-batch audit`` on a large synthetic run output.

    python benchmarks/bench_audit_time.py                         # 50,000 rows in 10 classes, --no-overlays
    python benchmarks/bench_audit_time.py --classes 1000          # 50,000 rows in 1,000 classes
    python benchmarks/bench_audit_time.py --images                # with input images and a manifest: overlays
    python benchmarks/bench_audit_time.py --work audit-work --keep    # reuse (or keep) the run between calls

Writes a run output (``engine/audit/synthetic.py``: Gaussian-blob 64x64 heatmaps, class 0 with a
planted corner cluster), and with ``--images`` also an input Parquet file of 64x64 JPEGs and a
``manifest.json`` that points at it, as a real run leaves them. Then runs the CLI,
``gradcam-batch audit OUT -o REPORT``, in a child process: the time is everything a user waits for
(imports, both passes, SpRAy, the report and ``summary.json`` written). The child reports its own
peak RSS (``VmHWM``). Prints JSON with the load average before and after, since the machine may be
shared.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, sys, time
t0 = time.perf_counter()
from gradcam_batch.cli import cli
try:
    cli(sys.argv[1:], prog_name="gradcam-batch", standalone_mode=False)
finally:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
    print(json.dumps({"wall_s": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(hwm, 1),
                      "torch_imported": "torch" in sys.modules}))
"""


def write_run(out: Path, rows: int, classes: int, size: int, images: bool) -> None:
    """The part files (and with ``images``, the inputs and a manifest), written in a child process."""
    per = {c: rows // classes + (1 if c < rows % classes else 0) for c in range(classes)}
    code = (
        "import sys, json\n"
        "from gradcam_batch.engine.audit.synthetic import write_synthetic_run\n"
        "per = {int(k): v for k, v in json.loads(sys.argv[2]).items()}\n"
        f"write_synthetic_run(sys.argv[1], rows_per_class=per, planted={{0: 0.3}}, size={size}, "
        "rows_per_file=10_000, seed=0)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(out), json.dumps(per)], check=True)
    if images:
        write_inputs(out, size)


def write_inputs(out: Path, size: int) -> None:
    """An input file of ``size`` x ``size`` JPEGs, one per output row (``image_id`` = the row's id), and a manifest."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from gradcam_batch.engine.job.sink import Manifest

    parts = sorted(out.glob("part-*.parquet"))
    ids = pq.read_table(parts, columns=["id"])["id"].to_pylist()
    rng = np.random.default_rng(0)
    inp = out.parent / "inputs" / "images.parquet"
    inp.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("image_id", pa.string()), ("image", pa.binary())])
    with pq.ParquetWriter(inp, schema) as w:
        for a in range(0, len(ids), 2000):
            chunk = ids[a : a + 2000]
            blobs = []
            for _ in chunk:
                base = rng.integers(40, 200, 3).astype(np.uint8)
                px = np.broadcast_to(base, (size, size, 3)).copy()
                y, x = rng.integers(8, size - 24, 2)
                px[y : y + 16, x : x + 16] = 255 - base
                buf = io.BytesIO()
                Image.fromarray(px).save(buf, format="JPEG", quality=85)
                blobs.append(buf.getvalue())
            w.write_table(pa.table({"image_id": chunk, "image": pa.array(blobs, pa.binary())}, schema=schema))
    config = {
        "files": [str(inp)],
        "inputs": [str(inp)],
        "image_column": "image",
        "id_column": "image_id",
        "resize": size,
        "crop": [size, size],
        "interpolation": "bilinear",
        "method": "gradcam",
        "methods": ["gradcam"],
        "model": "synthetic",
    }
    manifest = Manifest.new(out, fingerprint="synthetic", config=config, versions={})
    for p in parts:
        n = pq.ParquetFile(p).metadata.num_rows
        manifest.commit_file(p.name, rows=n, images=n, errors=0, units=[p.stem])
    manifest.data["status"] = "complete"
    manifest.save()


def measure(out: Path, report: Path, extra: list[str]) -> dict:
    args = ["audit", str(out), "-o", str(report), *extra]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"audit failed:\n{res.stdout}\n{res.stderr}")
    lines = res.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    summary = json.loads((report / "summary.json").read_text())
    views: dict[str, int] = {}
    for c in summary["classes"]:
        views[c["view"]] = views.get(c["view"], 0) + 1
    result.update(
        process_s=round(wall, 2),
        audit_seconds=summary["seconds"],
        load_before=round(load0, 2),
        load_after=round(os.getloadavg()[0], 2),
        classes=summary["totals"]["classes"],
        audited_rows=summary["totals"]["audited_rows"],
        flagged_clusters=summary["totals"]["flagged_clusters"],
        views=views,
        report_mb=round((report / "index.html").stat().st_size / 2**20, 2),
        args=args[3:],
        cli_output=lines[:-1][:4],
    )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--images", action="store_true", help="write input images and a manifest; audit with overlays")
    ap.add_argument("--work", type=Path, help="where the run goes (reused when it is there); default a temp dir")
    ap.add_argument("--keep", action="store_true", help="keep --work afterwards")
    ap.add_argument("audit_args", nargs="*", help="more audit options, after --, e.g. -- --view tsne")
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-audit-"))
    try:
        out = work / "run"
        if not out.exists():
            write_run(out, a.rows, a.classes, a.size, a.images)
        extra = list(a.audit_args) + ([] if a.images else ["--no-overlays"])
        result = measure(out, work / "report", extra)
        result.update(rows=a.rows, heatmap=f"{a.size}x{a.size}", images=a.images)
        print(json.dumps(result, indent=1))
    finally:
        if not (a.work and a.keep):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
