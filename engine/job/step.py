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
from dataclasses import dataclass, field, fields

import numpy as np
import pyarrow as pa
import torch

from gradcam_batch.engine.explain.explainer import stack_methods
from gradcam_batch.engine.job.config import RunSetupError, WarnOnce
from gradcam_batch.engine.job.plan import RunPlan
from gradcam_batch.engine.job.schema import ResultBatch, build_table
from gradcam_batch.engine.job.source import DecodedBatch, decode_jpegs_on_device
from gradcam_batch.engine.models.weights import state_digest
from gradcam_batch.kernels.reference import quantize

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

    classes: torch.Tensor  # (m, C) int64
    scores: torch.Tensor  # (m, C) float32
    probabilities: torch.Tensor  # (m, C) float32
    cams: torch.Tensor  # (m, C, h, w) in the cam column's dtype (float16 or float32)
    cam_max: torch.Tensor  # (m, C) float32
    peaks: torch.Tensor  # (m, C, 2) int64
    faults: torch.Tensor  # (m,) uint8: 0, or the bits SCORES_NOT_FINITE, CAM_NOT_FINITE, CAM_OUT_OF_RANGE
    heatmaps: torch.Tensor | None  # (m, C, H, W) uint8 or float16
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # metric columns, (m, C)
    saliency: torch.Tensor | None = None  # (m, C, H, W) float32 at the input size, for the box metrics
    guided: torch.Tensor | None = None  # (m, C, 3, H, W) uint8, Guided Grad-CAM (config.guided)

    def map(self, fn) -> DeviceResult:
        def one(v):
            if isinstance(v, dict):
                return {k: fn(t) for k, t in v.items()}
            return None if v is None else fn(v)

        return DeviceResult(**{f.name: one(getattr(self, f.name)) for f in fields(self)})


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

    def __init__(self, plan: RunPlan, device: torch.device | str, *, model=None):
        from gradcam_batch.engine.explain.explainer import Explainer
        from gradcam_batch.engine.models.loader import load_model

        c = plan.config
        self.plan = plan
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._cuda = self.device.type == "cuda"
        if model is None:
            model = load_model(
                c.model,
                weights=c.weights,
                num_classes=c.num_classes,
                device=self.device,
                providers=c.providers,
                weights_strict=c.weights_strict,
            )
            # A worker's own load (a Ray actor) must explain the weights the plan hashed: a weights
            # file replaced since, or a factory that builds other weights each time, would mix models.
            if plan.model_digest is not None and state_digest(model) != plan.model_digest:
                raise RunSetupError(
                    f"the model {c.model} loaded here has weights that differ from the weights the run was "
                    "planned with (a weights or model file changed since, or the factory does not build the "
                    "same weights each time)"
                )
        self.explainer = Explainer(
            model,
            target_layer=plan.target_layer,
            method=plan.methods,  # a sequence: {name: Explanation}, stacked by stack_methods below
            guided=c.guided,
            scorecam_batch=c.scorecam_batch,
            compile=c.compile,
            precision=c.precision,
            reshape=c.reshape,
            token_grid=c.token_grid,
        )
        # Made once: a tensor built from Python values per batch would be a host-to-device copy each time.
        self._mean = torch.tensor(plan.prep.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(plan.prep.std, device=self.device).view(1, 3, 1, 1)
        sel = plan.selection
        self._fixed = torch.tensor(sel.classes, dtype=torch.long, device=self.device) if sel.classes else None
        self._out_dtype = torch.uint8 if c.heatmap_dtype == "uint8" else torch.float16
        self._cam_dtype = torch.float32 if c.cam_dtype == "float32" else torch.float16
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
                max_image_pixels=self.plan.config.max_image_pixels,
                warn=self.warn,
            )
            for (pos, _), img, err in zip(batch.jpegs, decoded, errs, strict=True):
                if img is None:
                    use[pos] = False
                    errors[ok_idx[pos]] = err
                else:
                    x[pos] = img
        labels = None
        notes: list[str | None] = [None] * len(ok_idx)
        if self.plan.label_column:
            labels, valid, why = self._labels(rows, batch.ok)
            label_only = self.plan.selection.slots == 1
            for j in np.flatnonzero(~valid & use):
                if label_only:  # nothing else to explain for this image
                    use[j] = False
                    errors[ok_idx[j]] = why[j]
                else:
                    notes[j] = f"{why[j]}; the label row was skipped"
        ok[ok_idx[~use]] = False
        pending.notes = [nt for nt, u in zip(notes, use, strict=True) if u]
        if not use.any():
            return pending
        if not use.all():
            x = x[to_device(torch.from_numpy(np.flatnonzero(use)), self.device)]
            labels = labels[use] if labels is not None else None

        x = x.permute(0, 3, 1, 2).float().div_(255.0).sub_(self._mean).div_(self._std)
        if self._cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        labels_t = None if labels is None else to_device(torch.from_numpy(labels), self.device)
        hs = self.plan.heatmap_shape
        # Several methods stack on the class axis, method-major: C slots per method (schema.build_table).
        exp = stack_methods(
            self.explainer(
                x,
                classes=self._selector(labels_t),
                counterfactual=self.plan.config.counterfactual,
                output_size=hs,
                out_dtype=self._out_dtype,
                heatmaps=hs is not None,
            )
        )
        # Checked as computed and as stored: a cam past float16's range is finite before the cast, inf after.
        cams = exp.cams.to(self._cam_dtype)
        scores_ok = torch.isfinite(exp.scores).all(1) & torch.isfinite(exp.probabilities).all(1)
        cam_ok = torch.isfinite(exp.cams.flatten(1)).all(1)
        stored_ok = torch.isfinite(cams.flatten(1)).all(1)
        faults = (
            (~scores_ok).to(torch.uint8) * SCORES_NOT_FINITE
            + (~cam_ok).to(torch.uint8) * CAM_NOT_FINITE
            + (cam_ok & ~stored_ok).to(torch.uint8) * CAM_OUT_OF_RANGE
        )
        extras, saliency = self._metrics(x, exp) if self.plan.needs_saliency else ({}, None)
        result = DeviceResult(
            classes=exp.classes,
            scores=exp.scores.float(),
            probabilities=exp.probabilities.float(),
            cams=cams,
            cam_max=exp.cam_max.float(),
            peaks=exp.peaks,
            faults=faults,
            heatmaps=exp.heatmaps if hs is not None else None,
            extras=extras,
            saliency=saliency if self.plan.boxes is not None else None,
            guided=None if exp.guided is None else _guided_uint8(exp.guided),
        )
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

    def _metrics(self, x: torch.Tensor, exp) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The faithfulness metrics on the device, and the saliency they use (``engine/metrics``).

        The saliency is the heatmap at the input size before quantization: the fused kernel run
        again on the low-resolution cams (weights of one), so it is the heatmap column's own map.
        """
        from gradcam_batch.engine.metrics import confidence_change, deletion_insertion
        from gradcam_batch.kernels import fused_cam

        cams = exp.cams.float()
        m, c, h, w = cams.shape
        ones = torch.ones((m * c, 1, 1), device=cams.device)
        maps = fused_cam(cams.reshape(m * c, 1, h, w), ones, self.plan.prep.out_size, out_dtype=torch.float32)
        saliency = maps.heatmaps.reshape(m, c, *self.plan.prep.out_size)
        cfg, extras = self.plan.config, {}
        chunk = cfg.metrics_batch or cfg.batch_size
        if "deletion" in self.plan.metrics or "insertion" in self.plan.metrics:
            d, i = deletion_insertion(
                self._predict, x, saliency, exp.classes, steps=cfg.metrics_steps, batch_size=chunk
            )
            extras["deletion_auc"], extras["insertion_auc"] = d.float(), i.float()
        if "confidence" in self.plan.metrics:
            drop, increase = confidence_change(self._predict, x, saliency, exp.classes, batch_size=chunk)
            extras["confidence_drop"], extras["confidence_increase"] = drop.float(), increase
        return extras, saliency

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores (B, N) of the model, in the run's precision, with no graph (the metrics' forwards)."""
        precision = self.plan.config.precision
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        autocast = torch.autocast(x.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            return self.explainer._score_fn(self.explainer.model(x)).float()

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
            tolerance=plan.config.pointing_tolerance,
            threshold=plan.config.box_threshold,
            categories=[None if ct is None else torch.from_numpy(ct) for _, ct in framed] if have_cats else None,
            classes=torch.from_numpy(host.classes) if have_cats else None,
        )
        return {k: v.numpy() for k, v in out.items()}, [box_notes[r] for r in explained]

    def _selector(self, labels: torch.Tensor | None):
        """scores (B, N) -> classes (B, C): the fixed classes or the top-k, then the label slot."""
        fixed, top_k = self._fixed, self.plan.selection.top_k

        def select(scores: torch.Tensor) -> torch.Tensor:
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
        if pending.result is None:
            arrays = _empty(c_slots * len(self.plan.methods), self.plan.cam_shape)
        else:
            host = pending.result.map(lambda t: t.cpu().numpy())
            extras = dict(host.extras)
            box_notes = None
            if self.plan.boxes is not None:
                box_extras, box_notes = self._box_metrics(pending, host, ok)
                extras.update(box_extras)
            arrays = {f.name: getattr(host, f.name) for f in fields(host) if f.name not in ("extras", "saliency")}
            keep = np.ones(arrays["classes"].shape, dtype=bool)
            if self.plan.label_column and self.plan.selection.slots > 1:
                cls = arrays["classes"][:, :c_slots]  # every method's block holds the same classes
                valid = np.array([nt is None for nt in notes], dtype=bool)
                keep[:, c_slots - 1 :: c_slots] = (valid & ~(cls[:, :-1] == cls[:, -1:]).any(axis=1))[:, None]
            if box_notes is not None:  # after the label notes decided which label slots to keep
                notes = ["; ".join(n for n in pair if n) or None for pair in zip(notes, box_notes, strict=True)]
            arrays["keep"] = keep
            faults = arrays.pop("faults")
            arrays["extras"] = extras
            if faults.any():
                ok_idx = np.flatnonzero(ok)
                for j in np.flatnonzero(faults):
                    ok[ok_idx[j]] = False
                    errors[ok_idx[j]] = fault_message(int(faults[j]), self.plan.config.precision)
                finite = faults == 0
                arrays = {k: _take(v, finite) for k, v in arrays.items()}
                notes = [nt for nt, f in zip(notes, finite, strict=True) if f]
        result = ResultBatch(rows=pending.rows, ok=ok, errors=errors, notes=notes, methods=self.plan.methods, **arrays)
        table, source_rows = build_table(result, self.plan.schema)
        return BatchOutput(table, images=len(ok), errors=int((~ok).sum()), source_rows=source_rows)

    def __call__(self, batch: DecodedBatch) -> BatchOutput:
        return self.finish(self.launch(batch))


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


def _take(v, mask: np.ndarray):
    if isinstance(v, dict):
        return {k: t[mask] for k, t in v.items()}
    return None if v is None else v[mask]


def _empty(c_slots: int, cam_shape: tuple[int, int]) -> dict:
    e = np.zeros((0, c_slots))
    return {
        "classes": e.astype(np.int64),
        "keep": e.astype(bool),
        "scores": e.astype(np.float32),
        "probabilities": e.astype(np.float32),
        "cams": np.zeros((0, c_slots, *cam_shape), np.float16),
        "heatmaps": None,
        "cam_max": e.astype(np.float32),
        "peaks": np.zeros((0, c_slots, 2), np.int64),
    }


__all__ = ["BatchExplainer", "BatchOutput", "DeviceResult", "PendingBatch", "fault_message", "to_device"]
