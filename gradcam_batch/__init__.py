"""gradcam-batch: high-throughput, batched Grad-CAM.

The Python API in one call::

    import gradcam_batch
    exp = gradcam_batch.explain(model, images, top_k=3)
    exp.heatmaps  # (B, 3, H, W) in [0, 1]

See ``gradcam_batch.engine`` for the engine, ``gradcam_batch.kernels`` for the fused
post-processing kernel and ``gradcam_batch.cli`` for the command line.

``explain``, ``Explainer``, ``Explanation``, ``audit`` and ``AuditResult`` are imported on first
use, so that importing the package (as ``gradcam-batch --help`` does) does not import torch.
"""

from gradcam_batch.version import __version__

_LAZY = {"Explainer", "Explanation", "explain"}
_LAZY_AUDIT = {"audit", "AuditResult"}


def __getattr__(name: str):
    if name in _LAZY:
        from gradcam_batch.engine.explain import explainer

        return getattr(explainer, name)
    if name in _LAZY_AUDIT:
        from gradcam_batch.engine.audit import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'gradcam_batch' has no attribute {name!r}")


__all__ = ["AuditResult", "Explainer", "Explanation", "audit", "explain", "__version__"]
