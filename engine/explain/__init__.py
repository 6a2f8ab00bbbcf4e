"""The math: ``explain()``/``Explainer``, the graph split at the target layer, layer discovery,
transformer tokens and the compiled backbone. Works on tensors; knows nothing of files."""

from gradcam_batch.engine.explain.explainer import Explainer, Explanation, explain
from gradcam_batch.engine.explain.layers import LayerInfo, TargetLayerError, detect_target_layer, probe_layers

__all__ = [
    "Explainer",
    "Explanation",
    "LayerInfo",
    "TargetLayerError",
    "detect_target_layer",
    "explain",
    "probe_layers",
]
