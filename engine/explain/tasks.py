"""Tasks beyond single-label softmax classifiers: multi-label classifiers and semantic segmentation.

Both reuse the Explainer as it is: one backbone forward, one vectorized VJP of the head for every explained
class of the batch. A task adds three things around it: what the score of a class is, which classes a row
explains, and what the probability and the task's own figures are.

- ``multilabel``: the score is the logit (so a GAP -> linear head keeps its closed form); the probability is
  its sigmoid. Classes: the top-k, listed classes, every class whose probability is at least a threshold
  (capped at ``max_classes``, highest first), and the positive labels, each class once per row.
- ``segmentation``: the model returns (B, N, h, w) logits (a tensor, torchvision's ``{"out": ...}``, or a
  Transformers output's ``.logits``), upsampled bilinearly (``align_corners=False``) to the input size when
  smaller. The predicted mask is their argmax over classes. The score of class c is the sum of c's logits
  over the pixels predicted as c (the recipe of pytorch-grad-cam's ``SemanticSegmentationTarget``), so the
  decoder is the head that the VJP differentiates. ``area``: the region's share of the image;
  ``probability``: the mean softmax of c over the region. Classes: the K largest regions (an empty region is
  never picked), listed classes, or the classes of a true mask; a listed or true class with no predicted
  pixel gets score 0, a zero map and a note. With true masks: ``mask_energy`` and ``mask_iou``
  (``engine/metrics/localization.py``).

Rows are rectangular (B, C) with a ``keep`` mask: a row that explains fewer classes than the widest of its
batch is padded, and its padding is not kept. See the README's "Tasks".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gradcam_batch.engine.explain.explainer import Explainer, Explanation
from gradcam_batch.engine.metrics.localization import mask_metrics
from gradcam_batch.kernels import fused_cam

TASKS = ("softmax", "multilabel", "segmentation")
LABEL_FORMATS = ("auto", "indices", "multihot")
MASK_THRESHOLD = 0.15  # the Grad-CAM paper's box threshold, for mask_iou


class TaskError(ValueError):
    """Bad input for a task, in one line."""


# -- which task -------------------------------------------------------------------------------------------


def detect_task(model: object) -> str:
    """The task a model declares: ``"multilabel"`` for a Transformers config with ``problem_type =
    "multi_label_classification"``, ``"segmentation"`` for a Transformers ``...ForSemanticSegmentation``,
    ``"softmax"`` otherwise (a model that does not say is taken as a softmax classifier)."""
    config = getattr(model, "config", None)
    if getattr(config, "problem_type", None) == "multi_label_classification":
        return "multilabel"
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    if any(str(a).endswith("ForSemanticSegmentation") for a in architectures):
        return "segmentation"
    return "softmax"


def check_task_options(
    task: str, *, threshold: float | None = None, max_classes: int | None = None, top_k: int | None = None
) -> None:
    """The options' checks that need no data; ``TaskError`` with one line."""
    if task not in TASKS:
        raise TaskError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if threshold is not None:
        if task != "multilabel":
            raise TaskError(f"a probability threshold needs the multilabel task (sigmoid scores); the task is {task}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise TaskError(f"the threshold must be a probability in [0, 1], got {threshold!r}")
    if max_classes is not None:
        if isinstance(max_classes, bool) or not isinstance(max_classes, int) or max_classes < 1:
            raise TaskError(f"max_classes must be a positive integer, got {max_classes!r}")
        if threshold is None:
            raise TaskError("max_classes caps the classes a threshold selects; give a threshold too")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise TaskError(f"top_k must be a non-negative integer, got {top_k!r}")


# -- labels and masks -------------------------------------------------------------------------------------


def positive_labels(value: object, num_classes: int, label_format: str = "auto") -> tuple[list[int] | None, str | None]:
    """One row's positive classes, sorted and unique, or (None, why) for a bad value.

    ``value``: an integer (one positive), a list of positive class indices, or a multi-hot list of
    ``num_classes`` 0/1 values. ``label_format="auto"`` reads a list as multi-hot when its length is
    ``num_classes`` and every value is 0 or 1 (bools included), as indices otherwise; ``"indices"`` or
    ``"multihot"`` says which. None (a null label) gives (None, "null label")."""
    if label_format not in LABEL_FORMATS:
        raise TaskError(f"unknown label format {label_format!r}; expected one of {', '.join(LABEL_FORMATS)}")
    if value is None:
        return None, "null label"
    arr = np.asarray(value)
    if arr.dtype == object or arr.ndim > 1:
        return None, f"label {value!r} is neither a class index, a list of indices nor a multi-hot list"
    arr = arr.reshape(-1)
    if arr.dtype.kind not in "biuf":
        return None, f"label {value!r} is neither a class index, a list of indices nor a multi-hot list"
    if arr.dtype.kind == "f" and (not np.isfinite(arr).all() or (arr != np.round(arr)).any()):
        return None, f"label {value!r} holds values that are not integers"
    binary = arr.size == num_classes and bool(np.isin(arr, (0, 1)).all())
    multihot = label_format == "multihot" or (label_format == "auto" and binary and np.ndim(value) == 1)
    if multihot:
        if not binary:
            return None, f"a multi-hot label needs {num_classes} values of 0 or 1, got {arr.size}"
        return [int(i) for i in np.flatnonzero(arr)], None
    idx = arr.astype(np.int64)
    bad = idx[(idx < 0) | (idx >= num_classes)]
    if bad.size:
        return None, f"label {int(bad[0])} is not a class of the model (0..{num_classes - 1})"
    return sorted({int(i) for i in idx}), None


def check_true_mask(
    mask: torch.Tensor | np.ndarray, size: tuple[int, int], num_classes: int, ignore_index: int | None = None
) -> str | None:
    """Why one true mask (H, W) of class indices cannot be used with an input of ``size``, or None."""
    shape = tuple(mask.shape)
    if len(shape) != 2:
        return f"the true mask has shape {shape}; it must be one (H, W) map of class indices"
    if shape != tuple(size):
        return f"the true mask is {shape[1]}x{shape[0]} (WxH) and the input {size[1]}x{size[0]}; they must match"
    t = torch.as_tensor(mask)
    if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
        return f"the true mask holds {t.dtype} values; it must hold integer class indices"
    t = t.long()
    bad = (t < 0) | (t >= num_classes)
    if ignore_index is not None:
        bad &= t != ignore_index
    if bool(bad.any()):
        values = sorted({int(v) for v in t[bad].unique()[:5]})
        also = f" (or the ignore index {ignore_index})" if ignore_index is not None else ""
        return f"the true mask holds class indices {values} that the model does not have (0..{num_classes - 1}{also})"
    return None


# -- segmentation scores ----------------------------------------------------------------------------------


def dense_logits(output: object) -> torch.Tensor:
    """The (B, N, h, w) logits of a segmentation model's output: a tensor, ``{"out": ...}`` or ``.logits``."""
    if isinstance(output, torch.Tensor):
        logits = output
    elif isinstance(output, Mapping) and "out" in output:
        logits = output["out"]
    else:
        logits = getattr(output, "logits", None)
        if logits is None and isinstance(output, Mapping):
            logits = output.get("logits")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4:
        what = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(output).__name__
        raise TaskError(
            f"the segmentation task needs a model that returns (B, C, H, W) logits (a tensor, "
            f'{{"out": ...}} or .logits); this model returns {what}'
        )
    return logits


def first_max(x: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=1)`` for (B, N, P) ``x`` and its (B, 1, P) ``amax``: the first class holding the maximum.

    On the CPU, argmax over a middle dimension is several times slower than amax (a strided reduction
    without the vectorized kernel); a comparison with the max and an amax over reversed class ranks gives the
    same indices. A NaN pixel (no class equals it) gets the last class; its scores are NaN anyway."""
    n = x.shape[1]
    rank_dtype = torch.int16 if n < 2**15 else torch.int64
    rank = torch.arange(n, 0, -1, dtype=rank_dtype, device=x.device).view(1, n, 1)  # N for class 0, 1 for N-1
    return (n - ((x == best) * rank).amax(dim=1).long()).clamp_max(n - 1)


# The arguments of a segmentation head's final upsample, left by ``deferred_interpolate`` for the score function.
_DEFERRED: ContextVar[tuple | None] = ContextVar("gradcam_batch_deferred_upsample", default=None)


def deferred_interpolate(
    input: torch.Tensor,
    size=None,
    scale_factor=None,
    mode: str = "nearest",
    align_corners: bool | None = None,
    recompute_scale_factor: bool | None = None,
    antialias: bool = False,
) -> torch.Tensor:
    """Stands in for the final ``F.interpolate`` of a segmentation head (``SegmentationScore.adopt_head``): returns
    ``input`` as it is, and leaves the call's arguments for the score function, which takes the upsample itself."""
    _DEFERRED.set((tuple(input.shape[-2:]), size, scale_factor, mode, align_corners, recompute_scale_factor, antialias))
    return input


def _upsample_adjoint(onehot: torch.Tensor, low: tuple[int, int]) -> torch.Tensor:
    """U^T of bilinear upsampling (``align_corners=False``) from ``low`` to ``onehot``'s size: (B, N, H, W) ->
    (B, N, h, w). For any z, <U z, m> = <z, U^T m>."""
    b, n, hh, ww = onehot.shape
    return torch.ops.aten.upsample_bilinear2d_backward(onehot, [hh, ww], [b, n, *low], False)


class SegmentationScore:
    """The score function of the segmentation task: (B, N) scores and an aux, from one head forward.

    ``size`` is the input's (H, W), set before each batch by whoever owns the object (a ``TaskExplainer``).
    Scores: ``scores[b, c] = sum over {p: argmax_k up[b, k, p] == c} of up[b, c, p]``, with ``up`` the logits
    upsampled to ``size`` (bilinear, ``align_corners`` as given, default False). The argmax is taken on the
    detached logits: the mask is a constant of the score, as in the common recipe. Aux (never differentiated):
    ``count`` (B, N) pixels per predicted class, ``prob_sum`` (B, N) the sum of c's softmax over c's pixels,
    ``pred_mask`` (B, H, W) int64.
    """

    has_aux = True

    def __init__(self, size: tuple[int, int] | None = None, align_corners: bool = False):
        self.size = size
        self.align_corners = align_corners
        self.deferred = False  # the head's final upsample is deferred to this function (``adopt_head``)

    def adopt_head(self, head: nn.Module) -> None:
        """Take over a traced head's final bilinear upsample (torchvision's ``F.interpolate(out, size=input)``).

        The VJP of the head would otherwise run that upsample's backward over every class channel at the
        input's size, once per explained class (the largest cost above inference on LR-ASPP). Deferred, the
        score is taken on the small logits against the upsample's adjoint of each class's mask, computed once
        without a graph: the same number, since bilinear upsampling is linear. Nothing changes for a head that
        does not end so."""
        import torch.fx as fx

        if not isinstance(head, fx.GraphModule):
            return
        output = next(n for n in head.graph.nodes if n.op == "output")
        value = output.args[0]
        node = value.get("out") if isinstance(value, dict) else value
        if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is F.interpolate):
            return
        if len(node.users) != 1:
            return
        node.target = deferred_interpolate
        head.recompile()
        self.deferred = True

    def _undefer(self, logits: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """(logits, adjoint): the head's deferred upsample done here where it has to be, or left to the adjoint
        path where it goes to the input's size with this function's own bilinear upsample."""
        args = _DEFERRED.get() if self.deferred else None
        if args is None:
            return logits, False
        _DEFERRED.set(None)
        low, size, scale_factor, mode, align_corners, recompute, antialias = args
        kw = {"size": size, "scale_factor": scale_factor, "mode": mode, "align_corners": align_corners}
        kw |= {"recompute_scale_factor": recompute, "antialias": antialias}
        probe = torch.empty((1, 1, *low), device="meta")
        out = tuple(F.interpolate(probe, **kw).shape[-2:])
        # A scale factor that is not recomputed samples at 1 / factor, not at the sizes' ratio that the adjoint
        # (and this function's own upsample) use: such a head's upsample is done here as the model does it.
        by_size = scale_factor is None or bool(recompute)
        same = by_size and mode == "bilinear" and not align_corners and not antialias and not self.align_corners
        if same and self.size is not None and out == tuple(self.size):
            return logits, True
        return F.interpolate(logits, **kw), False

    def __call__(self, output: object) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, adjoint = self._undefer(dense_logits(output))
        b, n = logits.shape[:2]
        small = self.size is not None and tuple(logits.shape[-2:]) != tuple(self.size)
        if small and not self.align_corners:
            adjoint = True
        if adjoint:
            # The score on the small logits against U^T of each class's mask at the input size: sum over the
            # class's pixels of its upsampled logits, with no upsample in the graph. The mask is the argmax of
            # the upsampled logits, a constant of the score as on the direct path.
            fixed = F.interpolate(logits.detach(), size=self.size, mode="bilinear", align_corners=False).flatten(2)
            mask, aux = _region_aux(fixed, self.size)
            onehot = torch.zeros_like(fixed).scatter_(1, mask.unsqueeze(1), 1.0).view(b, n, *self.size)
            weight = _upsample_adjoint(onehot, tuple(logits.shape[-2:]))
            return (logits * weight).flatten(2).sum(dim=2), aux
        if small:
            logits = F.interpolate(logits, size=self.size, mode="bilinear", align_corners=self.align_corners)
        flat = logits.flatten(2)  # (B, N, P)
        mask, aux = _region_aux(flat.detach(), tuple(logits.shape[-2:]))
        picked = flat.gather(1, mask.unsqueeze(1)).squeeze(1)  # (B, P): each pixel's winning logit
        scores = torch.zeros((b, n), dtype=flat.dtype, device=flat.device).scatter_add(1, mask, picked)
        return scores, aux


def _region_aux(fixed: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The predicted mask (B, P) of detached (B, N, P) logits at the input size, and the score's aux: ``count``,
    ``prob_sum`` (B, N) and ``pred_mask`` (B, H, W)."""
    b, n = fixed.shape[:2]
    best = fixed.amax(dim=1, keepdim=True)  # (B, 1, P)
    mask = first_max(fixed, best)  # (B, P): argmax over the classes, ties to the lower class index
    # The winning class's softmax at each pixel, 1 / sum_k exp(l_k - l_max), with no (B, N, P) softmax kept.
    prob = (fixed - best).exp_().sum(dim=1).reciprocal_()
    zeros = torch.zeros((b, n), dtype=prob.dtype, device=prob.device)
    aux = {
        "count": zeros.scatter_add(1, mask, torch.ones_like(prob)),
        "prob_sum": zeros.scatter_add(1, mask, prob),
        "pred_mask": mask.view(b, *size),
    }
    return mask, aux


# -- class selection --------------------------------------------------------------------------------------


def compact(candidates: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, W) candidate classes in priority order -> (classes (B, C), keep (B, C)): each row's valid
    candidates, each class once (its first place), packed to the left; C is the widest row (at least 1).
    Padding repeats the row's first class (class 0 in a row with none) and is not kept."""
    b, w = candidates.shape
    device = candidates.device
    if w == 0:
        none = torch.zeros((b, 1), dtype=torch.long, device=device)
        return none, none.bool()
    earlier = torch.ones((w, w), dtype=torch.bool, device=device).tril(-1)  # [j, i]: i before j
    same = candidates.unsqueeze(2) == candidates.unsqueeze(1)  # (B, j, i)
    dup = (same & valid.unsqueeze(1) & earlier).any(dim=2)
    keep = valid & ~dup
    pos = torch.arange(w, device=device)
    order = torch.argsort((~keep).long() * w + pos, dim=1)
    classes, keep = candidates.gather(1, order), keep.gather(1, order)
    width = max(1, int(keep.sum(dim=1).max()))
    classes, keep = classes[:, :width], keep[:, :width]
    first = torch.where(keep[:, :1], classes[:, :1], torch.zeros_like(classes[:, :1]))
    return torch.where(keep, classes, first).contiguous(), keep.contiguous()


def _padded(rows: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(r) for r in rows), default=0)
    cls = torch.zeros((len(rows), width), dtype=torch.long)
    ok = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        cls[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        ok[i, : len(r)] = True
    return cls.to(device), ok.to(device)


def _listed(classes, b: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.as_tensor(classes, device=device)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TaskError(f"classes must be integer indices, got dtype {t.dtype}")
    t = t.long()
    if t.dim() == 1:
        t = t.unsqueeze(0).expand(b, -1)
    if t.dim() != 2 or t.shape[0] != b:
        raise TaskError(f"classes must be (C,) or (B, C) = ({b}, C) indices, got shape {tuple(t.shape)}")
    bad = (t < 0) | (t >= n)
    if bool(bad.any()):
        raise TaskError(f"class {int(t[bad][0])} is not a class of the model (0..{n - 1})")
    return t, torch.ones_like(t, dtype=torch.bool)


def select_multilabel(
    scores: torch.Tensor,
    *,
    top_k: int = 0,
    classes=None,
    threshold: float | None = None,
    max_classes: int | None = None,
    positives: Sequence[Sequence[int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(classes, keep, positive), each (B, C), for (B, N) logits: the top-k, the listed classes, the classes
    with sigmoid >= threshold (at most ``max_classes``, highest first), then the positive labels; each class
    once per row, in that order. ``positive``: the class is one of the row's positive labels."""
    b, n = scores.shape
    device = scores.device
    parts = []
    if top_k:
        idx = scores.topk(min(top_k, n), dim=1).indices
        parts.append((idx, torch.ones_like(idx, dtype=torch.bool)))
    if classes is not None:
        parts.append(_listed(classes, b, n, device))
    if threshold is not None:
        prob = torch.sigmoid(scores.float())
        top = prob.topk(min(max_classes or n, n), dim=1)
        parts.append((top.indices, top.values >= threshold))
    pos = pos_ok = None
    if positives is not None:
        if len(positives) != b:
            raise TaskError(f"positives must have one entry per image ({b}), got {len(positives)}")
        pos, pos_ok = _padded(positives, device)
        parts.append((pos, pos_ok))
    cand = torch.cat([p[0] for p in parts], dim=1) if parts else torch.zeros((b, 0), dtype=torch.long, device=device)
    ok = torch.cat([p[1] for p in parts], dim=1) if parts else torch.zeros((b, 0), dtype=torch.bool, device=device)
    out, keep = compact(cand, ok)
    if pos is None:
        positive = torch.zeros_like(keep)
    else:
        positive = ((out.unsqueeze(2) == pos.unsqueeze(1)) & pos_ok.unsqueeze(1)).any(dim=2) & keep
    return out, keep, positive


def select_segmentation(
    count: torch.Tensor,
    *,
    top_k: int = 0,
    classes=None,
    true_classes: Sequence[Sequence[int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(classes, keep), each (B, C), for (B, N) predicted pixel counts: the ``top_k`` largest non-empty
    regions (largest first, ties to the lower class), the listed classes, then the true mask's classes."""
    b, n = count.shape
    device = count.device
    parts = []
    if top_k:
        # A stable sort, not topk: equal regions go to the lower class, on every device.
        order = torch.argsort(-count, dim=1, stable=True)[:, : min(top_k, n)]
        parts.append((order, count.gather(1, order) > 0))
    if classes is not None:
        parts.append(_listed(classes, b, n, device))
    if true_classes is not None:
        if len(true_classes) != b:
            raise TaskError(f"true masks must have one entry per image ({b}), got {len(true_classes)}")
        parts.append(_padded(true_classes, device))
    cand = torch.cat([p[0] for p in parts], dim=1) if parts else torch.zeros((b, 0), dtype=torch.long, device=device)
    ok = torch.cat([p[1] for p in parts], dim=1) if parts else torch.zeros((b, 0), dtype=torch.bool, device=device)
    return compact(cand, ok)


# -- the explainer ----------------------------------------------------------------------------------------


@dataclass
class TaskExplanation:
    """One batch of a task. Every (B, C) tensor is aligned with ``explanation.classes``; rows where ``keep``
    is False are padding and are not to be written."""

    task: str
    explanation: Explanation | dict[str, Explanation]  # probabilities are the task's (sigmoid, region mean)
    keep: torch.Tensor  # (B, C) bool
    positive: torch.Tensor  # (B, C) bool: a positive label (multilabel) / present in the true mask (segmentation)
    notes: list[list[str | None]]  # (B, C): a note for the row's `error` column (an empty predicted region)
    area: torch.Tensor | None = None  # (B, C) float32, segmentation: the predicted region's share of the image
    empty: torch.Tensor | None = None  # (B, C) bool, segmentation: the class has no predicted pixel
    mask_energy: torch.Tensor | None = None  # (B, C) float32, segmentation with true masks
    mask_iou: torch.Tensor | None = None  # (B, C) float32, segmentation with true masks
    pred_mask: torch.Tensor | None = None  # (B, H, W) int64, segmentation: the predicted mask


class TaskExplainer:
    """An ``Explainer`` for a task; set up once, then called per batch.

    ``TaskExplainer(model, task, target_layer=None, method="gradcam", **explainer_options)`` takes the
    Explainer's own options (``precision``, ``compile``, ``vjp_strategy``, ...). ``task="softmax"`` is the
    plain classifier and returns the Explainer's classes with ``keep`` all True.
    """

    def __init__(
        self,
        model: nn.Module,
        task: str,
        target_layer: str | nn.Module | None = None,
        method: str | Sequence[str] = "gradcam",
        *,
        align_corners: bool = False,
        **explainer_options,
    ):
        check_task_options(task)
        if "score_fn" in explainer_options:
            raise TaskError("a task sets its own score function; use Explainer(score_fn=...) for a custom one")
        self.task = task
        self.segmentation_score = SegmentationScore(align_corners=align_corners) if task == "segmentation" else None
        self.explainer = Explainer(
            model, target_layer=target_layer, method=method, score_fn=self.segmentation_score, **explainer_options
        )

    @property
    def target_layer(self) -> str | None:
        return self.explainer.target_layer

    @property
    def model(self):
        return self.explainer.model

    def scores(self, output: object) -> torch.Tensor:
        """The (B, N) scores of a model output by the task's score function (a segmentation's region sums
        at the output's own resolution when no input size was set)."""
        return self.explainer.scores(output)

    def probe(self, sample: torch.Tensor, *, classes=None, counterfactual: bool = False) -> Explanation:
        """``Explainer.probe`` for the task: set up on ``sample`` and explain it once. ``classes`` is called
        with the (B, N) scores alone, whatever the task's score function returns beside them."""
        if self.segmentation_score is not None:
            self.segmentation_score.size = (sample.shape[-2], sample.shape[-1])
        pick = classes
        if callable(classes) and self.segmentation_score is not None:

            def pick(scores, aux=None):
                return classes(scores)

        return self.explainer.probe(sample, classes=pick, counterfactual=counterfactual)

    def __call__(
        self,
        images: torch.Tensor,
        *,
        top_k: int | None = None,
        classes=None,
        threshold: float | None = None,
        max_classes: int | None = None,
        positives: Sequence[Sequence[int]] | None = None,
        true_masks: torch.Tensor | Sequence[torch.Tensor | np.ndarray] | None = None,
        ignore_index: int | None = None,
        counterfactual: bool = False,
        output_size: tuple[int, int] | int | None = None,
        normalize: bool = True,
        out_dtype: torch.dtype = torch.float32,
        heatmaps: bool = True,
        saliency: bool = False,
    ) -> TaskExplanation:
        """Explain one batch. ``top_k`` None means 1 when nothing else selects classes, else 0.

        - softmax: ``top_k`` and ``classes`` as in ``explain()``.
        - multilabel: ``top_k``, ``classes``, ``threshold`` (+ ``max_classes``) and ``positives`` (per image, a
          list of class indices: see ``positive_labels``) combine.
        - segmentation: ``top_k`` (largest regions), ``classes`` and ``true_masks`` ((B, H, W) or B maps of
          class indices at the input's size; ``ignore_index`` marks unlabelled pixels) combine.
        """
        check_task_options(self.task, threshold=threshold, max_classes=max_classes, top_k=top_k)
        if positives is not None and self.task != "multilabel":
            raise TaskError(f"positive labels (several per image) need the multilabel task; the task is {self.task}")
        if true_masks is not None and self.task != "segmentation":
            raise TaskError(f"true masks need the segmentation task; the task is {self.task}")
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise TaskError("images must be a (B, C, H, W) tensor")
        asked = classes is not None or threshold is not None or positives is not None or true_masks is not None
        k = (0 if asked else 1) if top_k is None else top_k
        if not k and not asked:
            raise TaskError("nothing to explain: give top_k, classes, a threshold, positive labels or true masks")
        call = {"counterfactual": counterfactual, "output_size": output_size, "normalize": normalize}
        call |= {"out_dtype": out_dtype, "heatmaps": heatmaps, "saliency": saliency}
        if self.task == "softmax":
            exp = self.explainer(images, classes=classes, top_k=k, **call)
            first = _first(exp)
            keep = torch.ones_like(first.classes, dtype=torch.bool)
            return TaskExplanation(self.task, exp, keep, torch.zeros_like(keep), _no_notes(keep))
        if self.task == "multilabel":
            return self._multilabel(images, k, classes, threshold, max_classes, positives, call)
        return self._segmentation(images, k, classes, true_masks, ignore_index, call)

    def _multilabel(self, images, k, classes, threshold, max_classes, positives, call) -> TaskExplanation:
        picked: dict[str, torch.Tensor] = {}

        def select(scores: torch.Tensor) -> torch.Tensor:
            out, picked["keep"], picked["positive"] = select_multilabel(
                scores, top_k=k, classes=classes, threshold=threshold, max_classes=max_classes, positives=positives
            )
            return out

        exp = self.explainer(images, classes=select, top_k=1, **call)
        for e in _all(exp):
            e.probabilities = torch.sigmoid(e.scores)
        keep = picked["keep"]
        return TaskExplanation(self.task, exp, keep, picked["positive"], _no_notes(keep))

    def _segmentation(self, images, k, classes, true_masks, ignore_index, call) -> TaskExplanation:
        b = images.shape[0]
        size = (images.shape[-2], images.shape[-1])
        truth = true_classes = None
        if true_masks is not None:
            truth, true_classes = self._true_masks(true_masks, b, size, ignore_index, images.device)
        picked: dict[str, torch.Tensor] = {}

        def select(scores: torch.Tensor, aux: dict[str, torch.Tensor]) -> torch.Tensor:
            n = scores.shape[1]
            if true_classes is not None:
                bad = [c for row in true_classes for c in row if c >= n]
                if bad:
                    raise TaskError(f"the true mask holds class index {bad[0]}; the model has {n} classes (0..{n - 1})")
            out, picked["keep"] = select_segmentation(aux["count"], top_k=k, classes=classes, true_classes=true_classes)
            return out

        self.segmentation_score.size = size
        exp = self.explainer(images, classes=select, top_k=1, **call)
        first = _first(exp)
        aux = first.aux
        cls = first.classes
        count = aux["count"].gather(1, cls)
        empty = count == 0
        area = (count / float(size[0] * size[1])).float()
        prob = torch.where(empty, 0.0, aux["prob_sum"].gather(1, cls) / count.clamp_min(1)).float()
        for e in _all(exp):
            e.probabilities = prob
            # An empty region's score is a sum over no pixels and its gradient is exactly zero; the map is zero
            # already. Zeroed here too, so that no rounding of another path can leave a trace.
            if bool(empty.any()):
                z = empty[:, :, None, None]
                e.scores = torch.where(empty, 0.0, e.scores)
                e.cams = torch.where(z, 0, e.cams)
                for name in ("heatmaps", "saliency", "guided"):
                    t = getattr(e, name, None)
                    if isinstance(t, torch.Tensor):
                        zz = z if t.dim() == 4 else z[..., None]  # guided: (B, C, 3, H, W)
                        setattr(e, name, torch.where(zz, torch.zeros((), dtype=t.dtype, device=t.device), t))
                e.cam_max = torch.where(empty, 0.0, e.cam_max)
        keep = picked["keep"]
        notes = _no_notes(keep)
        for i, j in (empty & keep).nonzero().tolist():
            notes[i][j] = f"class {int(cls[i, j])} has no predicted pixel: its score and map are zero"
        result = TaskExplanation(self.task, exp, keep, torch.zeros_like(keep), notes, area=area, empty=empty)
        result.pred_mask = aux["pred_mask"]
        if truth is not None:
            # Each method's maps get their own metrics (in its Explanation's ``metrics``); the result's
            # fields are the first method's.
            for e in _all(exp):
                m = mask_metrics(_saliency(e.cams, size), truth, cls, threshold=MASK_THRESHOLD)
                e.metrics = {**(e.metrics or {}), "mask_energy": m["mask_energy"], "mask_iou": m["mask_iou"]}
            result.mask_energy, result.mask_iou = first.metrics["mask_energy"], first.metrics["mask_iou"]
            result.positive = m["in_true_mask"] & keep
        return result

    def _true_masks(self, masks, b: int, size, ignore_index, device):
        rows = list(masks)  # (B, H, W) or a sequence of (H, W)
        if len(rows) != b:
            raise TaskError(f"true masks must have one entry per image ({b}), got {len(rows)}")
        # The model's class count is known only after the forward: the range is checked in the selector, and
        # here everything but the upper bound (a huge bound passes any non-negative index).
        big = np.iinfo(np.int64).max
        for row in rows:
            why = check_true_mask(row, size, big, ignore_index)
            if why:
                raise TaskError(why)
        truth = torch.stack([torch.as_tensor(np.asarray(r) if not isinstance(r, torch.Tensor) else r) for r in rows])
        truth = truth.long().to(device)
        present = [sorted(int(v) for v in t.unique().tolist() if v != ignore_index) for t in truth]
        if ignore_index is not None:
            truth = torch.where(truth == ignore_index, -1, truth)  # matches no class in mask_metrics
        return truth, present


def _first(exp: Explanation | dict[str, Explanation]) -> Explanation:
    return next(iter(exp.values())) if isinstance(exp, dict) else exp


def _all(exp: Explanation | dict[str, Explanation]) -> list[Explanation]:
    return list(exp.values()) if isinstance(exp, dict) else [exp]


def _no_notes(keep: torch.Tensor) -> list[list[str | None]]:
    b, c = keep.shape
    return [[None] * c for _ in range(b)]


def _saliency(cams: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The normalized heatmaps at the input size, in float32 (the saliency every metric reads)."""
    b, c, h, w = cams.shape
    flat = cams.float().reshape(b * c, 1, h, w)
    ones = torch.ones((b * c, 1, 1), device=cams.device)
    return fused_cam(flat, ones, size, out_dtype=torch.float32).heatmaps.reshape(b, c, *size)


__all__ = [
    "LABEL_FORMATS",
    "MASK_THRESHOLD",
    "TASKS",
    "SegmentationScore",
    "TaskError",
    "TaskExplainer",
    "TaskExplanation",
    "check_task_options",
    "check_true_mask",
    "compact",
    "dense_logits",
    "detect_task",
    "first_max",
    "positive_labels",
    "select_multilabel",
    "select_segmentation",
]
