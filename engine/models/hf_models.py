"""``hf:DIR``: a Hugging Face Transformers image classifier or segmentation model saved with ``save_pretrained``.

The directory is loaded with ``AutoModelForImageClassification`` (``AutoModelForSemanticSegmentation``
when its config names a ``...ForSemanticSegmentation`` architecture) and its preprocessing read from
``AutoImageProcessor``, both offline (``HF_HUB_OFFLINE=1`` for the call, ``local_files_only=True``)
and without remote code (``trust_remote_code=False``): a name that would need the hub is refused
with one line. The model is returned as it is; the engine takes ``.logits`` from its output
(``default_score_fn``) and gives ViT-family models the token reshape (``engine/explain/layers.py``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch.nn as nn

from gradcam_batch.engine.errors import first_line as _first_line
from gradcam_batch.engine.models.preprocess import ModelPreprocess

# PIL resampling codes, as image processors store them.
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def _error(message: str) -> Exception:
    from gradcam_batch.engine.models.loader import ModelSpecError

    return ModelSpecError(message)


def hf_directory(target: str) -> Path:
    """The local model directory of ``hf:DIR``; a name that is not a directory is refused (no hub access)."""
    path = Path(target).expanduser()
    if not target:
        raise _error("hf: needs a directory written by save_pretrained, e.g. hf:path/to/model")
    if not path.is_dir():
        raise _error(
            f"hf:{target} is not a local directory; hf: loads a directory written by save_pretrained and "
            "never downloads (fetch the model once, save it with save_pretrained, and pass that directory)"
        )
    if not (path / "config.json").is_file():
        raise _error(f"hf:{target} has no config.json; it is not a directory written by save_pretrained")
    return path


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 for the call (restored after), and no progress bars on stderr."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        try:
            import transformers
        except ImportError:
            raise _error("hf: specs need the transformers package (pip install 'gradcam-batch[hf]')") from None
        bars = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()
        try:
            yield
        finally:
            if bars:
                transformers.utils.logging.enable_progress_bar()
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def is_segmentation_config(path: Path) -> bool:
    """Whether a saved config names a semantic segmentation architecture (``...ForSemanticSegmentation``)."""
    import json

    try:
        architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return any(str(a).endswith("ForSemanticSegmentation") for a in architectures)


def hf_model(target: str, num_classes: int | None) -> nn.Module:
    """The model of ``DIR``, offline: ``AutoModelForSemanticSegmentation`` when its config names a
    ``...ForSemanticSegmentation`` architecture, ``AutoModelForImageClassification`` otherwise (a
    multi-label one too: its config's ``problem_type`` says so). ``num_classes`` resizes the head."""
    path = hf_directory(target)
    segmentation = is_segmentation_config(path)
    with _offline():
        from transformers import AutoModelForImageClassification, AutoModelForSemanticSegmentation

        auto = AutoModelForSemanticSegmentation if segmentation else AutoModelForImageClassification
        kwargs = {}
        if num_classes is not None:
            # A new head of that size, randomly initialized; --weights then fills it.
            kwargs = {"num_labels": num_classes, "ignore_mismatched_sizes": True}
        try:
            return auto.from_pretrained(str(path), local_files_only=True, trust_remote_code=False, **kwargs)
        except Exception as exc:
            what = "a segmentation model" if segmentation else "an image classifier"
            raise _error(f"hf:{target} could not be loaded as {what}: {_first_line(exc)}") from None


def hf_preprocess(target: str) -> ModelPreprocess | None:
    """The image processor's preprocessing, or None when the directory has no preprocessor config."""
    path = hf_directory(target)
    if not (path / "preprocessor_config.json").is_file():
        return None
    with _offline():
        from transformers import AutoImageProcessor

        try:
            proc = AutoImageProcessor.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        except Exception as exc:
            raise _error(f"hf:{target}: cannot read its image processor: {_first_line(exc)}") from None
    return processor_preprocess(proc, f"image processor of hf:{target} ({type(proc).__name__})")


def _get(size, key: str):
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value is not None else None


def processor_preprocess(proc, source: str) -> ModelPreprocess:
    """Translate an image processor (ViT, DeiT, ConvNeXt, BEiT, ... style) into a ``ModelPreprocess``."""
    what = type(proc).__name__
    rescale = getattr(proc, "rescale_factor", 1 / 255) if getattr(proc, "do_rescale", True) else None
    if rescale is None or abs(float(rescale) - 1 / 255) > 1e-9:
        raise _error(f"{what}: only a rescale by 1/255 can be reproduced; pass --mean and --std for this model")
    size = getattr(proc, "size", None) if getattr(proc, "do_resize", True) else None
    resize: int | tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    if size is not None:
        height, width, shortest = _get(size, "height"), _get(size, "width"), _get(size, "shortest_edge")
        crop_pct = getattr(proc, "crop_pct", None)
        if height and width:
            resize = (height, width)
        elif shortest and crop_pct is not None and type(proc).__name__.startswith("ConvNext"):
            # ConvNeXt's processor: below 384, resize to shortest_edge / crop_pct and crop; else squash.
            if shortest < 384:
                resize, crop = int(shortest / crop_pct), (shortest, shortest)
            else:
                resize = (shortest, shortest)
        elif shortest:
            resize = shortest
        else:
            raise _error(
                f"{what}: size {dict(size) if isinstance(size, dict) else size} cannot be reproduced; "
                "pass --resize and --crop"
            )
    if crop is None and getattr(proc, "do_center_crop", False):
        cs = getattr(proc, "crop_size", None)
        ch, cw = _get(cs, "height"), _get(cs, "width")
        if ch and cw:
            crop = (ch, cw)
    if crop is None and not isinstance(resize, tuple):
        raise _error(f"{what}: the processor fixes no image size; pass --resize and --crop")
    resample = getattr(proc, "resample", 2)
    resample = int(getattr(resample, "value", resample)) if resample is not None else 2
    if getattr(proc, "do_normalize", True):
        mean = tuple(float(v) for v in proc.image_mean)
        std = tuple(float(v) for v in proc.image_std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return ModelPreprocess(
        resize=resize,
        crop=crop,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        interpolation=_RESAMPLE.get(resample, "bicubic"),
        source=source,
    )


__all__ = ["hf_directory", "hf_model", "hf_preprocess", "processor_preprocess"]
