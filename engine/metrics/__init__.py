"""Faithfulness and localization metrics of saliency maps, as plain functions on tensors (issue 12).

- ``faithfulness``: deletion and insertion (RISE), average drop and increase in confidence (Grad-CAM++);
- ``localization``: the pointing game, energy inside boxes (Score-CAM), the Grad-CAM paper's box and its IoU;
  energy inside and IoU with a true segmentation mask.

Ranking rule, shared by every metric: pixels are ordered by saliency, descending; ties go to the lower flat
index ``y * W + x`` first (a stable sort of ``-saliency``). See ``rank_pixels`` and the README.
"""

from gradcam_batch.engine.metrics.faithfulness import (
    confidence_change,
    deletion_insertion,
    deletion_insertion_curves,
    rank_pixels,
    rise_blur_kernel,
)
from gradcam_batch.engine.metrics.localization import box_metrics, largest_component_boxes, mask_metrics

__all__ = [
    "box_metrics",
    "confidence_change",
    "deletion_insertion",
    "deletion_insertion_curves",
    "largest_component_boxes",
    "mask_metrics",
    "rank_pixels",
    "rise_blur_kernel",
]
