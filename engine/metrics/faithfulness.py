"""Faithfulness: deletion and insertion (RISE) and average drop / increase in confidence (Grad-CAM++).

Every perturbed image of a batch (all images x all classes x all steps) goes through the model in forward
chunks of ``batch_size``; points that do not depend on the class (the image, the all-zero image, the blurred
image) are forwarded once. The maps are used as given: (B, C, H, W) at the input resolution, in [0, 1].

Ranking rule: pixels are ordered by saliency, descending; ties go to the lower flat index ``y * W + x`` first
(a stable sort of ``-saliency``). RISE's reference (``np.argsort`` then flip) leaves ties to the sort;
torchcam's ``argsort(descending=True, stable=True)`` is this rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

ScoreFn = Callable[[object], torch.Tensor]


def rank_pixels(saliency: torch.Tensor) -> torch.Tensor:
    """Flat pixel indices ``y * W + x`` of (..., H, W) maps, most salient first: (..., H*W) int64.

    Ties go to the lower flat index first: a stable sort of ``-saliency``.
    """
    flat = saliency.flatten(-2)
    return torch.sort(flat, dim=-1, descending=True, stable=True).indices


def _pixel_ranks(saliency: torch.Tensor) -> torch.Tensor:
    """Inverse of ``rank_pixels``: the rank of each flat pixel (0 = most salient), (..., H*W) int64."""
    order = rank_pixels(saliency)
    ranks = torch.empty_like(order)
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return ranks.scatter_(-1, order, positions)


def rise_blur_kernel(size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """The 1-D factor ``k`` of RISE's blur kernel: RISE's 2-D kernel is ``outer(k, k)``, float64 (size,).

    RISE's ``gkern`` runs ``scipy.ndimage.gaussian_filter(delta, sigma)`` on a centred delta of size x size:
    a normalized Gaussian of radius ``int(4 * sigma + 0.5)`` (scipy's truncate=4) whose tails are reflected
    back into the window (scipy's half-sample ``reflect`` mode), so the kernel sums to 1 but is not a
    truncated Gaussian. The Gaussian filter is separable and so is the delta, hence the outer product.
    """
    if size < 1 or sigma <= 0:
        raise ValueError(f"blur needs size >= 1 and sigma > 0, got ({size}, {sigma})")
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    # Input position of output o and tap j, folded into [0, size) the way scipy's 'reflect' folds it.
    pos = torch.arange(size)[:, None] + offsets.long()[None, :]
    pos = pos.remainder(2 * size)
    pos = torch.where(pos >= size, 2 * size - 1 - pos, pos)
    return ((pos == size // 2).double() * weights).sum(dim=1)


def _blur(images: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Each channel correlated with RISE's kernel, zero padding of size // 2 (RISE's ``conv2d`` call)."""
    k = rise_blur_kernel(size, sigma).to(device=images.device, dtype=torch.float32)
    channels = images.shape[1]
    x = images.float()
    x = F.conv2d(x, k.view(1, 1, size, 1).expand(channels, 1, size, 1), padding=(size // 2, 0), groups=channels)
    x = F.conv2d(x, k.view(1, 1, 1, size).expand(channels, 1, 1, size), padding=(0, size // 2), groups=channels)
    return x.to(images.dtype)


def _default_score(output: object) -> torch.Tensor:
    logits = getattr(output, "logits", output)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model's output is a {type(output).__name__}; pass score_fn to get (B, N) logits from it")
    return logits


def _check_inputs(images: torch.Tensor, saliency: torch.Tensor, classes: torch.Tensor) -> None:
    if images.dim() != 4:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    b, _, h, w = images.shape
    if saliency.dim() != 4 or saliency.shape[0] != b or saliency.shape[2:] != (h, w):
        raise ValueError(f"saliency must be (B, C, H, W) = ({b}, C, {h}, {w}), got {tuple(saliency.shape)}")
    if classes.shape != saliency.shape[:2]:
        raise ValueError(f"classes must be (B, C) = {tuple(saliency.shape[:2])}, got {tuple(classes.shape)}")


ACTIVATIONS = ("softmax", "sigmoid")


def _probabilities(model: Callable, score_fn: ScoreFn | None, x: torch.Tensor, activation: str) -> torch.Tensor:
    """The class probabilities of ``x``: the softmax of the scores (a single-label classifier) or their
    sigmoid (a multi-label one, whose classes are independent)."""
    logits = (score_fn or _default_score)(model(x)).float()
    return logits.sigmoid() if activation == "sigmoid" else logits.softmax(dim=-1)


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")


def step_counts(hw: int, steps: int) -> list[int]:
    """Pixels perturbed at each of the steps + 1 points: ``min(HW, i * ceil(HW / steps))`` (RISE's step)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    step = math.ceil(hw / steps)
    return [min(hw, i * step) for i in range(steps + 1)]


def deletion_insertion_curves(
    model: Callable,
    images: torch.Tensor,
    saliency: torch.Tensor,
    classes: torch.Tensor,
    *,
    steps: int = 20,
    batch_size: int | None = None,
    blur: tuple[int, float] | None = (11, 5.0),
    score_fn: ScoreFn | None = None,
    activation: str = "softmax",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The deletion and insertion curves behind ``deletion_insertion``: two (B, C, steps + 1) float32 tensors.

    Point i is the softmax probability of the class with the top ``step_counts(H*W, steps)[i]`` ranked pixels
    deleted (set to 0) or inserted (into the blurred image). Arguments as in ``deletion_insertion``.
    """
    _check_inputs(images, saliency, classes)
    _check_activation(activation)
    b, n_classes = classes.shape
    _, _, h, w = images.shape
    hw = h * w
    device = images.device
    counts = step_counts(hw, steps)
    interior = [i for i, n in enumerate(counts) if 0 < n < hw]
    chunk = batch_size or b
    if chunk < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    with torch.inference_mode():
        ranks = _pixel_ranks(saliency.float())  # (B, C, HW)
        substrate = _blur(images, *blur) if blur is not None else torch.zeros_like(images)

        # Jobs, one per forwarded image: (image, class slot, insertion?, pixels perturbed). The first 2B + 1
        # are shared by all classes: each image (deletion's first point, insertion's last), its blurred
        # substrate (insertion's first) and one all-zero image (deletion's last; the same for every image).
        # A job keeps the image's pixels where (rank < count) == insertion and the substrate elsewhere.
        n_int = len(interior)
        grid_b, grid_c, grid_kind, grid_i = torch.meshgrid(
            torch.arange(b),
            torch.arange(n_classes),
            torch.arange(2),
            torch.tensor(interior, dtype=torch.long),
            indexing="ij",
        )
        interior_counts = torch.tensor(counts, dtype=torch.long)[grid_i.flatten()]
        job_b = torch.cat([torch.arange(b), torch.arange(b), torch.zeros(1, dtype=torch.long), grid_b.flatten()])
        job_c = torch.cat([torch.zeros(2 * b + 1, dtype=torch.long), grid_c.flatten()])
        job_ins = torch.cat(
            [
                torch.zeros(b, dtype=torch.bool),
                torch.ones(b, dtype=torch.bool),
                torch.zeros(1, dtype=torch.bool),
                grid_kind.flatten().bool(),
            ]
        )
        job_count = torch.cat(
            [torch.zeros(2 * b, dtype=torch.long), torch.full((1,), hw, dtype=torch.long), interior_counts]
        )
        job_b, job_c, job_ins, job_count = (t.to(device) for t in (job_b, job_c, job_ins, job_count))
        n_jobs = job_b.numel()

        job_scores = torch.empty(n_jobs, n_classes, device=device, dtype=torch.float32)  # prob of classes[b, :]
        zero_probs = None
        for start in range(0, n_jobs, chunk):
            sl = slice(start, min(start + chunk, n_jobs))
            jb, jc, jins, jcount = job_b[sl], job_c[sl], job_ins[sl], job_count[sl]
            keep = (ranks[jb, jc] < jcount[:, None]) == jins[:, None]
            sub = substrate[jb] * jins.view(-1, 1, 1, 1).to(substrate.dtype)
            x = torch.where(keep.view(-1, 1, h, w), images[jb], sub)
            probs = _probabilities(model, score_fn, x, activation)
            job_scores[sl] = probs.gather(1, classes[jb])
            if start <= 2 * b < sl.stop:
                zero_probs = probs[2 * b - start]

        image_p = job_scores[:b]
        blurred_p = job_scores[b : 2 * b]
        zero_p = zero_probs[classes]
        # Interior jobs are laid out (b, c, kind, i); each keeps the probability of its own class slot c.
        inner = job_scores[2 * b + 1 :].view(b, n_classes, 2, n_int, n_classes)
        inner = inner.diagonal(dim1=1, dim2=4).permute(0, 3, 1, 2)  # (B, C, 2, n_int)

        deletion = torch.empty(b, n_classes, steps + 1, device=device, dtype=torch.float32)
        insertion = torch.empty_like(deletion)
        slot = {i: k for k, i in enumerate(interior)}
        for i, n in enumerate(counts):
            if n == 0:
                deletion[..., i], insertion[..., i] = image_p, blurred_p
            elif n == hw:
                deletion[..., i], insertion[..., i] = zero_p, image_p
            else:
                deletion[..., i], insertion[..., i] = inner[:, :, 0, slot[i]], inner[:, :, 1, slot[i]]
    return deletion, insertion


def _auc(curve: torch.Tensor) -> torch.Tensor:
    steps = curve.shape[-1] - 1
    return (curve.sum(-1) - curve[..., 0] / 2 - curve[..., -1] / 2) / steps


def deletion_insertion(
    model: Callable,
    images: torch.Tensor,
    saliency: torch.Tensor,
    classes: torch.Tensor,
    *,
    steps: int = 20,
    batch_size: int | None = None,
    blur: tuple[int, float] | None = (11, 5.0),
    score_fn: ScoreFn | None = None,
    activation: str = "softmax",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deletion and insertion AUC (Petsiuk et al. 2018, RISE, arXiv:1806.07421): two (B, C) float32 tensors.

    Pixels are ranked by ``rank_pixels``. Point i = 0..steps perturbs the top ``n_i = min(HW, i * ceil(HW /
    steps))`` pixels (RISE's step; ``n_steps`` equal steps as in torchcam, default 20), all channels at once:

    - deletion: the image with those pixels set to 0 in the normalized input space (RISE: zeros substrate);
    - insertion: the blurred image with those pixels taken from the image. The blur is RISE's: Gaussian,
      kernel 11, sigma 5 (``blur=(11, 5.0)``; see ``rise_blur_kernel``), per channel, zero padding;
      ``blur=None`` starts from zeros instead (torchcam's default baseline).

    p_i = softmax(score_fn(model(x_i)))[class]; AUC = (sum_i p_i - p_0 / 2 - p_steps / 2) / steps (RISE's
    ``auc``: the trapezoid over fractions i / steps). Low deletion and high insertion mean a faithful map.
    torchcam integrates over the perturbed fractions n_i / HW instead: the same AUC when steps divides HW.
    On maps so small that fewer than ``steps`` steps cover HW, the last points repeat the full perturbation.

    Args:
        model: any callable, images -> output; it is called under ``torch.inference_mode()`` and left in
            the mode it is in (torchcam switches to eval; call ``model.eval()`` first).
        images: (B, 3, H, W), normalized as the model expects.
        saliency: (B, C, H, W) in [0, 1], at the images' resolution.
        classes: (B, C) int64, the class explained by each map.
        steps: number of equal steps; steps + 1 points. Default 20 (torchcam's default).
        batch_size: perturbed images per forward; default B.
        blur: (kernel size, sigma) of the insertion substrate, or None for zeros. Default (11, 5.0) (RISE).
        score_fn: output -> (B, N) logits; default the output, or its ``.logits``.
        activation: ``"softmax"`` (default) or ``"sigmoid"`` for a multi-label model: what turns the
            logits into the probabilities p_i.

    The image, the blurred image and the all-zero image are forwarded once (not per class); the other
    points cost 2 * C * (steps - 1) forwards per image.
    """
    deletion, insertion = deletion_insertion_curves(
        model,
        images,
        saliency,
        classes,
        steps=steps,
        batch_size=batch_size,
        blur=blur,
        score_fn=score_fn,
        activation=activation,
    )
    return _auc(deletion), _auc(insertion)


def confidence_change(
    model: Callable,
    images: torch.Tensor,
    saliency: torch.Tensor,
    classes: torch.Tensor,
    *,
    batch_size: int | None = None,
    score_fn: ScoreFn | None = None,
    activation: str = "softmax",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop and increase in confidence (Chattopadhay et al. 2018, Grad-CAM++, arXiv:1710.11063): (B, C) each.

    Y = softmax(model(image))[class], O = softmax(model(image * saliency))[class], the map broadcast over the
    channels and multiplied in the normalized input space (as torchcam does); drop = max(0, Y - O) / Y
    (float32; the paper's "average drop" is its mean, in [0, 1] here rather than percent), increase = O > Y
    (bool; its mean is the "increase in confidence"). torchcam divides by Y + 1e-7; here by Y, so ours is
    larger by a factor (Y + 1e-7) / Y (under 1e-6 relative for Y > 0.1).

    ``batch_size``: images per forward, default B; ``score_fn`` and ``activation`` as in ``deletion_insertion``.
    """
    _check_inputs(images, saliency, classes)
    _check_activation(activation)
    b, n_classes = classes.shape
    chunk = batch_size or b
    if chunk < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    with torch.inference_mode():
        y = torch.cat([_probabilities(model, score_fn, images[s : s + chunk], activation) for s in range(0, b, chunk)])
        y = y.gather(1, classes)
        flat_b = torch.arange(b, device=images.device).repeat_interleave(n_classes)
        flat_sal = saliency.reshape(b * n_classes, 1, *saliency.shape[2:])
        flat_cls = classes.reshape(-1, 1)
        o = torch.cat(
            [
                _probabilities(
                    model,
                    score_fn,
                    images[flat_b[s : s + chunk]] * flat_sal[s : s + chunk].to(images.dtype),
                    activation,
                ).gather(1, flat_cls[s : s + chunk])
                for s in range(0, b * n_classes, chunk)
            ]
        ).view(b, n_classes)
    drop = (y - o).clamp_min(0) / y
    return drop.float(), o > y
