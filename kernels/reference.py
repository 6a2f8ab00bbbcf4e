"""Pure-torch reference of the fused CAM post-processing.

It is written for clarity, computes in float32 (float64 when the inputs are float64),
and is the CPU path in production. The Triton kernel in ``cam_kernel.py`` must match it:
within 1 LSB for uint8 heatmaps and 1e-5 absolute for float32 ones.

Steps, per (image b, class c):
  1. cam = sum_k weights[b, c, k] * acts[b, k]          (h, w)
  2. cam = ReLU(cam)                                     (optional)
  3. up  = bilinear upsample of cam to (H, W), exactly ``F.interpolate(mode="bilinear",
     align_corners=False)``
  4. heat = (up - min(up)) / (max(up) - min(up)), where the extremes are those of the
     upsampled map; a map whose range is at most ``eps * |max(up)|`` is "constant" (for
     example rounding noise from upsampling a 1x1 map) and becomes all zeros
  5. quantize: uint8 = floor(255 * heat + 0.5), or a cast to float16 / float32
The peak (y, x) is the first argmax of ``up`` in row-major order (before quantization,
which would create ties), and ``cam_max`` is the max of the low-resolution cam.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# A map whose upsampled range is at most DEFAULT_EPS * |max| is treated as constant.
DEFAULT_EPS = 1e-5


class CamMaps(NamedTuple):
    """What the fused post-processing returns."""

    cams: torch.Tensor  # (B, C, h, w) float32, after ReLU, unnormalized
    heatmaps: torch.Tensor  # (B, C, H, W) out_dtype
    cam_max: torch.Tensor  # (B, C) float32, max of the low-resolution cam
    peaks: torch.Tensor  # (B, C, 2) int64, (y, x) of the upsampled map's first maximum


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half inputs and float32, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def weighted_cams(acts: torch.Tensor, weights: torch.Tensor, *, relu: bool = True) -> torch.Tensor:
    """cam[b, c] = ReLU(sum_k weights[b, c, k] * acts[b, k]), in the compute dtype."""
    dt = compute_dtype(torch.promote_types(acts.dtype, weights.dtype))
    cams = torch.einsum("bck,bkhw->bchw", weights.to(dt), acts.to(dt))
    return cams.clamp_min(0) if relu else cams


def normalize_maps(maps: torch.Tensor, *, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Min-max normalize each (H, W) map of (B, C, H, W) to [0, 1]; constant maps become 0."""
    flat = maps.flatten(2)
    lo = flat.amin(dim=2, keepdim=True)
    hi = flat.amax(dim=2, keepdim=True)
    rng = hi - lo
    constant = rng <= eps * hi.abs()
    scale = torch.where(constant, torch.zeros_like(rng), 1.0 / torch.where(constant, torch.ones_like(rng), rng))
    return ((flat - lo) * scale).view_as(maps)


def quantize(maps: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """uint8 = floor(255 * x + 0.5) clamped to [0, 255]; float dtypes are a cast."""
    if out_dtype == torch.uint8:
        return torch.floor(maps * 255.0 + 0.5).clamp_(0, 255).to(torch.uint8)
    if out_dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return maps.to(out_dtype)
    raise ValueError(f"unsupported heatmap dtype {out_dtype}; use uint8, float16 or float32")


def fused_cam_reference(
    acts: torch.Tensor,
    weights: torch.Tensor,
    out_size: tuple[int, int] | None,
    *,
    relu: bool = True,
    normalize: bool = True,
    out_dtype: torch.dtype = torch.uint8,
    eps: float = DEFAULT_EPS,
) -> CamMaps:
    """Weighting, ReLU, bilinear upsampling, normalization and quantization in plain torch.

    ``out_size=None`` keeps the feature-map resolution and returns an empty heatmap tensor of
    shape (B, C, 0, 0); peaks then refer to the low-resolution cam.
    """
    cams = weighted_cams(acts, weights, relu=relu)
    b, c, h, w = cams.shape
    cam_max = cams.flatten(2).amax(dim=2)
    if out_size is None:
        flat_idx = cams.flatten(2).argmax(dim=2)
        peaks = torch.stack([flat_idx // w, flat_idx % w], dim=-1)
        heat = cams.new_empty((b, c, 0, 0), dtype=out_dtype)
        return CamMaps(cams, heat, cam_max, peaks)
    out_h, out_w = int(out_size[0]), int(out_size[1])
    if (out_h, out_w) == (h, w):
        up = cams
    else:
        up = F.interpolate(cams, size=(out_h, out_w), mode="bilinear", align_corners=False)
    flat_idx = up.flatten(2).argmax(dim=2)
    peaks = torch.stack([flat_idx // out_w, flat_idx % out_w], dim=-1)
    if normalize:
        up = normalize_maps(up, eps=eps)
    return CamMaps(cams, quantize(up, out_dtype), cam_max, peaks)
