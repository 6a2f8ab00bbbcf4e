"""The output columns, each declared once: the registry that the schema, the tables, the summary and the audit read.

A ``Column`` says what its name and Arrow type are, which run option enables it, how the batch step
fills it (on the device from the batch's explanation, or on the host after the copy back), how the
run's summary aggregates it, and whether the audit reads it. ``COLUMNS`` lists them in the order of
the output schema. Everything else is derived: ``output_schema`` (``engine/job/schema.py``), the
arrays the batch step copies back (``engine/job/step.py``), ``build_table``'s encoding, the means in
the summary and the manifest (``tally``, ``means``), the audit's metric columns
(``engine/audit/run_output.py``) and the names a kept input column may not have.

A new column is one ``Column(...)`` line here and one row of the README's schema table; a value that
no ``Fill`` offers yet is one more accessor on the fill (``engine/job/step.py``).

No torch here: the audit reads the registry without it (the fill functions run in the batch step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

HEATMAP_DTYPES = {"uint8": (pa.uint8(), np.uint8), "float16": (pa.float16(), np.float16)}
CAM_DTYPES = {"float16": (pa.float16(), np.float16), "float32": (pa.float32(), np.float32)}
METHOD_TYPE = pa.dictionary(pa.int32(), pa.string())
KEPT = "*kept"  # the place of the kept input columns, which keep their own names and types

# Where a column's values come from.
INPUT = "input"  # the input row (id, kept columns, label)
TABLE = "table"  # how build_table lays the rows out (class_rank, method, status, error)
DEVICE = "device"  # Column.fill(DeviceFill) -> (m, C, ...) tensor on the device, copied back with the batch
HOST = "host"  # Column.fill(HostFill) -> (m, C, ...) array on the host, after the copy back


@dataclass(frozen=True)
class Layout:
    """What decides a run's columns and their types: the plan makes one, ``output_schema`` reads it."""

    id_type: pa.DataType = pa.string()
    passthrough: tuple[pa.Field, ...] = ()  # the kept input columns
    label_type: pa.DataType | None = None  # None: no label column
    cam_shape: tuple[int, int] = (7, 7)
    cam_dtype: str = "float16"
    heatmap_shape: tuple[int, int] | None = None  # None: no heatmap column
    heatmap_dtype: str = "uint8"
    methods: tuple[str, ...] = ("gradcam",)
    metrics: tuple[str, ...] = ()  # of "deletion", "insertion", "confidence"
    boxes: bool = False
    guided_shape: tuple[int, int] | None = None  # None: no guided column
    task: str = "softmax"  # "softmax", "multilabel" or "segmentation" (engine/explain/tasks.py)
    masks: bool = False  # true segmentation masks (--mask-column): the mask metrics


@dataclass(frozen=True)
class Mean:
    """How the summary aggregates a column: the mean over the rows that hold it, under ``key``.

    ``at_least``: the share of rows whose value is at least this, not the mean of the values.
    ``label``: how the summary line shows it (a format with one field).
    """

    key: str
    label: str
    at_least: float | None = None


def _always(_: Layout) -> bool:
    return True


def _non_negative(values: np.ndarray) -> np.ndarray:
    """Valid where every value is >= 0: the batch step writes -1 for "none" (a peak, a predicted box)."""
    v = values >= 0
    return v.reshape(len(v), -1).all(axis=1)


@dataclass(frozen=True)
class Column:
    """One output column (see the module docstring)."""

    name: str
    type: pa.DataType | Callable[[Layout], pa.DataType] | None  # None: the kept columns' own
    fill: Callable | None = None  # DEVICE: DeviceFill -> tensor; HOST: HostFill -> array (masked: null)
    origin: str = DEVICE
    enabled: Callable[[Layout], bool] = _always
    option: str | None = None  # the RunConfig field that enables it (None: always present)
    valid: Callable[[np.ndarray], np.ndarray] | None = None  # rows that hold a value, beyond ok rows and NaN
    mean: Mean | None = None
    audit: bool = False  # the audit sums it per class and cluster, with intervals (a metric; its values in [0, 1])
    nullable: bool = True

    def arrow_type(self, layout: Layout) -> pa.DataType:
        return self.type(layout) if callable(self.type) else self.type

    def fields(self, layout: Layout) -> list[pa.Field]:
        if self.name == KEPT:
            return list(layout.passthrough)
        return [pa.field(self.name, self.arrow_type(layout), nullable=self.nullable)]


def _tensor(value: pa.DataType, shape) -> pa.DataType:
    return pa.fixed_shape_tensor(value, list(shape))


def _metric(name: str) -> Callable[[Layout], bool]:
    return lambda layout: name in layout.metrics


def _boxes(layout: Layout) -> bool:
    return layout.boxes


def _softmax(layout: Layout) -> bool:
    return layout.task == "softmax"


def _segmentation(layout: Layout) -> bool:
    return layout.task == "segmentation"


def _masks(layout: Layout) -> bool:
    return layout.task == "segmentation" and layout.masks


def _positives(layout: Layout) -> bool:
    """A multi-label run with labels, or a segmentation run with true masks: each row says whether its
    class is one of the image's positives."""
    if layout.task == "multilabel":
        return layout.label_type is not None
    return _masks(layout)


COLUMNS: tuple[Column, ...] = (
    Column("id", lambda lo: lo.id_type, origin=INPUT),
    Column(KEPT, None, origin=INPUT, option="keep_columns"),
    Column("class_index", pa.int32(), lambda f: f.exp.classes),
    Column("class_rank", pa.int32(), origin=TABLE),  # 0 = highest score among the image's explained classes
    Column("method", METHOD_TYPE, origin=TABLE, enabled=lambda lo: len(lo.methods) > 1, option="method"),
    Column(
        "label",
        lambda lo: lo.label_type,
        origin=INPUT,
        enabled=lambda lo: lo.label_type is not None,
        option="label_column",
    ),
    Column("score", pa.float32(), lambda f: f.exp.scores),
    Column("probability", pa.float32(), lambda f: f.exp.probabilities),
    # The softmax's entropy over every class: a single-label classifier's (a multi-label or segmentation
    # model has no one distribution over its classes).
    Column(
        "entropy",
        pa.float32(),
        lambda f: f.per_image(-f.all_probabilities.xlogy(f.all_probabilities).sum(1)),
        enabled=_softmax,
    ),
    # Segmentation: the predicted region's share of the image (the pixels whose argmax is the class).
    Column(
        "area",
        pa.float32(),
        lambda f: f.task_values["area"],
        enabled=_segmentation,
        mean=Mean("mean_area", "mean area {:.1%}"),
        audit=True,
    ),
    # Multi-label: the class is one of the image's positive labels; segmentation: it is in the true mask.
    Column(
        "positive",
        pa.bool_(),
        lambda f: f.task_values["positive"],
        enabled=_positives,
        mean=Mean("positive_rate", "positives {:.1%}"),
        audit=True,
    ),
    Column("cam", lambda lo: _tensor(CAM_DTYPES[lo.cam_dtype][0], lo.cam_shape), lambda f: f.cams),
    Column(
        "heatmap",
        lambda lo: _tensor(HEATMAP_DTYPES[lo.heatmap_dtype][0], lo.heatmap_shape),
        lambda f: f.exp.heatmaps,
        enabled=lambda lo: lo.heatmap_shape is not None,
        option="heatmap_size",
    ),
    Column(
        "guided",  # guided backprop x the map at the input size, 3 channels, min-max normalized per map
        lambda lo: _tensor(pa.uint8(), (3, *lo.guided_shape)),
        lambda f: f.guided,
        enabled=lambda lo: lo.guided_shape is not None,
        option="guided",
    ),
    # Null where the map is all zero (cam_max == 0): such a map has no peak, and (0, 0) would read as one.
    Column("peak_y", pa.int32(), lambda f: f.peak(0), valid=_non_negative),
    Column("peak_x", pa.int32(), lambda f: f.peak(1), valid=_non_negative),
    Column("cam_max", pa.float32(), lambda f: f.exp.cam_max),
    Column(
        "deletion_auc",
        pa.float32(),
        lambda f: f.faithfulness["deletion_auc"],
        enabled=_metric("deletion"),
        option="metrics",
        mean=Mean("deletion_auc", "deletion AUC {:.3f}"),
        audit=True,
    ),
    Column(
        "insertion_auc",
        pa.float32(),
        lambda f: f.faithfulness["insertion_auc"],
        enabled=_metric("insertion"),
        option="metrics",
        mean=Mean("insertion_auc", "insertion AUC {:.3f}"),
        audit=True,
    ),
    Column(
        "confidence_drop",
        pa.float32(),
        lambda f: f.faithfulness["confidence_drop"],
        enabled=_metric("confidence"),
        option="metrics",
        mean=Mean("average_drop", "average drop {:.1%}"),
        audit=True,
    ),
    Column(
        "confidence_increase",
        pa.bool_(),
        lambda f: f.faithfulness["confidence_increase"],
        enabled=_metric("confidence"),
        option="metrics",
        mean=Mean("increase_rate", "increase in confidence {:.1%}"),
        audit=True,
    ),
    Column(
        "pointing_hit",
        pa.bool_(),
        lambda h: h.boxes("pointing_hit"),
        origin=HOST,
        enabled=_boxes,
        option="box_column",
        mean=Mean("pointing_accuracy", "pointing accuracy {:.3f}"),
        audit=True,
    ),
    Column(
        "box_energy",
        pa.float32(),
        lambda h: h.boxes("box_energy"),
        origin=HOST,
        enabled=_boxes,
        option="box_column",
        audit=True,
    ),
    Column(
        "pred_box",
        pa.list_(pa.int32(), 4),
        lambda h: h.boxes("pred_box"),
        origin=HOST,
        enabled=_boxes,
        option="box_column",
        valid=_non_negative,
    ),
    Column(
        "box_iou",
        pa.float32(),
        lambda h: h.boxes("box_iou"),
        origin=HOST,
        enabled=_boxes,
        option="box_column",
        mean=Mean("localization_accuracy", "localization accuracy {:.3f}", at_least=0.5),
        audit=True,
    ),
    # Segmentation with true masks: the heatmap's energy inside the class's true mask, and the IoU with it
    # of the heatmap thresholded at 15% of its maximum (engine/metrics/localization.py: mask_metrics).
    Column(
        "mask_energy",
        pa.float32(),
        lambda f: f.task_values["mask_energy"],
        enabled=_masks,
        option="mask_column",
        mean=Mean("mask_energy", "mask energy {:.3f}"),
        audit=True,
    ),
    Column(
        "mask_iou",
        pa.float32(),
        lambda f: f.task_values["mask_iou"],
        enabled=_masks,
        option="mask_column",
        mean=Mean("mask_iou", "mask IoU {:.3f}"),
        audit=True,
    ),
    Column("status", pa.string(), origin=TABLE, nullable=False),  # "ok" or "error"
    Column("error", pa.string(), origin=TABLE),  # why a row is an error row, or a note on an ok row
)

BY_NAME = {c.name: c for c in COLUMNS}
# Names a kept input column may not have: every column the output can hold.
RESERVED = tuple(c.name for c in COLUMNS if c.name != KEPT)


def columns_of(layout: Layout) -> tuple[Column, ...]:
    """The columns a run with this layout has, in the schema's order."""
    return tuple(c for c in COLUMNS if c.enabled(layout))


def audited() -> tuple[Column, ...]:
    """The columns the audit reads as metrics, in the registry's order."""
    return tuple(c for c in COLUMNS if c.audit)


# -- the summary: added up per committed file, then the means ------------------------------------------


def tally(table: pa.Table) -> dict[str, list[float]]:
    """``{column: [sum, rows]}`` of the columns with a ``Mean`` in ``table`` (the rows that hold a value).

    Each commit line keeps its file's (``session.OutputSession.tally``); added up, they give ``means``.
    """
    import pyarrow.compute as pc

    out: dict[str, list[float]] = {}
    for c in COLUMNS:
        if c.mean is None or c.name not in table.column_names:
            continue
        values = table.column(c.name).drop_null()
        if c.mean.at_least is not None:
            values = pc.greater_equal(values, c.mean.at_least)
        if pa.types.is_boolean(values.type):
            values = pc.cast(values, pa.float64())
        out[c.name] = [float(pc.sum(values).as_py() or 0.0), len(values)]
    return out


def means(total: dict[str, list[float]], schema: pa.Schema) -> dict:
    """The dataset means of the summary's columns that ``schema`` has, from their added-up tally, and
    under ``rows`` how many rows each stands on; ``{}`` when the run has none of them."""
    wanted = [c for c in COLUMNS if c.mean is not None and c.name in schema.names]
    if not wanted:
        return {}
    out: dict = {}
    rows: dict[str, int] = {}
    for c in wanted:
        s, n = total.get(c.name, [0.0, 0])
        out[c.mean.key] = round(s / n, 4) if n else None
        rows[c.mean.key] = int(n)
    return out | {"rows": rows}


def summary_labels() -> dict[str, str]:
    """How the summary line shows each mean: ``{key: format}``."""
    return {c.mean.key: c.mean.label for c in COLUMNS if c.mean is not None}


__all__ = [
    "BY_NAME",
    "CAM_DTYPES",
    "COLUMNS",
    "Column",
    "DEVICE",
    "HEATMAP_DTYPES",
    "HOST",
    "INPUT",
    "KEPT",
    "Layout",
    "METHOD_TYPE",
    "Mean",
    "RESERVED",
    "TABLE",
    "audited",
    "columns_of",
    "means",
    "summary_labels",
    "tally",
]
