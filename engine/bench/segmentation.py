"""``bench --task segmentation``: segmentation Grad-CAM next to the model's inference and pytorch-grad-cam.

One model, one batch of synthetic images, three contenders at the same target layer, interleaved:

- ``inference``: ``model(x)`` under ``torch.inference_mode``;
- ``gradcam-batch top-K``: ``TaskExplainer(model, "segmentation")(x, top_k=K)``: one backbone forward
  without a graph, one decoder forward and one vectorized VJP of the decoder for the K classes, the maps
  and the heatmaps at the input size;
- ``pytorch-grad-cam``: for each of the K class ranks, one ``GradCAM(...)(x, targets)`` call over the batch
  (a forward and a backward of the whole model each), the target being the class's predicted mask
  (``SemanticSegmentationTarget``, as in its segmentation tutorial). The inference that finds those masks
  (the tutorial's first step) is not counted, which favours it.

A randomly initialized model (no ``--weights``) predicts one class almost everywhere, and its top-K would
hold one region: ``vary`` gives its BatchNorm layers the statistics of one batch of noise and its last
classifier convolution unit-variance weights, so that each image has several predicted regions. A model
with weights is timed as it is. Each figure is the median (and the min) of the timed rounds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

DEFAULT_MODEL = "torchvision:lraspp_mobilenet_v3_large"


def vary(model: nn.Module, size: int) -> nn.Module:
    """A random model's BatchNorm statistics from one batch of noise, and unit-variance weights in the last
    convolution: several predicted regions per image (see the module docstring)."""
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(2)))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if convs:
        nn.init.normal_(convs[-1].weight, std=1.0)
    return model.eval()


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict:
    """(median, min) seconds of each function, run in turn within each round, so that a change in the
    machine's load hits every function alike; ``warmup`` untimed rounds first."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


class _Out(nn.Module):
    """The (B, C, H, W) logits of a model whose output is ``{"out": ...}`` or has ``.logits``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        from gradcam_batch.engine.explain.tasks import dense_logits

        return dense_logits(self.model(x))


@dataclass
class SegmentationBench:
    """The figures of one ``bench --task segmentation``."""

    model: str
    layer: str
    batch: int
    size: int
    top_k: int
    classes_per_image: float  # the regions the top-K found, on average (a random model may have fewer)
    varied: bool
    times: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (median, min) seconds
    note: str | None = None

    def format_table(self) -> str:
        inf = self.times["inference"][0]
        lines = [
            f"{self.model}: batch {self.batch}, {self.size}x{self.size}, layer {self.layer}, top-{self.top_k} "
            f"({self.classes_per_image:.1f} classes per image)"
            + (", random weights varied (BatchNorm statistics, last conv)" if self.varied else ""),
            f"{'contender':<24}{'median ms':>11}{'min ms':>9}{'x inference':>13}",
        ]
        for name, (med, low) in self.times.items():
            lines.append(f"{name:<24}{med * 1e3:>11.1f}{low * 1e3:>9.1f}{med / inf:>13.2f}")
        if "pytorch-grad-cam" in self.times:
            ours = self.times[f"gradcam-batch top-{self.top_k}"][0]
            lines.append(f"pytorch-grad-cam / gradcam-batch: {self.times['pytorch-grad-cam'][0] / ours:.2f}x")
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "layer": self.layer,
            "batch": self.batch,
            "size": self.size,
            "top_k": self.top_k,
            "classes_per_image": self.classes_per_image,
            "varied": self.varied,
            "median_s": {k: v[0] for k, v in self.times.items()},
            "min_s": {k: v[1] for k, v in self.times.items()},
            "note": self.note,
        }


def run_segmentation_bench(
    model: nn.Module,
    *,
    spec: str,
    size: int = 256,
    batch: int = 2,
    top_k: int = 3,
    repeats: int = 5,
    warmup: int = 1,
    vary_weights: bool = True,
    baselines: tuple[str, ...] = ("inference", "pytorch-grad-cam"),
    seed: int = 0,
) -> SegmentationBench:
    """Time the contenders (see the module docstring) on one batch of ``batch`` noise images of ``size``."""
    from gradcam_batch.engine.explain.tasks import TaskExplainer

    if vary_weights:
        model = vary(model, size)
    model = model.eval()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))

    def inference():
        with torch.inference_mode():
            return model(x)

    explainer = TaskExplainer(model, "segmentation")
    exp = explainer(x, top_k=top_k)
    layer_name = exp.explanation.target_layer
    fns: dict[str, Callable[[], object]] = {"inference": inference}  # the ratios are against it: always timed
    fns[f"gradcam-batch top-{top_k}"] = lambda: explainer(x, top_k=top_k)
    note = None
    cam = None
    if "pytorch-grad-cam" in baselines:
        try:
            from pytorch_grad_cam import GradCAM
            from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget
        except ImportError:
            note = "pytorch-grad-cam is not installed: its row is left out (pip install grad-cam)"
        else:
            classes, mask, keep = exp.explanation.classes, exp.pred_mask, exp.keep
            targets = [
                [
                    SemanticSegmentationTarget(int(classes[b, j]), (mask[b] == classes[b, j]).float().numpy())
                    for b in range(batch)
                ]
                for j in range(classes.shape[1])
                if bool(keep[:, j].all())
            ]
            cam = GradCAM(model=_Out(model), target_layers=[model.get_submodule(layer_name)])

            def theirs():
                for per_image in targets:
                    cam(input_tensor=x, targets=per_image)

            fns["pytorch-grad-cam"] = theirs
    try:
        times = interleaved_times(fns, repeats, warmup)
    finally:
        if cam is not None:
            cam.activations_and_grads.release()
    return SegmentationBench(
        model=spec,
        layer=layer_name,
        batch=batch,
        size=size,
        top_k=top_k,
        classes_per_image=float(exp.keep.sum(1).float().mean()),
        varied=vary_weights,
        times=times,
        note=note,
    )


__all__ = ["DEFAULT_MODEL", "SegmentationBench", "interleaved_times", "run_segmentation_bench", "vary"]
