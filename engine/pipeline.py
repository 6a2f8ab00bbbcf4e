"""The run API behind ``gradcam-batch run``: Parquet in, Grad-CAM, Parquet out.

``run_job(RunConfig(...))`` is ``prepare(config).run()``:

- ``prepare`` checks everything that can be checked before a byte is written: the inputs and
  their columns, the output directory, the model spec and weights, the target layer (one probe
  image runs through the Explainer), the classes. Every problem raises ``RunSetupError`` (a
  ``ValueError``) with one line; the command line turns it into exit code 2.
- ``Job.run`` streams the pending units through three stages joined by bounded queues:

      reader thread  ->  queue(depth)  ->  compute (this thread)  ->  queue(depth)  ->  writer thread
      (Parquet row groups,               (uint8 -> device, normalize,      (Arrow batches,
       decode in a thread pool)           Explainer, results to host)       zstd Parquet, manifest)

  On CUDA the decoded uint8 batch goes through pinned memory with a non-blocking copy, and the
  results of batch i come back (non-blocking, into pinned memory) while batch i+1 is computed.

Which classes are explained per image (C slots, one output row per kept slot):

- ``top_k=K``: the K highest scores; ``classes=[...]``: those classes for every image;
- with a ``label_column``: the ground-truth label as one more slot. When the label is already
  among the top-K (or the listed classes) that duplicate is dropped, so an image has K rows when
  its label is among its top-K and K+1 rows otherwise; ``class_rank`` ranks the kept rows by
  score. A null or out-of-range label drops the label slot and is noted in ``error`` (the row
  stays ``status="ok"``); with a label column alone it makes the image an error row.
"""

from __future__ import annotations

import hashlib
import json
import platform
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from gradcam_batch.engine.sink import (
    HEATMAP_DTYPES,
    RESULT_COLUMNS,
    HeatmapWriter,
    Manifest,
    ResultBatch,
    clean_uncommitted,
    next_part_index,
    output_schema,
    own_files,
)
from gradcam_batch.engine.source import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DecodedBatch,
    InputFile,
    ParquetSource,
    Preprocess,
    SourceError,
    check_columns,
    decode_jpegs_on_device,
    detect_image_column,
    discover_inputs,
    image_kind,
    plan_units,
)

MAX_UNIT_ROWS = 4096


class RunSetupError(ValueError):
    """The run cannot start as configured; nothing has been written."""


@dataclass
class RunConfig:
    """Everything ``gradcam-batch run`` takes; see ``gradcam-batch run --help`` for each field."""

    inputs: Sequence[str]
    output: str
    model: str
    weights: str | None = None
    num_classes: int | None = None
    target_layer: str | None = None
    method: str = "gradcam"
    counterfactual: bool = False
    top_k: int | None = None  # None: 1, unless classes or a label column say what to explain
    classes: Sequence[int] | None = None
    label_column: str | None = None
    image_column: str | None = None
    id_column: str | None = None
    keep_columns: Sequence[str] = ()
    resize: int | tuple[int, int] | None = 256
    crop: tuple[int, int] | None = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    batch_size: int = 64
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False
    reshape: str | None = None  # "tokens" for (B, N, D) transformer outputs
    token_grid: str | None = None  # "HxW" patch grid for reshape="tokens"; inferred when None
    providers: Sequence[str] | None = None  # ONNX Runtime execution providers; None: best available
    workers: int | None = None
    heatmap_size: tuple[int, int] | None | str = "input"  # "input": the preprocessed image size
    heatmap_dtype: str = "uint8"
    rows_per_file: int = 10_000
    overwrite: bool = False
    limit: int | None = None
    progress: bool = False
    queue_depth: int = 4
    device_jpeg: bool = False  # decode JPEGs with torchvision on the device (nvJPEG on CUDA)
    extra: dict = field(default_factory=dict)  # recorded in the manifest (e.g. the demo's notes)


def check_column_roles(schema: pa.Schema, *, image_column: str, keep: Sequence[str], label_column: str | None) -> None:
    """The image column holds images, kept columns do not shadow output columns, labels are integers."""
    if image_kind(schema.field(image_column).type) is None:
        raise RunSetupError(
            f"column {image_column!r} has type {schema.field(image_column).type}; images must be "
            "binary, struct<bytes, path> or string paths"
        )
    clash = [k for k in keep if k in ("id", *RESULT_COLUMNS)]
    if clash:
        raise RunSetupError(f"kept column {clash[0]!r} has the name of an output column; it cannot be kept")
    if label_column is not None:
        ltype = schema.field(label_column).type
        if not pa.types.is_integer(ltype):
            raise RunSetupError(f"label column {label_column!r} has type {ltype}; it must hold integer class indices")


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


def versions(device: torch.device) -> dict:
    from gradcam_batch import __version__

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "gradcam_batch": __version__,
        "torch": torch.__version__,
        "pyarrow": pa.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "gpu": gpu,
    }


def _file_fingerprint(path: str | None) -> dict | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        return {"path": str(path)}
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size}


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


# -- prepare -------------------------------------------------------------------------------------------


class Job:
    """A validated run; ``run()`` executes it."""

    def __init__(self, config: RunConfig):
        self.config = config
        try:
            self._setup()
        except RunSetupError:
            raise
        except (ValueError, TypeError) as exc:  # SourceError, ModelSpecError, TargetLayerError, ...
            raise RunSetupError(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__) from None

    def _setup(self) -> None:
        c = self.config
        for name, value in (
            ("batch size", c.batch_size),
            ("rows per file", c.rows_per_file),
            ("queue depth", c.queue_depth),
        ):
            if not isinstance(value, int) or value < 1:
                raise RunSetupError(f"{name} must be a positive integer, got {value!r}")
        if c.top_k is not None and c.top_k < 1:
            raise RunSetupError(f"top-k must be a positive integer, got {c.top_k}")
        if c.top_k is not None and c.classes:
            raise RunSetupError("give either top-k or a class list, not both")
        if c.limit is not None and c.limit < 0:
            raise RunSetupError(f"limit must be >= 0, got {c.limit}")
        if c.heatmap_dtype not in HEATMAP_DTYPES:
            raise RunSetupError(f"heatmap dtype must be one of {', '.join(HEATMAP_DTYPES)}, got {c.heatmap_dtype!r}")
        if c.device_jpeg:
            try:
                import torchvision.io  # noqa: F401
            except ImportError:
                raise RunSetupError("--device-jpeg needs torchvision (pip install torchvision)") from None
        if c.workers is not None and c.workers < 1:
            raise RunSetupError(f"workers must be a positive integer, got {c.workers}")
        self.classes = list(dict.fromkeys(int(k) for k in c.classes)) if c.classes else None
        if self.classes and min(self.classes) < 0:
            raise RunSetupError(f"class indices must be >= 0, got {min(self.classes)}")
        self.top_k = c.top_k if c.top_k is not None else (None if (self.classes or c.label_column) else 1)
        try:
            self.prep = Preprocess(resize=c.resize, crop=c.crop, mean=tuple(c.mean), std=tuple(c.std))
        except ValueError as exc:
            raise RunSetupError(str(exc)) from None

        # Inputs and columns.
        self.files, input_dirs = discover_inputs(c.inputs)
        self.out_dir = Path(c.output).expanduser().resolve()
        for d in input_dirs:
            if _within(self.out_dir, Path(d).resolve()):
                raise RunSetupError(
                    f"the output directory {c.output} is inside the input directory {d}; choose another"
                )
        for f in self.files:
            if f.is_local and self.out_dir == Path(f.path).resolve().parent:
                raise RunSetupError(f"the output directory {c.output} holds the input {f.uri}; choose another")
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise RunSetupError(f"the output {c.output} exists and is not a directory")
        first = self.files[0].schema
        self.image_column = c.image_column or detect_image_column(first)
        keep = list(dict.fromkeys(c.keep_columns))
        check_columns(
            self.files,
            {"image column": self.image_column, "id column": c.id_column, "label column": c.label_column}
            | {f"kept column {k!r}": k for k in keep},
        )
        for col in (self.image_column, c.id_column, c.label_column, *keep):
            if col is None:
                continue
            for f in self.files[1:]:
                if f.schema.field(col).type != first.field(col).type:
                    raise RunSetupError(
                        f"column {col!r} is {first.field(col).type} in {self.files[0].uri} "
                        f"but {f.schema.field(col).type} in {f.uri}"
                    )
        check_column_roles(first, image_column=self.image_column, keep=keep, label_column=c.label_column)
        self.keep_columns = keep
        self.slots = (len(self.classes) if self.classes else (self.top_k or 0)) + (1 if c.label_column else 0)
        per_unit = max(1, c.rows_per_file // max(1, self.slots))
        if per_unit >= 64:
            per_unit -= per_unit % 64  # whole batches of the common batch sizes
        self.unit_rows = min(MAX_UNIT_ROWS, per_unit)
        self.units = plan_units(self.files, self.unit_rows, c.limit)
        self.total_rows = sum(u.rows for u in self.units)
        if self.total_rows == 0:
            raise RunSetupError("no input rows to explain" + (" (--limit 0)" if c.limit == 0 else ""))

        # Model and explainer.
        from gradcam_batch.engine.explainer import Explainer
        from gradcam_batch.engine.models import load_model

        self.device = resolve_device(c.device)
        self.model = load_model(
            c.model, weights=c.weights, num_classes=c.num_classes, device=self.device, providers=c.providers
        )
        self.explainer = Explainer(
            self.model,
            target_layer=c.target_layer,
            method=c.method,
            compile=c.compile,
            precision=c.precision,
            reshape=c.reshape,
            token_grid=c.token_grid,
        )
        self._probe()

        # Output state (read only here).
        self.fingerprint = self._fingerprint()
        self.manifest: Manifest | None = None
        if self.out_dir.exists() and not c.overwrite:
            self.manifest = Manifest.load(self.out_dir)
            if self.manifest is None:
                others = [p.name for p in self.out_dir.iterdir() if p not in own_files(self.out_dir)]
                if others:
                    raise RunSetupError(
                        f"the output directory {c.output} is not empty and holds no gradcam-batch run; choose another"
                    )
            elif self.manifest.data.get("fingerprint") != self.fingerprint:
                raise RunSetupError(
                    f"{c.output} holds a run with other settings or inputs; pass --overwrite to replace it, "
                    "or choose another output directory"
                )

    def _probe(self) -> None:
        """One blank image through the Explainer: finds the layer, the class count and the cam size."""
        h, w = self.prep.out_size
        x = torch.zeros((1, 3, h, w), device=self.device)
        seen: dict[str, int] = {}

        def select(scores: torch.Tensor) -> torch.Tensor:
            n = scores.shape[1]
            seen["n"] = n
            if self.classes and max(self.classes) >= n:
                raise RunSetupError(
                    f"class {max(self.classes)} is out of range: the model has {n} classes (0..{n - 1})"
                )
            if self.top_k is not None and self.top_k > n:
                raise RunSetupError(f"top-k {self.top_k} exceeds the number of classes of the model ({n})")
            return torch.zeros((scores.shape[0], 1), dtype=torch.long, device=scores.device)

        c = self.config
        try:
            exp = self.explainer(x, classes=select, counterfactual=c.counterfactual, heatmaps=False)
        except RunSetupError:
            raise
        except (ValueError, TypeError):
            raise
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RunSetupError(f"the model fails on a (1, 3, {h}, {w}) input: {type(exc).__name__}: {msg}") from None
        self.num_model_classes = seen["n"]
        self.target_layer = exp.target_layer
        self.cam_shape = (int(exp.cams.shape[-2]), int(exp.cams.shape[-1]))
        hs = c.heatmap_size
        self.heatmap_shape = self.prep.out_size if hs == "input" else (None if hs is None else tuple(hs))
        if self.heatmap_shape is not None and min(self.heatmap_shape) < 1:
            raise RunSetupError(f"heatmap size must be positive, got {self.heatmap_shape}")

    def _fingerprint(self) -> str:
        """What decides the output's content: a resumed run must match it exactly."""
        c = self.config
        key = {
            "files": [(f.uri, f.num_rows) for f in self.files],
            "image_column": self.image_column,
            "id_column": c.id_column,
            "label_column": c.label_column,
            "keep_columns": self.keep_columns,
            "model": c.model,
            "weights": _file_fingerprint(c.weights),
            "num_classes": c.num_classes,
            "target_layer": self.target_layer,
            "method": c.method,
            "counterfactual": c.counterfactual,
            "top_k": self.top_k,
            "classes": self.classes,
            "prep": [self.prep.resize, self.prep.crop, list(self.prep.mean), list(self.prep.std)],
            "heatmap": [self.heatmap_shape, c.heatmap_dtype],
            "precision": c.precision,
            "reshape": [c.reshape, c.token_grid],
            "unit_rows": self.unit_rows,
            "limit": c.limit,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def schema(self) -> pa.Schema:
        first = self.files[0].schema
        c = self.config
        id_type = first.field(c.id_column).type if c.id_column else pa.string()
        return output_schema(
            id_type=id_type,
            passthrough=[first.field(k) for k in self.keep_columns],
            label_type=first.field(c.label_column).type if c.label_column else None,
            cam_shape=self.cam_shape,
            heatmap_shape=self.heatmap_shape,
            heatmap_dtype=c.heatmap_dtype,
        )

    def manifest_config(self) -> dict:
        cfg = asdict(self.config)
        cfg.update(
            inputs=list(self.config.inputs),
            files=[f.uri for f in self.files],
            image_column=self.image_column,
            target_layer_resolved=self.target_layer,
            model_classes=self.num_model_classes,
            top_k=self.top_k,
            unit_rows=self.unit_rows,
            output=str(self.out_dir),
        )
        return cfg

    # -- run ---------------------------------------------------------------------------------------------

    def run(self) -> dict:
        """Explain every pending unit; returns the summary (also recorded in the manifest)."""
        c = self.config
        t_start = time.perf_counter()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        removed: list[str] = []
        if c.overwrite:
            for p in own_files(self.out_dir):
                p.unlink()
            self.manifest = None
        if self.manifest is None:
            for p in own_files(self.out_dir):  # leftovers of a run killed before its first manifest
                p.unlink()
            self.manifest = Manifest.new(
                self.out_dir,
                fingerprint=self.fingerprint,
                config=self.manifest_config(),
                versions=versions(self.device),
            )
        else:
            removed = clean_uncommitted(self.out_dir, self.manifest)
        manifest = self.manifest
        done = manifest.completed_units()
        pending = [u for u in self.units if u.key not in done]
        session = {"images": 0, "errors": 0, "rows_out": 0}
        if pending or manifest.data["status"] != "complete":
            manifest.data["status"] = "running"
            manifest.data["versions"] = versions(self.device)
            manifest.save()
            if pending:
                self._stream(pending, manifest, session)
        seconds = time.perf_counter() - t_start
        rate = session["images"] / seconds if seconds > 0 else 0.0
        if pending or manifest.data["status"] != "complete":
            throughput = {"images": session["images"], "seconds": round(seconds, 3), "images_per_s": round(rate, 2)}
            manifest.data["sessions"].append({**throughput, "device": str(self.device), "ended": time.time()})
            manifest.data["throughput"] = throughput
            manifest.data["status"] = "complete"
            manifest.save()
        totals = manifest.data["totals"]
        return {
            "output": str(self.out_dir),
            "status": "complete",
            "images": session["images"],
            "errors": session["errors"],
            "rows_out": session["rows_out"],
            "seconds": round(seconds, 3),
            "images_per_s": round(rate, 2),
            "resumed_units": len(self.units) - len(pending),
            "removed_partial_files": removed,
            "totals": dict(totals),
            "target_layer": self.target_layer,
            "device": str(self.device),
        }

    def _stream(self, pending, manifest: Manifest, session: dict) -> None:
        c = self.config
        source = ParquetSource(
            self.files,
            self.image_column,
            [k for k in (c.id_column, c.label_column, *self.keep_columns) if k],
            self.prep,
            batch_size=c.batch_size,
            workers=c.workers,
            device_jpeg=c.device_jpeg,
        )
        writer = HeatmapWriter(
            self.out_dir,
            self.schema(),
            manifest,
            rows_per_file=c.rows_per_file,
            queue_depth=c.queue_depth,
            first_part=next_part_index(manifest),
        )
        inbox: queue.Queue = queue.Queue(maxsize=c.queue_depth)
        stop = threading.Event()
        done_marker = object()
        reader_error: list[BaseException] = []

        def read() -> None:
            try:
                for db in source.batches(pending):
                    item = (db, self._row_table(db))
                    while not stop.is_set():
                        try:
                            inbox.put(item, timeout=0.2)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            except BaseException as exc:  # handed to the compute loop
                reader_error.append(exc)
            finally:
                while not stop.is_set():
                    try:
                        inbox.put(done_marker, timeout=0.2)
                        break
                    except queue.Full:
                        continue

        bar = None
        if c.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(u.rows for u in pending), unit="img", dynamic_ncols=True, smoothing=0.1)
        reader = threading.Thread(target=read, name="gradcam-reader", daemon=True)
        reader.start()
        in_flight = None  # the previous batch, whose results are still coming back from the device
        try:
            while True:
                item = inbox.get()
                if item is done_marker:
                    break
                db, rows = item
                launched = self._launch(db, rows)
                if in_flight is not None:
                    self._finish(in_flight, writer, session, bar)
                in_flight = launched
            if in_flight is not None:
                self._finish(in_flight, writer, session, bar)
            if reader_error:
                raise reader_error[0]
            writer.close()
        except BaseException:
            stop.set()
            writer.abort()
            raise
        finally:
            stop.set()
            if bar is not None:
                bar.close()
            reader.join(timeout=10)

    def _row_table(self, db: DecodedBatch) -> pa.Table:
        """The per-image output columns that come from the input: id, kept columns, label."""
        c = self.config
        if c.id_column:
            ids = db.rows.column(c.id_column)
        else:
            key = self.files[db.unit.file_index].key
            ids = pa.array([f"{key}:{r}" for r in db.row_index.tolist()], pa.string())
        cols, names = [ids], ["id"]
        for k in self.keep_columns:
            cols.append(db.rows.column(k))
            names.append(k)
        if c.label_column:
            cols.append(db.rows.column(c.label_column))
            names.append("label")
        return pa.Table.from_arrays(cols, names=names)

    def _launch(self, db: DecodedBatch, rows: pa.Table) -> dict:
        """Start the device work for one batch; returns what ``_finish`` needs."""
        c = self.config
        item = {"db": db, "rows": rows, "exp": None, "keep": None, "notes": None, "event": None}
        m = len(db.images)
        if m == 0:
            return item
        cuda = self.device.type == "cuda"
        x = torch.from_numpy(db.images)
        if cuda:
            x = x.pin_memory().to(self.device, non_blocking=True)
        if db.jpegs:
            x = self._device_jpegs(db, x)
            if x.shape[0] == 0:
                return item
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.prep.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.prep.std, device=self.device).view(1, 3, 1, 1)
        x = x.sub_(mean).div_(std)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)

        labels = None
        if c.label_column:
            lab = rows.column("label").to_numpy(zero_copy_only=False)
            lab = np.asarray(lab, dtype=np.float64)[db.ok]  # nulls arrive as NaN
            labels = torch.from_numpy(np.where(np.isnan(lab), -1, lab).astype(np.int64)).to(self.device)
        fixed = torch.tensor(self.classes, dtype=torch.long, device=self.device) if self.classes else None
        top_k = self.top_k
        sel: dict[str, torch.Tensor] = {}

        def select(scores: torch.Tensor) -> torch.Tensor:
            b, n = scores.shape
            base = fixed.expand(b, -1) if fixed is not None else (scores.topk(top_k, dim=1).indices if top_k else None)
            if labels is None:
                sel["keep"] = torch.ones(base.shape, dtype=torch.bool, device=scores.device)
                return base
            valid = (labels >= 0) & (labels < n)
            lab_c = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(1)
            if base is None:
                sel["keep"] = valid.unsqueeze(1)
                sel["valid"], sel["n"] = valid, torch.tensor(n)
                return lab_c
            dup = (base == lab_c).any(dim=1)
            sel["keep"] = torch.cat(
                [torch.ones(base.shape, dtype=torch.bool, device=scores.device), (valid & ~dup)[:, None]], 1
            )
            sel["valid"], sel["n"] = valid, torch.tensor(n)
            return torch.cat([base, lab_c], dim=1)

        exp = self.explainer(
            x,
            classes=select,
            counterfactual=c.counterfactual,
            output_size=self.heatmap_shape,
            out_dtype=torch.uint8 if c.heatmap_dtype == "uint8" else torch.float16,
            heatmaps=self.heatmap_shape is not None,
        )
        out = {
            "classes": exp.classes,
            "scores": exp.scores.float(),
            "probabilities": exp.probabilities.float(),
            "cams": exp.cams.half(),
            "cam_max": exp.cam_max.float(),
            "peaks": exp.peaks,
            "keep": sel["keep"],
        }
        if self.heatmap_shape is not None:
            out["heatmaps"] = exp.heatmaps
        if "valid" in sel:
            out["valid"] = sel["valid"]
        if cuda:
            # Back to pinned host memory without waiting; _finish waits on the event, after the
            # next batch has been launched.
            host = {}
            for k, t in out.items():
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host[k] = buf.copy_(t, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            item["event"] = ev
            out = host
        item["exp"] = out
        item["n"] = int(sel["n"]) if "n" in sel else None
        return item

    def _device_jpegs(self, db: DecodedBatch, x: torch.Tensor) -> torch.Tensor:
        """Fill the rows left encoded by the source; rows that fail become error rows."""
        decoded, errs = decode_jpegs_on_device([d for _, d in db.jpegs], self.prep, self.device)
        keep = torch.ones(x.shape[0], dtype=torch.bool)
        ok_idx = np.flatnonzero(db.ok)
        for (pos, _), img, err in zip(db.jpegs, decoded, errs, strict=True):
            if img is None:
                keep[pos] = False
                db.errors[ok_idx[pos]] = err
            else:
                x[pos] = img
        db.jpegs = []
        if bool(keep.all()):
            return x
        db.ok[ok_idx[~keep.numpy()]] = False
        return x[keep.to(x.device)]

    def _finish(self, item: dict, writer: HeatmapWriter, session: dict, bar) -> None:
        db: DecodedBatch = item["db"]
        if item["event"] is not None:
            item["event"].synchronize()
        ok = db.ok.copy()
        errors = list(db.errors)
        out = item["exp"]
        if out is None:
            c_slots = max(1, self.slots)
            e = np.zeros((0, c_slots))
            arrays = {
                "classes": e.astype(np.int64),
                "keep": e.astype(bool),
                "scores": e.astype(np.float32),
                "probabilities": e.astype(np.float32),
                "cams": np.zeros((0, c_slots, *self.cam_shape), np.float16),
                "heatmaps": None,
                "cam_max": e.astype(np.float32),
                "peaks": np.zeros((0, c_slots, 2), np.int64),
            }
            notes: list[str | None] = []
        else:
            arrays = {k: v.cpu().numpy() for k, v in out.items()}
            arrays.setdefault("heatmaps", None)
            notes = [None] * len(arrays["classes"])
            valid = arrays.pop("valid", None)
            if valid is not None:
                n = item["n"]
                lab = np.asarray(item["rows"].column("label").to_numpy(zero_copy_only=False), np.float64)[db.ok]
                ok_idx = np.flatnonzero(db.ok)
                for j in np.flatnonzero(~valid):
                    why = (
                        "null label"
                        if np.isnan(lab[j])
                        else f"label {int(lab[j])} is not a class of the model (0..{n - 1})"
                    )
                    if arrays["keep"][j].any():
                        notes[j] = f"{why}; the label row was skipped"
                    else:  # a label column alone: nothing to explain for this image
                        ok[ok_idx[j]] = False
                        errors[ok_idx[j]] = why
                if not ok.all() and ok.sum() < db.ok.sum():
                    still = ok[ok_idx]
                    arrays = {k: (v[still] if isinstance(v, np.ndarray) else v) for k, v in arrays.items()}
                    notes = [nt for nt, s in zip(notes, still, strict=True) if s]
        batch = ResultBatch(
            unit_key=db.unit.key if db.unit_done else None,
            rows=item["rows"],
            ok=ok,
            errors=errors,
            notes=notes,
            **arrays,
        )
        n_err = int((~ok).sum())
        session["images"] += db.num_rows
        session["errors"] += n_err
        session["rows_out"] += int(batch.keep.sum()) + n_err
        writer.put(batch)
        if bar is not None:
            bar.update(db.num_rows)
            if session["errors"]:
                bar.set_postfix(errors=session["errors"], refresh=False)


def prepare(config: RunConfig) -> Job:
    """Validate ``config`` (raises ``RunSetupError``, writes nothing) and return the ``Job``."""
    return Job(config)


def run_job(config: RunConfig) -> dict:
    """Run a whole explanation job; returns the summary dict (see ``Job.run``)."""
    return prepare(config).run()


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def summary_line(summary: dict) -> str:
    """One line: totals, errors, throughput, where."""
    t = summary["totals"]
    resumed = f", {_count(summary['resumed_units'], 'unit')} already done" if summary.get("resumed_units") else ""
    return (
        f"explained {_count(summary['images'], 'image')} ({_count(summary['rows_out'], 'row')}, "
        f"{_count(summary['errors'], 'error')}) in "
        f"{summary['seconds']:.1f} s: {summary['images_per_s']:.1f} img/s on {summary['device']}{resumed}; "
        f"output {summary['output']}: {_count(t['rows_in'], 'image')}, {_count(t['rows_out'], 'row')}, "
        f"{_count(t['errors'], 'error')} in {_count(t['files'], 'file')}"
    )


__all__ = ["InputFile", "Job", "RunConfig", "RunSetupError", "SourceError", "prepare", "run_job", "summary_line"]
