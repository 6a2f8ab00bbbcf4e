"""``timm:NAME``: a PyTorch Image Models architecture with random weights, and its data config.

The model is ``timm.create_model(NAME, pretrained=False, num_classes=...)``: nothing is
downloaded; trained weights come from ``--weights`` (``engine/models/weights.py``). The data
config (``timm.data.resolve_data_config``) becomes a ``ModelPreprocess``, translated as timm's own
eval transform does it: center mode resizes the shorter side to floor(size / crop_pct) and crops
``size``; squash mode resizes to floor(size / crop_pct) square and crops ``size``.
"""

from __future__ import annotations

import math

import torch.nn as nn

from gradcam_batch.engine.errors import first_line
from gradcam_batch.engine.models.preprocess import INTERPOLATIONS, ModelPreprocess


def _timm():
    from gradcam_batch.engine.models.loader import ModelSpecError

    try:
        import timm
    except ImportError:
        raise ModelSpecError("timm: specs need the timm package (pip install 'gradcam-batch[timm]')") from None
    return timm


def _check_name(timm, name: str) -> None:
    from gradcam_batch.engine.models.loader import ModelSpecError

    if not name or not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:6] if name else []
        hint = f"; did you mean {', '.join(close)}?" if close else " (see timm.list_models())"
        raise ModelSpecError(f"unknown timm model {name!r}{hint}")


def timm_model(name: str, num_classes: int | None) -> nn.Module:
    """``timm.create_model(name, pretrained=False[, num_classes=N])``, with one-line errors."""
    from gradcam_batch.engine.models.loader import ModelSpecError

    timm = _timm()
    _check_name(timm, name)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except Exception as exc:
        raise ModelSpecError(f"timm model {name!r} could not be built: {first_line(exc)}") from None


def timm_preprocess(name: str) -> ModelPreprocess:
    """The eval preprocessing of timm's data config for ``name`` (no model is built)."""
    from gradcam_batch.engine.models.loader import ModelSpecError

    timm = _timm()
    _check_name(timm, name)
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    data = resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg is not None else {})
    _, h, w = data["input_size"]
    crop_pct = float(data.get("crop_pct") or 0.875)
    mode = data.get("crop_mode") or "center"
    interpolation = data.get("interpolation") or "bilinear"
    if interpolation not in INTERPOLATIONS:
        interpolation = "bicubic"  # timm's "random" is a training-time choice; bicubic is its eval default
    sh, sw = math.floor(h / crop_pct), math.floor(w / crop_pct)
    if mode == "center" and h == w:
        resize: int | tuple[int, int] = sh
    elif mode == "squash":
        resize = (sh, sw)
    else:
        raise ModelSpecError(
            f"timm model {name!r} uses crop mode {mode!r} at {h}x{w}, which run cannot reproduce; "
            "pass --resize and --crop"
        )
    return ModelPreprocess(
        resize=resize,
        crop=(h, w),
        mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
        std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
        interpolation=interpolation,
        source=f"timm data config of {name}",
    )


__all__ = ["timm_model", "timm_preprocess"]
