"""The engine: explain()/Explainer (the math), target-layer discovery and the graph split."""

from gradcam_batch.engine.explainer import Explainer, Explanation, explain
from gradcam_batch.engine.layers import LayerInfo, TargetLayerError, detect_target_layer, probe_layers

__all__ = [
    "Explainer",
    "Explanation",
    "LayerInfo",
    "TargetLayerError",
    "detect_target_layer",
    "explain",
    "probe_layers",
]
