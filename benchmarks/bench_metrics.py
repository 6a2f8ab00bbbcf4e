"""Deletion + insertion against torchcam's DeletionInsertionMetric, and the connected-component labelling.

    python benchmarks/bench_metrics.py                    # both parts
    python benchmarks/bench_metrics.py --part deletion    # resnet18, 112x112, top-3, batch 16, 20 steps
    python benchmarks/bench_metrics.py --part labelling   # (64, 3, 224, 224) maps, scipy vs torch

Deletion part: the same model, images, classes and maps for both contenders, in interleaved rounds (the order
alternates), reported as images/s (an image = all its top-k maps scored for deletion and insertion). torchcam
gets the maps through an extractor that returns them, one class slot per ``update`` (its API scores one class
per image per call); its baseline is zeros for both curves, ours blurs the insertion substrate (same cost).
Both forward the same number of perturbed images per chunk (``--chunk``). The forward-only rate of the model
on the same chunk size is measured in the same rounds: ``bound`` = that rate / forwards per image, the most
any implementation that forwards every point could reach.

Labelling part: ``largest_component_boxes`` with ``backend="scipy"`` (one ``ndimage.label`` call on the CPU)
and ``backend="torch"`` (label propagation with 3x3 max-pooling on the maps' device), on smooth Grad-CAM-like
maps (random 7x7 grids, bilinear to 224x224); the torch backend on the first ``--torch-maps`` maps only.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from gradcam_batch import metrics
from gradcam_batch.engine.metrics.faithfulness import step_counts


class FixedMaps:
    """A torchcam CAM extractor that returns maps given in advance."""

    def __init__(self, model):
        self.model = model
        self.maps = None

    def __call__(self, class_idx=None, scores=None, normalized=True, **kwargs):
        return [self.maps]

    def fuse_cams(self, cams):
        return cams[0]

    @contextmanager
    def _hooks_off(self):
        yield


def smooth_maps(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    grid = torch.rand(n, 1, 7, 7, generator=gen)
    maps = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False).squeeze(1)
    lo = maps.flatten(1).amin(1).view(-1, 1, 1)
    hi = maps.flatten(1).amax(1).view(-1, 1, 1)
    return (maps - lo) / (hi - lo)


def bench_deletion(args) -> None:
    import torchvision
    from torchcam.metrics import DeletionInsertionMetric

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = torchvision.models.resnet18(weights=None).eval()
    b, k, size = args.batch, args.top_k, args.size
    images = torch.randn(b, 3, size, size, generator=gen)
    with torch.inference_mode():
        classes = model(images).topk(k, dim=1).indices
    saliency = smooth_maps(b * k, size, gen).view(b, k, size, size)
    softmax = lambda out: torch.softmax(out, dim=-1)
    extractor = FixedMaps(model)
    tc_metric = DeletionInsertionMetric(extractor, softmax, steps=args.steps, batch_size=args.chunk)

    def ours():
        return metrics.deletion_insertion(model, images, saliency, classes, steps=args.steps, batch_size=args.chunk)

    def torchcam():
        per_class = []
        for slot in range(k):
            extractor.maps = saliency[:, slot]
            tc_metric.reset()
            tc_metric.update(images, class_idx=classes[:, slot].tolist())
            per_class.append((tc_metric.deletion / b, tc_metric.insertion / b))
        return per_class

    chunk_input = torch.randn(args.chunk, 3, size, size, generator=gen)

    def forward_rate() -> float:
        with torch.inference_mode():
            t0 = time.perf_counter()
            for _ in range(args.forward_reps):
                model(chunk_input)
            return args.forward_reps * args.chunk / (time.perf_counter() - t0)

    hw = size * size
    interior = sum(1 for n in step_counts(hw, args.steps) if 0 < n < hw)
    ours_fwd = 2 + 2 * k * interior + 1 / b  # image, blurred image, per-class points, one all-zero image
    tc_fwd = k * (1 + 1 + 2 * interior)  # per class: the scoring forward, the all-baseline image, the points
    print(
        f"resnet18 {size}x{size}, B={b}, top-{k}, steps={args.steps}, chunk {args.chunk}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"forwards per image: ours {ours_fwd:.2f}, torchcam {tc_fwd}")

    # Warm-up on two images (oneDNN primitive creation).
    metrics.deletion_insertion(model, images[:2], saliency[:2], classes[:2], steps=2)
    results = {}
    rates = {"ours": [], "torchcam": [], "forward": []}
    for r in range(args.rounds):
        order = ["ours", "torchcam"] if r % 2 == 0 else ["torchcam", "ours"]
        for name in order:
            t0 = time.perf_counter()
            results[name] = ours() if name == "ours" else torchcam()
            rates[name].append(b / (time.perf_counter() - t0))
        if r == 0:
            tc_del = torch.tensor([d for d, _ in results["torchcam"]])
            gap = (results["ours"][0].mean(0).double() - tc_del).abs().max()
            print(f"mean deletion AUC per class slot, |ours - torchcam| max {gap:.2e} (x axis differs)")
        rates["forward"].append(forward_rate())
        print(
            f"round {r}: ours {rates['ours'][-1]:.3f} img/s, torchcam {rates['torchcam'][-1]:.3f} img/s, "
            f"ratio {rates['ours'][-1] / rates['torchcam'][-1]:.2f}, forward {rates['forward'][-1]:.1f} img/s"
        )
    med = {name: statistics.median(v) for name, v in rates.items()}
    ratios = [o / t for o, t in zip(rates["ours"], rates["torchcam"], strict=True)]
    print(
        f"median: ours {med['ours']:.3f} img/s, torchcam {med['torchcam']:.3f} img/s, "
        f"ratio {statistics.median(ratios):.2f} (per round {', '.join(f'{x:.2f}' for x in ratios)}); "
        f"bound {med['forward'] / ours_fwd:.3f} img/s (forward {med['forward']:.1f} img/s / {ours_fwd:.2f})"
    )


def bench_labelling(args) -> None:
    gen = torch.Generator().manual_seed(2)
    maps = smooth_maps(64 * 3, 224, gen).view(64, 3, 224, 224)
    maps[:, :, 100:104] = 0.0  # a valley across every map: at least two components above 15%
    runs = []
    for _ in range(args.label_reps):
        t0 = time.perf_counter()
        scipy_boxes = metrics.largest_component_boxes(maps, 0.15, backend="scipy")
        runs.append(time.perf_counter() - t0)
    scipy_s = statistics.median(runs)
    # The propagation needs as many 3x3 passes as the longest path inside a component: on a CPU it runs
    # minutes for the whole stack, so it is timed on the first maps only, per map.
    n = args.torch_maps
    t0 = time.perf_counter()
    torch_boxes = metrics.largest_component_boxes(maps.flatten(0, 1)[:n], 0.15, backend="torch")
    torch_s = time.perf_counter() - t0
    same = torch.equal(scipy_boxes.flatten(0, 1)[:n], torch_boxes)
    print(
        f"largest_component_boxes on (64, 3, 224, 224) maps, threshold 0.15: scipy {scipy_s * 1e3:.0f} ms for "
        f"192 maps ({scipy_s / 192 * 1e3:.1f} ms/map, median of {args.label_reps}); torch ({maps.device}) "
        f"{torch_s * 1e3:.0f} ms for {n} maps ({torch_s / n * 1e3:.0f} ms/map); same boxes: {same}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["deletion", "labelling", "all"], default="all")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--chunk", type=int, default=32, help="perturbed images per forward, both contenders")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--forward-reps", type=int, default=4)
    ap.add_argument("--label-reps", type=int, default=3)
    ap.add_argument("--torch-maps", type=int, default=12, help="maps timed with the torch labelling")
    args = ap.parse_args()
    if args.part in ("labelling", "all"):
        bench_labelling(args)
    if args.part in ("deletion", "all"):
        bench_deletion(args)


if __name__ == "__main__":
    main()
