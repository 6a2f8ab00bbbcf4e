"""Segmentation Grad-CAM side by side on the CPU, for RESULTS.md: the engine's top-3 in one call, the model's
inference, and pytorch-grad-cam with its ``SemanticSegmentationTarget``, class by class, at the same target layer.

    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/bench_segmentation.py [--size 256] [--batch 2] [--repeats 9]

The same as ``gradcam-batch bench --task segmentation --model torchvision:NAME`` for each model below
(``engine/bench/segmentation.py`` says what each contender runs): torchvision ``lraspp_mobilenet_v3_large`` and
``deeplabv3_mobilenet_v3_large``, randomly initialized (no download), 21 classes, with varied weights so that
each image has several predicted regions. The machine's load changes the figures; run on an idle machine.
"""

from __future__ import annotations

import argparse

import torch

from gradcam_batch.engine.bench.harness import load_model
from gradcam_batch.engine.bench.segmentation import run_segmentation_bench

MODELS = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large")
TOP_K = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, batch {args.batch}, {args.size}^2")
    for name in args.models.split(","):
        spec = f"torchvision:{name}"
        report = run_segmentation_bench(
            load_model(spec, num_classes=21), spec=spec, size=args.size, batch=args.batch, top_k=TOP_K,
            repeats=args.repeats,
        )  # fmt: skip
        print(report.format_table())


if __name__ == "__main__":
    main()
