"""Post-processing kernels: weighting, ReLU, upsampling, normalization and quantization.

``fused_cam`` dispatches between the Triton kernel (CUDA tensors) and the pure-torch
reference (everything else). ``backend="triton"`` / ``backend="torch"`` force one of them;
the environment variable ``GRADCAM_BATCH_KERNEL`` (``auto``, ``triton``, ``torch``) does the
same for a whole run.
"""

from gradcam_batch.kernels.dispatch import fused_cam
from gradcam_batch.kernels.reference import DEFAULT_EPS, CamMaps, fused_cam_reference

__all__ = ["DEFAULT_EPS", "CamMaps", "fused_cam", "fused_cam_reference"]
