"""The CAM family: every method is one function of what a single pass gives.

A pass of the ``Explainer`` yields the target activation A (B, K, h, w) and, when a method needs it,
the class gradients g = dy^c/dA (B, C, K, h, w) from one vmapped VJP of the head. For a
global-average-pool -> linear head g is W[c] / (h*w) at every position, so it is passed as
(B, C, K, 1, 1) and every formula below broadcasts: each gradient method then has a closed form with
no VJP. A method returns either channel weights (B, C, K), which the fused kernel turns into
ReLU(sum_k w_k A_k), or finished low-resolution maps (B, C, h, w), which the kernel only upsamples,
normalizes and quantizes. The README's "CAM methods" section has the table and the costs.

Choices where the libraries differ (each stated once, here):

- Grad-CAM++ follows the paper's official code and pytorch-grad-cam: the denominator sums A over space
  and multiplies by g^3 at (i, j): alpha = g^2 / (2 g^2 + sum_ab A_ab * g^3), 0 where that is 0.
  torchcam sums g^3 * A instead, which is the formula only when g is constant over space. The exp(score)
  factor of the paper's derivation cancels in alpha and scales w by a positive per-class constant, so
  it is left out (as pytorch-grad-cam does). Computed as 1 / (2 + S * g), the same value without
  g^3's underflow.
- XGrad-CAM: w = sum_ij g A / (sum_ij A + 1e-7), pytorch-grad-cam's epsilon.
- Eigen-CAM and EigenGrad-CAM: the first principal component's sign is arbitrary in an SVD; here it is
  the one whose projection correlates positively with the channel sum sum_k X_k of the decomposed
  maps X (A, or g * A). pytorch-grad-cam leaves the sign to LAPACK.
- Score-CAM: channels upsampled with ``align_corners=False`` (the paper's code), min-max normalized
  with a 1e-8 epsilon (pytorch-grad-cam's), scores are the logits y^c of the masked inputs, and the
  weights their softmax over the K channels (pytorch-grad-cam's and torchcam's reading).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

XGRADCAM_EPS = 1e-7  # pytorch-grad-cam's
SCORECAM_EPS = 1e-8  # pytorch-grad-cam's, in the min-max normalization of each upsampled channel
DEFAULT_SCORECAM_BATCH = 64  # masked images per forward
# Score-CAM's upsampling of each channel: False as in the paper's code and torchcam, and as the engine
# upsamples every map; pytorch-grad-cam uses True (its maps then correlate 0.99 with ours, not 1.0).
SCORECAM_ALIGN_CORNERS = False


@dataclass(frozen=True)
class CamInputs:
    """What one pass gives the methods (signs already applied for counterfactuals)."""

    acts: torch.Tensor  # (B, K, h, w) in the compute dtype
    classes: torch.Tensor  # (B, C) the explained classes
    grads: torch.Tensor | None  # (B, C, K, h, w), or (B, C, K, 1, 1) for a GAP -> linear head
    linear: torch.Tensor | None  # (B, C, K) the rows W[c] of a GAP -> linear head
    score_weights: torch.Tensor | None  # (B, C, K) Score-CAM's channel weights

    @property
    def area(self) -> int:
        return self.acts.shape[-2] * self.acts.shape[-1]


@dataclass(frozen=True)
class Method:
    """One CAM method: what it needs from the pass and the function that weighs or maps.

    ``needs``: "grad" (g from the VJP or the closed form), "linear" (a GAP -> linear head),
    "acts" (A alone), "scores" (Score-CAM's masked forwards).
    """

    name: str
    needs: str
    fn: Callable[[CamInputs], torch.Tensor]  # -> weights (B, C, K) or maps (B, C, h, w)
    paper: str


def _constant(g: torch.Tensor) -> bool:
    return g.shape[-2:] == (1, 1)


def _sum_hw(g: torch.Tensor, area: int) -> torch.Tensor:
    """sum over the map of g (B, C, K, h, w), also when g is stored as one value per channel."""
    return g[..., 0, 0] * area if _constant(g) else g.sum(dim=(3, 4))


def _grad_times_acts(g: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    return g * acts.unsqueeze(1)  # (B, C, K, h, w)


def gradcam(x: CamInputs) -> torch.Tensor:
    return x.grads.mean(dim=(3, 4))


def cam(x: CamInputs) -> torch.Tensor:
    return x.linear


def gradcam_pp(x: CamInputs) -> torch.Tensor:
    g = x.grads
    s = x.acts.sum(dim=(2, 3))[:, None, :, None, None]  # sum_ab A_ab, per image and channel
    d = 2 + s * g  # the denominator over g^2
    alpha = torch.where((g != 0) & (d != 0), 1 / torch.where(d == 0, torch.ones_like(d), d), torch.zeros_like(d))
    return _sum_hw(alpha * g.clamp_min(0), x.area)


def xgradcam(x: CamInputs) -> torch.Tensor:
    g, a = x.grads, x.acts
    s = a.sum(dim=(2, 3))  # (B, K)
    num = g[..., 0, 0] * s[:, None] if _constant(g) else torch.einsum("bckij,bkij->bck", g, a)
    return num / (s[:, None] + XGRADCAM_EPS)


def layercam(x: CamInputs) -> torch.Tensor:
    g = x.grads.clamp_min(0)
    return g[..., 0, 0] if _constant(g) else _grad_times_acts(g, x.acts).sum(dim=2)


def hirescam(x: CamInputs) -> torch.Tensor:
    g = x.grads
    return g[..., 0, 0] if _constant(g) else _grad_times_acts(g, x.acts).sum(dim=2)


def gradcam_elementwise(x: CamInputs) -> torch.Tensor:
    return _grad_times_acts(x.grads, x.acts).clamp_min(0).sum(dim=2)


def eigencam(x: CamInputs) -> torch.Tensor:
    proj = principal_projection(x.acts)  # (B, h, w): the same for every class
    return proj.unsqueeze(1).expand(*x.classes.shape, *proj.shape[-2:])


def eigengradcam(x: CamInputs) -> torch.Tensor:
    ga = _grad_times_acts(x.grads, x.acts)  # (B, C, K, h, w)
    b, c = ga.shape[:2]
    return principal_projection(ga.flatten(0, 1)).view(b, c, *ga.shape[-2:])


def scorecam(x: CamInputs) -> torch.Tensor:
    return x.score_weights


_METHODS = (
    Method("gradcam", "grad", gradcam, "Selvaraju et al., Grad-CAM, ICCV 2017"),
    Method("cam", "linear", cam, "Zhou et al., Learning Deep Features for Discriminative Localization, CVPR 2016"),
    Method("gradcam++", "grad", gradcam_pp, "Chattopadhay et al., Grad-CAM++, WACV 2018"),
    Method("xgradcam", "grad", xgradcam, "Fu et al., Axiom-based Grad-CAM, BMVC 2020"),
    Method("layercam", "grad", layercam, "Jiang et al., LayerCAM, IEEE TIP 2021"),
    Method("hirescam", "grad", hirescam, "Draelos and Carin, HiResCAM, 2020"),
    Method("gradcam-elementwise", "grad", gradcam_elementwise, "pytorch-grad-cam's GradCAMElementWise"),
    Method("eigencam", "acts", eigencam, "Muhammad and Yeasin, Eigen-CAM, IJCNN 2020"),
    Method("eigengradcam", "grad", eigengradcam, "pytorch-grad-cam's EigenGradCAM"),
    Method("scorecam", "scores", scorecam, "Wang et al., Score-CAM, CVPR Workshops 2020"),
)
METHODS: dict[str, Method] = {m.name: m for m in _METHODS}
GRADIENT_METHODS = tuple(m.name for m in _METHODS if m.needs == "grad")


def parse_methods(spec: str | Sequence[str]) -> tuple[str, ...]:
    """A name, a comma list ("gradcam,layercam") or a sequence of names -> unique names, in order.

    Raises ``ValueError`` naming the known methods for an unknown or empty one.
    """
    items = spec.split(",") if isinstance(spec, str) else [str(s) for s in spec]
    names = tuple(dict.fromkeys(s.strip().lower() for s in items if s.strip()))
    known = ", ".join(METHODS)
    if not names:
        raise ValueError(f"no method given; expected one or more of {known}")
    for n in names:
        if n not in METHODS:
            raise ValueError(f"unknown method {n!r}; expected one or more of {known}")
    return names


def principal_projection(x: torch.Tensor) -> torch.Tensor:
    """(N, K, h, w) -> (N, h, w): each stack's projection on its first principal component.

    The h*w positions are the samples and the K channels the features, centred per channel. The
    projection is X v1 = s1 u1, found from the smaller of the two Gram matrices (h*w x h*w or K x K),
    decomposed in float64. Its sign makes it correlate positively with the centred channel sum.
    """
    n, k, h, w = x.shape
    m = x.reshape(n, k, h * w).transpose(1, 2)  # (N, hw, K)
    m = m - m.mean(dim=1, keepdim=True)
    if h * w <= k:
        vals, vecs = torch.linalg.eigh((m @ m.transpose(1, 2)).double())
        proj = vecs[..., -1] * vals[..., -1].clamp_min(0).sqrt()[:, None]
    else:
        _, vecs = torch.linalg.eigh((m.transpose(1, 2) @ m).double())
        proj = m.double() @ vecs[..., -1:]
        proj = proj[..., 0]
    flip = (proj * m.double().sum(dim=2)).sum(dim=1) < 0
    proj = torch.where(flip[:, None], -proj, proj)
    return proj.to(x.dtype).view(n, h, w)


# -- Score-CAM ----------------------------------------------------------------------------------------
def scorecam_weights(
    forward: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    acts: torch.Tensor,
    classes: torch.Tensor,
    *,
    batch_size: int = DEFAULT_SCORECAM_BATCH,
    sign: float = 1.0,
    align_corners: bool | None = None,
) -> torch.Tensor:
    """Score-CAM's channel weights (B, C, K) for every explained class from one set of K masked forwards.

    Mask k of image b is channel k of A upsampled to the input size and min-max normalized; the
    masked image is ``images[b] * mask``. ``forward(x)`` returns (n, N) scores; its scores at the
    explained classes, for every class of image b at once, go through a softmax over the K channels
    (of ``sign * score``: a counterfactual favours the channels that lower the score). B*K masked
    images run ``batch_size`` at a time, so memory holds one chunk of masks, never all of them.
    ``align_corners`` is the upsampling's; None means ``SCORECAM_ALIGN_CORNERS``.
    """
    if align_corners is None:
        align_corners = SCORECAM_ALIGN_CORNERS
    b, k = acts.shape[:2]
    size = images.shape[-2:]
    flat = acts.reshape(b * k, 1, *acts.shape[-2:])
    cdt = torch.promote_types(acts.dtype, torch.float32)
    scores = torch.empty((b * k, classes.shape[1]), dtype=cdt, device=acts.device)
    for start in range(0, b * k, batch_size):
        idx = torch.arange(start, min(start + batch_size, b * k), device=acts.device)
        img = idx // k
        up = F.interpolate(flat[idx].to(cdt), size=size, mode="bilinear", align_corners=align_corners).flatten(1)
        lo = up.amin(dim=1, keepdim=True)
        hi = up.amax(dim=1, keepdim=True)
        masks = ((up - lo) / (hi - lo + SCORECAM_EPS)).view(-1, 1, *size)
        out = forward(images[img] * masks.to(images.dtype))
        scores[start : start + len(idx)] = out.to(cdt).gather(1, classes[img])
    return torch.softmax(sign * scores.view(b, k, -1), dim=1).transpose(1, 2)


# -- Guided backpropagation -----------------------------------------------------------------------------
class _GuidedReLU(torch.autograd.Function):
    """Identity on a ReLU's output; backward passes only positive gradients where the output is positive."""

    generate_vmap_rule = True  # every class's cotangent in one batched backward

    @staticmethod
    def forward(out: torch.Tensor) -> torch.Tensor:
        return out.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        return grad.clamp_min(0) * (out > 0).to(grad.dtype)


@contextlib.contextmanager
def guided_relus(model: nn.Module) -> Iterator[int]:
    """Guided backpropagation on every ``nn.ReLU`` of ``model`` while inside; yields their count.

    A forward hook passes each ReLU's output through ``_GuidedReLU``: with the ReLU's own backward
    (which masks where the input was positive) the gradient becomes ReLU(grad) * [x > 0], the rule
    of Springenberg et al. Functional ``F.relu`` calls are not seen (as in pytorch-grad-cam).
    The hooks are removed on exit, also when the body raises.
    """
    handles = [
        m.register_forward_hook(lambda mod, args, out: _GuidedReLU.apply(out))
        for m in model.modules()
        if isinstance(m, nn.ReLU)
    ]
    try:
        yield len(handles)
    finally:
        for h in handles:
            h.remove()


def guided_backprop(
    model: nn.Module,
    images: torch.Tensor,
    classes: torch.Tensor,
    score_fn: Callable[[object], torch.Tensor],
    *,
    sign: float = 1.0,
) -> torch.Tensor:
    """d y^c / d x under guided backpropagation, for every explained class at once: (B, C, 3, H, W).

    One forward of the whole model with a graph, then one backward batched over the C one-hot
    cotangents (``is_grads_batched``); the caller's parameters get no ``.grad``.
    """
    with guided_relus(model), torch.enable_grad():
        x = images.detach().requires_grad_(True)
        scores = score_fn(model(x))
        c = classes.shape[1]
        cot = torch.zeros((c, *scores.shape), dtype=scores.dtype, device=scores.device)
        cot.scatter_(2, classes.t().unsqueeze(-1), sign)
        (grads,) = torch.autograd.grad(scores, x, cot, is_grads_batched=True)
    return grads.transpose(0, 1)


def guided_gradcam(gb: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
    """Guided backprop (B, C, 3, H, W) times a normalized map at input size (B, C, H, W), then
    min-max normalized per (image, class) over its 3*H*W values; a constant product becomes 0."""
    dt = torch.promote_types(gb.dtype, torch.float32)
    prod = (gb.to(dt) * saliency.unsqueeze(2).to(dt)).flatten(2)
    lo = prod.amin(dim=2, keepdim=True)
    rng = prod.amax(dim=2, keepdim=True) - lo
    out = torch.where(rng > 0, (prod - lo) / torch.where(rng > 0, rng, torch.ones_like(rng)), torch.zeros_like(prod))
    return out.view_as(gb)


__all__ = [
    "GRADIENT_METHODS",
    "METHODS",
    "CamInputs",
    "Method",
    "guided_backprop",
    "guided_gradcam",
    "guided_relus",
    "parse_methods",
    "principal_projection",
    "scorecam_weights",
]
