"""Choose the Triton kernel or the torch reference for ``fused_cam``."""

from __future__ import annotations

import os

import torch

from gradcam_batch.kernels.reference import DEFAULT_EPS, CamMaps, fused_cam_reference

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "GRADCAM_BATCH_KERNEL"


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' means: the environment variable when set, else Triton on CUDA and torch elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if env not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={env!r} is not one of {', '.join(BACKENDS)}")
        backend = env
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    return backend


def fused_cam(
    acts: torch.Tensor,
    weights: torch.Tensor,
    out_size: tuple[int, int] | None,
    *,
    relu: bool = True,
    normalize: bool = True,
    out_dtype: torch.dtype = torch.uint8,
    eps: float = DEFAULT_EPS,
    backend: str = "auto",
) -> CamMaps:
    """Grad-CAM post-processing for (B, K, h, w) activations and (B, C, K) weights.

    Returns ``CamMaps(cams, heatmaps, cam_max, peaks)``; see ``kernels.reference`` for the
    exact semantics both backends implement.
    """
    if acts.dim() != 4:
        raise ValueError(f"acts must be (B, K, h, w), got shape {tuple(acts.shape)}")
    if weights.dim() != 3 or weights.shape[0] != acts.shape[0] or weights.shape[2] != acts.shape[1]:
        raise ValueError(
            f"weights must be (B, C, K) = ({acts.shape[0]}, C, {acts.shape[1]}), got {tuple(weights.shape)}"
        )
    chosen = resolve_backend(backend, acts.device)
    if chosen == "triton" and acts.dtype != torch.float64:
        try:
            from gradcam_batch.kernels.fused_cam import fused_cam_triton
        except ImportError:  # the Triton kernel has not landed in this build
            fused_cam_triton = None
        if fused_cam_triton is not None:
            return fused_cam_triton(
                acts, weights, out_size, relu=relu, normalize=normalize, out_dtype=out_dtype, eps=eps
            )
    return fused_cam_reference(acts, weights, out_size, relu=relu, normalize=normalize, out_dtype=out_dtype, eps=eps)
