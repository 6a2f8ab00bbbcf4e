"""Segmentation Grad-CAM side by side on the CPU: the engine's top-3 in one call, the model's inference, and
pytorch-grad-cam with its ``SemanticSegmentationTarget``, class by class, at the same target layer.

    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/bench_segmentation.py [--size 256] [--batch 2] [--repeats 5]

Models: torchvision ``lraspp_mobilenet_v3_large`` and ``deeplabv3_mobilenet_v3_large``, randomly initialized
(no download), 21 classes, with BatchNorm statistics from one batch of noise and unit-variance weights in the
last classifier conv, so that each image has several predicted regions (a random model predicts one class
everywhere). Per model:

- ``inference``: ``model(x)`` under ``torch.inference_mode``;
- ``engine top-3``: ``TaskExplainer(model, "segmentation")(x, top_k=3)``: one backbone forward without a graph,
  one head forward and one vectorized VJP of the decoder for the 3 classes, the maps and heatmaps;
- ``pytorch-grad-cam``: for each of the 3 class ranks, one ``GradCAM(...)(x, targets)`` call over the batch
  (a forward and a backward of the whole model each), the target being the class's predicted mask. The
  inference that finds those masks (the tutorial's first step) is not counted, which favours it.

Each figure is the median (and the min) of ``--repeats`` timed runs, the three interleaved, after one untimed
run each (set-up, the engine's VJP
strategy measurement). The machine's load changes the figures; run on an idle machine for RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

from gradcam_batch.engine.explain.tasks import TaskExplainer

MODELS = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large")
TOP_K = 3


def varied(model: nn.Module, size: int) -> nn.Module:
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(2)))
    convs = [m for m in model.classifier.modules() if isinstance(m, nn.Conv2d)]
    nn.init.normal_(convs[-1].weight, std=1.0)
    return model.eval()


def interleaved_times(fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """(median, min) seconds of each function, run in turn within each repeat, so that a change in the
    machine's load hits every function alike; one untimed run of each first."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


class Out(nn.Module):
    """pytorch-grad-cam's tutorial wrapper: the ``"out"`` logits of a torchvision segmentation model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


def bench(name: str, size: int, batch: int, repeats: int) -> dict:
    import torchvision.models.segmentation as seg
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    torch.manual_seed(0)
    model = varied(getattr(seg, name)(weights=None, weights_backbone=None, num_classes=21), size)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))

    def inference():
        with torch.inference_mode():
            return model(x)

    explainer = TaskExplainer(model, "segmentation")
    exp = explainer(x, top_k=TOP_K)
    layer = model.get_submodule(exp.explanation.target_layer)
    classes, mask = exp.explanation.classes, exp.pred_mask
    targets = [
        [
            SemanticSegmentationTarget(int(classes[b, j]), (mask[b] == classes[b, j]).float().numpy())
            for b in range(batch)
        ]
        for j in range(classes.shape[1])
    ]
    cam = GradCAM(model=Out(model), target_layers=[layer])

    def theirs():
        for per_image in targets:
            cam(input_tensor=x, targets=per_image)

    out = interleaved_times(
        {"inference": inference, "engine": lambda: explainer(x, top_k=TOP_K), "pytorch-grad-cam": theirs}, repeats
    )
    cam.activations_and_grads.release()
    out["classes"] = float(exp.keep.sum(1).float().mean())
    out["layer"] = exp.explanation.target_layer
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, batch {args.batch}, {args.size}^2")
    print("median (min) of the timed runs")
    for name in args.models.split(","):
        r = bench(name, args.size, args.batch, args.repeats)
        (inf, inf_min), (eng, eng_min), (pgc, pgc_min) = r["inference"], r["engine"], r["pytorch-grad-cam"]
        print(
            f"{name} (layer {r['layer']}, {r['classes']:.1f} classes/image): inference {inf * 1e3:.0f} "
            f"({inf_min * 1e3:.0f}) ms, engine top-3 {eng * 1e3:.0f} ({eng_min * 1e3:.0f}) ms, pytorch-grad-cam "
            f"{pgc * 1e3:.0f} ({pgc_min * 1e3:.0f}) ms; engine / inference {eng / inf:.2f} ({eng_min / inf_min:.2f}), "
            f"pytorch-grad-cam / engine {pgc / eng:.2f} ({pgc_min / eng_min:.2f})"
        )


if __name__ == "__main__":
    main()
