"""A float64 reference of every CAM method, written for clarity, sharing no code with the engine.

The gradients come from ``tests/engine_reference.py``'s way: a float64 copy of the model, one plain
``backward()`` through the whole network per class column, the target's output kept by a hook with
``retain_grad()``. Then each method's formula is written out as the papers and pytorch-grad-cam state
it, image by image and class by class where that reads more plainly.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def reference_signals(model: nn.Module, images: torch.Tensor, layer: str, classes: torch.Tensor, *, sign: float = 1.0):
    """(A (B, K, h, w), g (B, C, K, h, w), scores (B, N)) in float64, one backward per class column."""
    ref = copy.deepcopy(model).double().eval().requires_grad_(True)
    captured: list[torch.Tensor] = []

    def hook(mod, args, out):
        out.retain_grad()
        captured.append(out)

    handle = ref.get_submodule(layer).register_forward_hook(hook)
    try:
        scores = ref(images.detach().double())
    finally:
        handle.remove()
    (a,) = captured
    grads = []
    for j in range(classes.shape[1]):
        a.grad = None
        picked = scores.gather(1, classes[:, j : j + 1].long()).sum()
        (sign * picked).backward(retain_graph=True)
        grads.append(a.grad.detach().clone())
    return a.detach(), torch.stack(grads, dim=1), scores.detach()


def weights_to_map(weights: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """sum_k w[b, c, k] * A[b, k] -> (B, C, h, w), before any ReLU."""
    return (weights[:, :, :, None, None] * acts[:, None]).sum(dim=2)


def gradcam(a, g):
    return weights_to_map(g.mean(dim=(3, 4)), a)


def gradcam_pp(a, g):
    """The paper's equation 19 with the official code's denominator: sum_ab A_ab times g^3 at (i, j)."""
    g2, g3 = g**2, g**3
    sum_a = a.sum(dim=(2, 3))[:, None, :, None, None]
    denom = 2 * g2 + sum_a * g3
    alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(g))
    w = (alpha * torch.relu(g)).sum(dim=(3, 4))
    return weights_to_map(w, a)


def xgradcam(a, g, eps=1e-7):
    sum_a = a.sum(dim=(2, 3))[:, None, :, None, None]
    w = (g * a[:, None] / (sum_a + eps)).sum(dim=(3, 4))
    return weights_to_map(w, a)


def layercam(a, g):
    return (torch.relu(g) * a[:, None]).sum(dim=2)


def hirescam(a, g):
    return (g * a[:, None]).sum(dim=2)


def gradcam_elementwise(a, g):
    return torch.relu(g * a[:, None]).sum(dim=2)


def projection(x: torch.Tensor) -> torch.Tensor:
    """(K, h, w) -> (h, w): numpy SVD of the centred (h*w, K) matrix, first right singular vector,
    the sign chosen so that the projection correlates positively with the centred channel sum."""
    k, h, w = x.shape
    m = x.reshape(k, h * w).T.numpy()
    m = m - m.mean(axis=0)
    _, _, vt = np.linalg.svd(m, full_matrices=False)
    proj = m @ vt[0]
    if float(proj @ m.sum(axis=1)) < 0:
        proj = -proj
    return torch.from_numpy(proj.reshape(h, w))


def eigencam(a, g):
    c = g.shape[1]
    return torch.stack([projection(a[b]) for b in range(a.shape[0])])[:, None].expand(-1, c, -1, -1)


def eigengradcam(a, g):
    ga = g * a[:, None]
    return torch.stack([torch.stack([projection(ga[b, c]) for c in range(ga.shape[1])]) for b in range(ga.shape[0])])


GRADIENT_REFERENCES = {
    "gradcam": gradcam,
    "gradcam++": gradcam_pp,
    "xgradcam": xgradcam,
    "layercam": layercam,
    "hirescam": hirescam,
    "gradcam-elementwise": gradcam_elementwise,
    "eigencam": eigencam,
    "eigengradcam": eigengradcam,
}


def reference_scorecam(model: nn.Module, images: torch.Tensor, acts: torch.Tensor, classes: torch.Tensor):
    """Score-CAM in float64, one masked image at a time: channel k upsampled (bilinear, align_corners
    False), min-max normalized (+1e-8), times the image, its logit y^c; softmax over k; weighted sum."""
    ref = copy.deepcopy(model).double().eval()
    b, k = acts.shape[:2]
    size = images.shape[-2:]
    maps = []
    with torch.no_grad():
        for i in range(b):
            logits = []
            for j in range(k):
                up = F.interpolate(acts[i : i + 1, j : j + 1].double(), size=size, mode="bilinear", align_corners=False)
                mask = (up - up.min()) / (up.max() - up.min() + 1e-8)
                logits.append(ref(images[i : i + 1].double() * mask)[0])
            logits = torch.stack(logits)  # (K, N)
            per_class = []
            for c in classes[i].tolist():
                w = torch.softmax(logits[:, c], dim=0)
                per_class.append((w[:, None, None] * acts[i].double()).sum(dim=0))
            maps.append(torch.stack(per_class))
    return torch.stack(maps)


class _HandGuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        return grad_out * (x > 0).double() * (grad_out > 0).double()


class _GuidedReLUModule(nn.Module):
    def forward(self, x):
        return _HandGuidedReLU.apply(x)


def reference_guided_backprop(model: nn.Module, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Guided backprop in float64 with every nn.ReLU replaced by a module whose backward is written
    by hand, one backward per (class column): (B, C, 3, H, W)."""
    ref = copy.deepcopy(model).double().eval()

    def swap(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU):
                setattr(module, name, _GuidedReLUModule())
            else:
                swap(child)

    swap(ref)
    out = []
    for j in range(classes.shape[1]):
        x = images.detach().double().requires_grad_(True)
        scores = ref(x)
        scores.gather(1, classes[:, j : j + 1].long()).sum().backward()
        out.append(x.grad.detach().clone())
    return torch.stack(out, dim=1)


def pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each pair of maps (over the last two dims), in float64."""
    a = a.double().flatten(-2)
    b = b.double().flatten(-2)
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.square().sum(-1) * b.square().sum(-1)).sqrt()
