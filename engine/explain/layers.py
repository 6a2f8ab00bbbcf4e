"""Target-layer resolution and auto-detection.

Auto-detection runs one probe forward on a single image with a forward hook on every
module and picks the last module whose output is a 4-D spatial map (B, K, h, w) with
h * w > 1 that the scores depend on. Two refinements make it pick the layer people expect:

- Pooling layers, and containers whose output *is* a pooling layer's output (VGG's
  ``features`` ends in a max-pool), are skipped: the map before the pooling is wanted.
  Identity, dropout and flatten modules are never picked, but the module whose output they
  pass on can be (timm's ConvNeXt ends its stages in an ``nn.Identity``).
- Several modules often return the very same tensor (``layer4``, its last block, and that
  block's in-place ReLU). Among them the engine takes the last block of the outermost
  container: ``layer4.1`` for a ResNet, ``features.12`` for MobileNetV3, ``features.7``
  (the last stage) for ConvNeXt, and the last ReLU before the pool for VGG.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

_SKIP_TYPES = (
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
_ALIAS_TYPES = (nn.Dropout, nn.Dropout2d, nn.Identity, nn.Flatten)


@dataclass
class LayerInfo:
    """One module seen in the probe forward."""

    name: str
    type: str
    shape: tuple[int, ...] | None  # output shape, None when the output is not a tensor
    calls: int  # how many times the module ran in one forward
    candidate: bool = False  # a 4-D spatial map that the scores depend on
    chosen: bool = False  # what auto-detection picks


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


def _is_nested(inner: str, outer: str) -> bool:
    return inner.startswith(outer + ".")


def probe_layers(
    model: nn.Module,
    sample: torch.Tensor,
    score_fn: Callable[[object], torch.Tensor],
    reshape: str | None = None,
    token_grid: tuple[int, int] | None = None,
) -> list[LayerInfo]:
    """Run one forward and describe every module; marks candidates and the auto-detected one.

    With ``reshape="tokens"`` the candidates are token outputs ((B, N, D), or a norm's (B, H, W, C)
    grid) and the chosen one is what ``detect_token_layer`` picks (engine/explain/tokens.py).
    The caller puts the model in the mode it wants (the engine uses eval) beforehand.
    """
    records: list[tuple[str, nn.Module, object]] = []
    calls: dict[str, int] = {}
    handles = []

    def make_hook(name: str):
        def hook(module, args, output):
            calls[name] = calls.get(name, 0) + 1
            records.append((name, module, output))

        return hook

    try:
        for name, mod in model.named_modules():
            if name:
                handles.append(mod.register_forward_hook(make_hook(name)))
        x = sample.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = model(x)
            scores = score_fn(out)
    finally:
        for h in handles:
            h.remove()

    # Last call of each module, in completion order.
    last: dict[str, int] = {}
    for i, (name, _, _) in enumerate(records):
        last[name] = i
    order = sorted(last.items(), key=lambda kv: kv[1])
    infos: dict[str, LayerInfo] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, i in order:
        _, mod, output = records[i]
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else None
        infos[name] = LayerInfo(name=name, type=type(mod).__name__, shape=shape, calls=calls[name])
        if isinstance(output, torch.Tensor):
            tensors[name] = output

    modules = {n: m for n, m, _ in records}
    if reshape == "tokens":
        spatial = [n for n, _ in order if n in tensors and _is_token_output(tensors[n], modules[n])]
    else:
        spatial = [
            n
            for n, _ in order
            if n in tensors and tensors[n].dim() == 4 and tensors[n].shape[2] * tensors[n].shape[3] > 1
        ]
    depends: dict[str, bool] = {}
    if spatial and scores.requires_grad:
        # enable_grad again: under a caller's no_grad, scores.sum() would have no graph.
        with torch.enable_grad():
            grads = torch.autograd.grad(
                scores.sum(), [tensors[n] for n in spatial], allow_unused=True, retain_graph=False
            )
        for n, g in zip(spatial, grads, strict=True):
            depends[n] = g is not None and (reshape != "tokens" or _patch_grads(g, token_grid, sample) > 0)
    for n in spatial:
        infos[n].candidate = depends.get(n, False)

    if reshape == "tokens":
        from gradcam_batch.engine.explain.tokens import detect_token_layer

        try:
            chosen = detect_token_layer(model, sample, score_fn, token_grid)
        except TargetLayerError:
            chosen = None
    else:
        chosen = _choose(order, tensors, infos, spatial, modules)
    if chosen is not None:
        infos[chosen].chosen = True
    return [infos[n] for n, _ in order]


def _patch_grads(g: torch.Tensor, grid: tuple[int, int] | None, sample: torch.Tensor) -> float:
    """The largest gradient magnitude on the patch tokens (the extra tokens lead, see tokens.py)."""
    from gradcam_batch.engine.explain.tokens import infer_grid

    if g.dim() == 3:
        h, w = grid if grid is not None else infer_grid(g.shape[1], (sample.shape[-2], sample.shape[-1]))
        g = g[:, max(0, g.shape[1] - h * w) :]
    return float(g.abs().amax())


def _is_token_output(t: torch.Tensor, module: nn.Module) -> bool:
    if t.dim() == 3:
        return t.shape[1] > 1 and t.shape[2] > 1
    is_norm = type(module).__name__.endswith("Norm")
    return t.dim() == 4 and is_norm and t.shape[3] > max(t.shape[1:3])


def _choose(order, tensors, infos, spatial, modules) -> str | None:
    def key(n: str):
        t = tensors[n]
        return (t.data_ptr(), tuple(t.shape), tuple(t.stride()))

    groups: dict[tuple, list[str]] = {}
    for n, _ in order:
        if n in tensors:
            groups.setdefault(key(n), []).append(n)
    seen: set[tuple] = set()
    for n in reversed(spatial):
        k = key(n)
        if k in seen:
            continue
        seen.add(k)
        group = groups[k]  # in completion order
        if any(isinstance(modules[m], _SKIP_TYPES) for m in group):
            continue
        if not any(infos[m].candidate for m in group):
            continue
        group = [m for m in group if not isinstance(modules[m], _ALIAS_TYPES)]
        if not group:
            continue
        outer = [m for m in group if not any(_is_nested(m, o) for o in group if o != m)]
        top = outer[-1]
        children = [m for m in group if _is_nested(m, top) and "." not in m[len(top) + 1 :]]
        pick = children[-1] if children else top
        if infos[pick].calls != 1:
            once = [m for m in group if infos[m].calls == 1]
            if not once:
                continue
            pick = once[-1]
        return pick
    return None


def detect_target_layer(model: nn.Module, sample: torch.Tensor, score_fn: Callable[[object], torch.Tensor]) -> str:
    """The auto-detected target layer's name, or a clear error listing what was seen."""
    infos = probe_layers(model, sample, score_fn)
    for info in infos:
        if info.chosen:
            return info.name
    spatial = [f"{i.name} {list(i.shape)}" for i in infos if i.shape is not None and len(i.shape) == 4]
    listing = "; ".join(spatial[-10:]) if spatial else "none"
    raise TargetLayerError(
        "could not find a target layer: no module outputs a 4-D (B, K, h, w) map with h*w > 1 that the "
        f"scores depend on. 4-D outputs seen: {listing}. Pass target_layer= explicitly."
    )


# Hugging Face Transformers model types whose encoders output (B, N, D) tokens over a patch grid.
HF_TOKEN_MODEL_TYPES = frozenset(
    {"vit", "deit", "beit", "data2vec-vision", "dinov2", "dinov2_with_registers", "vit_msn", "ijepa", "swin", "swinv2"}
)


def default_reshape(model: object) -> str | None:
    """``"tokens"`` for the transformer families that are recognized, else None (explicit reshape= wins).

    timm: a model with a ``patch_embed`` (ViT, DeiT, Swin, EVA, BEiT, ...). Transformers: a model whose
    ``config.model_type`` is in ``HF_TOKEN_MODEL_TYPES``. Other models (torchvision's ViT included)
    keep the plain 4-D path unless reshape="tokens" is asked for.
    """
    module = type(model).__module__ or ""
    if module.startswith("timm.") and isinstance(model, nn.Module) and hasattr(model, "patch_embed"):
        return "tokens"
    if module.startswith("transformers."):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type in HF_TOKEN_MODEL_TYPES:
            return "tokens"
    return None
