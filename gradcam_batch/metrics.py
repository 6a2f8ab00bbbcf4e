"""``gradcam_batch.metrics``: the public name of ``gradcam_batch.engine.metrics`` (importing it imports torch).

Plain functions on tensors: ``deletion_insertion``, ``confidence_change``, ``box_metrics`` and the ranking rule
``rank_pixels`` (saliency descending, ties to the lower flat index ``y * W + x``).
"""

from gradcam_batch.engine.metrics import *  # noqa: F403
from gradcam_batch.engine.metrics import __all__  # noqa: F401
