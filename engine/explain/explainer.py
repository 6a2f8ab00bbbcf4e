"""The Grad-CAM engine: ``explain()`` and ``Explainer``.

Where the speed comes from (see the README's design notes):

1. The backbone (everything before the target layer) runs under ``torch.inference_mode``:
   no autograd graph, no parameter gradients. Autograd starts at the target activation A.
2. The C classes of the B images are explained by one vectorized vector-Jacobian product
   of the head: ``torch.func.vjp`` once, then ``torch.vmap`` over the C one-hot cotangents.
3. A global-average-pool -> linear head needs no backward at all: dy^c/dA^k_ij = W[c, k] / (h*w)
   (the CAM equivalence), so alpha is read off the linear layer.
4. Post-processing (weighting, ReLU, upsampling, normalization, quantization) is one call to
   ``gradcam_batch.kernels.fused_cam`` per method: a fused Triton kernel on CUDA, batched torch elsewhere.
5. Several methods (``engine/explain/methods.py``) share that one backbone forward and that one VJP;
   each is a weighting function of A and g.

One module past 500 lines: the Explainer's set-up, its per-batch paths (closed form, VJP, hook) and
``explain()``'s cache share private state; the weighting functions live in ``methods.py``.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from gradcam_batch.engine.explain.compiled import (
    CompiledBackbone,
    backbone_context,
    check_compile_mode,
    check_precision,
    prepare_input,
)
from gradcam_batch.engine.explain.layers import TargetLayerError, layer_name_of
from gradcam_batch.engine.explain.methods import (
    DEFAULT_SCORECAM_BATCH,
    METHODS,
    CamInputs,
    guided_backprop,
    guided_gradcam,
    parse_methods,
    scorecam_weights,
)
from gradcam_batch.engine.explain.split import (
    LinearHead,
    SplitBackend,
    SplitError,
    SplitModel,
    analyze_head,
    split_at,
)
from gradcam_batch.engine.explain.tokens import RESHAPES, map_to_tokens, parse_grid, tokens_to_map
from gradcam_batch.engine.explain.trunk import last_feature_map, layer_reshape, notice
from gradcam_batch.engine.explain.vjp import AutoVjp
from gradcam_batch.kernels import DEFAULT_EPS, fused_cam
from gradcam_batch.kernels.reference import quantize

VJP_STRATEGIES = ("auto", "vmap", "loop", "batched_grad")  # auto: measured per head (engine/explain/vjp.py)


class SplitFallbackWarning(RuntimeWarning):
    """The model could not be cut at the target layer by torch.fx: the whole model runs eager in float32 with
    a forward hook, without torch.compile or a low-precision backbone. Issued once per model, layer and cause."""


@dataclass
class Explanation:
    """The result of one explained batch. All tensors live on the model's device."""

    classes: torch.Tensor  # (B, C) int64, the explained class indices
    scores: torch.Tensor  # (B, C) float32, y^c before softmax
    probabilities: torch.Tensor  # (B, C) float32, softmax over all N scores, taken at the classes
    cams: torch.Tensor  # (B, C, h, w) float32, ReLU(sum_k alpha_k^c A^k), unnormalized
    heatmaps: torch.Tensor  # (B, C, H, W) out_dtype, upsampled (and normalized to [0, 1])
    cam_max: torch.Tensor  # (B, C) float32, max of each low-resolution cam
    peaks: torch.Tensor  # (B, C, 2) int64, (y, x) of each heatmap's maximum
    weights: torch.Tensor | None  # (B, C, K) float32, alpha_k^c (negated for counterfactuals); None for
    # the methods that weigh A element-wise (layercam, hirescam, gradcam-elementwise, eigen*)
    target_layer: str  # qualified name of the target module
    closed_form: bool  # True when alpha came from the GAP -> linear closed form
    method: str = "gradcam"
    guided: torch.Tensor | None = None  # (B, C, 3, H, W) out_dtype, guided backprop x the map (guided=True)
    # explain(..., metrics=...): (B, C) tensors keyed deletion_auc, insertion_auc, confidence_drop,
    # confidence_increase (engine/metrics)
    metrics: dict[str, torch.Tensor] | None = None
    # (B, C, H, W) float32 (float64 for float64 input), the normalized map at the input size before
    # quantization: what the metrics perturb by (saliency=True; also made for guided=True)
    saliency: torch.Tensor | None = None
    # What a score function with ``has_aux`` returned beside the scores (detached; see ``aux_score_fn``)
    aux: dict[str, torch.Tensor] | None = None


def stack_methods(results: dict[str, Explanation]) -> Explanation:
    """Several methods' Explanations as one, the methods stacked on the class axis (method-major:
    slot ``i * C + j`` is method i, class j). ``weights`` is dropped, ``method`` joins the names."""
    exps = list(results.values())
    first = exps[0]

    def cat(name: str) -> torch.Tensor | None:
        values = [getattr(e, name) for e in exps]
        return None if values[0] is None else torch.cat(values, dim=1)

    return Explanation(
        classes=first.classes.repeat(1, len(exps)),
        scores=first.scores.repeat(1, len(exps)),
        probabilities=first.probabilities.repeat(1, len(exps)),
        cams=cat("cams"),
        heatmaps=cat("heatmaps"),
        cam_max=cat("cam_max"),
        peaks=cat("peaks"),
        weights=None,
        target_layer=first.target_layer,
        closed_form=first.closed_form,
        method=",".join(results),
        guided=cat("guided"),
        saliency=cat("saliency"),
        aux=first.aux,
    )


def has_aux(score_fn: Callable | None) -> bool:
    """Whether ``score_fn`` returns ``(scores, aux)``: it says so with a true ``has_aux`` attribute.

    ``aux`` is a dict of tensors computed from the same head forward as the scores and never differentiated
    (a segmentation model's predicted mask and region sizes, engine/explain/tasks.py). A selector passed as
    ``classes=`` is then called as ``classes(scores, aux)``, and the aux is returned in ``Explanation.aux``;
    it comes from the one head forward that the VJP differentiates, so the head runs once."""
    return bool(getattr(score_fn, "has_aux", False))


def scores_only(score_fn: Callable) -> Callable[[object], torch.Tensor]:
    """``score_fn`` without its aux: the (B, N) scores alone (layer search, Score-CAM, guided backprop, metrics)."""
    if not has_aux(score_fn):
        return score_fn
    return lambda output: score_fn(output)[0]


def default_score_fn(output: object) -> torch.Tensor:
    """The model output itself, when it is a (B, N) tensor, or its ``.logits`` (a Transformers ``ModelOutput``)."""
    if isinstance(output, torch.Tensor) and output.dim() == 2:
        return output
    logits = None if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor) and logits.dim() == 2:
        return logits
    desc = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    raise TypeError(f"the model returns {desc}, not (B, N) scores; pass score_fn= to map its output to (B, N) scores")


@contextlib.contextmanager
def eval_mode(model: nn.Module | SplitBackend) -> Iterator[None]:
    """Run in eval semantics and restore every module's own train/eval flag afterwards. A model that is
    not a torch module (an exported ONNX graph) has its inference semantics fixed: nothing to switch."""
    flags = []
    if isinstance(model, nn.Module):
        flags = [(m, m.training) for m in model.modules()]
        model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


class _TargetHook:
    """Forward hook for models FX cannot trace: capture A, or make it the autograd root.

    In ``root`` mode the hook detaches the target's output, makes it a leaf that requires
    grad, and turns grad mode on for the rest of the forward, so the graph starts at A.
    The handle is removed on exit, also when the forward raises.
    """

    def __init__(self, module: nn.Module, name: str, root: bool, to_map: Callable | None = None):
        self.module, self.name, self.root = module, name, root
        self.to_map = to_map  # reshape="tokens": tokens -> (map, prefix); the map becomes A
        self.activation: torch.Tensor | None = None
        self.calls = 0
        self._handle = None
        self._grad_ctx: contextlib.ExitStack | None = None

    def _hook(self, module, args, output):
        self.calls += 1
        if self.calls > 1:
            raise TargetLayerError(
                f"target layer {self.name!r} runs more than once per forward; pick a module that runs once"
            )
        prefix = None
        if self.to_map is not None:
            output, prefix = self.to_map(output)
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise TargetLayerError(f"target layer {self.name!r} outputs {shape}; Grad-CAM needs a 4-D (B, K, h, w) map")
        if not self.root:
            self.activation = output
            return None
        leaf = output.detach().requires_grad_(True)
        self.activation = leaf
        assert self._grad_ctx is not None
        self._grad_ctx.enter_context(torch.enable_grad())
        # The rest of the forward gets a copy: an in-place op right after the target (ReLU(inplace=True))
        # may neither write into a leaf that requires grad nor change A.
        return leaf.clone() if prefix is None else map_to_tokens(leaf.clone(), prefix)

    def __enter__(self) -> _TargetHook:
        self._grad_ctx = contextlib.ExitStack()
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
        if self._grad_ctx is not None:
            self._grad_ctx.close()
        return None


class Explainer:
    """Set up once (layer resolution, graph split, head analysis, methods), then call per batch.

    ``Explainer(model, target_layer=None, method="gradcam", score_fn=None)(images, ...)``
    takes the same per-batch keyword arguments as ``explain()``, and ``saliency=True`` for
    ``Explanation.saliency`` (made once, and shared with a heatmap at the input size and with guided).
    ``method`` is a name (the call returns one ``Explanation``) or a sequence of names (it returns
    ``{name: Explanation}``, every method from the same backbone forward and the same VJP).

    The model is always explained in eval semantics (BatchNorm running statistics, no
    dropout); each module's train/eval flag is restored after every call. Parameters,
    ``requires_grad`` flags, ``.grad`` and hooks of the caller's model are left as they were.
    An ``OnnxModel`` is cut by itself (``SplitBackend``) and explained the same way.
    """

    def __init__(
        self,
        model: nn.Module | SplitBackend,
        target_layer: str | nn.Module | None = None,
        method: str | Sequence[str] = "gradcam",
        score_fn: Callable[[object], torch.Tensor] | None = None,
        *,
        vjp_strategy: str = "auto",
        kernel_backend: str = "auto",
        compile: bool = False,
        compile_mode: str | None = None,
        precision: str = "fp32",
        reshape: str | None = None,
        token_grid: str | tuple[int, int] | None = None,
        guided: bool = False,
        scorecam_batch: int = DEFAULT_SCORECAM_BATCH,
    ):
        if isinstance(method, str) and method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
        self.methods = parse_methods([method] if isinstance(method, str) else method)
        self._single = isinstance(method, str)
        if vjp_strategy not in VJP_STRATEGIES:
            raise ValueError(f"unknown vjp_strategy {vjp_strategy!r}; expected one of {', '.join(VJP_STRATEGIES)}")
        if not isinstance(scorecam_batch, int) or isinstance(scorecam_batch, bool) or scorecam_batch < 1:
            raise ValueError(f"scorecam_batch must be a positive integer, got {scorecam_batch!r}")
        self.model = model
        self.method = self.methods[0]
        self.score_fn = score_fn
        self.vjp_strategy = vjp_strategy
        self._auto_vjp = AutoVjp()
        self.kernel_backend = kernel_backend
        self.guided = bool(guided)
        self.scorecam_batch = scorecam_batch
        # _score_fn gives the scores alone; _aux_score_fn, when the score function has an aux, the pair
        self._score_fn = scores_only(score_fn) if score_fn is not None else default_score_fn
        self._aux_score_fn = score_fn if has_aux(score_fn) else None
        self._needs = {METHODS[m].needs for m in self.methods}
        # Backbone options (engine/explain/compiled.py, engine/explain/tokens.py): compile and precision apply to
        # the FX backbone; reshape="tokens" turns a (B, N, D) target output into a (B, D, h, w) map.
        self.compile = bool(compile)
        self.compile_mode = check_compile_mode(compile_mode)
        self.precision = check_precision(precision)
        # None: decided at set-up from the target layer's output (engine/explain/trunk.py): "tokens" for a
        # (B, N, D) or (B, H, W, C) layer, the plain 4-D path otherwise.
        if reshape not in RESHAPES:
            raise ValueError(f"unknown reshape {reshape!r}; expected None or 'tokens'")
        self.reshape = reshape
        self.token_grid = parse_grid(token_grid)
        self._backbone = None
        # A model that is not a torch module cuts itself (SplitBackend: the ONNX Runtime backend); from the
        # set-up on, its split runs like an FX split.
        torch_model = isinstance(model, nn.Module)
        if not torch_model and not callable(getattr(model, "split_at", None)):
            raise TypeError(f"model must be a torch nn.Module or an OnnxModel, got {type(model).__name__}")
        # What a backbone that is not a torch module cannot give: a backward through it (guided), and a
        # token output (its target is a 4-D tensor, found by its rank).
        if self.guided and not torch_model:
            raise ValueError(
                f"guided=True needs a backward through the whole model, and {model!r} is not a torch module "
                "(an ONNX Runtime backbone has no backward); every other method works without it"
            )
        if reshape is not None and not torch_model:
            raise ValueError(f"reshape={reshape!r} is not supported for {model!r}; pick a 4-D target tensor")
        self.target_layer: str | None = target_layer
        if torch_model and target_layer is not None:
            self.target_layer = layer_name_of(model, target_layer)
        self._split: SplitModel | None = None
        self._linear: LinearHead | None = None
        self._prepared = False
        self._eager = False  # probe(): the backbone runs uncompiled

    # -- set-up -----------------------------------------------------------------------------------
    def _prepare(self, images: torch.Tensor) -> None:
        if getattr(self.model, "explain_unsupported", None):  # a TorchScript / torch.export program
            raise ValueError(self.model.explain_unsupported)
        if not isinstance(self.model, nn.Module):
            self.target_layer = self.model.resolve_target_layer(self.target_layer, images[:1])
            self._split = self.model.split_at(self.target_layer)
        else:
            self._split_torch(images)
        if self._split is not None and self.score_fn is None and self.reshape is None:
            self._linear = analyze_head(self._split)
        adopt = getattr(self.score_fn, "adopt_head", None)
        if self._split is not None and adopt is not None:
            adopt(self._split.head)  # a score function that takes over the head's last step (tasks.SegmentationScore)
        if self._split is not None:
            self._backbone = self._split.backbone
            # torch.compile applies to a torch backbone; an ONNX Runtime session runs as exported.
            if self.compile and isinstance(self._backbone, nn.Module):
                self._backbone = CompiledBackbone(self._split.backbone, self.compile_mode)
        if "cam" in self.methods and self._linear is None:
            raise ValueError(
                f"method='cam' needs a global-average-pool -> linear head after {self.target_layer!r}, "
                "and the model has a different head; use method='gradcam'"
            )
        self._prepared = True

    def _split_torch(self, images: torch.Tensor) -> None:
        """The layer (found, or its reshape decided) and the FX cut of a torch model; the hook path without one."""
        if self.target_layer is None:
            found = last_feature_map(
                self.model, images[:1], self._score_fn, reshape=self.reshape, token_grid=self.token_grid
            )
            self.target_layer, self.reshape = found.layer, found.reshape
            if found.note:
                notice(self.model, found.note)
        elif self.reshape is None:
            self.reshape = layer_reshape(self.model, self.target_layer, images[:1])
        try:
            self._split = split_at(self.model, self.target_layer)
        except SplitError as exc:
            self._split = None
            self._warn_fallback(str(exc))

    def _warn_fallback(self, cause: str) -> None:
        import warnings

        # Once per model, layer and cause: a run sets up two Explainers on one model (the plan's probe and
        # the batch step), and Python's own once-per-location filter is reset whenever a filter changes.
        with _CACHE_LOCK:
            try:
                seen = _FALLBACK_WARNED.setdefault(self.model, set())
            except TypeError:  # not weak-referenceable: warn every time
                seen = set()
            if (self.target_layer, cause) in seen:
                return
            seen.add((self.target_layer, cause))
        lost = [*(["torch.compile"] if self.compile else []), *([self.precision] if self.precision != "fp32" else [])]
        cost = f"no {' or '.join(lost)}" if lost else "no torch.compile or low-precision backbone"
        warnings.warn(
            f"target layer {self.target_layer!r}: the graph split failed, {cause}; using the forward-hook path "
            f"(the whole model eager in fp32, {cost})",
            SplitFallbackWarning,
            stacklevel=1,
        )

    @property
    def closed_form(self) -> bool:
        """True when the head is GAP -> linear and alpha needs no backward pass."""
        return self._linear is not None

    def scores(self, output: object) -> torch.Tensor:
        """The (B, N) class scores of a model output, by the ``score_fn`` this Explainer was given (or the default)."""
        return self._score_fn(output)

    def probe(self, sample: torch.Tensor, *, classes=None, counterfactual: bool = False) -> Explanation:
        """Set up on ``sample`` and explain it once, cheaply: what a job checks before it starts.

        The set-up (layer search, graph split, head analysis) is the one every later call uses. The
        call runs the backbone uncompiled, so that torch.compile first sees a real batch, and leaves
        out what the set-up does not need: Score-CAM's K masked forwards (gradcam stands in when it
        is the only method) and guided backprop. Returns the first method's ``Explanation``.
        """
        saved = (self.methods, self._needs, self.guided, self._single)
        self.methods = [m for m in self.methods if m != "scorecam"] or ["gradcam"]
        self._needs = {METHODS[m].needs for m in self.methods}
        self.guided, self._single, self._eager = False, True, True
        try:
            return self(sample, classes=classes, counterfactual=counterfactual, heatmaps=False)
        finally:
            self.methods, self._needs, self.guided, self._single = saved
            self._eager = False

    # -- per batch --------------------------------------------------------------------------------
    def __call__(
        self,
        images: torch.Tensor,
        *,
        classes: torch.Tensor | None = None,
        top_k: int = 1,
        counterfactual: bool = False,
        output_size: tuple[int, int] | int | None = None,
        normalize: bool = True,
        out_dtype: torch.dtype = torch.float32,
        relu: bool = True,
        eps: float = DEFAULT_EPS,
        heatmaps: bool = True,
        saliency: bool = False,
    ) -> Explanation | dict[str, Explanation]:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a (B, C, H, W) tensor, got {shape}")
        if images.shape[0] == 0:
            raise ValueError("images is an empty batch")
        sign = -1.0 if counterfactual else 1.0
        # inference_mode(False): a caller's inference_mode would leave the head no graph to differentiate.
        with torch.inference_mode(False), eval_mode(self.model):
            if not self._prepared:
                self._prepare(images)
            inputs, scores_all, aux = self._pass(images, classes, top_k, sign)
            gb = None
            if self.guided:
                gb = guided_backprop(self.model, images, inputs.classes, self._score_fn, sign=sign)
        if output_size is None:
            out_size = (images.shape[-2], images.shape[-1])
        elif isinstance(output_size, int):
            out_size = (output_size, output_size)
        else:
            out_size = (int(output_size[0]), int(output_size[1]))
        post = {"relu": relu, "normalize": normalize, "out_dtype": out_dtype, "eps": eps}
        classes_t = inputs.classes
        dt = torch.float32 if inputs.acts.dtype != torch.float64 else torch.float64
        scores_all = scores_all.to(dt)
        scores = scores_all.gather(1, classes_t)
        probs = torch.softmax(scores_all, dim=1).gather(1, classes_t)
        in_size = (images.shape[-2], images.shape[-1])
        want_saliency = saliency or gb is not None
        # The saliency is the normalized heatmap at the input size: when the heatmap is that map, the
        # kernel makes it once in full precision and the heatmap is its quantization.
        shared = want_saliency and heatmaps and normalize and out_size == in_size
        out: dict[str, Explanation] = {}
        for name in self.methods:
            result = METHODS[name].fn(inputs)
            weights = result.contiguous() if result.dim() == 3 else None
            sal = None
            if shared:
                exact = torch.promote_types(inputs.acts.dtype, torch.float32)
                maps = self._post(inputs.acts, result, out_size, {**post, "out_dtype": exact})
                sal = maps.heatmaps
                maps = maps._replace(heatmaps=quantize(sal, out_dtype))
            else:
                maps = self._post(inputs.acts, result, out_size if heatmaps else None, post)
                if want_saliency:
                    sal = self._post(maps.cams.flatten(0, 1)[:, None], None, in_size, post).heatmaps
                    sal = sal.view(*maps.cams.shape[:2], *in_size)
            guided = None
            if gb is not None:
                guided = quantize(guided_gradcam(gb, sal), out_dtype)
            out[name] = Explanation(
                classes=classes_t,
                scores=scores,
                probabilities=probs,
                cams=maps.cams,
                heatmaps=maps.heatmaps,
                cam_max=maps.cam_max,
                peaks=maps.peaks,
                weights=weights,
                target_layer=self.target_layer or "",
                closed_form=self.closed_form,
                method=name,
                guided=guided,
                saliency=sal if saliency else None,
                aux=aux,
            )
        return out[self.methods[0]] if self._single else out

    def _post(self, acts: torch.Tensor, result: torch.Tensor | None, out_size, post: dict):
        """The fused kernel on channel weights (B, C, K), or on finished maps (B, C, h, w) (result None:
        ``acts`` are (N, 1, h, w) maps already), with weights of one so that the kernel only upsamples,
        normalizes and quantizes."""
        if result is not None and result.dim() == 3:
            return fused_cam(acts, result.contiguous(), out_size, backend=self.kernel_backend, **post)
        if result is not None:
            b, c, h, w = result.shape
            flat = result.reshape(b * c, 1, h, w).contiguous()
        else:
            flat = acts
            exact = torch.promote_types(acts.dtype, torch.float32)
            post = {**post, "relu": False, "out_dtype": exact, "normalize": True}
        ones = torch.ones((flat.shape[0], 1, 1), dtype=flat.dtype, device=flat.device)
        maps = fused_cam(flat, ones, out_size, backend=self.kernel_backend, **post)
        if result is None:
            return maps
        return maps._replace(
            cams=maps.cams.view(b, c, h, w),
            heatmaps=maps.heatmaps.view(b, c, *maps.heatmaps.shape[-2:]),
            cam_max=maps.cam_max.view(b, c),
            peaks=maps.peaks.view(b, c, 2),
        )

    def _pass(self, images, classes, top_k, sign):
        """One backbone forward and at most one VJP: A, the scores, the classes, g, and Score-CAM's weights.

        Returns (inputs, all scores (B, N), the score function's aux or None).
        """
        need_grad = "grad" in self._needs
        grads = linear = aux = None
        if self._split is None:
            acts, scores_all, classes_t, grads, aux = self._hooked_pass(images, classes, top_k, sign, need_grad)
        else:
            acts, scores_all, classes_t, grads, linear, aux = self._split_pass(images, classes, top_k, sign, need_grad)
        score_weights = None
        if "scores" in self._needs:
            score_weights = scorecam_weights(
                self._forward_scores, images, acts, classes_t, batch_size=self.scorecam_batch, sign=sign
            )
        return CamInputs(acts, classes_t, grads, linear, score_weights), scores_all, aux

    def _split_pass(self, images, classes, top_k, sign, need_grad):
        """The FX path: no-grad backbone, then the head's closed form, its VJP, or its forward alone."""
        self._split.sync(self.model)
        backbone = self._split.backbone if self._eager else self._backbone
        with torch.inference_mode(), backbone_context(images.device, self.precision):
            feats = backbone(prepare_input(images))
        # Inference tensors cannot enter autograd; a clone outside inference mode can. The head
        # runs in fp32 whatever precision the backbone ran in.
        low = self.precision != "fp32"
        acts, *extra = (
            (t.to(torch.float32, copy=True) if low and t.is_floating_point() else t.clone())
            if isinstance(t, torch.Tensor)
            else t
            for t in feats
        )
        prefix = None
        if self.reshape == "tokens":
            acts, prefix = tokens_to_map(acts, self.token_grid, (images.shape[-2], images.shape[-1]))
        self._check_acts(acts)
        head = self._split.head
        score_fn = self._aux_score_fn or self._score_fn
        with_aux = self._aux_score_fn is not None
        h, w = acts.shape[-2:]
        cdt = torch.promote_types(acts.dtype, torch.float32)

        if self._linear is not None:  # only with the default score function: no aux
            with torch.no_grad():
                scores_all = score_fn(head(acts, *extra))
            classes_t = resolve_classes(classes, top_k, scores_all)
            weight = self._linear.weight.detach().to(cdt)
            rows = weight[classes_t]  # (B, C, K)
            # g = W[c] / (h*w) at every position: stored once per channel, broadcast by the methods.
            grads = (sign * (rows / (h * w)))[..., None, None] if need_grad else None
            return acts, scores_all.detach(), classes_t, grads, sign * rows, None

        def head_scores(a: torch.Tensor) -> torch.Tensor:
            if prefix is not None:
                a = map_to_tokens(a, prefix)
            # The clone keeps a head that opens with an in-place op (a conv target followed by
            # ReLU(inplace=True)) from writing into A, the VJP's primal, which is weighted later.
            return score_fn(head(a.clone(), *extra))

        aux = None
        if not need_grad:
            with torch.no_grad():
                scores_all, aux = _split_aux(head_scores(acts), with_aux)
            self._check_scores(scores_all, images)
            return acts, scores_all, resolve_classes(classes, top_k, scores_all, aux), None, None, aux
        if self.vjp_strategy == "batched_grad":
            with torch.enable_grad():
                a = acts.detach().requires_grad_(True)
                scores_all, aux = _split_aux(head_scores(a), with_aux)
                self._check_scores(scores_all, images)
                classes_t = resolve_classes(classes, top_k, scores_all.detach(), aux)
                cot = one_hots(classes_t, scores_all, sign)
                (grads,) = torch.autograd.grad(scores_all, a, cot, is_grads_batched=True)
        else:
            # Under an outer no_grad, vjp still differentiates w.r.t. its primal (it is a
            # function transform) but records nothing for the model's parameters.
            with torch.no_grad():
                if with_aux:
                    scores_all, vjp_fn, aux = torch.func.vjp(head_scores, acts, has_aux=True)
                    aux = _detached(aux)
                else:
                    scores_all, vjp_fn = torch.func.vjp(head_scores, acts)
                self._check_scores(scores_all, images)
                classes_t = resolve_classes(classes, top_k, scores_all, aux)
                cot = one_hots(classes_t, scores_all, sign)
                if self.vjp_strategy == "auto":
                    grads = self._auto_vjp(vjp_fn, cot)
                elif self.vjp_strategy == "vmap":
                    (grads,) = torch.vmap(vjp_fn)(cot)
                else:
                    grads = torch.stack([vjp_fn(cot[c])[0] for c in range(cot.shape[0])])
        grads = grads.to(cdt).transpose(0, 1)  # (C, B, K, h, w) -> (B, C, K, h, w)
        return acts, scores_all.detach(), classes_t, grads, None, aux

    def _hooked_pass(self, images, classes, top_k, sign, need_grad):
        """Fallback for models FX cannot trace: one forward, graph from A, batched backward."""
        assert self.target_layer is not None
        module = self.model.get_submodule(self.target_layer)
        # no_grad outside, the hook's enable_grad inside: leaving restores both in order.
        to_map = None
        if self.reshape == "tokens":
            to_map = lambda t: tokens_to_map(t, self.token_grid, (images.shape[-2], images.shape[-1]))
        with torch.no_grad(), _TargetHook(module, self.target_layer, root=True, to_map=to_map) as hook:
            out = self.model(images)
            scores_all, aux = _split_aux((self._aux_score_fn or self._score_fn)(out), self._aux_score_fn is not None)
            a = hook.activation
        if a is None:
            raise TargetLayerError(f"target layer {self.target_layer!r} did not run in the forward pass")
        self._check_acts(a)
        self._check_scores(scores_all, images)
        classes_t = resolve_classes(classes, top_k, scores_all.detach(), aux)
        cdt = torch.promote_types(a.dtype, torch.float32)
        if not need_grad:
            return a.detach(), scores_all.detach(), classes_t, None, aux
        cot = one_hots(classes_t, scores_all, sign)
        if not scores_all.requires_grad:
            self._no_dependency()
        (grads,) = torch.autograd.grad(scores_all, a, cot, is_grads_batched=True, allow_unused=True)
        if grads is None:
            self._no_dependency()
        return a.detach(), scores_all.detach(), classes_t, grads.to(cdt).transpose(0, 1), aux

    def _forward_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(n, N) scores of a batch with no graph (Score-CAM's masked inputs), in the run's precision."""
        with torch.inference_mode():
            if self._split is None:
                with backbone_context(x.device, self.precision):
                    return _at_least_fp32(self._score_fn(self.model(x)))
            self._split.sync(self.model)
            with backbone_context(x.device, self.precision):
                feats = self._backbone(prepare_input(x))
            low = self.precision != "fp32"
            feats = [t.float() if low and isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in feats]
            return _at_least_fp32(self._score_fn(self._split.head(*feats)))

    def _check_acts(self, acts: object) -> None:
        if not isinstance(acts, torch.Tensor) or acts.dim() != 4:
            shape = tuple(acts.shape) if isinstance(acts, torch.Tensor) else type(acts).__name__
            raise TargetLayerError(
                f"target layer {self.target_layer!r} outputs {shape}; Grad-CAM needs a 4-D (B, K, h, w) map"
            )

    def _check_scores(self, scores: torch.Tensor, images: torch.Tensor) -> None:
        if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or scores.shape[0] != images.shape[0]:
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(f"score_fn must return (B, N) = ({images.shape[0]}, N) scores, got {shape}")

    def _no_dependency(self):
        raise TargetLayerError(f"the scores do not depend on target layer {self.target_layer!r}")


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _split_aux(result: object, with_aux: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    if not with_aux:
        return result, None
    scores, aux = result
    return scores, _detached(aux)


def _detached(aux: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in aux.items()}


def resolve_classes(
    classes: torch.Tensor | None, top_k: int, scores: torch.Tensor, aux: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """(B, C) long indices of the classes to explain: the given ones (checked), a selector's, or the top ``top_k``."""
    b, n = scores.shape
    selected = callable(classes)
    if selected:
        # A selector that needs the scores (e.g. the ground truth plus the top-k) returns (B, C); with a
        # score function's aux (a segmentation mask's region sizes), it gets that too.
        classes = classes(scores.detach()) if aux is None else classes(scores.detach(), aux)
    if classes is None:
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        if top_k > n:
            raise ValueError(f"top_k={top_k} exceeds the number of classes ({n})")
        return scores.detach().topk(top_k, dim=1).indices
    classes_t = torch.as_tensor(classes, device=scores.device)
    if classes_t.dtype.is_floating_point or classes_t.dtype == torch.bool:
        raise ValueError(f"classes must be integer indices, got dtype {classes_t.dtype}")
    classes_t = classes_t.long()
    if classes_t.dim() == 1:
        classes_t = classes_t.unsqueeze(0).expand(b, -1)
    if classes_t.dim() != 2 or classes_t.shape[0] != b or classes_t.shape[1] == 0:
        raise ValueError(f"classes must be (C,) or (B, C) = ({b}, C) indices, got shape {tuple(classes_t.shape)}")
    if selected and classes_t.is_cuda:
        # A selector's indices on the device are its own responsibility: checking them here would
        # wait for the device on every batch (the run's batch step checks its classes up front).
        return classes_t.contiguous()
    bad = (classes_t < 0) | (classes_t >= n)
    if bool(bad.any()):
        idx = int(classes_t[bad][0])
        raise ValueError(f"class index {idx} is out of range: the model has {n} classes (0..{n - 1})")
    return classes_t.contiguous()


def one_hots(classes: torch.Tensor, scores: torch.Tensor, sign: float) -> torch.Tensor:
    """(C, B, N) cotangents: one-hot at each explained class, negated for counterfactuals."""
    b, c = classes.shape
    cot = torch.zeros((c, b, scores.shape[1]), dtype=scores.dtype, device=scores.device)
    cot.scatter_(2, classes.t().unsqueeze(-1), sign)
    return cot


# explain()'s set-up cache: per model (held weakly), up to _CACHE_SIZE prepared explainers, one per set of
# set-up arguments, least recently used first out. See ``explain`` for what keeps an entry valid.
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 8
# Per model (held weakly): the (layer, cause) pairs whose graph-split fallback was already reported.
_FALLBACK_WARNED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _structure(model: nn.Module) -> tuple[int, ...]:
    """Which module and parameter objects the model holds: what a prepared explainer's set-up (the layer,
    the graph cut, the head analysis) was derived from. The set-up holds no tensor of its own: the cut
    graphs read every parameter and buffer through the model's modules at call time (engine/explain/split.py),
    so new values, dtypes or devices (an optimizer step, ``load_state_dict``, ``.to()``, ``.double()``, a
    buffer assigned anew) need nothing; a replaced module or parameter object makes a new set-up."""
    return (*map(id, model.modules()), -1, *map(id, model.parameters()))


def _cached_explainer(model: nn.Module, key: tuple, make: Callable[[], Explainer]) -> tuple[Explainer, bool]:
    """(explainer for this call, whether it is new). Cached templates hold no reference to the model
    itself (only to its submodules, through the graph split), so the weak key can die."""
    structure = _structure(model)
    with _CACHE_LOCK:
        try:
            entries = _CACHE.setdefault(model, OrderedDict())
        except TypeError:  # not weak-referenceable
            return make(), True
        hit = entries.get(key)
        if hit is not None and hit[0] == structure:
            entries.move_to_end(key)
            explainer = copy.copy(hit[1])
            explainer.model = model
            return explainer, False
        entries.pop(key, None)
    return make(), True


def _store_explainer(model: nn.Module, key: tuple, explainer: Explainer) -> None:
    template = copy.copy(explainer)
    template.model = None
    with _CACHE_LOCK:
        entries = _CACHE.get(model)
        if entries is None:
            return
        entries[key] = (_structure(model), template)
        while len(entries) > _CACHE_SIZE:
            entries.popitem(last=False)


def explain(
    model: nn.Module | SplitBackend,
    images: torch.Tensor,
    *,
    target_layer: str | nn.Module | None = None,
    classes: torch.Tensor | None = None,
    top_k: int = 1,
    method: str | Sequence[str] = "gradcam",
    counterfactual: bool = False,
    score_fn: Callable[[object], torch.Tensor] | None = None,
    output_size: tuple[int, int] | int | None = None,
    normalize: bool = True,
    out_dtype: torch.dtype = torch.float32,
    reshape: str | None = None,
    precision: str = "fp32",
    guided: bool = False,
    scorecam_batch: int = DEFAULT_SCORECAM_BATCH,
    metrics: Sequence[str] = (),
) -> Explanation | dict[str, Explanation]:
    """Grad-CAM (and the CAM family) for a batch of preprocessed images, for several classes per image at once.

    Args:
        model: a classifier (any ``nn.Module``), left exactly as it was; or an ``OnnxModel``
            (``engine/models/onnx_backend.py``), whose target layer is a tensor name. Every method works on
            both; ``guided`` needs a torch module.
        images: (B, 3, H, W) float tensor on the model's device, already normalized.
        target_layer: a module name from ``model.named_modules()``, the module itself, or None to
            pick the trunk's last feature map: the map, or the tokens, that the network pools or reads a
            class token from into the classifier (engine/explain/trunk.py).
        classes: None for the ``top_k`` highest scores per image, a (B, C) LongTensor of class
            indices per image, or a (C,) LongTensor of classes for every image.
        method: a name, or a sequence of names (the result is then ``{name: Explanation}``, all from
            one forward and one VJP): ``gradcam``, ``cam`` (GAP -> linear heads only), ``gradcam++``,
            ``xgradcam``, ``layercam``, ``hirescam``, ``gradcam-elementwise``, ``eigencam``,
            ``eigengradcam``, ``scorecam`` (see engine/explain/methods.py).
        counterfactual: negate the gradients: the regions whose removal would raise the score.
        score_fn: maps the model output to (B, N) scores (multi-label, segmentation, similarity).
        output_size: (H, W) of the heatmaps; default the input's size.
        normalize: min-max normalize each heatmap to [0, 1]; a constant map becomes 0.
        out_dtype: heatmap dtype: float32 (default), float16 or uint8 (round(255 * x)).
        reshape: ``"tokens"`` for a transformer target layer with (B, N, D) output (see engine/explain/tokens.py);
            None decides from the target layer's output.
        precision: the backbone's autocast dtype: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``.
        guided: also Guided Grad-CAM (``Explanation.guided``): a backward through the whole model.
        scorecam_batch: Score-CAM's masked images per forward.
        metrics: any of ``"deletion"``, ``"insertion"``, ``"confidence"``: fills ``Explanation.metrics``
            with the faithfulness metrics of ``gradcam_batch.metrics`` (their defaults), computed on
            the normalized heatmap at the input size.

    The set-up (layer search, graph split, head analysis) is cached per model and argument set, so
    calling ``explain()`` in a loop costs what a reused ``Explainer`` does. The cached set-up reads
    the model's parameters and buffers at each call: new weights (a training step), ``.to()``,
    ``.double()``, ``.half()`` or a buffer assigned anew are used as they are, and a module or parameter
    replaced by another object makes a new set-up.
    """
    key = (
        target_layer,
        method if isinstance(method, str) else tuple(method),
        score_fn,
        reshape,
        precision,
        bool(guided),
        scorecam_batch,
    )

    def make() -> Explainer:
        return Explainer(
            model,
            target_layer=target_layer,
            method=method,
            score_fn=score_fn,
            reshape=reshape,
            precision=precision,
            guided=guided,
            scorecam_batch=scorecam_batch,
        )

    if isinstance(model, nn.Module):
        explainer, new = _cached_explainer(model, key, make)
    else:
        explainer, new = make(), False
    result = explainer(
        images,
        classes=classes,
        top_k=top_k,
        counterfactual=counterfactual,
        output_size=output_size,
        normalize=normalize,
        out_dtype=out_dtype,
        saliency=bool(metrics),
    )
    if new and isinstance(model, nn.Module):
        _store_explainer(model, key, explainer)
    if metrics:
        for exp in result.values() if isinstance(result, dict) else (result,):
            exp.metrics = _faithfulness(model, images, exp, tuple(metrics), score_fn)
    return result


def _faithfulness(model, images: torch.Tensor, exp: Explanation, names: tuple[str, ...], score_fn) -> dict:
    """The metrics of ``engine/metrics`` on the input-size saliency of ``exp``."""
    from gradcam_batch.engine.metrics import confidence_change, deletion_insertion

    unknown = [n for n in names if n not in ("deletion", "insertion", "confidence")]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; expected deletion, insertion or confidence")
    saliency = exp.saliency
    scores = scores_only(score_fn) if score_fn is not None else default_score_fn
    with eval_mode(model) if isinstance(model, nn.Module) else contextlib.nullcontext():
        out: dict[str, torch.Tensor] = {}
        if "deletion" in names or "insertion" in names:
            d, i = deletion_insertion(model, images, saliency, exp.classes, score_fn=scores)
            out |= {k: v for k, v in (("deletion_auc", d), ("insertion_auc", i)) if k.split("_")[0] in names}
        if "confidence" in names:
            drop, increase = confidence_change(model, images, saliency, exp.classes, score_fn=scores)
            out |= {"confidence_drop": drop, "confidence_increase": increase}
    return out
