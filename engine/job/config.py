"""What a run is asked to do (``RunConfig``), and the errors and environment facts every runner shares.

``RunConfig`` is the raw request, field for field what ``gradcam-batch run`` takes. It is checked
and resolved once, into a ``RunPlan`` (``engine/job/plan.py``); nothing else reads it field by field.
"""

from __future__ import annotations

import platform
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import torch

from gradcam_batch.engine.errors import first_line
from gradcam_batch.engine.job.decode import DEFAULT_MAX_IMAGE_PIXELS
from gradcam_batch.engine.job.preprocess import IMAGENET_MEAN, IMAGENET_STD


class RunSetupError(ValueError):
    """The run cannot start as configured; nothing has been written. The CLI exits with 2."""


class OutputBusy(RunSetupError):
    """Another run holds the output directory's lock."""


class RunFailed(RuntimeError):
    """A run stopped after it started; what it committed is kept.

    ``transient`` says whether rerunning the same command can get past the failure (an I/O
    error, a full disk, a lost Ray node): only then is "rerun to resume" the right advice.
    """

    def __init__(self, message: str, *, transient: bool):
        super().__init__(message)
        self.transient = transient

    @property
    def advice(self) -> str:
        if self.transient:
            return "rerun the same command to resume"
        return "a rerun fails the same way: change what the message names (the committed output is kept)"


class RunWarning(UserWarning):
    """What a run should tell its user without stopping: a fallback, an option that changes nothing.

    Given through ``warnings.warn``, the path of every warning of the engine, so the CLI prints
    it on stderr and a caller can filter it. ``key`` names the kind: a run says each kind once,
    however many batches or Ray actors meet it.
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key or message


class WarnOnce:
    """``warn(key, message)``: a ``RunWarning`` the first time ``key`` comes, nothing after."""

    def __init__(self) -> None:
        self.said: set[str] = set()

    def __call__(self, key: str, message: str) -> None:
        if key not in self.said:
            self.said.add(key)
            warnings.warn(RunWarning(message, key), stacklevel=2)


@dataclass
class RunConfig:
    """Everything ``gradcam-batch run`` takes; see ``gradcam-batch run --help`` for each field."""

    inputs: Sequence[str]
    output: str
    model: str
    weights: str | None = None
    weights_strict: bool = True  # every tensor must match by name; False allows missing and unexpected ones
    num_classes: int | None = None
    target_layer: str | None = None
    # A name, a comma list ("gradcam,layercam") or a sequence: one row per (image, class, method), with
    # a `method` column when there are several (engine/explain/methods.py lists the names).
    method: str | Sequence[str] = "gradcam"
    guided: bool = False  # also Guided Grad-CAM, the `guided` column (a backward through the whole model)
    scorecam_batch: int = 64  # Score-CAM's masked images per forward
    counterfactual: bool = False
    top_k: int | None = None  # None: 1, unless classes or a label column say what to explain
    classes: Sequence[int] | None = None
    label_column: str | None = None
    # What the model is (engine/explain/tasks.py): "auto" (what the model declares; a softmax classifier when
    # it says nothing), "softmax", "multilabel" or "segmentation".
    task: str = "auto"
    threshold: float | None = None  # multilabel: also explain every class with sigmoid >= threshold
    max_classes: int | None = None  # multilabel: at most this many classes by the threshold per image
    label_format: str = "auto"  # multilabel: a list label is "indices", "multihot", or "auto" (by its values)
    mask_column: str | None = None  # segmentation: the true masks (encoded images of class indices, or paths)
    mask_ignore_index: int | None = None  # segmentation: the mask value of unlabelled pixels (255 in VOC)
    image_column: str | None = None
    id_column: str | None = None
    keep_columns: Sequence[str] = ()
    resize: int | tuple[int, int] | None = 256
    crop: int | tuple[int, int] | None = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"  # the resize filter; timm: and hf: models bring their own (cli/run.py)
    batch_size: int = 64
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False
    reshape: str | None = None  # "tokens" for (B, N, D) transformer outputs
    token_grid: str | None = None  # "HxW" patch grid for reshape="tokens"; inferred when None
    providers: Sequence[str] | None = None  # ONNX Runtime execution providers; None: best available
    workers: int | None = None  # decode threads (per process)
    heatmap_size: tuple[int, int] | int | None | str = "input"  # "input": the preprocessed image size
    heatmap_dtype: str = "uint8"
    cam_dtype: str = "float16"  # the `cam` column; "float32" keeps cams past float16's 65504
    rows_per_file: int = 10_000
    overwrite: bool = False
    limit: int | None = None
    progress: bool = False
    queue_depth: int = 4
    device_jpeg: bool = False  # decode JPEGs with torchvision on the device (nvJPEG on CUDA)
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS  # larger images become error rows; None: Pillow's limit
    decode_memory_mb: int | None = 1024  # full-size pixels the decode threads may hold at once; None: no bound
    # Faithfulness and localization (engine/metrics): "deletion", "insertion", "confidence"; boxes
    # from a column (or four coordinate columns "x0,y0,x1,y1") add the localization columns.
    metrics: Sequence[str] = ()
    metrics_steps: int = 20  # deletion/insertion steps (RISE)
    metrics_batch: int | None = None  # perturbed images per forward; None: the batch size
    # The faithfulness metrics on a seeded random share of the images (by id; the same images on every
    # resume and runner); the other rows hold nulls. None: every image.
    metrics_sample: float | None = None
    box_column: str | None = None
    box_format: str = "xyxy"  # or "coco": (x, y, width, height)
    pointing_tolerance: float = 15.0  # pixels (the pointing game's)
    box_threshold: float = 0.15  # of the map's max, for the Grad-CAM paper's box
    extra: dict = field(default_factory=dict)  # recorded in the manifest (e.g. the demo's notes)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise RunSetupError(f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RunSetupError(f"device {name!r} asked for, but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RunSetupError(f"device {name!r}: there are {torch.cuda.device_count()} CUDA devices")
    elif dev.type != "cpu":
        raise RunSetupError(f"unsupported device {name!r}; expected auto, cpu, cuda or cuda:N")
    return dev


def versions(device: torch.device | None = None) -> dict:
    from gradcam_batch.version import __version__

    gpu = torch.cuda.get_device_name(device) if device is not None and device.type == "cuda" else None
    return {
        "gradcam_batch": __version__,
        "torch": torch.__version__,
        "pyarrow": pa.__version__,
        "python": platform.python_version(),
        "device": str(device) if device is not None else None,
        "gpu": gpu,
    }


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OutputBusy",
    "RunConfig",
    "RunFailed",
    "RunSetupError",
    "RunWarning",
    "WarnOnce",
    "first_line",
    "resolve_device",
    "versions",
]
