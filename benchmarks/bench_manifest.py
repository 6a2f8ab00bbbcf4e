"""Bytes the manifest costs over a long run: the commit log against a rewrite per commit.

Opens and commits the part files of a run of ``--units`` input units (``--units-per-file`` each)
through ``Manifest.note_open`` and ``Manifest.commit_file``, as the writer does, and counts the
manifest bytes written. ``--old REF`` runs the same commits through the sink of a git revision
(the manifest that rewrote ``manifest.json`` on every commit) and counts that too, side by side::

    python benchmarks/bench_manifest.py --units 20000 --old b06807e
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gradcam_batch.engine.job.sink import Manifest

REPO = Path(__file__).resolve().parents[1]


def _config() -> dict:
    # What a real run records: every RunConfig field and the resolved inputs.
    return {"inputs": ["data/"], "files": [f"data/train-{i:05d}.parquet" for i in range(64)], "top_k": 1}


def _commits(units: int, per_file: int):
    for f, start in enumerate(range(0, units, per_file)):
        keys = [
            f"train-{u // 8:05d}.parquet:{(u % 8) * 4096}-{(u % 8 + 1) * 4096}" for u in range(start, start + per_file)
        ]
        yield f"part-{f:05d}.parquet", keys


def measure_new(units: int, per_file: int, out: Path) -> dict:
    m = Manifest.new(out, fingerprint="f" * 16, config=_config(), versions={})
    m.save()
    t0 = time.perf_counter()
    for name, keys in _commits(units, per_file):
        m.note_open(name)  # the writer names each part file in the log before creating it
        m.commit_file(name, rows=4096 * per_file, images=4096 * per_file, errors=0, units=keys)
    m.save()  # the end of the run folds the log into manifest.json
    return {"bytes": m.bytes_written, "seconds": round(time.perf_counter() - t0, 2)}


def measure_old(ref: str, units: int, per_file: int, out: Path) -> dict:
    """The same commits through the manifest of ``ref``, whose every commit rewrote manifest.json.

    Its writer is replaced by one that measures the bytes it would write (the same JSON with
    ``indent=2`` and a newline) without writing them: thousands of growing rewrites, each fsynced,
    take hours, and that changes no byte count. The size is measured exactly at 200 evenly spaced
    commits and interpolated in between (each commit adds one file entry of the same shape).
    """
    src = subprocess.run(["git", "show", f"{ref}:engine/sink.py"], cwd=REPO, capture_output=True, text=True, check=True)
    path = out.parent / "old_sink.py"
    path.write_text(src.stdout)
    spec = importlib.util.spec_from_file_location("old_sink", path)
    old = importlib.util.module_from_spec(spec)
    sys.modules["old_sink"] = old  # dataclasses look their module up
    spec.loader.exec_module(old)
    sizes: dict[int, int] = {}
    commit = [0]
    every = max(1, (units // per_file) // 200)

    def count(path: Path, data: dict) -> None:
        # json.dump with indent runs the pure-Python encoder: serialize every `every`-th rewrite only.
        if commit[0] % every == 0 or commit[0] == units // per_file:
            sizes[commit[0]] = len(json.dumps(data, indent=2, sort_keys=False).encode()) + 1

    old.atomic_write_json = count
    m = old.Manifest.new(out, fingerprint="f" * 16, config=_config(), versions={})
    m.save()
    t0 = time.perf_counter()
    for name, keys in _commits(units, per_file):
        commit[0] += 1
        m.commit_file(name, rows=4096 * per_file, images=4096 * per_file, errors=0, units=keys)
    # Each commit rewrote the whole file: the sum of its sizes after every commit. Between two
    # measured commits a size grows by the same entry each time, so the sum in between is linear.
    ks = sorted(k for k in sizes if k > 0)
    total = sizes[0] + sizes[ks[0]]
    for a, b in zip(ks[:-1], ks[1:], strict=True):
        total += sum(round(sizes[a] + (sizes[b] - sizes[a]) * (k - a) / (b - a)) for k in range(a + 1, b + 1))
    total += sum(round(sizes[ks[0]] * k / ks[0]) for k in range(1, ks[0]))  # before the first sample
    return {
        "bytes": int(total),
        "measured_rewrites": len(sizes),
        "last_manifest_bytes": sizes[ks[-1]],
        "seconds": round(time.perf_counter() - t0, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", type=int, default=20_000)
    ap.add_argument("--units-per-file", type=int, default=2)
    ap.add_argument("--old", metavar="REF", help="also measure the sink of this git revision")
    ap.add_argument("--tmp", help="directory for the scratch output (e.g. a tmpfs)")
    args = ap.parse_args()
    result = {"units": args.units, "units_per_file": args.units_per_file, "commits": args.units // args.units_per_file}
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        (Path(d) / "new").mkdir()
        result["log"] = measure_new(args.units, args.units_per_file, Path(d) / "new")
        if args.old:
            (Path(d) / "old").mkdir()
            result["rewrite"] = measure_old(args.old, args.units, args.units_per_file, Path(d) / "old")
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
