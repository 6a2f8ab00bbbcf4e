"""``explain()`` in a loop against one reused ``Explainer`` and plain inference (issue 11).

    python benchmarks/bench_explain_loop.py [--model resnet50] [--calls 20] [--size 64] [--batch 2]

Each of the three loops runs ``--calls`` times on the same model and inputs; the loops are
interleaved over ``--rounds`` rounds and the median loop time is printed. The first ``explain()``
call builds the set-up and is left out by a warm-up loop, as a user's first call would be.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

from gradcam_batch import Explainer, explain


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet50")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--method", default="gradcam", help="a name or a comma list")
    args = p.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None).eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    method = args.method if "," not in args.method else args.method.split(",")
    reused = Explainer(model, method=method)

    def loop_explain():
        for _ in range(args.calls):
            explain(model, x, method=method)

    def loop_explainer():
        for _ in range(args.calls):
            reused(x)

    def loop_inference():
        with torch.inference_mode():
            for _ in range(args.calls):
                model(x)

    loops = {"explain()": loop_explain, "Explainer": loop_explainer, "inference": loop_inference}
    times: dict[str, list[float]] = {k: [] for k in loops}
    for fn in loops.values():  # warm-up: the set-up of both explainers, allocator, threads
        fn()
    for r in range(args.rounds):
        names = list(loops)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            loops[name]()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{args.model} {args.batch}x3x{args.size}x{args.size} method {args.method}: {args.calls} calls per loop, "
        f"median of {args.rounds} rounds, {torch.get_num_threads()} threads"
    )
    for k, v in med.items():
        print(f"  {k:10s} {v * 1000 / args.calls:8.1f} ms per call")
    print(f"  explain() / Explainer = {med['explain()'] / med['Explainer']:.3f}")


if __name__ == "__main__":
    main()
