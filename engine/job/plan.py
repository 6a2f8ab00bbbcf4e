"""``RunPlan``: the validated, immutable description of a run, built once from a ``RunConfig``.

``build_plan(config)`` makes every check that can be made before a byte is written, in this
order, and raises ``RunSetupError`` with one line for the first that fails:

1. the numbers (batch size, top-k, limit, ...) and the class selection;
2. the preprocessing, and the input and heatmap sizes against ``MAX_SIDE``;
3. the inputs, their columns and the column roles (every file, same types), the output directory
   (never inside an input directory; a directory, or creatable as one, and writable), the planned
   units;
4. the model: it is loaded, its weights hashed (``state_digest``), and one blank image goes through
   the ``Explainer``, which finds the target layer, the class count and the cam size; classes and
   top-k are checked against them;
5. the output schema and the fingerprint, and what the output directory holds (``sink.survey``):
   nothing, the same run (resume), or a run that ``overwrite`` replaces. A foreign file stops it
   where the run would have to delete it or could mistake it for its own.

Building a plan writes nothing. The plan resolves the options into ready-made specs
(``engine/job/specs.py``: model, explain, source, sink, metrics) and the output's column layout
(``engine/job/columns.py``); every runner (local, Ray) and the batch step (``engine/job/step.py``)
read those, never the raw ``RunConfig``. A plan pickles (the Ray actors receive it). The probe's
model and Explainer stay with the ``ModelHandle`` that the caller passes in: the local runner's
batch step runs them, so a process loads the model once and traces it once.

One module past 500 lines because every check before a run, and the fingerprint, belong in one place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import torch

from gradcam_batch.engine.explain.methods import parse_methods
from gradcam_batch.engine.job.boxes import BoxSpec, box_spec
from gradcam_batch.engine.job.columns import CAM_DTYPES, HEATMAP_DTYPES, RESERVED, Column, Layout, columns_of
from gradcam_batch.engine.job.config import RunConfig, RunSetupError, RunWarning, first_line, resolve_device
from gradcam_batch.engine.job.inputs import (
    InputFile,
    Unit,
    check_columns,
    detect_image_column,
    discover_inputs,
    image_kind,
    plan_units,
)
from gradcam_batch.engine.job.outdir import output_problem, survey
from gradcam_batch.engine.job.preprocess import Preprocess
from gradcam_batch.engine.job.schema import output_schema
from gradcam_batch.engine.job.specs import ExplainSpec, MetricsSpec, ModelSpec, SinkSpec, SourceSpec
from gradcam_batch.engine.models.loader import random_weights_note
from gradcam_batch.engine.models.weights import state_digest

MAX_UNIT_ROWS = 4096
# The largest side, in pixels, of the model input (crop, resize) and of the heatmap. A bound far
# above any classifier's input that keeps a typo (--crop 100000: a 120 GB probe input) from
# allocating; the README states it.
MAX_SIDE = 8192
METRICS = ("deletion", "insertion", "confidence")
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class ClassSelection:
    """Which classes each image is explained for: C slots, one output row per kept slot.

    - ``top_k=K``: the K highest scores; ``classes=(...)``: those classes for every image;
    - ``label``: the ground-truth label as one more slot. When the label is already among the
      top-K (or the listed classes) that duplicate is dropped, so an image has K rows when its
      label is among its top-K and K+1 rows otherwise. A null or out-of-range label drops the
      label slot and is noted in ``error`` (the row stays ``status="ok"``); with a label
      selection alone it makes the image an error row.
    """

    top_k: int | None
    classes: tuple[int, ...] | None
    label: bool
    # The tasks' own (engine/explain/tasks.py), whose rows per image vary: a multi-label threshold (with its
    # cap), a multi-label label's format, and a segmentation's true-mask classes.
    threshold: float | None = None
    max_classes: int | None = None
    label_format: str = "auto"
    masks: bool = False

    @property
    def slots(self) -> int:
        """Rows per image: exact for a softmax classifier; for a task, what the listed parts give at most
        (a threshold its cap, a multi-hot label or a mask one more), which sizes the units only."""
        extra = (self.max_classes or 1 if self.threshold is not None else 0) + (1 if self.masks else 0)
        return (len(self.classes) if self.classes else (self.top_k or 0)) + (1 if self.label else 0) + extra

    def fingerprint(self) -> dict:
        """What the fingerprint covers: the softmax fields as before the tasks (resumable), then the rest
        where set."""
        key = {"top_k": self.top_k, "classes": self.classes, "label": self.label}
        task = {"threshold": self.threshold, "max_classes": self.max_classes, "masks": self.masks}
        task |= {"label_format": self.label_format} if self.label_format != "auto" else {}
        # ``is``, not ``in``: a threshold of 0 (== False) is a setting
        return key | {k: v for k, v in task.items() if v is not None and v is not False}


@dataclass(frozen=True)
class RunPlan:
    """A validated run, resolved into ready-made specs (``engine/job/specs.py``) that the batch step and
    the runners read. ``config`` is the request as given: the manifest records it and the fingerprint
    covers it, both made here; nothing after the plan reads it."""

    config: RunConfig
    model: ModelSpec
    explain: ExplainSpec
    source: SourceSpec
    sink: SinkSpec
    metrics: MetricsSpec
    selection: ClassSelection
    layout: Layout  # which columns the output has (engine/job/columns.py)
    id_column: str | None
    label_column: str | None
    keep_columns: tuple[str, ...]
    model_classes: int
    cam_shape: tuple[int, int]
    unit_rows: int
    mask_column: str | None  # segmentation: the true masks' column
    mask_ignore_index: int | None
    units: tuple[Unit, ...]
    fingerprint: str
    manifest_config: dict  # the config as given and as resolved, for the manifest
    device: str = "auto"  # the device option: each process resolves it (a Ray actor on its own GPU)
    progress: bool = False

    # Shorthands for the specs' fields that most readers want.
    @property
    def files(self) -> tuple[InputFile, ...]:
        return self.source.files

    @property
    def image_column(self) -> str:
        return self.source.image_column

    @property
    def image_kind(self) -> str:
        return self.source.image_kind

    @property
    def input_columns(self) -> list[str]:
        """The non-image input columns to read: the row columns, and the boxes."""
        return list(self.source.columns)

    @property
    def prep(self) -> Preprocess:
        return self.source.prep

    @property
    def out_dir(self) -> Path | None:
        return self.sink.out_dir

    @property
    def schema(self) -> pa.Schema:
        return self.sink.schema

    @property
    def methods(self) -> tuple[str, ...]:
        return self.explain.methods

    @property
    def target_layer(self) -> str:
        return self.explain.target_layer or ""

    @property
    def heatmap_shape(self) -> tuple[int, int] | None:
        return self.explain.heatmap_shape

    @property
    def boxes(self) -> BoxSpec | None:
        return self.metrics.boxes

    @property
    def model_digest(self) -> str | None:
        return self.model.digest

    @property
    def task(self) -> str:
        """The resolved task: "softmax", "multilabel" or "segmentation"."""
        return self.explain.task

    @property
    def needs_saliency(self) -> bool:
        """Whether the batch step makes the input-size saliency (for metrics or boxes)."""
        return self.metrics.needs_saliency

    @property
    def columns(self) -> tuple[Column, ...]:
        """The output's columns, from the registry (``engine/job/columns.py``)."""
        return columns_of(self.layout)

    @property
    def total_rows(self) -> int:
        return sum(u.rows for u in self.units)

    @property
    def row_columns(self) -> list[str]:
        """The non-image input columns that the output takes: id, label, kept columns."""
        return [k for k in dict.fromkeys((self.id_column, self.label_column, *self.keep_columns)) if k]


# -- building ------------------------------------------------------------------------------------


class ModelHandle:
    """The run's model and its ``Explainer``, made by the plan's probe and kept for the batch step: one
    process loads the model once, builds one Explainer and traces the model once."""

    def __init__(self, config: RunConfig, device: torch.device | str | None = None):
        self.spec = model_spec(config)
        self.device = resolve_device(config.device) if device is None else torch.device(device)
        self._model = None
        self.explainer = None  # the probe's, set up on the probe's sample

    def get(self):
        if self._model is None:
            self._model = self.spec.load(self.device)
        return self._model


def model_spec(c: RunConfig) -> ModelSpec:
    return ModelSpec(
        spec=c.model,
        weights=c.weights,
        num_classes=c.num_classes,
        providers=tuple(c.providers) if c.providers else None,
        weights_strict=c.weights_strict,
    )


def explain_spec(c: RunConfig, heatmap_shape: tuple[int, int] | None) -> ExplainSpec:
    return ExplainSpec(
        methods=parse_methods(c.method),
        target_layer=c.target_layer,
        guided=c.guided,
        scorecam_batch=c.scorecam_batch,
        compile=c.compile,
        precision=c.precision,
        reshape=c.reshape,
        token_grid=c.token_grid,
        counterfactual=c.counterfactual,
        heatmap_shape=heatmap_shape,
        heatmap_dtype=c.heatmap_dtype,
        cam_dtype=c.cam_dtype,
    )


def build_plan(
    config: RunConfig, *, device: torch.device | str | None = None, model: ModelHandle | None = None
) -> RunPlan:
    """Validate ``config`` into a ``RunPlan`` (raises ``RunSetupError``; writes nothing).

    ``device``: where the model is probed (default: the run's device). ``model``: a handle that
    keeps the loaded model and the probe's Explainer for the caller (the local runner runs them).
    """
    try:
        return _build(config, device, model)
    except RunSetupError:
        raise
    except (ValueError, TypeError) as exc:  # SourceError, ModelSpecError, TargetLayerError, ...
        raise RunSetupError(first_line(exc)) from None


def plan_for_schema(config: RunConfig, schema: pa.Schema) -> RunPlan:
    """A plan for rows that come from elsewhere (a user's Ray Dataset): no files, units or output."""
    try:
        c = config
        selection, prep = _check_numbers(c)
        image_column = c.image_column or detect_image_column(schema)
        keep = tuple(dict.fromkeys(c.keep_columns))
        for role, name in [
            ("image", image_column),
            ("id", c.id_column),
            ("label", c.label_column),
            ("mask", c.mask_column),
        ] + [("kept", k) for k in keep]:
            if name is not None and name not in schema.names:
                raise RunSetupError(
                    f"{role} column {name!r} not found; the dataset's columns are: {', '.join(schema.names)}"
                )
        check_column_roles(
            schema, image_column=image_column, keep=keep, label_column=c.label_column, mask_column=c.mask_column
        )
        explain = explain_spec(c, heatmap_shape(c, prep))
        label_type = schema.field(c.label_column).type if c.label_column else None
        probe = _probe(c, selection, prep, explain, ModelHandle(c, "cpu"), label_type)
        return _assemble(c, (), None, schema, image_column, keep, selection, prep, explain, probe, 1, ())
    except RunSetupError:
        raise
    except (ValueError, TypeError) as exc:
        raise RunSetupError(first_line(exc)) from None


def _check_numbers(c: RunConfig) -> tuple[ClassSelection, Preprocess]:
    for name, value in (
        ("batch size", c.batch_size),
        ("rows per file", c.rows_per_file),
        ("queue depth", c.queue_depth),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RunSetupError(f"{name} must be a positive integer, got {value!r}")
    if c.workers is not None and (not isinstance(c.workers, int) or c.workers < 1):
        raise RunSetupError(f"workers must be a positive integer, got {c.workers!r}")
    if c.top_k is not None and (not isinstance(c.top_k, int) or c.top_k < 1):
        raise RunSetupError(f"top-k must be a positive integer, got {c.top_k!r}")
    if c.top_k is not None and c.classes:
        raise RunSetupError("give either top-k or a class list, not both")
    if c.limit is not None and c.limit < 0:
        raise RunSetupError(f"limit must be >= 0, got {c.limit}")
    if c.max_image_pixels is not None and (not isinstance(c.max_image_pixels, int) or c.max_image_pixels < 1):
        raise RunSetupError(f"max image pixels must be a positive integer, got {c.max_image_pixels!r}")
    if c.decode_memory_mb is not None and (not isinstance(c.decode_memory_mb, int) or c.decode_memory_mb < 1):
        raise RunSetupError(f"decode memory must be a positive number of MB, got {c.decode_memory_mb!r}")
    unknown = [m for m in c.metrics if m not in METRICS]
    if unknown:
        raise RunSetupError(f"unknown metric {unknown[0]!r}; expected any of {', '.join(METRICS)}")
    if not isinstance(c.metrics_steps, int) or c.metrics_steps < 1:
        raise RunSetupError(f"metrics steps must be a positive integer, got {c.metrics_steps!r}")
    if c.metrics_batch is not None and (not isinstance(c.metrics_batch, int) or c.metrics_batch < 1):
        raise RunSetupError(f"metrics batch must be a positive integer, got {c.metrics_batch!r}")
    if c.metrics_sample is not None:
        f = c.metrics_sample
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise RunSetupError(f"the metrics sample must be a share in (0, 1], got {f!r}")
        if not c.metrics:
            raise RunSetupError("--metrics-sample samples the faithfulness metrics; give --metrics too")
    if c.pointing_tolerance < 0 or not 0 < c.box_threshold <= 1:
        raise RunSetupError("the pointing tolerance must be >= 0 and the box threshold in (0, 1]")
    if c.heatmap_dtype not in HEATMAP_DTYPES:
        raise RunSetupError(f"heatmap dtype must be one of {', '.join(HEATMAP_DTYPES)}, got {c.heatmap_dtype!r}")
    if c.cam_dtype not in CAM_DTYPES:
        raise RunSetupError(f"cam dtype must be one of {', '.join(CAM_DTYPES)}, got {c.cam_dtype!r}")
    parse_methods(c.method)  # a ValueError naming the known methods
    if not isinstance(c.scorecam_batch, int) or isinstance(c.scorecam_batch, bool) or c.scorecam_batch < 1:
        raise RunSetupError(f"scorecam batch must be a positive integer, got {c.scorecam_batch!r}")
    if c.precision not in ("fp32", "bf16", "fp16"):
        raise RunSetupError(f"unknown precision {c.precision!r}; expected fp32, bf16 or fp16")
    if c.reshape not in (None, "tokens"):
        raise RunSetupError(f"unknown reshape {c.reshape!r}; expected tokens")
    if c.token_grid is not None and c.reshape != "tokens":
        raise RunSetupError("a token grid applies with reshape='tokens' only")
    if c.device_jpeg:
        try:
            import torchvision.io  # noqa: F401
        except ImportError:
            raise RunSetupError("--device-jpeg needs torchvision (pip install torchvision)") from None
    classes = tuple(dict.fromkeys(int(k) for k in c.classes)) if c.classes else None
    if classes and min(classes) < 0:
        raise RunSetupError(f"class indices must be >= 0, got {min(classes)}")
    _check_task_numbers(c)
    asked = classes or c.label_column or c.threshold is not None or c.mask_column
    top_k = c.top_k if c.top_k is not None else (None if asked else 1)
    selection = ClassSelection(
        top_k=top_k,
        classes=classes,
        label=c.label_column is not None,
        threshold=c.threshold,
        max_classes=c.max_classes,
        label_format=c.label_format,
        masks=c.mask_column is not None,
    )
    try:
        prep = Preprocess(
            resize=c.resize, crop=c.crop, mean=tuple(c.mean), std=tuple(c.std), interpolation=c.interpolation
        )
    except (ValueError, TypeError) as exc:
        raise RunSetupError(first_line(exc)) from None
    check_sizes(prep, c.heatmap_size)
    return selection, prep


def _check_task_numbers(c: RunConfig) -> None:
    """The task options' checks that need no model (the rest: ``_check_task``, after the probe)."""
    from gradcam_batch.engine.explain.tasks import LABEL_FORMATS, TASKS, check_task_options

    if c.task != "auto" and c.task not in TASKS:
        raise RunSetupError(f"unknown task {c.task!r}; expected auto, {', '.join(TASKS)}")
    if c.label_format not in LABEL_FORMATS:
        raise RunSetupError(f"unknown label format {c.label_format!r}; expected one of {', '.join(LABEL_FORMATS)}")
    if c.max_classes is not None and c.threshold is None:
        raise RunSetupError("--max-classes caps the classes that --threshold selects; give --threshold too")
    # The threshold's and the cap's values (the task they need is checked once it is known).
    check_task_options("multilabel", threshold=c.threshold, max_classes=c.max_classes)
    mi = c.mask_ignore_index
    if mi is not None and (isinstance(mi, bool) or not isinstance(mi, int) or mi < 0):
        raise RunSetupError(f"the mask ignore index must be a non-negative integer, got {mi!r}")
    if mi is not None and c.mask_column is None:
        raise RunSetupError("a mask ignore index applies with a mask column (--mask-column) only")


def _check_task(c: RunConfig, task: str, label_type: pa.DataType | None) -> None:
    """The options against the resolved task, in one line each."""
    from gradcam_batch.engine.explain.tasks import check_task_options

    check_task_options(task, threshold=c.threshold, max_classes=c.max_classes)
    if c.mask_column is not None and task != "segmentation":
        raise RunSetupError(f"a mask column needs --task segmentation; the task is {task}")
    if task == "segmentation":
        if c.label_column is not None:
            raise RunSetupError(
                "a segmentation run takes its ground truth from --mask-column; --label-column is for classifiers"
            )
        if c.metrics:
            raise RunSetupError(
                "the faithfulness metrics (--metrics) are not defined for segmentation models yet; "
                "--mask-column gives the mask metrics"
            )
        if c.box_column:
            raise RunSetupError("boxes (--box-column) apply to classifiers; a segmentation run takes --mask-column")
    if label_type is not None and _is_list(label_type) and task != "multilabel":
        raise RunSetupError(
            f"a list label column (several labels per image) needs --task multilabel; the task is {task}"
        )
    if c.label_format != "auto" and task != "multilabel":
        raise RunSetupError(f"a label format applies to --task multilabel; the task is {task}")


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def check_sizes(prep: Preprocess, heatmap_size) -> None:
    """Every side of the resize, the crop and the heatmap size is at most ``MAX_SIDE`` pixels."""
    for name, size in (("resize", prep.resize), ("crop", prep.crop), ("heatmap size", heatmap_size)):
        if isinstance(size, int) and not isinstance(size, bool):
            sides = (size,)
        elif isinstance(size, (tuple, list)) and all(isinstance(v, int) for v in size):
            sides = tuple(size)
        else:
            continue  # None, "input", or a value that a later check refuses
        if sides and max(sides) > MAX_SIDE:
            shown = "x".join(str(v) for v in sides)
            raise RunSetupError(f"{name} {shown} is above the limit of {MAX_SIDE} pixels a side")


def check_writable(out_dir: Path, shown: str) -> None:
    """``out_dir`` is a writable directory, or can be made one: its nearest existing ancestor is a
    writable directory. Reads only (``os.access``: a read-only mount fails it even for root)."""
    p = out_dir
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise RunSetupError(f"the output {shown} cannot be made: {p} is not a directory")
    if not os.access(p, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(p).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        why = "Read-only file system" if read_only else "Permission denied"
        raise RunSetupError(f"cannot write the output {shown}: {p}: {why}")


def check_column_roles(
    schema: pa.Schema,
    *,
    image_column: str,
    keep: Sequence[str],
    label_column: str | None,
    mask_column: str | None = None,
) -> None:
    """The image column holds images, kept columns do not shadow output columns, labels are integers (or,
    several per image, lists of integers or of 0/1 values), a mask column holds images."""
    if image_kind(schema.field(image_column).type) is None:
        raise RunSetupError(
            f"column {image_column!r} has type {schema.field(image_column).type}; images must be "
            "binary, struct<bytes, path> or string paths"
        )
    clash = [k for k in keep if k in RESERVED or k.startswith("__")]
    if clash:
        raise RunSetupError(f"kept column {clash[0]!r} has the name of an output column; it cannot be kept")
    if label_column is not None:
        ltype = schema.field(label_column).type
        inner = ltype.value_type if _is_list(ltype) else None
        listed = inner is not None and (pa.types.is_integer(inner) or pa.types.is_boolean(inner))
        if not (pa.types.is_integer(ltype) or listed):
            raise RunSetupError(
                f"label column {label_column!r} has type {ltype}; it must hold integer class indices "
                "(or, for a multi-label model, lists of indices or multi-hot lists)"
            )
    if mask_column is not None and image_kind(schema.field(mask_column).type) is None:
        raise RunSetupError(
            f"mask column {mask_column!r} has type {schema.field(mask_column).type}; masks must be encoded images "
            "(binary), struct<bytes, path> or string paths"
        )


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _build(c: RunConfig, device, model) -> RunPlan:
    selection, prep = _check_numbers(c)

    files, input_dirs = discover_inputs(c.inputs)
    out_dir = Path(c.output).expanduser().resolve()
    for d in input_dirs:
        if _within(out_dir, Path(d).resolve()):
            raise RunSetupError(f"the output directory {c.output} is inside the input directory {d}; choose another")
    for f in files:
        if f.is_local and out_dir == Path(f.path).resolve().parent:
            raise RunSetupError(f"the output directory {c.output} holds the input {f.uri}; choose another")
    if out_dir.exists() and not out_dir.is_dir():
        raise RunSetupError(f"the output {c.output} exists and is not a directory")
    check_writable(out_dir, c.output)
    first = files[0].schema
    image_column = c.image_column or detect_image_column(first)
    keep = tuple(dict.fromkeys(c.keep_columns))
    check_columns(
        files,
        {
            "image column": image_column,
            "id column": c.id_column,
            "label column": c.label_column,
            "mask column": c.mask_column,
        }
        | {f"kept column {k!r}": k for k in keep},
    )
    for col in (image_column, c.id_column, c.label_column, c.mask_column, *keep):
        if col is None:
            continue
        for f in files[1:]:
            if f.schema.field(col).type != first.field(col).type:
                theirs, ours = f.schema.field(col).type, first.field(col).type
                raise RunSetupError(f"column {col!r} is {ours} in {files[0].uri} but {theirs} in {f.uri}")
    check_column_roles(
        first, image_column=image_column, keep=keep, label_column=c.label_column, mask_column=c.mask_column
    )
    if c.box_column:
        box_cols = [b.strip() for b in c.box_column.split(",") if b.strip()]
        check_columns(files, {f"box column {b!r}": b for b in box_cols})
        for col in box_cols:
            for f in files[1:]:
                if f.schema.field(col).type != first.field(col).type:
                    raise RunSetupError(f"box column {col!r} has another type in {f.uri} than in {files[0].uri}")
    per_unit = max(1, c.rows_per_file // max(1, selection.slots))
    if per_unit >= 64:
        per_unit -= per_unit % 64  # whole batches of the common batch sizes
    unit_rows = min(MAX_UNIT_ROWS, per_unit)
    units = tuple(plan_units(files, unit_rows, c.limit))
    if not units or sum(u.rows for u in units) == 0:
        raise RunSetupError("no input rows to explain" + (" (--limit 0)" if c.limit == 0 else ""))

    explain = explain_spec(c, heatmap_shape(c, prep))
    if model is None:
        model = ModelHandle(c, device)
    probe = _probe(c, selection, prep, explain, model, first.field(c.label_column).type if c.label_column else None)
    plan = _assemble(
        c, tuple(files), out_dir, first, image_column, keep, selection, prep, explain, probe, unit_rows, units
    )
    check_output(plan)
    return plan


@dataclass(frozen=True)
class _Probe:
    target_layer: str
    model_classes: int
    cam_shape: tuple[int, int]
    model_digest: str | None
    task: str


def _probe(
    c: RunConfig,
    selection: ClassSelection,
    prep: Preprocess,
    explain: ExplainSpec,
    handle: ModelHandle,
    label_type: pa.DataType | None = None,
) -> _Probe:
    """One blank image through the run's Explainer: finds the layer, the class count and the cam size.

    The Explainer stays with ``handle`` (set up, and the model traced, for the batch step).
    """
    device = handle.device
    model = handle.get()
    note = random_weights_note(c.model, c.weights, c.num_classes)
    if note is not None:
        warnings.warn(RunWarning(note, "random-weights"), stacklevel=2)
    # Hashed as loaded, before anything else touches it; a Ray actor hashes its own load the same way.
    digest = state_digest(model) if isinstance(model, torch.nn.Module) else None
    from gradcam_batch.engine.explain.tasks import detect_task

    task = detect_task(model) if c.task == "auto" else c.task
    _check_task(c, task, label_type)
    explain = dataclasses.replace(explain, task=task)
    explainer = explain.explainer(model)
    h, w = prep.out_size
    x = torch.zeros((1, 3, h, w), device=device)
    if task != "softmax":
        # A textured image: on a blank one, a transformer without position embeddings (SegFormer) gives every
        # position the same features, and the layer search finds no map whose positions the scores depend on.
        x = torch.randn((1, 3, h, w), generator=torch.Generator().manual_seed(0)).to(device)
    seen: list[int] = []

    def first_class(scores: torch.Tensor) -> torch.Tensor:
        seen.append(scores.shape[1])
        return torch.zeros((scores.shape[0], 1), dtype=torch.long, device=scores.device)

    try:
        exp = explainer.probe(x, classes=first_class, counterfactual=explain.counterfactual)
    except (ValueError, TypeError):
        raise
    except Exception as exc:
        raise RunSetupError(
            f"the model fails on a (1, 3, {h}, {w}) input: {type(exc).__name__}: {first_line(exc)}"
        ) from None
    n = seen[0]
    if selection.classes and max(selection.classes) >= n:
        raise RunSetupError(f"class {max(selection.classes)} is out of range: the model has {n} classes (0..{n - 1})")
    if selection.top_k is not None and selection.top_k > n:
        raise RunSetupError(f"top-k {selection.top_k} exceeds the number of classes of the model ({n})")
    if explain.guided and isinstance(model, torch.nn.Module):
        _check_guided(model, x)
    handle.explainer = explainer
    return _Probe(exp.target_layer, n, (int(exp.cams.shape[-2]), int(exp.cams.shape[-1])), digest, task)


# How a forward can apply a ReLU without an nn.ReLU module: guided backprop does not see these.
_RELU_FUNCTIONS = {torch.relu, torch.relu_, torch.nn.functional.relu, torch.nn.functional.relu_}
_RELU_FUNCTIONS |= {torch.Tensor.relu, torch.Tensor.relu_}


class _ReluCalls(torch.overrides.TorchFunctionMode):
    """Counts the relu calls of a forward: an nn.ReLU module's own call is one of them (its F.relu)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _RELU_FUNCTIONS:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _check_guided(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Warn when guided backprop would change little or nothing: it acts on ``nn.ReLU`` modules only.

    One forward counts the ``nn.ReLU`` modules called and the relu calls outside them (``torch.relu``,
    ``F.relu``, ``Tensor.relu``). Other activations (GELU, SiLU, ReLU6, LeakyReLU, ...) have no guided
    rule here, so a model built on them keeps its plain gradient wherever they are.
    """
    module_calls = 0

    def count(*_):
        nonlocal module_calls
        module_calls += 1

    handles = [m.register_forward_pre_hook(count) for m in model.modules() if isinstance(m, torch.nn.ReLU)]
    relus = _ReluCalls()
    try:
        with torch.no_grad(), relus:
            model(x)
    except Exception:
        return  # the probe's own forward succeeded; this count is advice only
    finally:
        for h in handles:
            h.remove()
    functional = max(0, relus.calls - module_calls)
    if module_calls == 0:
        others = f"its {functional} functional relu calls and other activations" if functional else "other activations"
        warnings.warn(
            RunWarning(
                "--guided: the model calls no nn.ReLU module, so guided backpropagation changes nothing: the "
                "guided column is the plain input gradient times the map (guided backprop acts on nn.ReLU "
                f"modules; {others} keep their plain gradient)",
                "guided-no-relu",
            ),
            stacklevel=3,
        )
    elif functional:
        s_m, s_f = ("" if module_calls == 1 else "s"), ("" if functional == 1 else "s")
        warnings.warn(
            RunWarning(
                f"--guided: guided backpropagation acts on the model's {module_calls} nn.ReLU call{s_m}, not on "
                f"its {functional} functional relu call{s_f} (torch.relu, F.relu, Tensor.relu), whose gradient "
                "stays plain",
                "guided-functional-relu",
            ),
            stacklevel=3,
        )


def heatmap_shape(c: RunConfig, prep: Preprocess) -> tuple[int, int] | None:
    """The heatmap size: the model input's for "input", none for None."""
    hs = c.heatmap_size
    if hs == "input":
        shape = prep.out_size
    elif hs is None:
        return None
    elif isinstance(hs, int):
        shape = (hs, hs)
    else:
        shape = (int(hs[0]), int(hs[1]))
    if min(shape) < 1:
        raise RunSetupError(f"heatmap size must be positive, got {shape}")
    return shape


def _assemble(
    c, files, out_dir, schema, image_column, keep, selection, prep, explain, probe, unit_rows, units
) -> RunPlan:
    boxes = box_spec(schema, c.box_column, c.box_format) if c.box_column else None
    metrics = MetricsSpec(
        names=tuple(m for m in METRICS if m in c.metrics),
        steps=c.metrics_steps,
        batch=c.metrics_batch or c.batch_size,
        sample=c.metrics_sample if c.metrics_sample is not None and c.metrics_sample < 1 else None,
        boxes=boxes,
        tolerance=c.pointing_tolerance,
        threshold=c.box_threshold,
    )
    layout = Layout(
        id_type=schema.field(c.id_column).type if c.id_column else pa.string(),
        passthrough=tuple(schema.field(k) for k in keep),
        label_type=schema.field(c.label_column).type if c.label_column else None,
        cam_shape=probe.cam_shape,
        cam_dtype=explain.cam_dtype,
        heatmap_shape=explain.heatmap_shape,
        heatmap_dtype=explain.heatmap_dtype,
        methods=explain.methods,
        metrics=metrics.names,
        boxes=boxes is not None,
        guided_shape=prep.out_size if explain.guided else None,
        task=probe.task,
        masks=c.mask_column is not None,
    )
    row_columns = [k for k in dict.fromkeys((c.id_column, c.label_column, *keep)) if k]
    source = SourceSpec(
        files=files,
        image_column=image_column,
        image_kind=image_kind(schema.field(image_column).type),
        columns=tuple(
            dict.fromkeys([*row_columns, *(boxes.columns if boxes else ()), *[c.mask_column] * bool(c.mask_column)])
        ),
        prep=prep,
        batch_size=c.batch_size,
        workers=c.workers,
        device_jpeg=c.device_jpeg,
        max_image_pixels=c.max_image_pixels,
        decode_memory=c.decode_memory_mb << 20 if c.decode_memory_mb else None,
        want_sizes=boxes is not None or c.mask_column is not None,
    )
    sink = SinkSpec(
        out_dir=out_dir,
        schema=output_schema(layout),
        rows_per_file=c.rows_per_file,
        queue_depth=c.queue_depth,
        overwrite=c.overwrite,
    )
    plan = RunPlan(
        config=c,
        model=dataclasses.replace(model_spec(c), digest=probe.model_digest),
        explain=dataclasses.replace(explain, target_layer=probe.target_layer, task=probe.task),
        source=source,
        sink=sink,
        metrics=metrics,
        selection=selection,
        layout=layout,
        id_column=c.id_column,
        label_column=c.label_column,
        keep_columns=keep,
        model_classes=probe.model_classes,
        cam_shape=probe.cam_shape,
        unit_rows=unit_rows,
        mask_column=c.mask_column,
        mask_ignore_index=c.mask_ignore_index,
        units=units,
        fingerprint="",
        manifest_config={},
        device=c.device,
        progress=c.progress,
    )
    return dataclasses.replace(
        plan, fingerprint=fingerprint(plan) if files else "", manifest_config=_manifest_config(plan)
    )


def _manifest_config(plan: RunPlan) -> dict:
    """The config as given, and as resolved: files, image column, target layer, class count, ..."""
    cfg = dataclasses.asdict(plan.config)
    cfg.update(
        inputs=list(plan.config.inputs),
        files=[f.uri for f in plan.files],
        image_column=plan.image_column,
        target_layer_resolved=plan.target_layer,
        model_classes=plan.model_classes,
        task_resolved=plan.task,
        top_k=plan.selection.top_k,
        unit_rows=plan.unit_rows,
        output=str(plan.out_dir),
        methods=list(plan.methods),
    )
    return cfg


# -- fingerprint -------------------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file, streamed in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# The library that builds a spec's architecture: its version is part of the fingerprint.
_SPEC_LIBRARIES = {"torchvision:": "torchvision", "timm:": "timm", "hf:": "transformers"}


def _model_files(spec: str) -> list[str]:
    """The local files whose content defines a model spec, beside its weights (which the state digest covers).

    A model file; a factory's source; the JSON files of an ``hf:`` directory (its config and
    preprocessor config). ``torchvision:`` and ``timm:`` architectures are defined by their
    library's version.
    """
    p = Path(spec)
    if p.is_file():
        return [str(p)]
    if spec.startswith("hf:"):
        d = Path(spec[len("hf:") :]).expanduser()
        return sorted(str(f) for f in d.iterdir() if f.suffix == ".json" and f.is_file()) if d.is_dir() else []
    if spec.startswith(tuple(_SPEC_LIBRARIES)):
        return []
    if ":" in spec:
        target = spec.rpartition(":")[0]
        if target.endswith(".py"):
            return [target] if Path(target).is_file() else []
        with_spec = None
        with contextlib.suppress(ImportError, ValueError):
            with_spec = importlib.util.find_spec(target)
        if with_spec is not None and with_spec.origin and Path(with_spec.origin).is_file():
            return [with_spec.origin]
    return []


def _library_versions(spec: str) -> dict[str, str]:
    """{library: version} of the library that builds the spec's architecture (none for other specs)."""
    for prefix, name in _SPEC_LIBRARIES.items():
        if spec.startswith(prefix):
            with contextlib.suppress(ImportError):
                return {name: str(getattr(importlib.import_module(name), "__version__", "unknown"))}
    return {}


def _input_stamp(f: InputFile) -> list:
    """An input file by size and modification time (what ``pyarrow.fs`` gives for local files and URIs)."""
    try:
        info = f.filesystem.get_file_info(f.path)
    except OSError:
        return [f.uri, f.num_rows]
    mtime = info.mtime_ns if info.type == pafs.FileType.File else None
    return [f.uri, f.num_rows, info.size, mtime]


def fingerprint(plan: RunPlan) -> str:
    """What decides the output's content: a resumed run must match it exactly.

    The model counts by content: the sha256 of its loaded state dict (whatever the weights' source,
    a seeded random initialization included), of its model or factory file or ``hf:`` config files,
    and its library's version; inputs count by size and modification time.
    Options that change only rounding or speed (device, batch size, compile, workers, decode
    memory) are left out, so that a run can be resumed on another machine or runner.
    """
    c = plan.config
    key = {
        "files": [_input_stamp(f) for f in plan.files],
        "image_column": plan.image_column,
        "id_column": c.id_column,
        "label_column": c.label_column,
        "keep_columns": list(plan.keep_columns),
        "model": c.model,
        "model_files": [sha256_file(p) for p in _model_files(c.model)],
        "weights": sha256_file(c.weights) if c.weights and Path(c.weights).is_file() else c.weights,
        "weights_strict": c.weights_strict,
        "model_state": plan.model_digest,
        "libraries": _library_versions(c.model),
        "num_classes": c.num_classes,
        "providers": list(c.providers) if c.providers else None,
        "target_layer": plan.target_layer,
        # One method hashes as before the method lists (resumable); several as their list.
        "method": plan.methods[0] if len(plan.methods) == 1 else list(plan.methods),
        "counterfactual": c.counterfactual,
        "selection": plan.selection.fingerprint(),
        "prep": [plan.prep.resize, plan.prep.crop, list(plan.prep.mean), list(plan.prep.std)]
        # Appended only when not the default, so that runs from before the option keep their fingerprint.
        + ([plan.prep.interpolation] if plan.prep.interpolation != "bilinear" else []),
        "heatmap": [plan.heatmap_shape, c.heatmap_dtype],
        "precision": c.precision,
        "reshape": [c.reshape, c.token_grid],
        "device_jpeg": c.device_jpeg,
        "max_image_pixels": c.max_image_pixels,
        "metrics": [
            list(plan.metrics.names),
            c.metrics_steps,
            c.box_column,
            c.box_format,
            c.pointing_tolerance,
            c.box_threshold,
        ],
        "unit_rows": plan.unit_rows,
        "limit": c.limit,
        "schema": plan.schema.to_string(show_schema_metadata=False),
    }
    if plan.metrics.sample is not None:  # added only when sampled, so that earlier runs keep their fingerprint
        key["metrics_sample"] = plan.metrics.sample
    if plan.task != "softmax":  # added only for the tasks, so that classifier runs keep their fingerprint
        key["task"] = [plan.task, c.mask_column, c.mask_ignore_index]
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_output(plan: RunPlan) -> None:
    """The output directory is absent or empty, holds this same run, or a run that ``overwrite``
    replaces, and no foreign file is in the way (``sink.output_problem``). Reads only."""
    if plan.out_dir is None:
        return
    problem = output_problem(survey(plan.out_dir), fingerprint=plan.fingerprint, overwrite=plan.sink.overwrite)
    if problem is not None:
        raise RunSetupError(problem)


__all__ = [
    "ClassSelection",
    "ModelHandle",
    "RunPlan",
    "MAX_SIDE",
    "build_plan",
    "check_column_roles",
    "check_sizes",
    "check_writable",
    "fingerprint",
    "plan_for_schema",
]
