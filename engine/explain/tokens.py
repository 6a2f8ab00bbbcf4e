"""Transformer (token) outputs as Grad-CAM maps: ``reshape="tokens"``.

A vision transformer's blocks output (B, N, D): E extra tokens (the class token, distillation
or register tokens) followed by the h*w patch tokens in row-major order. Grad-CAM needs
(B, K, h, w), so the patch tokens are reshaped to the patch grid and the D features become the
K channels. The extra tokens are kept aside unchanged: the head still receives the full
(B, N, D) sequence, rebuilt from the map, so the gradient w.r.t. the map is exactly the
gradient w.r.t. the patch tokens.

The grid is given as ``"HxW"`` or inferred: the largest h*w <= N with the image's aspect ratio
(square images: floor(sqrt(N))^2), and E = N - h*w leading extra tokens.

Auto-detection for token models picks the last module with a (B, N, D) output whose patch
tokens the scores depend on. In a ViT only the class token reaches the classifier after the
last attention, so this is the last block's pre-attention LayerNorm
(``encoder.layers.encoder_layer_L.ln_1`` in torchvision), the usual choice for ViT Grad-CAM.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch
import torch.nn as nn

from gradcam_batch.engine.explain.layers import TargetLayerError

RESHAPES = (None, "tokens")


def parse_grid(grid: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"14x14"`` or ``(14, 14)`` -> (14, 14); None stays None (infer)."""
    if grid is None:
        return None
    if isinstance(grid, str):
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", grid)
        if not m:
            raise ValueError(f"token grid must look like HxW (e.g. 14x14), got {grid!r}")
        h, w = int(m.group(1)), int(m.group(2))
    else:
        try:
            h, w = (int(v) for v in grid)
        except (TypeError, ValueError):
            raise ValueError(f"token grid must be (H, W), got {grid!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"token grid must be positive, got {h}x{w}")
    return h, w


def infer_grid(n_tokens: int, image_hw: tuple[int, int] | None = None) -> tuple[int, int]:
    """The largest patch grid that fits ``n_tokens`` with the image's aspect ratio."""
    best = None
    if image_hw is not None and image_hw[0] != image_hw[1]:
        ih, iw = image_hw
        g = math.gcd(ih, iw)
        rh, rw = ih // g, iw // g
        k = math.isqrt(n_tokens // (rh * rw)) if n_tokens >= rh * rw else 0
        if k >= 1:
            best = (rh * k, rw * k)
    if best is None:
        s = math.isqrt(n_tokens)
        best = (s, s)
    if best[0] * best[1] < 1:
        raise ValueError(f"cannot infer a patch grid for {n_tokens} tokens")
    return best


def tokens_to_map(
    tokens: torch.Tensor, grid: tuple[int, int] | None = None, image_hw: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, D) -> ((B, D, h, w) map of the patch tokens, (B, E, D) extra tokens)."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise TargetLayerError(f"reshape='tokens' needs a (B, N, D) token output, got {shape}")
    b, n, d = tokens.shape
    h, w = grid if grid is not None else infer_grid(n, image_hw)
    extra = n - h * w
    if extra < 0:
        raise TargetLayerError(f"token grid {h}x{w} needs {h * w} patch tokens, the layer has {n}")
    prefix = tokens[:, :extra]
    patches = tokens[:, extra:]
    return patches.transpose(1, 2).reshape(b, d, h, w), prefix


def map_to_tokens(cam_map: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """The inverse of ``tokens_to_map``: (B, D, h, w) and (B, E, D) -> (B, E + h*w, D)."""
    b, d = cam_map.shape[:2]
    patches = cam_map.reshape(b, d, -1).transpose(1, 2)
    return torch.cat([prefix.to(patches.dtype), patches], dim=1)


def detect_token_layer(
    model: nn.Module,
    sample: torch.Tensor,
    score_fn: Callable[[object], torch.Tensor],
    grid: tuple[int, int] | None = None,
) -> str:
    """The last module with a (B, N, D) output whose patch tokens the scores depend on."""
    records: list[tuple[str, torch.Tensor]] = []
    calls: dict[str, int] = {}
    handles = []

    def make_hook(name):
        def hook(module, args, output):
            calls[name] = calls.get(name, 0) + 1
            if isinstance(output, torch.Tensor) and output.dim() == 3:
                records.append((name, output))

        return hook

    try:
        for name, mod in model.named_modules():
            if name:
                handles.append(mod.register_forward_hook(make_hook(name)))
        with torch.enable_grad():
            scores = score_fn(model(sample.detach().clone().requires_grad_(True)))
    finally:
        for h in handles:
            h.remove()
    image_hw = (sample.shape[-2], sample.shape[-1])
    cands = [(n, t) for n, t in records if calls[n] == 1 and t.requires_grad]
    if cands and scores.requires_grad:
        grads = torch.autograd.grad(scores.sum(), [t for _, t in cands], allow_unused=True)
        for (name, t), g in reversed(list(zip(cands, grads, strict=True))):
            if g is None:
                continue
            h, w = grid if grid is not None else infer_grid(t.shape[1], image_hw)
            extra = t.shape[1] - h * w
            if extra < 0 or h * w < 2:
                continue
            if bool(g[:, extra:].abs().amax() > 0):
                return name
    seen = "; ".join(f"{n} {list(t.shape)}" for n, t in records[-8:]) or "none"
    raise TargetLayerError(
        "could not find a token layer: no module outputs (B, N, D) tokens whose patch tokens the scores depend on. "
        f"3-D outputs seen: {seen}. Pass target_layer= explicitly (a zero-initialized classifier, as in a freshly "
        "built torchvision ViT, has no gradients at all: load trained weights)."
    )


__all__ = ["RESHAPES", "detect_token_layer", "infer_grid", "map_to_tokens", "parse_grid", "tokens_to_map"]
