"""Models from a spec string (``--model``): torchvision, factory files and modules, TorchScript,
``.pt2`` and ONNX Runtime. ``load_model`` is the one entry point; see the README's backends section."""

from gradcam_batch.engine.models.loader import ModelSpecError, load_model

__all__ = ["ModelSpecError", "load_model"]
