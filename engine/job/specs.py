"""The ready-made parts of a run: what ``build_plan`` resolves once from the ``RunConfig``.

A ``RunPlan`` (``engine/job/plan.py``) carries one of each. The batch step and the runners read
these, never the raw options, and make their parts from them:

- ``ModelSpec``: which model, and the digest of the weights the plan probed; ``load`` loads it
  and ``check`` holds another process's load to those weights;
- ``ExplainSpec``: the Explainer's arguments and the per-batch options; ``explainer(model)`` is the
  one place the Explainer is built for a run;
- ``SourceSpec``: the input files, columns, preprocessing and decode limits; ``open`` makes the
  ``ParquetSource``;
- ``SinkSpec``: the output directory, schema and file sizes; ``writer`` makes the ``HeatmapWriter``;
- ``MetricsSpec``: the faithfulness metrics and the boxes.

Each pickles (a Ray actor receives the plan).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from gradcam_batch.engine.job.boxes import BoxSpec
from gradcam_batch.engine.job.config import RunSetupError
from gradcam_batch.engine.job.inputs import InputFile
from gradcam_batch.engine.job.preprocess import Preprocess
from gradcam_batch.engine.job.source import ParquetSource


@dataclass(frozen=True)
class ModelSpec:
    """The run's model: its spec and how to load it, and (after the probe) the digest of its weights."""

    spec: str
    weights: str | None = None
    num_classes: int | None = None
    providers: tuple[str, ...] | None = None  # ONNX Runtime execution providers
    weights_strict: bool = True
    # sha256 of the probed model's state dict; None before the probe, or for a model that is not an
    # nn.Module (ONNX). A process that loads the model again (a Ray actor) checks that it got these weights.
    digest: str | None = None

    def load(self, device):
        from gradcam_batch.engine.models.loader import load_model

        return load_model(
            self.spec,
            weights=self.weights,
            num_classes=self.num_classes,
            device=device,
            providers=list(self.providers) if self.providers else None,
            weights_strict=self.weights_strict,
        )

    def check(self, model) -> None:
        """``RunSetupError`` when ``model`` (another process's load) has other weights than the planned ones:
        a weights file replaced since, or a factory that builds other weights each time, would mix models."""
        from gradcam_batch.engine.models.weights import state_digest

        if self.digest is not None and state_digest(model) != self.digest:
            raise RunSetupError(
                f"the model {self.spec} loaded here has weights that differ from the weights the run was "
                "planned with (a weights or model file changed since, or the factory does not build the "
                "same weights each time)"
            )


@dataclass(frozen=True)
class ExplainSpec:
    """How each batch is explained: the Explainer's arguments and the per-call options."""

    methods: tuple[str, ...]  # output slots are method-major: (method, class)
    target_layer: str | None = None  # None until the probe resolves it
    guided: bool = False
    scorecam_batch: int = 64
    compile: bool = False
    precision: str = "fp32"
    reshape: str | None = None
    token_grid: str | None = None
    counterfactual: bool = False
    heatmap_shape: tuple[int, int] | None = None  # None: no heatmaps
    heatmap_dtype: str = "uint8"
    cam_dtype: str = "float16"
    task: str = "softmax"  # resolved by the probe: "softmax", "multilabel" or "segmentation"

    def explainer(self, model):
        """The run's ``Explainer`` for ``model`` (a ``TaskExplainer`` for a multi-label or segmentation
        model): the one place a run assembles its arguments."""
        from gradcam_batch.engine.explain.explainer import Explainer
        from gradcam_batch.engine.explain.tasks import TaskExplainer

        options = {
            "target_layer": self.target_layer,
            "method": list(self.methods),  # a sequence: {name: Explanation}, stacked by the batch step
            "guided": self.guided,
            "scorecam_batch": self.scorecam_batch,
            "compile": self.compile,
            "precision": self.precision,
            "reshape": self.reshape,
            "token_grid": self.token_grid,
        }
        if self.task != "softmax":
            return TaskExplainer(model, self.task, **options)
        return Explainer(model, **options)


@dataclass(frozen=True)
class SourceSpec:
    """What is read and how it is decoded."""

    files: tuple[InputFile, ...]  # () for a user's Ray Dataset
    image_column: str
    image_kind: str  # "bytes", "struct" or "path"
    columns: tuple[str, ...]  # the non-image input columns to read: id, label, kept, boxes
    prep: Preprocess
    batch_size: int = 64
    workers: int | None = None  # decode threads; None: the source's default
    device_jpeg: bool = False
    max_image_pixels: int | None = None
    decode_memory: int | None = None  # bytes of full-size pixels the decode threads may hold; None: no bound
    want_sizes: bool = False  # each image's original size (for the boxes)

    def open(self, files: Sequence[InputFile] | None = None, *, threads: int | None = None) -> ParquetSource:
        """The ``ParquetSource`` of these files (default: the run's), with ``threads`` decode threads
        (default: the spec's)."""
        return ParquetSource(
            self.files if files is None else files,
            self.image_column,
            self.columns,
            self.prep,
            batch_size=self.batch_size,
            workers=self.workers if threads is None else threads,
            device_jpeg=self.device_jpeg,
            max_image_pixels=self.max_image_pixels,
            decode_memory=self.decode_memory,
            want_sizes=self.want_sizes,
        )


@dataclass(frozen=True)
class SinkSpec:
    """Where and how the output is written."""

    out_dir: Path | None  # None for a user's Ray Dataset
    schema: pa.Schema
    rows_per_file: int = 10_000
    queue_depth: int = 4  # batches queued before the writer (and, locally, before the compute)
    overwrite: bool = False

    def writer(self, manifest, *, tally=None):
        """A ``HeatmapWriter`` that goes on after the manifest's last part file; ``tally(table)`` is
        what each table adds to its file's commit line."""
        from gradcam_batch.engine.job.sink import HeatmapWriter, next_part_index

        return HeatmapWriter(
            self.out_dir,
            self.schema,
            manifest,
            rows_per_file=self.rows_per_file,
            queue_depth=self.queue_depth,
            first_part=next_part_index(manifest),
            tally=tally,
        )


@dataclass(frozen=True)
class MetricsSpec:
    """The faithfulness metrics and the boxes a run computes."""

    names: tuple[str, ...] = ()  # of "deletion", "insertion", "confidence", in that order
    steps: int = 20  # deletion/insertion steps
    batch: int = 64  # perturbed images per forward
    boxes: BoxSpec | None = None
    tolerance: float = 15.0  # the pointing game's, in pixels
    threshold: float = 0.15  # of the map's max, for the Grad-CAM paper's box
    sample: float | None = None  # the faithfulness metrics on this seeded share of the images (None: all)

    @property
    def needs_saliency(self) -> bool:
        """Whether the batch step needs the input-size saliency (for metrics or boxes)."""
        return bool(self.names) or self.boxes is not None


__all__ = ["ExplainSpec", "MetricsSpec", "ModelSpec", "SinkSpec", "SourceSpec"]
