"""Peak memory of the ``run --ray`` driver on a run whose units finish out of order.

    python benchmarks/bench_ray_driver_memory.py --rows 960 --slow-seconds 0.3

Writes one Parquet file of ``--rows`` demo images in one row group, and a model factory: the demo
CNN, except that the first actor to load it sleeps ``--slow-seconds`` in every forward (a slow
GPU or node). Two actors share the batches, so the slow one holds pieces of units long after the
fast one has finished the units around them: the units finish out of order. The output rows are
made heavy (float16 heatmaps of ``--heatmap`` x ``--heatmap``, top-3) so that rows held on the
driver show in its memory.

Runs ``run_ray`` in this process on a local Ray of ``--cpus`` logical CPUs and samples, every
20 ms, its resident memory (in all; its own, anonymous: heap and Arrow buffers; and the shared
memory of Ray's object store that it mapped) and the bytes live in Arrow's memory pool. Prints
JSON: the peaks, the values just before the run, the most units the driver held (when the runner
reports it), the output's size, whether the part files hold the rows in input order, and the wall
time. For the figures before a change to ``engine/job/ray_runner.py``, run it with the earlier
version of that file in place.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

FACTORY = """
import os, time
import torch
from gradcam_batch.engine.demo.synthetic import ShapesCNN

SLOW = {slow!r}
LOCK = {lock!r}
DRIVER = {driver}


class Slow(ShapesCNN):
    def forward(self, x):
        time.sleep(SLOW)
        return super().forward(x)


def make():
    if os.getpid() != DRIVER:
        try:
            os.close(os.open(LOCK, os.O_CREAT | os.O_EXCL))  # the first actor to get here is slow
            return Slow()
        except FileExistsError:
            pass
    return ShapesCNN()
"""


def rss() -> dict[str, int]:
    """This process's resident memory in bytes: in all, its own (anonymous: heap, Arrow buffers), and
    shared memory (Ray's object store pages that it has mapped and touched)."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssShmem"):
                out[key] = int(value.split()[0]) << 10
    out["ArrowAllocated"] = pa.total_allocated_bytes()  # live in Arrow's pool (freed memory it keeps is not)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=960)
    ap.add_argument("--slow-seconds", type=float, default=0.3)
    ap.add_argument("--heatmap", type=int, default=256)
    ap.add_argument("--rows-per-file", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--cpus", type=int, default=4)
    args = ap.parse_args()

    import logging

    import ray

    from gradcam_batch.engine.demo import assets
    from gradcam_batch.engine.job import ray_runner
    from gradcam_batch.engine.job.config import RunConfig

    tmp = Path(tempfile.mkdtemp(prefix="bench_ray_driver_"))
    sample = pq.read_table(assets.SAMPLE)
    reps = -(-args.rows // sample.num_rows)
    table = pa.concat_tables([sample] * reps).slice(0, args.rows)
    pq.write_table(table, tmp / "in.parquet", row_group_size=1 << 20)
    factory = tmp / "slow_model.py"
    factory.write_text(FACTORY.format(slow=args.slow_seconds, lock=str(tmp / "slow.lock"), driver=os.getpid()))

    held = []
    assembler = getattr(ray_runner, "UnitAssembler", None)
    if assembler is not None:
        add = assembler.add

        def counting_add(self, batch):
            out = add(self, batch)
            held.append(self.peak)
            return out

        assembler.add = counting_add

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    config = RunConfig(
        inputs=[str(tmp / "in.parquet")],
        output=str(tmp / "out"),
        model=f"{factory}:make",
        weights=str(assets.CHECKPOINT),
        top_k=3,
        image_column="image",
        batch_size=args.batch_size,
        rows_per_file=args.rows_per_file,
        heatmap_size=(args.heatmap, args.heatmap),
        heatmap_dtype="float16",
        **assets.PREPROCESS,
    )
    options = ray_runner.RayOptions(workers=2, num_cpus_per_worker=1, num_cpus_per_read=1)
    run = ray_runner.prepare_ray(config, options)
    before = rss()
    peak = dict(before)
    done = threading.Event()

    def sample_rss():
        while not done.wait(0.02):
            for k, v in rss().items():
                peak[k] = max(peak[k], v)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    run.run()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    parts = sorted((tmp / "out").glob("part-*.parquet"))
    rows = [int(i.rsplit(":", 1)[1]) for i in pq.read_table(parts, columns=["id"]).column("id").to_pylist()]
    print(
        json.dumps(
            {
                "rows_in": args.rows,
                "units": len(run.plan.units),
                "rows_out": len(rows),
                "output_mb_on_disk": round(sum(p.stat().st_size for p in parts) / 2**20, 1),
                "heatmaps_mb_in_memory": round(len(rows) * args.heatmap**2 * 2 / 2**20, 1),
                **{f"{k}_before_mb": round(v / 2**20, 1) for k, v in before.items()},
                **{f"{k}_peak_mb": round(v / 2**20, 1) for k, v in peak.items()},
                "units_held_peak": max(held) if held else None,
                "written_in_input_order": rows == sorted(rows),
                "seconds": round(seconds, 1),
            },
            indent=1,
        )
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
