"""The one batch step: a decoded batch in, the Arrow table of its output rows out.

``BatchExplainer(plan, device)`` is what every runner calls (the local pipeline on its compute
thread, each Ray actor on its batches); no runner has per-batch code of its own. A batch goes:

1. ``launch``: uint8 images to the device (pinned memory, a non-blocking copy on CUDA), device
   JPEG decode when asked, normalization with mean and std held on the device, class selection
   (top-k or listed classes, plus the label slot), the ``Explainer`` call, a finiteness check,
   and the results' copy back to pinned host memory. Nothing in it waits for the device.
2. ``finish``: waits for that copy, turns invalid labels into notes or error rows, non-finite
   results (and cams past the range of the cam column's dtype) into error rows that say what
   helps, and builds the table (``engine/job/schema.py``).

Calling ``launch`` for batch i+1 before ``finish`` for batch i overlaps the device with the host.
``step(batch)`` does both.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from gradcam_batch.engine.explain.explainer import stack_methods
from gradcam_batch.engine.job.columns import DEVICE, HOST
from gradcam_batch.engine.job.config import WarnOnce
from gradcam_batch.engine.job.device_jpeg import decode_jpegs_on_device
from gradcam_batch.engine.job.errors import DecodeError
from gradcam_batch.engine.job.plan import RunPlan
from gradcam_batch.engine.job.schema import ResultBatch, build_table
from gradcam_batch.engine.job.source import DecodedBatch
from gradcam_batch.kernels.reference import quantize

# The private values a task's batch copies back beside the columns: which (image, slot) pairs are kept, and
# which explain a segmentation class with no predicted pixel.
KEEP, EMPTY = "__keep", "__empty"
EMPTY_NOTE = "the class has no predicted pixel in this image: its score and map are zero"
LABEL_SKIPPED = "; the label row was skipped"  # ends the note of an image whose label is bad
# Why an explained image becomes an error row after all: bits of DeviceResult.faults.
SCORES_NOT_FINITE, CAM_NOT_FINITE, CAM_OUT_OF_RANGE = 1, 2, 4
FLOAT16_MAX = 65504


def fault_message(faults: int, precision: str) -> str:
    """The ``error`` of an image whose results are not finite (``faults``: the bits above), with what helps.

    In fp16/bf16 a non-finite score or cam is most likely an overflow of the reduced precision, which
    ``--precision fp32`` avoids; in fp32 the model itself gives NaN or infinity, and no run option helps.
    A cam that is finite but past float16's largest value fits a float32 cam column.
    """
    if faults & (SCORES_NOT_FINITE | CAM_NOT_FINITE):
        what = "scores" if faults & SCORES_NOT_FINITE else "cam"
        if precision != "fp32":
            return f"non-finite {what} (likely an overflow in --precision {precision}; --precision fp32 avoids it)"
        if what == "scores":
            return "non-finite scores: the model gives NaN or infinity for this image in fp32 (check its weights)"
        return "non-finite cam: NaN or infinite activations or gradients at the target layer, in fp32"
    return f"cam values above float16's largest ({FLOAT16_MAX}) for the cam column; --cam-dtype float32 stores them"


@dataclass
class DeviceResult:
    """The per-image results of one batch: on the device after ``launch``, on the host after ``finish``."""

    values: dict[str, torch.Tensor]  # the registry's device columns by name, each (m, C, ...)
    faults: torch.Tensor  # (m,) uint8: 0, or the bits SCORES_NOT_FINITE, CAM_NOT_FINITE, CAM_OUT_OF_RANGE
    saliency: torch.Tensor | None = None  # (m, C, H, W) float32 at the input size, for the host columns (boxes)

    def map(self, fn) -> DeviceResult:
        return DeviceResult(
            {k: fn(t) for k, t in self.values.items()},
            fn(self.faults),
            None if self.saliency is None else fn(self.saliency),
        )


class DeviceFill:
    """What the registry's device columns are filled from (``columns.Column.fill``), for one batch.

    ``exp``: the batch's explanation, the methods stacked on the class axis. The rest is derived
    on first use, once per batch, whichever columns ask for it.
    """

    def __init__(
        self,
        step: BatchExplainer,
        x: torch.Tensor,
        exp,
        all_scores: torch.Tensor | None,
        task_values: dict[str, torch.Tensor] | None = None,
    ):
        self.step, self.x, self.exp, self.all_scores = step, x, exp, all_scores
        self.sample: np.ndarray | None = None  # (m,) bool: the images the faithfulness metrics sample (None: all)
        # A task's own (m, C) values (engine/explain/tasks.py): area, positive, mask_energy, mask_iou
        self.task_values = task_values or {}

    @functools.cached_property
    def all_probabilities(self) -> torch.Tensor:
        """(m, N) float32: the softmax over every class of the model (the explained ones are ``exp.probabilities``)."""
        return torch.softmax(self.all_scores.float(), dim=1)

    def per_image(self, values: torch.Tensor) -> torch.Tensor:
        """(m,) per image -> (m, C): the same value on every row of the image."""
        return values[:, None].expand(-1, self.exp.classes.shape[1])

    @functools.cached_property
    def cams(self) -> torch.Tensor:
        """The cams in the cam column's dtype (float16 unless asked otherwise)."""
        return self.exp.cams.to(self.step._cam_dtype)

    def peak(self, axis: int) -> torch.Tensor:
        """The heatmap peak's y (0) or x (1); -1 where the map is all zero and has no peak."""
        return torch.where(self.exp.cam_max > 0, self.exp.peaks[..., axis], -1)

    @property
    def guided(self) -> torch.Tensor:
        return _guided_uint8(self.exp.guided)

    @property
    def saliency(self) -> torch.Tensor:
        """(m, C, H, W) float32: the heatmap at the input size before quantization, which the metrics read
        (``Explanation.saliency``: made once by the Explainer, shared with the heatmap and guided)."""
        return self.exp.saliency

    @functools.cached_property
    def faithfulness(self) -> dict[str, torch.Tensor]:
        """The faithfulness metrics the run asks for, (m, C) each, computed once for all their columns."""
        return self.step._faithfulness(self)


class HostFill:
    """What the registry's host columns are filled from: a batch's results back on the host."""

    def __init__(self, step: BatchExplainer, pending: PendingBatch, host: DeviceResult, ok: np.ndarray):
        self.step, self.pending, self.host, self.ok = step, pending, host, ok

    @functools.cached_property
    def _boxes(self) -> tuple[dict[str, np.ndarray], list[str | None]]:
        return self.step._box_metrics(self.pending, self.host, self.ok)

    def boxes(self, name: str) -> np.ma.MaskedArray:
        """A localization metric, (m, C[, 4]); masked (null) where the class has no box."""
        out, _ = self._boxes
        values = out[name]
        none = ~out["has_boxes"]
        none = none.reshape(*none.shape, *[1] * (values.ndim - 2))
        return np.ma.masked_array(values, np.broadcast_to(none, values.shape))

    @property
    def box_notes(self) -> list[str | None]:
        """Per explained image, the note on a malformed box (or None)."""
        return self._boxes[1]


@dataclass
class PendingBatch:
    """A batch whose device work has been launched."""

    batch: DecodedBatch
    rows: pa.Table  # (n,) id, kept columns, label
    ok: np.ndarray  # (n,) bool: rows sent to the device
    errors: list[str | None]  # (n,)
    notes: list[str | None]  # (m,) per explained image
    result: DeviceResult | None
    event: object = None  # a CUDA event recorded after the copy back


@dataclass
class BatchOutput:
    """The output rows of one batch."""

    table: pa.Table
    images: int  # input rows the batch held
    errors: int  # of which became error rows
    source_rows: np.ndarray  # (rows,) per output row, its row in the batch


class BatchExplainer:
    """Turns decoded batches into output tables for one plan, on one device (see the module docstring)."""

    def __init__(self, plan: RunPlan, device: torch.device | str, *, model=None, explainer=None):
        """``explainer``: the plan's own (its probe's, set up on this device); ``model``: a loaded model
        to build one for. Without either, the model is loaded here and checked against the plan's
        digest (a Ray actor)."""
        self.plan = plan
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._cuda = self.device.type == "cuda"
        spec = plan.explain
        if explainer is None:
            if model is None:
                model = plan.model.load(self.device)
                plan.model.check(model)
            explainer = spec.explainer(model)
        self.explainer = explainer
        # Made once: a tensor built from Python values per batch would be a host-to-device copy each time.
        self._mean = torch.tensor(plan.prep.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(plan.prep.std, device=self.device).view(1, 3, 1, 1)
        sel = plan.selection
        self._fixed = torch.tensor(sel.classes, dtype=torch.long, device=self.device) if sel.classes else None
        self._out_dtype = torch.uint8 if spec.heatmap_dtype == "uint8" else torch.float16
        self._cam_dtype = torch.float32 if spec.cam_dtype == "float32" else torch.float16
        self._task = plan.task
        # Rows with a label and nothing else to explain: a bad label leaves the image nothing.
        self._label_only = bool(plan.label_column) and not (sel.top_k or sel.classes or sel.threshold is not None)
        self._device_columns = [col for col in plan.columns if col.origin == DEVICE]
        self._host_columns = [col for col in plan.columns if col.origin == HOST]
        self.warn = WarnOnce()  # fallbacks met in the batches, once per run each (a Ray actor forwards them)

    # -- host side ------------------------------------------------------------------------------------

    def row_table(self, batch: DecodedBatch) -> pa.Table:
        """The per-image output columns that come from the input: id, kept columns, label."""
        plan = self.plan
        if plan.id_column:
            ids = batch.rows.column(plan.id_column)
        else:
            key = plan.files[batch.unit.file_index].key
            ids = pa.array([f"{key}:{r}" for r in batch.row_index.tolist()], pa.string())
        cols, names = [ids], ["id"]
        for k in plan.keep_columns:
            cols.append(batch.rows.column(k))
            names.append(k)
        if plan.label_column:
            cols.append(batch.rows.column(plan.label_column))
            names.append("label")
        return pa.Table.from_arrays(cols, names=names)

    def _labels(self, rows: pa.Table, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        """(label index, valid, why not) for the decoded rows; invalid labels get index 0."""
        n = self.plan.model_classes
        lab = np.asarray(rows.column("label").to_numpy(zero_copy_only=False), dtype=np.float64)[ok]  # null: NaN
        valid = ~np.isnan(lab) & (lab >= 0) & (lab < n)
        why: list[str | None] = [None] * len(lab)
        for j in np.flatnonzero(~valid):
            why[j] = (
                "null label" if np.isnan(lab[j]) else f"label {int(lab[j])} is not a class of the model (0..{n - 1})"
            )
        return np.where(valid, lab, 0).astype(np.int64), valid, why

    # -- device side ----------------------------------------------------------------------------------

    def launch(self, batch: DecodedBatch) -> PendingBatch:
        """Start the device work for one batch; nothing here waits for the device."""
        with torch.cuda.device(self.device) if self._cuda else contextlib.nullcontext():
            return self._launch(batch)

    def _launch(self, batch: DecodedBatch) -> PendingBatch:
        rows = self.row_table(batch)
        ok = batch.ok.copy()
        errors = list(batch.errors)
        pending = PendingBatch(batch, rows, ok, errors, [], None)
        if len(batch.images) == 0:
            return pending
        x = to_device(torch.from_numpy(batch.images), self.device)
        ok_idx = np.flatnonzero(batch.ok)
        use = np.ones(len(ok_idx), dtype=bool)  # decoded images that go on to the model
        if batch.jpegs:
            decoded, errs = decode_jpegs_on_device(
                [d for _, d in batch.jpegs],
                self.plan.prep,
                self.device,
                max_image_pixels=self.plan.source.max_image_pixels,
                warn=self.warn,
            )
            for (pos, _), img, err in zip(batch.jpegs, decoded, errs, strict=True):
                if img is None:
                    use[pos] = False
                    errors[ok_idx[pos]] = err
                else:
                    x[pos] = img
        labels = positives = masks = None
        notes: list[str | None] = [None] * len(ok_idx)
        if self.plan.label_column:
            if self._task == "multilabel":
                positives, why = self._positives(rows, batch.ok)
                valid = np.array([w is None for w in why], dtype=bool)
            else:
                labels, valid, why = self._labels(rows, batch.ok)
            for j in np.flatnonzero(~valid & use):
                if self._label_only:  # nothing else to explain for this image
                    use[j] = False
                    errors[ok_idx[j]] = why[j]
                else:
                    notes[j] = f"{why[j]}{LABEL_SKIPPED}"
        if self.plan.mask_column:
            masks, why = self._masks(batch, ok_idx, use)
            for j in np.flatnonzero(use):
                if why[j] is not None:  # the mask metrics were asked for: a bad mask is an error row
                    use[j] = False
                    errors[ok_idx[j]] = why[j]
        ok[ok_idx[~use]] = False
        pending.notes = [nt for nt, u in zip(notes, use, strict=True) if u]
        if not use.any():
            return pending
        if not use.all():
            x = x[to_device(torch.from_numpy(np.flatnonzero(use)), self.device)]
            labels = labels[use] if labels is not None else None
        if positives is not None:
            positives = [p for p, u in zip(positives, use, strict=True) if u]
        if masks is not None:
            masks = [mk for mk, u in zip(masks, use, strict=True) if u]

        x = x.permute(0, 3, 1, 2).float().div_(255.0).sub_(self._mean).div_(self._std)
        if self._cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        labels_t = None if labels is None else to_device(torch.from_numpy(labels), self.device)
        hs = self.plan.heatmap_shape
        call = {
            "counterfactual": self.plan.explain.counterfactual,
            "output_size": hs,
            "out_dtype": self._out_dtype,
            "heatmaps": hs is not None,
            "saliency": self.plan.needs_saliency,
        }
        if self._task == "softmax":
            seen: list[torch.Tensor] = []  # the scores of every class, which the selector sees
            # Several methods stack on the class axis, method-major: C slots per method (schema.build_table).
            exp = stack_methods(self.explainer(x, classes=self._selector(labels_t, seen), **call))
            fill = DeviceFill(self, x, exp, seen[0])
            private: dict[str, torch.Tensor] = {}
        else:
            fill, private = self._task_fill(x, positives, masks, call)
            exp = fill.exp
        if self.plan.metrics.sample is not None:
            fill.sample = metrics_sample(rows.column("id").take(pa.array(ok_idx[use])), self.plan.metrics.sample)
        values = {c.name: c.fill(fill) for c in self._device_columns} | private
        # Checked as computed and as stored: a cam past float16's range is finite before the cast, inf after.
        scores_ok = torch.isfinite(exp.scores).all(1) & torch.isfinite(exp.probabilities).all(1)
        cam_ok = torch.isfinite(exp.cams.flatten(1)).all(1)
        stored_ok = torch.isfinite(fill.cams.flatten(1)).all(1)
        faults = (
            (~scores_ok).to(torch.uint8) * SCORES_NOT_FINITE
            + (~cam_ok).to(torch.uint8) * CAM_NOT_FINITE
            + (cam_ok & ~stored_ok).to(torch.uint8) * CAM_OUT_OF_RANGE
        )
        result = DeviceResult(values, faults, fill.saliency if self.plan.boxes is not None else None)
        if self._cuda:
            # Back to pinned host memory without waiting; finish() waits on the event, which is
            # recorded on this device's current stream (the one the copies were queued on).
            result = result.map(
                lambda t: torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
            )
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            pending.event = event
        pending.result = result
        return pending

    def _task_fill(self, x, positives, masks, call) -> tuple[DeviceFill, dict[str, torch.Tensor]]:
        """A multi-label or segmentation batch through the ``TaskExplainer``: the fill of the device
        columns, and the private values (``KEEP``, ``EMPTY``) that ``finish`` reads."""
        sel = self.plan.selection
        true = None
        if masks is not None:
            true = to_device(torch.from_numpy(np.stack(masks)), self.device)
        texp = self.explainer(
            x,
            top_k=sel.top_k,
            classes=list(sel.classes) if sel.classes else None,
            threshold=sel.threshold,
            max_classes=sel.max_classes,
            positives=positives,
            true_masks=true,
            ignore_index=self.plan.mask_ignore_index,
            **call,
        )
        exp = stack_methods(texp.explanation)
        reps = len(self.plan.methods)  # every method explains the same classes: the task's (B, C) values repeat

        def tile(t: torch.Tensor) -> torch.Tensor:
            return t.repeat(1, reps)

        task_values = {k: tile(v) for k, v in {"area": texp.area, "positive": texp.positive}.items() if v is not None}
        if texp.mask_energy is not None:
            for name in ("mask_energy", "mask_iou"):
                # Each method's own (method-major, as the stacked slots; the run's explainer takes a method list,
                # so its explanation is a dict); a class with no predicted pixel has a zero map: neither its
                # energy nor its IoU is defined (null).
                value = torch.cat([e.metrics[name] for e in texp.explanation.values()], dim=1)
                task_values[name] = torch.where(tile(texp.empty), torch.nan, value)
        private = {KEEP: tile(texp.keep)}
        if texp.empty is not None:
            private[EMPTY] = tile(texp.empty)
        return DeviceFill(self, x, exp, None, task_values), private

    def _positives(self, rows: pa.Table, ok: np.ndarray) -> tuple[list[list[int]], list[str | None]]:
        """Per decoded row, its positive classes (a multi-label label: indices, multi-hot, or one index) and
        why not; a bad label gives no positives."""
        from gradcam_batch.engine.explain.tasks import positive_labels

        n = self.plan.model_classes
        out: list[list[int]] = []
        why: list[str | None] = []
        for value, decoded in zip(rows.column("label").to_pylist(), ok.tolist(), strict=True):
            if not decoded:
                continue
            pos, bad = positive_labels(value, n, self.plan.selection.label_format)
            out.append(pos or [])
            why.append(bad)
        return out, why

    def _masks(self, batch: DecodedBatch, ok_idx: np.ndarray, use: np.ndarray) -> tuple[list, list[str | None]]:
        """Per decoded row, its true mask at the input size ((H, W) int64) or why not (``engine/job/masks.py``)."""
        from gradcam_batch.engine.job.inputs import image_kind
        from gradcam_batch.engine.job.masks import decode_mask

        plan = self.plan
        column = batch.rows.column(plan.mask_column)
        kind = image_kind(column.type)
        files = plan.files
        f = files[batch.unit.file_index] if files and batch.unit is not None else None
        values = column.to_pylist()
        masks: list = []
        why: list[str | None] = []
        for j, r in enumerate(ok_idx.tolist()):
            if not use[j]:
                masks.append(None)
                why.append(None)
                continue
            size = tuple(int(v) for v in batch.sizes[r]) if batch.sizes is not None and batch.sizes[r][0] >= 0 else None
            try:
                masks.append(
                    decode_mask(
                        values[r],
                        kind,
                        f,
                        size,
                        plan.prep,
                        plan.model_classes,
                        plan.mask_ignore_index,
                        max_image_pixels=plan.source.max_image_pixels,
                    )
                )
                why.append(None)
            except DecodeError as exc:
                masks.append(None)
                why.append(str(exc))
        return masks, why

    def _faithfulness(self, fill: DeviceFill) -> dict[str, torch.Tensor]:
        """The faithfulness metrics the run asks for, on the device (``engine/metrics``), on the batch's saliency."""
        from gradcam_batch.engine.metrics import confidence_change, deletion_insertion

        x, exp, saliency = fill.x, fill.exp, fill.saliency
        classes = exp.classes
        spec, out = self.plan.metrics, {}
        # A multi-label model's classes are independent: its probabilities are sigmoids, not a softmax.
        activation = "sigmoid" if self._task == "multilabel" else "softmax"
        if fill.sample is not None:  # --metrics-sample: only the sampled images; the others' rows are null (NaN)
            full = {n: torch.full(classes.shape, torch.nan, device=x.device) for n in _FAITHFULNESS}
            if not fill.sample.any():
                return full  # every column null (the fill reads the run's own columns only)
            idx = to_device(torch.from_numpy(np.flatnonzero(fill.sample)), x.device)
            x, saliency, classes = x[idx], saliency[idx], classes[idx]
        if "deletion" in spec.names or "insertion" in spec.names:
            d, i = deletion_insertion(
                self._predict, x, saliency, classes, steps=spec.steps, batch_size=spec.batch, activation=activation
            )
            out["deletion_auc"], out["insertion_auc"] = d.float(), i.float()
        if "confidence" in spec.names:
            drop, increase = confidence_change(
                self._predict, x, saliency, classes, batch_size=spec.batch, activation=activation
            )
            out["confidence_drop"], out["confidence_increase"] = drop.float(), increase
        if fill.sample is not None:
            # A sampled run's boolean column travels as float (1, 0, NaN): the NaN rows become nulls
            # (schema.encode), the others booleans.
            for name, value in out.items():
                full[name][idx] = value.float()
            out = {n: v for n, v in full.items() if n in out}
        return out

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores (B, N) of the model, in the run's precision, with no graph (the metrics' forwards)."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.plan.explain.precision)
        autocast = torch.autocast(x.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            return self.explainer.scores(self.explainer.model(x)).float()

    def _box_metrics(
        self, pending: PendingBatch, host: DeviceResult, ok: np.ndarray
    ) -> tuple[dict[str, np.ndarray], list[str | None]]:
        """Pointing game, box energy, the paper's box and its IoU, on the host (``engine/metrics``);
        and per explained image, the note on a malformed box (``engine/job/boxes.py``)."""
        from gradcam_batch.engine.job.boxes import read_boxes, to_input_frame
        from gradcam_batch.engine.metrics import box_metrics

        batch, plan = pending.batch, self.plan
        boxes, cats, box_notes = read_boxes(batch.rows, plan.boxes)
        sizes = batch.sizes if batch.sizes is not None else np.full((batch.num_rows, 2), -1)
        explained = np.flatnonzero(ok)
        framed = [to_input_frame(boxes[r], cats[r], tuple(sizes[r]), plan.prep) for r in explained]
        have_cats = any(ct is not None for _, ct in framed)
        out = box_metrics(
            torch.from_numpy(host.saliency),
            [None if b is None else torch.from_numpy(b).float() for b, _ in framed],
            tolerance=plan.metrics.tolerance,
            threshold=plan.metrics.threshold,
            categories=[None if ct is None else torch.from_numpy(ct) for _, ct in framed] if have_cats else None,
            classes=torch.from_numpy(host.values["class_index"]) if have_cats else None,
        )
        return {k: v.numpy() for k, v in out.items()}, [box_notes[r] for r in explained]

    def _selector(self, labels: torch.Tensor | None, seen: list[torch.Tensor]):
        """scores (B, N) -> classes (B, C): the fixed classes or the top-k, then the label slot.

        It keeps the scores it is given in ``seen``: every class's, which the columns over all
        classes read (``DeviceFill.all_probabilities``)."""
        fixed, top_k = self._fixed, self.plan.selection.top_k

        def select(scores: torch.Tensor) -> torch.Tensor:
            seen.append(scores)
            b = scores.shape[0]
            base = fixed.expand(b, -1) if fixed is not None else (scores.topk(top_k, dim=1).indices if top_k else None)
            if labels is None:
                return base
            lab = labels.unsqueeze(1)
            return lab if base is None else torch.cat([base, lab], dim=1)

        return select

    # -- back on the host -----------------------------------------------------------------------------

    def finish(self, pending: PendingBatch) -> BatchOutput:
        """Wait for a launched batch and build its output table."""
        if pending.event is not None:
            pending.event.synchronize()
        ok, errors, notes = pending.ok, pending.errors, pending.notes
        c_slots = max(1, self.plan.selection.slots)
        values: dict[str, np.ndarray] = {}
        keep = np.zeros((0, c_slots * len(self.plan.methods)), dtype=bool)
        slot_notes = None
        if pending.result is not None:
            host = pending.result.map(lambda t: t.cpu().numpy())
            values = dict(host.values)
            task_keep, empty = values.pop(KEEP, None), values.pop(EMPTY, None)
            if self._host_columns:
                fill = HostFill(self, pending, host, ok)
                values |= {c.name: c.fill(fill) for c in self._host_columns}
            keep = np.ones(values["class_index"].shape, dtype=bool) if task_keep is None else task_keep.copy()
            if empty is not None and (empty & keep).any():
                slot_notes = np.where(empty & keep, EMPTY_NOTE, None).astype(object)
            if self._task == "softmax" and self.plan.label_column and self.plan.selection.slots > 1:
                cls = values["class_index"][:, :c_slots]  # every method's block holds the same classes
                valid = np.array([nt is None for nt in notes], dtype=bool)
                keep[:, c_slots - 1 :: c_slots] = (valid & ~(cls[:, :-1] == cls[:, -1:]).any(axis=1))[:, None]
            if self.plan.boxes is not None:  # after the label notes decided which label slots to keep
                pairs = zip(notes, fill.box_notes, strict=True)
                notes = ["; ".join(n for n in pair if n) or None for pair in pairs]
            faults = host.faults
            nothing = ~keep.any(axis=1)  # a task's image with no class to explain (none reaches the threshold)
            if faults.any() or nothing.any():
                ok_idx = np.flatnonzero(ok)
                for j in np.flatnonzero(nothing):
                    ok[ok_idx[j]] = False
                    errors[ok_idx[j]] = self._nothing_message(notes[j])
                for j in np.flatnonzero(faults):
                    ok[ok_idx[j]] = False
                    errors[ok_idx[j]] = fault_message(int(faults[j]), self.plan.explain.precision)
                kept = (faults == 0) & ~nothing
                values = {k: v[kept] for k, v in values.items()}
                keep = keep[kept]
                notes = [nt for nt, f in zip(notes, kept, strict=True) if f]
                slot_notes = slot_notes[kept] if slot_notes is not None else None
        result = ResultBatch(
            rows=pending.rows,
            ok=ok,
            errors=errors,
            keep=keep,
            notes=notes,
            values=values,
            methods=self.plan.methods,
            slot_notes=slot_notes,
        )
        table, source_rows = build_table(result, self.plan.schema)
        return BatchOutput(table, images=len(ok), errors=int((~ok).sum()), source_rows=source_rows)

    def _nothing_message(self, note: str | None) -> str:
        """The error of an image that a task's selection leaves no class to explain; ``note``: the image's
        note on a bad label, which is then the reason its label gave nothing."""
        sel = self.plan.selection
        parts = []
        if sel.threshold is not None:
            parts.append(f"no class has a probability of at least {sel.threshold:g}")
        if self.plan.label_column:
            parts.append(note.removesuffix(LABEL_SKIPPED) if note else "the label lists no positive class")
        if self.plan.mask_column:
            parts.append("the true mask holds no class (only the ignore index)")
        return "nothing to explain: " + (" and ".join(parts) or "no class selected")

    def __call__(self, batch: DecodedBatch) -> BatchOutput:
        return self.finish(self.launch(batch))


_FAITHFULNESS = ("deletion_auc", "insertion_auc", "confidence_drop", "confidence_increase")


def metrics_sample(ids: pa.Array | pa.ChunkedArray, share: float, seed: int = 0) -> np.ndarray:
    """(m,) bool: the images whose faithfulness metrics are computed, a seeded share of them.

    An image is in when the hash of its id (blake2b of the id's text and ``seed``), as a number in
    [0, 1), is below ``share``: the same images on every resume, runner and batch size, and about
    ``share`` of any set of images."""
    import hashlib

    out = np.zeros(len(ids), dtype=bool)
    salt = f"metrics-sample:{seed}:".encode()
    for i, value in enumerate(ids.to_pylist()):
        digest = hashlib.blake2b(salt + str(value).encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "big") / 2**64 < share
    return out


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without a host sync: on CUDA through pinned memory, non-blocking.

    Every host-to-device copy of ``launch`` goes through here: from pageable memory, CUDA copies
    synchronously, and the host would wait for the device's queue at that point.
    """
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def _guided_uint8(guided: torch.Tensor) -> torch.Tensor:
    """The guided column's uint8 from ``Explanation.guided``, which is already in the run's heatmap dtype:
    quantized once (uint8 as it is; a float16 map in [0, 1] to uint8)."""
    return guided if guided.dtype == torch.uint8 else quantize(guided.float(), torch.uint8)


__all__ = [
    "BatchExplainer",
    "BatchOutput",
    "DeviceFill",
    "DeviceResult",
    "HostFill",
    "PendingBatch",
    "fault_message",
    "to_device",
]
