"""Peak memory of ``gradcam-batch audit`` on a large synthetic run output: the streaming reader at work.

    python benchmarks/bench_audit_memory.py                       # 50,000 rows, 64x64 heatmaps, 10 classes
    python benchmarks/bench_audit_memory.py --rows 200000 --view tsne

Writes a run output (``engine/audit/synthetic.py``: Gaussian-blob heatmaps, one class with a
planted corner cluster) into a temp directory, then audits it in a child process that reports its
own peak RSS (``VmHWM``), the RSS after imports, the seconds and what was found. Prints JSON.
The heatmaps alone, as float32, would take rows x size^2 x 4 bytes (800 MB for the default).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# VmHWM (the peak RSS) from /proc: unlike getrusage's ru_maxrss, it starts afresh at exec and does
# not inherit the peak of the process that forked the child.
CHILD = """
import json, sys, time
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
from gradcam_batch.engine.audit import audit
import sklearn.manifold, sklearn.cluster, scipy.sparse.linalg  # imported before the baseline
base = hwm()
args = json.loads(sys.argv[1])
t0 = time.perf_counter()
r = audit(args["out"], args["report"], spray={"view": args["view"]}, max_per_class=args["max_per_class"])
print(json.dumps({
    "peak_rss_mb": round(hwm(), 1),
    "rss_after_imports_mb": round(base, 1),
    "seconds": round(time.perf_counter() - t0, 1),
    "classes": len(r.classes),
    "audited_rows": r.summary["totals"]["audited_rows"],
    "sampled_rows": r.summary["totals"]["sampled_rows"],
    "flagged": [[c.class_index, k.cluster, k.size] for c, k in r.flagged],
}))
"""


def measure(rows: int, classes: int, size: int, view: str, max_per_class: int, work: Path) -> dict:
    out = work / "run"
    per = {c: rows // classes + (1 if c < rows % classes else 0) for c in range(classes)}
    # Written in a child too, so that this process stays small and forks no large image.
    write = (
        "import sys, json\n"
        "from gradcam_batch.engine.audit.synthetic import write_synthetic_run\n"
        "per = {int(k): v for k, v in json.loads(sys.argv[2]).items()}\n"
        f"write_synthetic_run(sys.argv[1], rows_per_class=per, planted={{0: 0.3}}, size={size}, "
        "rows_per_file=10_000, seed=0)\n"
    )
    subprocess.run([sys.executable, "-c", write, str(out), json.dumps(per)], check=True)
    args = {"out": str(out), "report": str(work / "report"), "view": view, "max_per_class": max_per_class}
    res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, check=True)
    result = json.loads(res.stdout.strip().splitlines()[-1])
    result.update(
        rows=rows,
        heatmap=f"{size}x{size}",
        view=view,
        max_per_class=max_per_class,
        output_mb=round(sum(p.stat().st_size for p in out.glob("part-*.parquet")) / 2**20, 1),
        heatmaps_float32_mb=round(rows * size * size * 4 / 2**20, 1),
    )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--view", default="spectral", choices=["spectral", "tsne", "umap"])
    ap.add_argument("--max-per-class", type=int, default=5000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(measure(a.rows, a.classes, a.size, a.view, a.max_per_class, Path(tmp)), indent=1))


if __name__ == "__main__":
    main()
