"""Transformer (token) outputs as Grad-CAM maps: ``reshape="tokens"``.

A vision transformer's blocks output (B, N, D): E extra tokens (the class token, distillation
or register tokens) followed by the h*w patch tokens in row-major order. Grad-CAM needs
(B, K, h, w), so the patch tokens are reshaped to the patch grid and the D features become the
K channels. The extra tokens are kept aside unchanged: the head still receives the full
(B, N, D) sequence, rebuilt from the map, so the gradient w.r.t. the map is exactly the
gradient w.r.t. the patch tokens.

The grid is given as ``"HxW"`` or inferred: the largest h*w <= N with the image's aspect ratio
(square images: floor(sqrt(N))^2), and E = N - h*w leading extra tokens. A 4-D output whose last
dimension is its largest, (B, H, W, C) with C > H (timm's Swin: (B, 7, 7, 768)), is a token grid
already: it is permuted to (B, C, H, W), with no extra tokens. Any other 4-D output, such as a
(B, K, h, w) convolution map, is refused as a token layer.

Auto-detection for token models is the rule of ``engine/explain/trunk.py``: the trunk's last token map.
Where the classifier pools the tokens (Swin, Mixer, Twins, LeViT) that is the map it pools (``norm``,
``stages.2``); where it reads the class token, the last earlier layer of the same shape whose patch tokens
the scores depend on, a normalization layer if there is one: the last block's pre-attention LayerNorm
(``encoder.layers.encoder_layer_L.ln_1`` in torchvision, ``blocks.L.norm1`` in timm), the usual choice for
ViT Grad-CAM, ahead of the attention's own projections (timm's ``qkv``, Transformers' ``v_proj``), which run
after it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch
import torch.nn as nn

from gradcam_batch.engine.explain.layers import TargetLayerError

RESHAPES = (None, "tokens")
# The "prefix" of a (B, H, W, C) grid: there are no extra tokens, only the layout to restore.
CHANNELS_LAST = "channels_last"


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
) -> tuple[torch.Tensor, torch.Tensor | str]:
    """(B, N, D) -> ((B, D, h, w) map of the patch tokens, (B, E, D) extra tokens).

    (B, H, W, C) -> ((B, C, H, W), ``CHANNELS_LAST``).
    """
    if isinstance(tokens, torch.Tensor) and tokens.dim() == 4 and tokens.shape[3] > max(tokens.shape[1:3]):
        if grid is not None and tuple(grid) != tuple(tokens.shape[1:3]):
            raise TargetLayerError(
                f"token grid {grid[0]}x{grid[1]} does not match the (B, H, W, C) layer's "
                f"{tokens.shape[1]}x{tokens.shape[2]}"
            )
        return tokens.permute(0, 3, 1, 2).contiguous(), CHANNELS_LAST
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


def map_to_tokens(cam_map: torch.Tensor, prefix: torch.Tensor | str) -> torch.Tensor:
    """The inverse of ``tokens_to_map``: (B, D, h, w) and (B, E, D) -> (B, E + h*w, D)."""
    if isinstance(prefix, str):  # CHANNELS_LAST
        return cam_map.permute(0, 2, 3, 1)
    b, d = cam_map.shape[:2]
    patches = cam_map.reshape(b, d, -1).transpose(1, 2)
    return torch.cat([prefix.to(patches.dtype), patches], dim=1)


def detect_token_layer(
    model: nn.Module,
    sample: torch.Tensor,
    score_fn: Callable[[object], torch.Tensor],
    grid: tuple[int, int] | None = None,
) -> str:
    """The trunk's last token map (``reshape="tokens"``; see engine/explain/trunk.py)."""
    from gradcam_batch.engine.explain.trunk import last_feature_map

    return last_feature_map(model, sample, score_fn, reshape="tokens", token_grid=grid).layer


__all__ = [
    "CHANNELS_LAST",
    "RESHAPES",
    "detect_token_layer",
    "infer_grid",
    "map_to_tokens",
    "parse_grid",
    "tokens_to_map",
]
