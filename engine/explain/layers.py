"""Target-layer resolution and the probe listing of the ``layers`` command.

The default target layer is the trunk's last feature map, found from the graph of one probe forward
(``engine/explain/trunk.py``): the map before the network pools, or reads a class token, into the
classifier, or, for a dense output, the decoder's input. ``probe_layers`` lists every module of that
probe forward with its output shape, marks the feature maps the scores depend on, and the chosen one.
Pooling layers are never picked (the map before the pooling is wanted), nor are identity, dropout and
flatten modules, which alias the map that is picked (timm's ConvNeXt ends its stages in an
``nn.Identity``). Among modules that return the very same tensor (``layer4``, its last block, that
block's in-place ReLU) the last block of the outermost container is taken: ``layer4.1`` for a ResNet,
``features.12`` for MobileNetV3, ``features.7`` for ConvNeXt, the last ReLU before the pool for VGG.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

POOLING_TYPES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
# Modules that return their input unchanged in eval (or a view of it): never picked themselves, but they do
# not disqualify the tensor. timm puts them after the last stage (ConvNeXt's ``norm_pre``, RegNet's
# ``final_conv``, EfficientNet's ``bn2.drop``), where they alias the map that should be picked.
ALIAS_TYPES = (nn.Dropout, nn.Dropout2d, nn.Identity, nn.Flatten)


@dataclass
class LayerInfo:
    """One module seen in the probe forward."""

    name: str
    type: str
    shape: tuple[int, ...] | None  # output shape, None when the output is not a tensor
    calls: int  # how many times the module ran in one forward
    candidate: bool = False  # a feature map whose positions the scores depend on
    chosen: bool = False  # what auto-detection picks
    layout: str | None = None  # a candidate's layout: "spatial", "tokens" or "grid" (engine/explain/trunk.py)


class TargetLayerError(ValueError):
    """The target layer cannot be used or found."""


def layer_name_of(model: nn.Module, layer: nn.Module | str) -> str:
    """The qualified name of ``layer`` in ``model``, with a clear error when it is not there."""
    if isinstance(layer, str):
        try:
            model.get_submodule(layer)
        except AttributeError:
            names = [n for n, _ in model.named_modules() if n]
            hint = ", ".join(names[-12:])
            raise TargetLayerError(
                f"target layer {layer!r} is not a module of {type(model).__name__}; its last modules are: {hint}"
            ) from None
        return layer
    for name, mod in model.named_modules():
        if mod is layer:
            if not name:
                raise TargetLayerError("the target layer cannot be the model itself")
            return name
    raise TargetLayerError(f"the given target layer ({type(layer).__name__}) is not a submodule of the model")


def is_nested(inner: str, outer: str) -> bool:
    return inner.startswith(outer + ".")


def probe_layers(
    model: nn.Module,
    sample: torch.Tensor,
    score_fn: Callable[[object], torch.Tensor],
    reshape: str | None = None,
    token_grid: tuple[int, int] | None = None,
) -> list[LayerInfo]:
    """Run one forward and describe every module; marks candidates and the auto-detected one.

    Candidates are the feature maps whose positions the scores depend on: (B, K, h, w) maps, (B, N, D)
    tokens (on their patch tokens) and norms' (B, H, W, C) grids; with ``reshape="tokens"`` the token
    layouts only. The chosen one is what ``last_feature_map`` picks (engine/explain/trunk.py). The
    caller puts the model in the mode it wants (the engine uses eval) beforehand.
    """
    from gradcam_batch.engine.explain.trunk import candidate_maps, last_feature_map, run_probe

    probe = run_probe(model, sample, score_fn)
    try:
        chosen = last_feature_map(model, sample, score_fn, reshape=reshape, token_grid=token_grid, probe=probe)
    except TargetLayerError:
        chosen = None
    layouts = dict(candidate_maps(probe, reshape == "tokens", token_grid))
    infos = []
    for name in probe.order:
        out = probe.outputs[name]
        infos.append(
            LayerInfo(
                name=name,
                type=type(probe.modules[name]).__name__,
                shape=tuple(out.shape) if isinstance(out, torch.Tensor) else None,
                calls=probe.calls[name],
                candidate=name in layouts,
                chosen=chosen is not None and name == chosen.layer,
                layout=layouts.get(name),
            )
        )
    return infos


def detect_target_layer(model: nn.Module, sample: torch.Tensor, score_fn: Callable[[object], torch.Tensor]) -> str:
    """The auto-detected target layer's name (the trunk's last feature map), or a clear error."""
    from gradcam_batch.engine.explain.trunk import last_feature_map

    return last_feature_map(model, sample, score_fn).layer
