"""Models from a spec string (``--model``): torchvision, timm, Hugging Face directories, factory files and
modules, TorchScript, ``.pt2`` and ONNX Runtime; weights files (safetensors, state dicts, checkpoints).
``load_model`` is the one entry point; see the README's "Models and backends" section."""

from gradcam_batch.engine.models.loader import ModelSpecError, load_model, model_preprocessing
from gradcam_batch.engine.models.preprocess import ModelPreprocess

__all__ = ["ModelPreprocess", "ModelSpecError", "load_model", "model_preprocessing"]
