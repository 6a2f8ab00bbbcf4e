"""The library contenders of ``gradcam-batch bench``: pytorch-grad-cam's, captum's and torchcam's CAM methods.

``harness.contenders`` decides who runs. With ``--methods``, per top-k: one ``Explainer`` per method, one
``Explainer`` for the whole list (every method from one forward and one VJP), and each library's
implementation of each method it has; without it, Grad-CAM alone. The libraries explain top-k with k
calls, one class column per call, as their users do (pytorch-grad-cam's ``targets``, captum's ``target``
and torchcam's ``class_idx`` take one class per image), and are handed the classes for free.
Their Score-CAM runs with the engine's masked images per forward. Every contender produces maps at
input size: torchcam's low-resolution maps are upsampled bilinearly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from gradcam_batch.engine.bench import CAPTUM, PYTORCH_GRAD_CAM, TORCHCAM

# Our method name -> the library's class.
PGC_CLASSES = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "hirescam": "HiResCAM",
    "gradcam-elementwise": "GradCAMElementWise",
    "eigencam": "EigenCAM",
    "eigengradcam": "EigenGradCAM",
    "scorecam": "ScoreCAM",
}
TORCHCAM_CLASSES = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMpp",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "scorecam": "ScoreCAM",
}


def pytorch_grad_cam_run(model, layer: str, method: str, batches, classes, k: int, ctx, scorecam_batch: int):
    """(run(i), release()) for pytorch-grad-cam's implementation of ``method``."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    own = copy.deepcopy(model)
    cam = getattr(pytorch_grad_cam, PGC_CLASSES[method])(model=own, target_layers=[own.get_submodule(layer)])
    restore: Callable[[], None] = lambda: None  # noqa: E731
    if method == "scorecam":
        cam.batch_size = scorecam_batch
        # Its masked-forward loop draws a progress bar per image and class; silence it while timed.
        import pytorch_grad_cam.score_cam as score_cam

        saved = score_cam.tqdm
        score_cam.tqdm = SimpleNamespace(tqdm=lambda it, **kw: it)

        def restore() -> None:
            score_cam.tqdm = saved

    targets = [[[ClassifierOutputTarget(int(c)) for c in cls[:, r].tolist()] for r in range(k)] for cls in classes]

    def run(i: int) -> object:
        with ctx():
            return [cam(input_tensor=batches[i], targets=targets[i][r]) for r in range(k)]

    def release() -> None:
        cam.activations_and_grads.release()
        restore()

    return run, release


def torchcam_run(model, layer: str, method: str, batches, classes, k: int, ctx, scorecam_batch: int):
    """(run(i), release()) for torchcam's implementation of ``method``: maps upsampled to the input size."""
    import torchcam.methods as tcm

    own = copy.deepcopy(model).eval()
    kwargs = {"batch_size": scorecam_batch} if method == "scorecam" else {}
    size = tuple(batches[0].shape[-2:])
    extractor = getattr(tcm, TORCHCAM_CLASSES[method])(own, target_layer=layer, input_shape=(3, *size), **kwargs)

    def run(i: int) -> object:
        out = []
        with ctx():
            for r in range(k):
                idx = classes[i][:, r].tolist()
                with torch.set_grad_enabled(method != "scorecam"):
                    scores = own(batches[i])
                (maps,) = extractor(class_idx=idx, scores=scores)
                out.append(F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False))
        return out

    return run, extractor.remove_hooks


def captum_run(model, layer: str, method: str, batches, classes, k: int, ctx, scorecam_batch: int):
    """(run(i), release()) for captum's LayerGradCam: ReLU'd maps, upsampled bilinearly to the input size."""
    from captum.attr import LayerAttribution, LayerGradCam

    gc = LayerGradCam(model, model.get_submodule(layer))
    size = tuple(batches[0].shape[-2:])

    def run(i: int) -> object:
        out = []
        with ctx():
            for r in range(k):
                attr = gc.attribute(batches[i], target=classes[i][:, r], relu_attributions=True)
                out.append(LayerAttribution.interpolate(attr, size, "bilinear"))
        return out

    return run, lambda: None


CAPTUM_CLASSES = {"gradcam": "LayerGradCam"}

# Library -> (our method name -> its class, the runner); the order is the table's.
LIBRARIES = {
    PYTORCH_GRAD_CAM: (PGC_CLASSES, pytorch_grad_cam_run),
    CAPTUM: (CAPTUM_CLASSES, captum_run),
    TORCHCAM: (TORCHCAM_CLASSES, torchcam_run),
}

__all__ = ["LIBRARIES", "captum_run", "pytorch_grad_cam_run", "torchcam_run"]
