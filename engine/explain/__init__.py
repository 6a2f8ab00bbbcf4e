"""The math: ``explain()``/``Explainer``, the graph split at the target layer, layer discovery,
transformer tokens and the compiled backbone. Works on tensors; knows nothing of files."""

from gradcam_batch.engine.explain.explainer import Explainer, Explanation, explain
from gradcam_batch.engine.explain.layers import LayerInfo, TargetLayerError, detect_target_layer, probe_layers
from gradcam_batch.engine.explain.tasks import TaskError, TaskExplainer, TaskExplanation, detect_task
from gradcam_batch.engine.explain.trunk import FeatureMap, last_feature_map

__all__ = [
    "Explainer",
    "Explanation",
    "FeatureMap",
    "LayerInfo",
    "TargetLayerError",
    "TaskError",
    "TaskExplainer",
    "TaskExplanation",
    "detect_target_layer",
    "detect_task",
    "explain",
    "last_feature_map",
    "probe_layers",
]
