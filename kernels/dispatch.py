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
    exact semantics both backends implement. ``out_size=None`` skips the heatmaps.

    ``backend="auto"`` follows ``GRADCAM_BATCH_KERNEL`` when it is set, else runs the Triton
    kernel on CUDA tensors and the torch reference elsewhere. A backend named by the argument or
    the variable is used or fails loudly: forced Triton raises when Triton cannot be imported or
    the activations are float64, and on CPU tensors it needs TRITON_INTERPRET=1.
    """
    if acts.dim() != 4:
        raise ValueError(f"acts must be (B, K, h, w), got shape {tuple(acts.shape)}")
    if weights.dim() != 3 or weights.shape[0] != acts.shape[0] or weights.shape[2] != acts.shape[1]:
        raise ValueError(
            f"weights must be (B, C, K) = ({acts.shape[0]}, C, {acts.shape[1]}), got {tuple(weights.shape)}"
        )
    if out_size is not None and not _valid_size(out_size):
        raise ValueError(f"out_size must be two positive ints (H, W) or None, got {out_size!r}")
    chosen = resolve_backend(backend, acts.device)
    if chosen == "triton":
        kernel = _triton_kernel(forced=forced_backend(backend), acts=acts)
        if kernel is not None:
            return kernel(acts, weights, out_size, relu=relu, normalize=normalize, out_dtype=out_dtype, eps=eps)
    return fused_cam_reference(acts, weights, out_size, relu=relu, normalize=normalize, out_dtype=out_dtype, eps=eps)


def _valid_size(out_size) -> bool:
    try:
        return len(out_size) == 2 and all(int(n) == n and n > 0 for n in out_size)
    except TypeError:
        return False


def forced_backend(backend: str) -> bool:
    """True when the caller or the environment named a backend, rather than leaving it to the device."""
    return backend != "auto" or os.environ.get(ENV_VAR, "auto").strip().lower() not in ("", "auto")


def _triton_kernel(*, forced: bool, acts: torch.Tensor):
    """The Triton launcher, or None when 'auto' picked Triton but it cannot serve these inputs.

    A backend that was asked for by name never falls back silently: it raises instead.
    """
    if acts.dtype == torch.float64:
        if forced:
            raise ValueError(
                "the Triton kernel takes float32, float16 or bfloat16 activations, not float64; use backend='torch'"
            )
        return None
    try:
        from gradcam_batch.kernels.cam_kernel import fused_cam_triton
    except ImportError as exc:
        if forced:
            raise RuntimeError(f"kernel backend 'triton' was requested but Triton cannot be imported: {exc}") from exc
        return None
    return fused_cam_triton
