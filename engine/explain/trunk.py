"""The trunk's last feature map: the default target layer, found from the graph of one probe forward.

A probe forward (one image, a hook on every module) records each module's output. Each output that still has
positions is a feature map, in one of three layouts: ``spatial`` (B, K, h, w) with h*w > 1, ``tokens``
(B, N, D) with N > 1, or ``grid``, a norm's channels-last (B, H, W, C) output (timm's Swin). The rule:

1. **The frontier.** Autograd's graph is walked backward from the scores. The first feature maps reached are the
   tensors after which the network pools, or reads a class token, into the classifier: ``layer4`` (ResNet),
   ``norm`` (ViT, Swin, Mixer, Twins), the last stage (LeViT). Pooling modules are walked through (the map
   before a pool is wanted: VGG's ``features`` ends in one), and so is every output without positions (the
   classifier, a norm after the pooling). Attribute names play no part.
2. **Dense outputs** (a model whose output is a (B, C, H, W) map: segmentation): the frontier is the decoder's
   last layer. The decoder is the top-level module that holds it, and the trunk's last feature map is that
   module's input (the latest-computed one when it takes several, as LR-ASPP's low and high features), traced
   back to the module that produced it. A decoder with a pooling branch of its own (DeepLab's ASPP) cannot pull
   the choice inside it, because the choice is made at the decoder's input. When the top-level module's input
   is the image itself (the whole model in one container), the frontier stands.
3. **The layer.** Several modules often return the very tensor (``layer4``, its last block, the block's
   in-place ReLU): the last child of the outermost container is taken (``layer4.1``, ``stages.3``).
   Token maps read through a class token have no gradient on their patch tokens; the layer is then the last
   earlier module with output of the same shape whose patch tokens the scores depend on, a normalization layer
   if there is one (the last block's pre-attention norm, ``blocks.11.norm1``), so that the attention's own
   projections, which run after it, are not taken.

When a feature map of the other kind (a spatial map beside tokens, or tokens beside a map) ran after fewer than
half of the model's parameters before the chosen one, the choice is close: ``FeatureMap.note`` says which layer
was taken and why, and the Explainer shows it once as a ``TargetLayerNotice``. See the README's "Target layer".

One module past 500 lines: the probe, the graph walk, the layouts and the choice read and fill one ``Probe``,
and each rule above is a few of these functions; apart, they would pass that state around.
"""

from __future__ import annotations

import warnings
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from gradcam_batch.engine.explain.layers import ALIAS_TYPES, POOLING_TYPES, TargetLayerError, is_nested

LAYOUTS = ("spatial", "tokens", "grid")
CLOSE_SHARE = 0.5  # a feature map of the other kind is a close call when fewer parameters than this share ran between


class TargetLayerNotice(UserWarning):
    """Which target layer auto-detection took, and why, when a feature map of the other kind was close."""


@dataclass(frozen=True)
class FeatureMap:
    """The trunk's last feature map, as ``last_feature_map`` found it."""

    layer: str  # qualified module name
    layout: str  # "spatial" (B, K, h, w), "tokens" (B, N, D) or "grid" (B, H, W, C)
    shape: tuple[int, ...]  # the module's output shape in the probe (batch 1)
    readout: str  # "pool" (positions pooled), "class-token" (a token read), "decoder" (a dense output's decoder input)
    note: str | None = None  # one line when a feature map of the other kind was close

    @property
    def reshape(self) -> str | None:
        """The Explainer's ``reshape`` for this layer: ``"tokens"`` for token and grid layouts."""
        return None if self.layout == "spatial" else "tokens"


def model_output(output: object) -> torch.Tensor | None:
    """The tensor a model's output stands for: itself, ``.logits``, ``["out"]`` (torchvision segmentation),
    or the first tensor of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping):
        for key in ("out", "logits"):
            if isinstance(output.get(key), torch.Tensor):
                return output[key]
    if isinstance(output, (tuple, list)):
        return next((t for t in output if isinstance(t, torch.Tensor)), None)
    return None


def _is_norm(module: nn.Module) -> bool:
    """A normalization layer: torch's, or a class named ``...Norm`` that holds no Linear or Conv (LeViT's
    ``LinearNorm`` is a linear layer followed by a BatchNorm, not a norm)."""
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.RMSNorm)):
        return True
    if not type(module).__name__.endswith("Norm"):
        return False
    return not any(isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) for m in module.modules())


def layout_of(t: object, module: nn.Module, tokens_only: bool = False) -> str | None:
    """The feature-map layout of a module output, or None when it has no positions."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return None
    if t.dim() == 3 and t.shape[1] > 1 and t.shape[2] > 1:
        return "tokens"
    if t.dim() == 4:
        # A norm over the last dimension of a channels-last grid; elsewhere 4-D is (B, K, h, w).
        if type(module).__name__.endswith("Norm") and t.shape[3] > max(t.shape[1:3]) and t.shape[1] * t.shape[2] > 1:
            return "grid"
        if not tokens_only and t.shape[2] * t.shape[3] > 1:
            return "spatial"
    return None


@dataclass
class Probe:
    """One forward of one sample with every module hooked: outputs, inputs and autograd nodes."""

    order: list[str]  # module names by the completion of their last call
    modules: dict[str, nn.Module]
    outputs: dict[str, object]  # the last call's output
    inputs: dict[str, list[torch.Tensor]]  # the last call's tensor arguments, containers flattened
    calls: dict[str, int]
    nodes: dict[object, list[tuple[str, torch.Tensor]]]  # autograd node -> (module, output) of every call
    objective: torch.Tensor  # the scalar the walk starts from
    dense: bool  # the model's output is a (B, C, H, W) map
    image_hw: tuple[int, int]
    from_input: set[object]  # the autograd nodes that depend on the input (not on parameters alone)
    grads: dict[str, torch.Tensor | None] = field(default_factory=dict)  # d objective / d output, per layer

    def index(self, name: str) -> int:
        return self._index[name]

    def __post_init__(self):
        self._index = {n: i for i, n in enumerate(self.order)}


def _tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def run_probe(
    model: nn.Module, sample: torch.Tensor, score_fn: Callable[[object], torch.Tensor] | None = None
) -> Probe:
    """The probe forward. ``score_fn`` maps the output to (B, N) scores; None sums the model's output tensor
    (which may be dense). The caller puts the model in the mode it wants (the engine uses eval)."""
    records: list[tuple[str, nn.Module, object, list[torch.Tensor]]] = []
    calls: dict[str, int] = {}
    handles = []

    def make_hook(name: str):
        def hook(module, args, kwargs, output):
            calls[name] = calls.get(name, 0) + 1
            records.append((name, module, output, _tensors((args, kwargs))))

        return hook

    try:
        for name, mod in model.named_modules():
            if name:
                handles.append(mod.register_forward_hook(make_hook(name), with_kwargs=True))
        x = sample.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = model(x)
            main = model_output(out)
            scores = score_fn(out) if score_fn is not None else main
    finally:
        for h in handles:
            h.remove()
    if not isinstance(scores, torch.Tensor):
        raise TargetLayerError(f"the model returns {type(out).__name__}; pass a score function to find its layer")
    dense = isinstance(main, torch.Tensor) and main.dim() == 4 and main.shape[2] * main.shape[3] > 1
    last: dict[str, int] = {}
    for i, (name, _, _, _) in enumerate(records):
        last[name] = i
    order = [n for n, _ in sorted(last.items(), key=lambda kv: kv[1])]
    nodes: dict[object, list[tuple[str, torch.Tensor]]] = {}
    for name, _, output, _ in records:
        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            nodes.setdefault(output.grad_fn, []).append((name, output))
    return Probe(
        from_input=_depends_on(scores.grad_fn, x),
        order=order,
        modules={n: m for n, m, _, _ in records},
        outputs={n: records[last[n]][2] for n in order},
        inputs={n: records[last[n]][3] for n in order},
        calls=calls,
        nodes=nodes,
        objective=scores.sum() if scores.requires_grad else scores.detach().sum(),
        dense=dense,
        image_hw=(sample.shape[-2], sample.shape[-1]),
    )


def _depends_on(start: object, leaf: torch.Tensor) -> set[object]:
    """The nodes of autograd's graph below ``start`` from which ``leaf`` is reached: the computations on the
    image, as opposed to tensors computed from parameters alone (a relative position bias, (1, heads, N, N))."""
    users: dict[object, list[object]] = {}
    roots: list[object] = []
    seen: set[object] = set()
    stack = [start]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if getattr(node, "variable", None) is leaf:
            roots.append(node)
        for nxt, _ in node.next_functions:
            if nxt is not None:
                users.setdefault(nxt, []).append(node)
                stack.append(nxt)
    found: set[object] = set()
    stack = roots
    while stack:
        node = stack.pop()
        if node in found:
            continue
        found.add(node)
        stack.extend(users.get(node, ()))
    return found


def _walk(probe: Probe, start: object, tokens_only: bool, passed: list | None = None) -> set[str]:
    """The modules whose outputs are the first feature maps reached walking autograd's graph back from ``start``.

    ``passed`` collects the module outputs without positions walked through on the way (the pooled features)."""
    hits: set[str] = set()
    seen: set[object] = set()
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node is None or node in seen:
            continue
        seen.add(node)
        entries = probe.nodes.get(node, ())
        maps = [n for n, t in entries if layout_of(t, probe.modules[n], tokens_only) and node in probe.from_input]
        if maps and not any(isinstance(probe.modules[n], POOLING_TYPES) for n, _ in entries):
            hits.update(n for n, _ in entries)
            continue
        if passed is not None and entries:
            passed.append(entries[0][1])
        queue.extend(nxt for nxt, _ in node.next_functions)
    return hits


def _weighted_sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A sum of the tensors with fixed positive random weights, so that no two terms cancel."""
    gen = torch.Generator().manual_seed(0)
    total = 0
    for t in tensors:
        w = (torch.rand(t.shape, generator=gen, dtype=torch.float64) + 0.5).to(t.device, t.dtype)
        total = total + (t * w).sum()
    return total


def _latest(probe: Probe, names: set[str]) -> str:
    return max(names, key=probe.index)


def _decoder_input(probe: Probe, frontier: str, tokens_only: bool) -> str | None:
    """For a dense output: the latest feature map among the inputs of the top-level module holding ``frontier``."""
    top = frontier.split(".")[0]
    producers: set[str] = set()
    for t in probe.inputs.get(top, ()):
        if t.grad_fn is not None:
            producers |= {n for n in _walk(probe, t.grad_fn, tokens_only) if not (n == top or is_nested(n, top))}
    return _latest(probe, producers) if producers else None


def _grads(probe: Probe, names: list[str]) -> None:
    todo = [n for n in names if n not in probe.grads]
    tensors = [probe.outputs[n] for n in todo]
    usable = [n for n, t in zip(todo, tensors, strict=True) if t.requires_grad]
    if usable and probe.objective.requires_grad:
        with torch.enable_grad():
            grads = torch.autograd.grad(
                probe.objective, [probe.outputs[n] for n in usable], allow_unused=True, retain_graph=True
            )
        probe.grads.update(zip(usable, grads, strict=True))
    for n in todo:
        probe.grads.setdefault(n, None)


def patch_gradient(probe: Probe, name: str, layout: str, grid: tuple[int, int] | None) -> bool:
    """Whether the objective depends on the layer's positions: for tokens, on its patch tokens (the extra
    tokens, a class token among them, lead)."""
    from gradcam_batch.engine.explain.tokens import infer_grid

    _grads(probe, [name])
    g = probe.grads[name]
    if g is None:
        return False
    if layout == "tokens":
        h, w = grid if grid is not None else infer_grid(g.shape[1], probe.image_hw)
        extra = g.shape[1] - h * w
        if extra < 0 or h * w < 2:
            return False
        g = g[:, extra:]
    return bool(g.abs().amax() > 0)


def _same_tensor(probe: Probe, name: str) -> list[str]:
    """The modules whose last output is the very tensor ``name`` returned (in completion order)."""
    t = probe.outputs[name]
    key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()))
    return [
        n
        for n in probe.order
        if isinstance(probe.outputs[n], torch.Tensor)
        and (probe.outputs[n].data_ptr(), tuple(probe.outputs[n].shape), tuple(probe.outputs[n].stride())) == key
    ]


def _pick(probe: Probe, group: list[str]) -> str | None:
    """The layer that stands for a tensor several modules return: the last child of the outermost container."""
    group = [m for m in group if not isinstance(probe.modules[m], ALIAS_TYPES)]
    if not group or any(isinstance(probe.modules[m], POOLING_TYPES) for m in group):
        return None
    outer = [m for m in group if not any(is_nested(m, o) for o in group if o != m)]
    top = outer[-1]
    children = [m for m in group if is_nested(m, top) and "." not in m[len(top) + 1 :]]
    pick = children[-1] if children else top
    if probe.calls[pick] != 1:
        once = [m for m in group if probe.calls[m] == 1]
        return once[-1] if once else None
    return pick


def candidate_maps(probe: Probe, tokens_only: bool, grid: tuple[int, int] | None) -> list[tuple[str, str]]:
    """(name, layout) of every feature map the scores depend on (tokens: on their patch tokens), in order."""
    maps = [(n, layout_of(probe.outputs[n], probe.modules[n], tokens_only)) for n in probe.order]
    maps = [(n, lay) for n, lay in maps if lay is not None and probe.outputs[n].grad_fn in probe.from_input]
    _grads(probe, [n for n, _ in maps])
    return [(n, lay) for n, lay in maps if patch_gradient(probe, n, lay, grid)]


def _params_between(probe: Probe, first: str, last: str) -> int:
    """Parameters of the modules that complete after ``first`` and up to ``last`` (their own, not their children's)."""
    lo, hi = probe.index(first), probe.index(last)
    return sum(
        p.numel()
        for n in probe.order[lo + 1 : hi + 1]
        if not is_nested(first, n)
        for p in probe.modules[n].parameters(recurse=False)
    )


def params_after(model: nn.Module, probe: Probe, name: str) -> float:
    """The share of the model's parameters in modules that complete after ``name`` (its ancestors excluded)."""
    total = sum(p.numel() for p in model.parameters())
    i = probe.index(name)
    after = sum(
        p.numel()
        for n in probe.order[i + 1 :]
        if not is_nested(name, n)
        for p in probe.modules[n].parameters(recurse=False)
    )
    return after / total if total else 0.0


def _positions(probe: Probe, name: str, layout: str) -> int:
    """How many positions (patches, for tokens) a feature map has."""
    from gradcam_batch.engine.explain.tokens import infer_grid

    t = probe.outputs[name]
    if t.dim() == 3:
        h, w = infer_grid(t.shape[1], probe.image_hw)
        return h * w
    return t.shape[1] * t.shape[2] if layout == "grid" else t.shape[2] * t.shape[3]


def _note(probe: Probe, model: nn.Module, chosen: str, layout: str, readout: str, cands) -> str | None:
    kind = layout == "spatial"
    i = probe.index(chosen)
    other = [n for n, lay in cands if (lay == "spatial") != kind and probe.index(n) < i and probe.calls[n] == 1]
    # A rival inside the chosen module is part of it, not an alternative.
    other = [
        n for n in other if not isinstance(probe.modules[n], ALIAS_TYPES + POOLING_TYPES) and not is_nested(n, chosen)
    ]
    if not other:
        return None
    rival = other[-1]
    if _positions(probe, rival, "spatial" if kind else "tokens") != _positions(probe, chosen, layout):
        return None  # another resolution: another stage, not a close call
    total = sum(p.numel() for p in model.parameters()) or 1
    share = _params_between(probe, rival, chosen) / total
    if share >= CLOSE_SHARE:
        return None
    why = {
        "pool": "the last feature map before the network pools into the classifier",
        "class-token": "the last layer whose patch tokens reach the class token the classifier reads",
        "decoder": "the last feature map of the trunk, which the decoder takes",
    }[readout]
    shape = "x".join(str(d) for d in probe.outputs[chosen].shape)
    rival_shape = "x".join(str(d) for d in probe.outputs[rival].shape)
    return (
        f"target layer: took {chosen!r} ({layout} {shape}), {why}; {rival!r} ({rival_shape}) ran "
        f"{share:.0%} of the parameters before it. Pass target_layer= (--target-layer) to choose another"
    )


def last_feature_map(
    model: nn.Module,
    sample: torch.Tensor,
    score_fn: Callable[[object], torch.Tensor] | None = None,
    *,
    reshape: str | None = None,
    token_grid: tuple[int, int] | None = None,
    probe: Probe | None = None,
) -> FeatureMap:
    """The trunk's last feature map of a classifier (``score_fn`` gives (B, N) scores) or of a dense-output
    model (score_fn=None and a (B, C, H, W) output, or any score_fn: the output's shape decides).

    ``reshape="tokens"`` considers token layouts only. Raises ``TargetLayerError`` when there is none.
    """
    if probe is None:
        probe = run_probe(model, sample, score_fn)
    tokens_only = reshape == "tokens"
    hits: set[str] = set()
    if probe.objective.grad_fn is not None:
        passed: list[torch.Tensor] = []
        hits = _walk(probe, probe.objective.grad_fn, tokens_only, passed)
        # The pooled features join the objective: a zero-initialized classifier (timm's Mixer, torchvision's
        # ViT) passes no gradient, and which positions reach the scores would not show.
        passed = [t for t in passed if t.is_floating_point() and t.requires_grad]
        if passed and not probe.grads:
            probe.objective = probe.objective + _weighted_sum(passed)
    hits = {n for n in hits if layout_of(probe.outputs[n], probe.modules[n], tokens_only)}
    cands = candidate_maps(probe, tokens_only, token_grid)
    layouts = dict(cands)
    if not hits:
        raise _not_found(probe, tokens_only)
    end = _latest(probe, hits)
    readout = "pool"
    if probe.dense:
        inner = _decoder_input(probe, end, tokens_only)
        if inner is not None:
            end, readout = inner, "decoder"
    layout = layout_of(probe.outputs[end], probe.modules[end], tokens_only)
    chosen = None
    if layout != "spatial" and not patch_gradient(probe, end, layout, token_grid):
        readout = "class-token"
        shape = probe.outputs[end].shape
        found = [
            n
            for n, lay in cands
            if lay == layout
            and probe.index(n) < probe.index(end)
            and probe.outputs[n].shape == shape
            and probe.calls[n] == 1
            and not isinstance(probe.modules[n], ALIAS_TYPES)
        ]
        norms = [n for n in found if _is_norm(probe.modules[n])]
        chosen = (norms or found or [None])[-1]
    else:
        # Walk back from the end over maps of the same layout until a tensor has a layer that runs once.
        same = [n for n, lay in cands if lay == layout and probe.index(n) <= probe.index(end)]
        done: set[str] = set()
        for n in reversed(same):
            if n in done:
                continue
            group = _same_tensor(probe, n)
            done.update(group)
            if any(m in layouts for m in group):
                chosen = _pick(probe, group)
                if chosen is not None:
                    break
    if chosen is None:
        raise _not_found(probe, tokens_only)
    return FeatureMap(
        layer=chosen,
        layout=layout,
        shape=tuple(probe.outputs[chosen].shape),
        readout=readout,
        note=_note(probe, model, chosen, layout, readout, cands),
    )


def layer_reshape(model: nn.Module, layer: str, sample: torch.Tensor) -> str | None:
    """The Explainer's ``reshape`` for a target layer given by name: ``"tokens"`` when its output is (B, N, D)
    tokens or a norm's (B, H, W, C) grid, else None. One forward of ``sample`` with a hook on that module."""
    module = model.get_submodule(layer)
    seen: list[object] = []
    handle = module.register_forward_hook(lambda m, args, output: seen.append(output))
    try:
        with torch.no_grad():
            model(sample)
    finally:
        handle.remove()
    if not seen:
        return None  # the engine says later that the layer did not run
    return "tokens" if layout_of(seen[-1], module) in ("tokens", "grid") else None


def _not_found(probe: Probe, tokens_only: bool) -> TargetLayerError:
    seen = [
        f"{n} {list(probe.outputs[n].shape)}"
        for n in probe.order
        if isinstance(probe.outputs[n], torch.Tensor) and probe.outputs[n].dim() in ((3,) if tokens_only else (3, 4))
    ]
    listing = "; ".join(seen[-10:]) or "none"
    what = "(B, N, D) tokens" if tokens_only else "a 4-D (B, K, h, w) map with h*w > 1 or (B, N, D) tokens"
    return TargetLayerError(
        f"could not find a target layer: no module outputs {what} whose positions the scores depend on. "
        f"Outputs seen: {listing}. Pass target_layer= explicitly (a zero-initialized classifier, as in a freshly "
        "built torchvision ViT, has no gradients at all: load trained weights)."
    )


_NOTICED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def notice(model: nn.Module, message: str) -> None:
    """Show a ``TargetLayerNotice`` once per model and message (a run sets up the layer twice)."""
    try:
        seen = _NOTICED.setdefault(model, set())
    except TypeError:
        seen = set()
    if message in seen:
        return
    seen.add(message)
    warnings.warn(message, TargetLayerNotice, stacklevel=1)


__all__ = [
    "LAYOUTS",
    "FeatureMap",
    "Probe",
    "TargetLayerNotice",
    "candidate_maps",
    "last_feature_map",
    "layer_reshape",
    "layout_of",
    "model_output",
    "notice",
    "params_after",
    "patch_gradient",
    "run_probe",
]
