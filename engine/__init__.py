"""The engine, grouped by what each part is (the tree reads like the data flow):

- ``explain/``: the math: ``explain()``/``Explainer``, graph split, layers, tokens, compiled backbone;
- ``models/``: spec loading and backends (torch, ONNX Runtime);
- ``job/``: the run: ``RunPlan``, the one batch step, Parquet source and sink, manifest, and the
  local and Ray Data runners;
- ``demo/`` and ``bench/``: the demo's data and training, the benchmark harness (not on the
  runtime path).
"""

_LAZY = {"Explainer", "Explanation", "LayerInfo", "TargetLayerError", "detect_target_layer", "explain", "probe_layers"}


def __getattr__(name: str):
    # Imported on first use: the CLI reaches engine submodules without importing torch.
    if name in _LAZY:
        from gradcam_batch.engine import explain

        return getattr(explain, name)
    raise AttributeError(f"module 'gradcam_batch.engine' has no attribute {name!r}")


__all__ = [
    "Explainer",
    "Explanation",
    "LayerInfo",
    "TargetLayerError",
    "detect_target_layer",
    "explain",
    "probe_layers",
]
