"""gradcam-batch: high-throughput, batched Grad-CAM.

The Python API in one call::

    import gradcam_batch
    exp = gradcam_batch.explain(model, images, top_k=3)
    exp.heatmaps  # (B, 3, H, W) in [0, 1]

See ``gradcam_batch.engine`` for the engine, ``gradcam_batch.kernels`` for the fused
post-processing kernel and ``gradcam_batch.cli`` for the command line.
"""

from gradcam_batch.engine.explainer import Explainer, Explanation, explain

__version__ = "0.1.0"

__all__ = ["Explainer", "Explanation", "explain", "__version__"]
