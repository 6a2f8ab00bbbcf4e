"""Scale-out on Ray Data: the job of ``gradcam-batch run`` on several GPUs or several machines.

The same job as the single-machine pipeline, run as a Ray Data pipeline::

    ray.data.read_parquet(files).select_columns(needed)      # projection pushed into the read
      -> map_batches(ExplainBatches, batch_format="pyarrow",
                     compute=ActorPoolStrategy(size=N), num_gpus=G)   # one Explainer per actor
      -> write_parquet(staging dir)                            # the output schema of the sink

Nothing here computes a Grad-CAM or an output column itself. Each actor loads the model once
(``engine.models.load_model``), decodes with the source's ``decode_image``/``Preprocess`` (through
``ParquetSource``'s per-image loader, so paths and Hugging Face structs work the same), runs the
per-batch half of ``engine.pipeline.Job`` (class selection, label slot, ``Explainer``, results to
host) and turns the result into Arrow with ``engine.sink.build_table``. The output files therefore
have exactly the single-machine schema: ``cam`` and ``heatmap`` are ``arrow.fixed_shape_tensor``
(not Ray's own tensor extension), and bad images are ``status="error"`` rows.

Two entry points:

- ``explain_dataset(ds, model=..., top_k=..., ...)``: for a ``ray.data.Dataset`` already in hand;
  returns a lazy Dataset of output rows (write it, or iterate it).
- ``run_ray(RunConfig(...), RayOptions(...))``: what ``gradcam-batch run --ray`` calls.

Resume: our own manifest, not Ray's checkpointing. Ray Data's ``CheckpointConfig`` needs a unique
id column present in the *input* and filters input rows by it; default ids here are made up
(``<file>:<row>``) and one input row becomes several output rows, so it does not fit. Instead the
input files are processed in *commit groups* (whole files, at least ``commit_rows`` pending rows
each). A group is one Ray execution that writes into ``.ray-staging-N/``; when it has finished, its
files are renamed to ``part-NNNNN.parquet`` and one manifest rewrite lists all of them together
with every unit of the group's files. That rewrite is the commit point, exactly as in the sink: a
rerun deletes staging directories and unlisted part files and skips the committed units. The
manifest is the sink's (same format and fingerprint), so a run begun on one machine can be
resumed with ``--ray`` and the other way round.

Row identity: Ray Data has no row-index column, and ``include_paths=True`` would overwrite an
input column named ``path`` (a common name for image paths). But the default id
(``<file>:<row>``), the row ranges of ``--limit`` or of a partly done file, and relative image
paths need each row's file and row. ``include_row_hash=True`` gives a hash of (file path, row
position); in Ray 2.60 it is the splitmix64 finalizer of ``md5(path)[:8] + row``, a bijection, so
``_unmix`` undoes it and the row's file is the one whose seed leaves a position inside that file
(``ExplainBatches._locate``; the driver checks that no two seeds of a group are closer than a
file's length, so the answer is unique). A row that matches no file stops the run with one line
asking for ``--id-column``: that is what a Ray version with another hash would cause. With an id
column, byte images and whole files, the hash is not read at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from gradcam_batch.engine.pipeline import (
    Job,
    RunConfig,
    RunSetupError,
    check_column_roles,
    prepare,
    resolve_device,
    versions,
)
from gradcam_batch.engine.sink import (
    HEATMAP_DTYPES,
    Manifest,
    ResultBatch,
    build_table,
    clean_uncommitted,
    fsync_path,
    next_part_index,
    output_schema,
    own_files,
)
from gradcam_batch.engine.source import (
    DecodedBatch,
    InputFile,
    ParquetSource,
    Preprocess,
    Unit,
    assemble_images,
    detect_image_column,
    image_kind,
)

PATH_COLUMN = "path"  # what read_parquet(include_paths=True) adds
ROW_HASH_COLUMN = "row_hash"  # what read_parquet(include_row_hash=True) adds
STAGING_PREFIX = ".ray-staging-"
DEFAULT_COMMIT_ROWS = 100_000  # per actor: a commit group is this many pending rows per actor at least
_NO_UNIT = Unit(file_index=0, row_group=0, start=0, stop=0, key="")

# splitmix64 finalizer constants (Steele, Lea & Flood 2014) and their inverses modulo 2**64.
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_UNMIX1, _UNMIX2 = pow(_MIX1, -1, 1 << 64), pow(_MIX2, -1, 1 << 64)


class RayNotInstalled(RunSetupError):
    """``--ray`` without Ray."""


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise RayNotInstalled("Ray is not installed; install the extra: pip install 'gradcam-batch[ray]'") from None
    return ray


@dataclass
class RayOptions:
    """How the job runs on Ray (``gradcam-batch run --ray ...``).

    ``address``: None starts a local Ray (all local GPUs and CPUs); ``"auto"`` joins the cluster
    this machine belongs to; ``"ray://host:10001"`` connects through Ray Client. Ignored when Ray
    is already initialized in this process.
    ``workers``: actors in the pool (one Explainer each). Default: the cluster's GPUs divided by
    ``num_gpus_per_worker``, or 1 on a cluster without GPUs.
    ``num_gpus_per_worker``: GPUs reserved per actor. Default: 1 when the cluster has GPUs, else 0.
    Fractions (0.5) put two actors on one GPU.
    ``num_cpus_per_worker``: CPUs reserved per actor (decode threads run inside it). Default 1.
    ``commit_rows``: pending input rows per actor in one commit group (see the module docstring).
    """

    address: str | None = None
    workers: int | None = None
    num_gpus_per_worker: float | None = None
    num_cpus_per_worker: float | None = None
    commit_rows: int = DEFAULT_COMMIT_ROWS
    quiet: bool = True  # keep Ray's INFO logging and worker output off the terminal


# -- row identity ---------------------------------------------------------------------------------


def _unxorshift(y: np.ndarray, s: int) -> np.ndarray:
    """The inverse of x -> x ^ (x >> s) on uint64: y ^ (y >> s) ^ (y >> 2s) ^ ..."""
    x = y.copy()
    t = y >> np.uint64(s)
    while t.any():
        x ^= t
        t = t >> np.uint64(s)
    return x


def _unmix(hashes: np.ndarray) -> np.ndarray:
    """Undo the splitmix64 finalizer: Ray's ``row_hash`` -> ``path seed + row position`` (mod 2**64)."""
    z = np.asarray(hashes, dtype=np.uint64)
    z = _unxorshift(z, 31)
    z = z * np.uint64(_UNMIX2)
    z = _unxorshift(z, 27)
    z = z * np.uint64(_UNMIX1)
    return _unxorshift(z, 30)


def _path_seed(path: str) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.md5(path.encode("utf-8")).digest()[:8], byteorder="little"))


def _row_positions(hashes: np.ndarray, path: str) -> np.ndarray:
    """Row positions within ``path`` from Ray's ``row_hash`` values (see the module docstring)."""
    return _unmix(hashes) - _path_seed(path)


def _seeds_separate(files: Sequence[InputFile]) -> bool:
    """True when no two files' seeds lie closer than the longest file (modulo 2**64).

    Then a hash resolves to exactly one (file, row) with the row inside that file: the lookup in
    ``ExplainBatches._locate`` cannot be ambiguous. Failing needs md5 prefixes closer than a
    file's row count, about n / 2**64 per pair.
    """
    if len(files) < 2:
        return True
    seeds = sorted(int(_path_seed(f.path)) for f in files)
    gaps = [b - a for a, b in zip(seeds[:-1], seeds[1:], strict=True)] + [seeds[0] + (1 << 64) - seeds[-1]]
    return min(gaps) > max(f.num_rows for f in files)


# -- the per-actor state ----------------------------------------------------------------------------


@dataclass
class BatchSpec:
    """Everything an actor needs to explain batches; built on the driver, pickled to the actors."""

    config: RunConfig
    image_column: str
    keep_columns: list[str]
    classes: list[int] | None
    top_k: int | None
    slots: int
    prep: Preprocess
    target_layer: str
    cam_shape: tuple[int, int]
    heatmap_shape: tuple[int, int] | None
    schema: pa.Schema
    image_kind: str
    # The input files a batch can come from: each row's file is found from its row hash. A
    # file resolves relative image paths and gives the default id's key.
    files: list[InputFile] = field(default_factory=list)
    # Row ranges [start, stop) to explain, by index into ``files``; a file not listed goes whole.
    wanted: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    decode_threads: int | None = None

    @property
    def needs_row_index(self) -> bool:
        """Whether rows must be traced to their file and row (else the hash is not read at all)."""
        return self.config.id_column is None or bool(self.wanted) or self.image_kind != "bytes"

    def input_columns(self, available: Sequence[str]) -> list[str]:
        cols = [self.image_column, *(c for c in (self.config.id_column, self.config.label_column) if c)]
        cols += self.keep_columns
        cols += [c for c in (PATH_COLUMN, ROW_HASH_COLUMN) if c in available]
        return list(dict.fromkeys(cols))


class _BatchJob(Job):
    """The per-batch half of ``Job`` (``_launch``/``_finish``/``_probe``) without the file half.

    ``Job.__init__`` validates files and the output directory; an actor has neither, so this
    constructor sets the attributes those methods read and loads the model, nothing else.
    """

    def __init__(self, spec: BatchSpec, device, *, target_layer: str | None = None):
        from gradcam_batch.engine.explainer import Explainer
        from gradcam_batch.engine.models import load_model

        c = spec.config
        self.config = c
        self.prep = spec.prep
        self.classes = spec.classes
        self.top_k = spec.top_k
        self.slots = spec.slots
        self.cam_shape = spec.cam_shape
        self.heatmap_shape = spec.heatmap_shape
        self.device = device
        self.model = load_model(c.model, weights=c.weights, num_classes=c.num_classes, device=device)
        self.explainer = Explainer(
            self.model,
            target_layer=target_layer or spec.target_layer or None,  # "": not resolved yet
            method=c.method,
            compile=c.compile,
            precision=c.precision,
        )


class _Capture:
    """Stands in for the ``HeatmapWriter`` that ``Job._finish`` hands its ``ResultBatch`` to."""

    def __init__(self):
        self.batch: ResultBatch | None = None

    def put(self, batch: ResultBatch) -> None:
        self.batch = batch


class ExplainBatches:
    """The Ray Data callable class: pyarrow batch of input rows -> pyarrow table of output rows.

    One instance per actor; the model is loaded once, in ``__init__``.
    """

    def __init__(self, spec: BatchSpec):
        self.spec = spec
        self.device = resolve_device(spec.config.device)
        self.job = _BatchJob(spec, self.device)
        files = spec.files or [_virtual_file(spec)]
        self._seeds = [(_path_seed(f.path), f.num_rows) for f in spec.files]
        self.source = ParquetSource(
            files,
            spec.image_column,
            [],
            spec.prep,
            batch_size=spec.config.batch_size,
            workers=spec.decode_threads,
            device_jpeg=spec.config.device_jpeg,
        )
        self.default_file = _virtual_file(spec)
        self.pool = ThreadPoolExecutor(self.source.workers, thread_name_prefix="gradcam-decode")

    def __call__(self, batch: pa.Table) -> pa.Table:
        spec = self.spec
        n = batch.num_rows
        file_of: list[InputFile] = [self.default_file] * n
        rows = np.full(n, -1, np.int64)
        keep = np.ones(n, dtype=bool)
        if spec.needs_row_index and ROW_HASH_COLUMN in batch.column_names:
            hashes = batch.column(ROW_HASH_COLUMN).to_numpy()
            if spec.files:
                fidx, rows = self._locate(hashes)
                file_of = [spec.files[i] for i in fidx.tolist()]
                for i, ranges in spec.wanted.items():
                    sel = np.flatnonzero(fidx == i)
                    inside = np.zeros(len(sel), dtype=bool)
                    for start, stop in ranges:
                        inside |= (rows[sel] >= start) & (rows[sel] < stop)
                    keep[sel] = inside
            elif PATH_COLUMN in batch.column_names:  # a user's Dataset from read_parquet(include_paths=True)
                paths = batch.column(PATH_COLUMN).combine_chunks().dictionary_encode()
                codes = paths.indices.to_numpy(zero_copy_only=False)
                for code, path in enumerate(paths.dictionary.to_pylist()):
                    sel = np.flatnonzero(codes == code)
                    f = _file_for(path, spec)
                    for i in sel:
                        file_of[i] = f
                    rows[sel] = _row_positions(hashes[sel], path).astype(np.int64)
        if spec.config.id_column is None and (rows < 0).any():
            raise RuntimeError(
                "rows without a file path and row position: give id_column=, or read the dataset with "
                "read_parquet(..., include_paths=True, include_row_hash=True)"
            )
        if not keep.all():
            idx = np.flatnonzero(keep)
            batch = batch.take(pa.array(idx))
            file_of = [file_of[i] for i in idx]
            rows = rows[idx]
        if batch.num_rows == 0:
            return spec.schema.empty_table()

        values = batch.column(spec.image_column).to_pylist()
        results = list(self.pool.map(self.source._decode_one, zip(values, file_of, strict=True)))
        # with device_jpeg, the JPEGs are decoded by Job._launch on the device
        images, ok, jpegs = assemble_images(results, spec.prep.out_size)
        db = DecodedBatch(
            unit=_NO_UNIT,
            unit_done=False,
            rows=batch.drop_columns([spec.image_column]),
            row_index=rows,
            images=images,
            ok=ok,
            errors=[r[1] for r in results],
            jpegs=jpegs,
        )
        capture = _Capture()
        item = self.job._launch(db, self._row_table(batch, file_of, rows))
        self.job._finish(item, capture, {"images": 0, "errors": 0, "rows_out": 0}, None)
        assert capture.batch is not None
        return build_table(capture.batch, spec.schema)

    def _locate(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index into spec.files, row within that file) of every row, from Ray's row hashes."""
        z = _unmix(hashes)
        fidx = np.full(len(z), -1, np.int64)
        rows = np.zeros(len(z), np.int64)
        for i, (seed, limit) in enumerate(self._seeds):
            pos = z - seed
            hit = pos < np.uint64(limit)
            fidx[hit] = i
            rows[hit] = pos[hit].astype(np.int64)
        if (fidx < 0).any():
            raise RuntimeError(
                f"cannot trace rows to their input file from Ray's row_hash (Ray {_ray_version()} hashes "
                "differently from Ray 2.60); pass --id-column, and no --limit, to run without it"
            )
        return fidx, rows

    def _row_table(self, batch: pa.Table, file_of: list[InputFile], rows: np.ndarray) -> pa.Table:
        """id, kept columns, label: what ``Job._row_table`` makes, with the file known per row."""
        c = self.spec.config
        if c.id_column:
            ids = batch.column(c.id_column)
        else:
            ids = pa.array([f"{f.key}:{r}" for f, r in zip(file_of, rows.tolist(), strict=True)], pa.string())
        cols, names = [ids], ["id"]
        for k in self.spec.keep_columns:
            cols.append(batch.column(k))
            names.append(k)
        if c.label_column:
            cols.append(batch.column(c.label_column))
            names.append("label")
        return pa.Table.from_arrays(cols, names=names)


def _ray_version() -> str:
    try:
        import ray

        return ray.__version__
    except ImportError:
        return "?"


def _virtual_file(spec: BatchSpec) -> InputFile:
    """A stand-in input file for rows without a path: relative image paths resolve from the cwd."""
    schema = pa.schema([pa.field(spec.image_column, _KIND_TYPES[spec.image_kind])])
    return InputFile("", os.path.join(os.getcwd(), "_"), pafs.LocalFileSystem(), "", True, (), schema)


_KIND_TYPES = {
    "bytes": pa.binary(),
    "path": pa.string(),
    "struct": pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
}


def _file_for(path: str, spec: BatchSpec) -> InputFile:
    """An input file that the spec does not list (a user's own Ray Dataset): its path is its key."""
    if "://" in path:
        fs, p = pafs.FileSystem.from_uri(path)
        local = False
    else:
        fs, p, local = pafs.LocalFileSystem(), path, True
    schema = pa.schema([pa.field(spec.image_column, _KIND_TYPES[spec.image_kind])])
    return InputFile(path, p, fs, path, local, (), schema)


# -- planning ---------------------------------------------------------------------------------------


def spec_from_job(job: Job, config: RunConfig) -> BatchSpec:
    """The actor spec of a prepared single-machine job: the same classes, layer, shapes and schema."""
    return BatchSpec(
        config=config,
        image_column=job.image_column,
        keep_columns=list(job.keep_columns),
        classes=job.classes,
        top_k=job.top_k,
        slots=job.slots,
        prep=job.prep,
        target_layer=job.target_layer,
        cam_shape=job.cam_shape,
        heatmap_shape=job.heatmap_shape,
        schema=job.schema(),
        image_kind=image_kind(job.files[0].schema.field(job.image_column).type),
        files=list(job.files),
    )


def spec_from_schema(config: RunConfig, schema: pa.Schema) -> BatchSpec:
    """The actor spec for a user's Dataset: the checks of ``prepare`` that do not need files.

    The model is loaded once here, on the CPU, to find the target layer, class count and cam size.
    """
    import torch

    c = config
    if c.top_k is not None and c.top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {c.top_k}")
    if c.top_k is not None and c.classes:
        raise ValueError("give either top_k or classes, not both")
    if not isinstance(c.batch_size, int) or c.batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {c.batch_size!r}")
    if c.heatmap_dtype not in HEATMAP_DTYPES:
        raise ValueError(f"heatmap_dtype must be one of {', '.join(HEATMAP_DTYPES)}, got {c.heatmap_dtype!r}")
    classes = list(dict.fromkeys(int(k) for k in c.classes)) if c.classes else None
    if classes and min(classes) < 0:
        raise ValueError(f"class indices must be >= 0, got {min(classes)}")
    top_k = c.top_k if c.top_k is not None else (None if (classes or c.label_column) else 1)
    prep = Preprocess(resize=c.resize, crop=c.crop, mean=tuple(c.mean), std=tuple(c.std))
    image_column = c.image_column or detect_image_column(schema)
    keep = list(dict.fromkeys(c.keep_columns))
    for role, name in [("image", image_column), ("id", c.id_column), ("label", c.label_column)] + [
        ("kept", k) for k in keep
    ]:
        if name is not None and name not in schema.names:
            raise ValueError(f"{role} column {name!r} not found; the dataset's columns are: {', '.join(schema.names)}")
    check_column_roles(schema, image_column=image_column, keep=keep, label_column=c.label_column)
    kind = image_kind(schema.field(image_column).type)
    if ROW_HASH_COLUMN in schema.names and PATH_COLUMN in keep:
        raise ValueError(
            "'path' holds the file path that read_parquet(include_paths=True) added (it overwrites an input "
            "column of that name); it cannot be kept"
        )
    slots = (len(classes) if classes else (top_k or 0)) + (1 if c.label_column else 0)

    probe_spec = BatchSpec(
        config=dataclasses.replace(c, compile=False),
        image_column=image_column,
        keep_columns=keep,
        classes=classes,
        top_k=top_k,
        slots=slots,
        prep=prep,
        target_layer="",
        cam_shape=(0, 0),
        heatmap_shape=None,
        schema=pa.schema([]),
        image_kind=kind,
    )
    probe = _BatchJob(probe_spec, torch.device("cpu"), target_layer=c.target_layer)
    try:
        probe._probe()
    except RunSetupError as exc:
        raise ValueError(str(exc)) from None
    out = output_schema(
        id_type=schema.field(c.id_column).type if c.id_column else pa.string(),
        passthrough=[schema.field(k) for k in keep],
        label_type=schema.field(c.label_column).type if c.label_column else None,
        cam_shape=probe.cam_shape,
        heatmap_shape=probe.heatmap_shape,
        heatmap_dtype=c.heatmap_dtype,
    )
    return dataclasses.replace(
        probe_spec,
        config=c,
        target_layer=probe.target_layer,
        cam_shape=probe.cam_shape,
        heatmap_shape=probe.heatmap_shape,
        schema=out,
    )


def _pool(ray, options: RayOptions, device: str = "auto") -> tuple[int, float]:
    """(actors, GPUs per actor) from the options and what the cluster has."""
    gpus_total = float(ray.cluster_resources().get("GPU", 0.0))
    per = options.num_gpus_per_worker
    if per is None:
        per = 1.0 if gpus_total >= 1 and not device.startswith("cpu") else 0.0
    if per == 0 and device.startswith("cuda"):
        raise RunSetupError(f"--device {device} needs GPUs per worker (--num-gpus-per-worker), and GPUs in the cluster")
    if per < 0:
        raise RunSetupError(f"GPUs per worker must be >= 0, got {per}")
    if per > 0 and gpus_total < per:
        raise RunSetupError(f"{per:g} GPUs per worker asked for, but the Ray cluster has {gpus_total:g} GPUs")
    workers = options.workers
    if workers is None:
        workers = max(1, int(gpus_total // per)) if per > 0 else 1
    if workers < 1:
        raise RunSetupError(f"workers must be a positive integer, got {workers}")
    if per > 0 and workers * per > gpus_total + 1e-9:
        raise RunSetupError(
            f"{workers} workers x {per:g} GPUs need {workers * per:g} GPUs; the Ray cluster has {gpus_total:g}"
        )
    return workers, per


def _arrow_schema(ds) -> pa.Schema:
    schema = ds.schema()
    if schema is None:
        raise ValueError("the dataset has no schema (is it empty?)")
    base = getattr(schema, "base_schema", schema)
    if not isinstance(base, pa.Schema):
        raise ValueError("the dataset is not Arrow-backed; read it with ray.data.read_parquet or map it to Arrow")
    return base


def _map(ds, spec: BatchSpec, workers: int, gpus: float, cpus: float | None):
    from ray.data import ActorPoolStrategy

    ds = ds.select_columns(spec.input_columns(_arrow_schema(ds).names))
    kwargs = {"num_gpus": gpus} if gpus else {}
    if cpus is not None:
        kwargs["num_cpus"] = cpus
    return ds.map_batches(
        ExplainBatches,
        fn_constructor_kwargs={"spec": spec},
        batch_size=spec.config.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=workers),
        **kwargs,
    )


def explain_dataset(
    ds,
    config: RunConfig | None = None,
    *,
    workers: int | None = None,
    num_gpus_per_worker: float | None = None,
    num_cpus_per_worker: float | None = None,
    **options,
):
    """Explain the images of a Ray Dataset; returns a lazy ``ray.data.Dataset`` of output rows.

    The rows and their schema are those of ``gradcam-batch run`` (see the README's output
    schema); write them with ``.write_parquet(dir)`` or consume them with ``.iter_batches()``.

    Args:
        ds: a ``ray.data.Dataset`` with an image column (encoded bytes, a Hugging Face
            ``struct<bytes, path>`` image, or paths/URIs), e.g. from ``ray.data.read_parquet``.
        config: a ``RunConfig``; its ``inputs``/``output``/resume fields are ignored. Or give
            the same fields as keywords: ``model=``, ``weights=``, ``top_k=``, ``classes=``,
            ``label_column=``, ``image_column=``, ``id_column=``, ``keep_columns=``, ``resize=``,
            ``crop=``, ``mean=``, ``std=``, ``batch_size=``, ``device=``, ``precision=``,
            ``heatmap_size=``, ``heatmap_dtype=``, ...
        workers: actors in the pool (one Explainer, one model copy each). Default: the cluster's
            GPUs divided by ``num_gpus_per_worker``, or 1 without GPUs.
        num_gpus_per_worker: GPUs per actor; default 1 on a cluster with GPUs, else 0.
        num_cpus_per_worker: CPUs per actor (decode threads run in it); Ray's default is 1.

    Ids: ``id_column`` when given; otherwise ``<file path>:<row>``, which needs the dataset to come
    from ``read_parquet(..., include_paths=True, include_row_hash=True)``.

    Ray must be initialized (``ray.init()``) or it starts a local one, as Ray Data always does.
    """
    ray = _import_ray()
    if config is None:
        if "model" not in options:
            raise ValueError("explain_dataset needs a model: model='torchvision:resnet50' or a RunConfig")
        config = RunConfig(inputs=(), output="", **options)
    elif options:
        config = dataclasses.replace(config, **options)
    spec = spec_from_schema(config, _arrow_schema(ds))
    if not ray.is_initialized():
        ray.init()  # what Ray Data would do on the first execution; the pool size needs the cluster now
    n_workers, gpus = _pool(ray, RayOptions(workers=workers, num_gpus_per_worker=num_gpus_per_worker), config.device)
    return _map(ds, spec, n_workers, gpus, num_cpus_per_worker)


# -- the run ----------------------------------------------------------------------------------------


def _quiet_ray_data() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False
    # Ray Data logs every execution at INFO and warns that its bars are off.
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _groups(job: Job, pending_units: list[Unit], per_group_rows: int) -> list[list[int]]:
    """Consecutive input files (indices) with pending units, cut into groups of >= per_group_rows."""
    rows_by_file: dict[int, int] = {}
    for u in pending_units:
        rows_by_file[u.file_index] = rows_by_file.get(u.file_index, 0) + u.rows
    groups: list[list[int]] = []
    current: list[int] = []
    acc = 0
    for fi in sorted(rows_by_file):
        current.append(fi)
        acc += rows_by_file[fi]
        if acc >= per_group_rows:
            groups.append(current)
            current, acc = [], 0
    if current:
        groups.append(current)
    return groups


def _wanted(job: Job, files: list[int], pending_units: list[Unit]) -> dict[int, list[tuple[int, int]]]:
    """Row ranges by position in ``files``, for the files of a group that are not wanted whole."""
    wanted: dict[int, list[tuple[int, int]]] = {}
    for pos, fi in enumerate(files):
        ranges = sorted((u.start, u.stop) for u in pending_units if u.file_index == fi)
        merged: list[tuple[int, int]] = []
        for start, stop in ranges:
            if merged and merged[-1][1] == start:
                merged[-1] = (merged[-1][0], stop)
            else:
                merged.append((start, stop))
        if merged != [(0, job.files[fi].num_rows)]:
            wanted[pos] = merged
    return wanted


def _file_stats(path: Path) -> dict:
    """rows, images and error rows of one written part file."""
    t = pq.read_table(path, columns=["class_rank", "status"])
    rank0 = pc.sum(pc.equal(t.column("class_rank"), 0)).as_py() or 0
    errors = pc.sum(pc.equal(t.column("status"), "error")).as_py() or 0
    # An error row has a null rank: each image is one rank-0 row or one error row.
    return {"rows": t.num_rows, "images": int(rank0 + errors), "errors": int(errors)}


def _commit_group(manifest: Manifest, out_dir: Path, staging: Path, units: list[str]) -> dict:
    """Move a finished group's files into place and list them, and its units, in one manifest write."""
    written = sorted(p for p in staging.iterdir() if p.is_file() and p.name.endswith(".parquet"))
    part = next_part_index(manifest)
    entries = []
    for p in written:
        fsync_path(p)
        name = f"part-{part:05d}.parquet"
        os.replace(p, out_dir / name)
        entries.append({"name": name, **_file_stats(out_dir / name), "units": []})
        part += 1
    fsync_path(out_dir)
    if not entries:
        raise RuntimeError(f"Ray wrote no files for {len(units)} units")
    # The units go with the group's last file: the group is committed as a whole or not at all.
    entries[-1]["units"] = list(units)
    data = manifest.data
    data["files"].extend(entries)
    data["completed_units"].extend(units)
    totals = data["totals"]
    for e in entries:
        totals["rows_in"] += e["images"]
        totals["images_ok"] += e["images"] - e["errors"]
        totals["errors"] += e["errors"]
        totals["rows_out"] += e["rows"]
    totals["files"] = len(data["files"])
    manifest.save()
    shutil.rmtree(staging, ignore_errors=True)
    return {k: sum(e[k] for e in entries) for k in ("rows", "images", "errors")}


def _clean_staging(out_dir: Path) -> list[str]:
    removed = []
    if out_dir.is_dir():
        for p in sorted(out_dir.iterdir()):
            if p.is_dir() and p.name.startswith(STAGING_PREFIX):
                shutil.rmtree(p)
                removed.append(p.name)
    return removed


_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)): (.+)$")


def _first_line(exc: BaseException) -> str:
    """The original error behind a Ray error, in one line.

    Ray wraps an actor's exception several times (``ActorDiedError`` -> ``RayTaskError`` -> ...),
    each with the remote traceback in its text; the original ``Type: message`` line is the last
    one there whose type is not one of Ray's.
    """
    texts, seen, todo = [], set(), [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        texts.append(str(e))
        todo += [x for x in (e.__cause__, e.__context__, getattr(e, "cause", None)) if isinstance(x, BaseException)]
    found = None
    for text in texts:
        for line in text.splitlines():
            m = _ERROR_LINE.match(line.strip())
            if m and not m.group(1).startswith("ray.") and m.group(1) not in ("SystemException",):
                found = m
    if found is not None:
        name, message = found.group(1).rsplit(".", 1)[-1], found.group(2)
        # The engine's own errors already read as one line; others keep their type.
        return (
            message
            if name in ("RunSetupError", "ModelSpecError", "SourceError", "TargetLayerError")
            else (f"{name}: {message}")
        )
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class RayJob:
    """A validated ``--ray`` run; ``run()`` executes it. Made by ``prepare_ray``.

    ``manifest`` is the manifest found in the output directory (or None), as on ``Job``.
    """

    def __init__(self, config: RunConfig, options: RayOptions, log: Callable[[str], None] | None = None):
        self.config = config
        self.options = options
        self.log = log
        self.ray = ray = _import_ray()
        if options.commit_rows < 1:
            raise RunSetupError(f"commit rows must be a positive integer, got {options.commit_rows}")
        # The driver probes the model on the CPU: it must not hold GPU memory that an actor needs,
        # and a Ray Client driver may have no GPU at all.
        self.job = prepare(dataclasses.replace(config, device="cpu", compile=False, workers=None))
        if config.device != "auto" and not config.device.startswith(("cpu", "cuda")):
            raise RunSetupError(f"unsupported device {config.device!r}; expected auto, cpu, cuda or cuda:N")
        if len({type(f.filesystem).__name__ for f in self.job.files}) > 1:
            raise RunSetupError("with --ray all inputs must be on one filesystem (all local, or one URI scheme)")
        # --workers counts actors here; each actor decodes with its own default thread count.
        self.spec = spec_from_job(self.job, dataclasses.replace(config, workers=None))
        self.manifest = self.job.manifest
        self._started = False
        if not ray.is_initialized():
            level = logging.ERROR if options.quiet else logging.INFO
            init = {"address": options.address, "include_dashboard": False, "logging_level": level}
            if options.quiet:
                init["log_to_driver"] = False
            try:
                ray.init(**init)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise RunSetupError(
                    f"cannot start or reach Ray at {options.address or 'local'}: {_first_line(exc)}"
                ) from None
            self._started = True
        try:
            if options.quiet:
                _quiet_ray_data()
            if config.progress:
                from ray.data import DataContext

                DataContext.get_current().enable_progress_bars = True
            self.workers, self.gpus = _pool(ray, options, config.device)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Shut down the Ray that this job started (not one that was running before)."""
        if self._started:
            self.ray.shutdown()
            self._started = False

    def run(self) -> dict:
        """Explain every pending unit; returns the summary (the keys of ``Job.run``'s)."""
        try:
            return _run_groups(self)
        finally:
            self.close()


def prepare_ray(config: RunConfig, options: RayOptions | None = None, *, log=None) -> RayJob:
    """Validate a ``--ray`` run (raises ``RunSetupError``, writes nothing) and start or join Ray.

    Everything ``prepare`` checks is checked here too, on this machine. Inputs and the output
    directory must be reachable from every Ray node: a shared filesystem or URIs for the inputs,
    a shared filesystem for the output. ``log`` receives one line per committed group.
    """
    return RayJob(config, options or RayOptions(), log)


def run_ray(config: RunConfig, options: RayOptions | None = None, *, log: Callable[[str], None] | None = None) -> dict:
    """``gradcam-batch run --ray``: the job on Ray Data; returns the summary of ``Job.run``."""
    return prepare_ray(config, options, log=log).run()


def _run_groups(rj: RayJob) -> dict:
    ray, job, config, spec, options = rj.ray, rj.job, rj.config, rj.spec, rj.options
    workers, gpus, log = rj.workers, rj.gpus, rj.log
    t_start = time.perf_counter()
    out_dir = job.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    removed = _clean_staging(out_dir)
    manifest = job.manifest
    if config.overwrite:
        for p in own_files(out_dir):
            p.unlink()
        manifest = None
    device = f"ray ({workers} x {gpus:g} GPU)" if gpus else f"ray ({workers} x CPU)"
    if manifest is None:
        for p in own_files(out_dir):  # leftovers of a run killed before its first manifest
            p.unlink()
        cfg = job.manifest_config()
        cfg.update(device=config.device, compile=config.compile)
        manifest = Manifest.new(out_dir, fingerprint=job.fingerprint, config=cfg, versions=versions(job.device))
    else:
        removed += clean_uncommitted(out_dir, manifest)
    manifest.data["status"] = "running"
    manifest.data["versions"] = {**versions(job.device), "ray": ray.__version__, "runner": device}
    manifest.save()

    done = manifest.completed_units()
    pending = [u for u in job.units if u.key not in done]
    groups = _groups(job, pending, options.commit_rows * workers)
    session = {"images": 0, "errors": 0, "rows_out": 0}
    for gi, file_idx in enumerate(groups):
        group_units = [u for u in pending if u.file_index in set(file_idx)]
        files = [job.files[i] for i in file_idx]
        gspec = dataclasses.replace(spec, files=files, wanted=_wanted(job, file_idx, group_units))
        if gspec.needs_row_index and not _seeds_separate(files):
            raise RuntimeError("two input files' row hashes could collide; run them in separate runs")
        staging = out_dir / f"{STAGING_PREFIX}{gi:05d}"
        try:
            ds = ray.data.read_parquet(
                [f.path for f in files],
                filesystem=files[0].filesystem,
                partitioning=None,
                include_row_hash=gspec.needs_row_index,
                file_extensions=None,
            )
            out = _map(ds, gspec, workers, gpus, options.num_cpus_per_worker)
            out.write_parquet(str(staging), min_rows_per_file=config.rows_per_file, compression="zstd")
        except (RunSetupError, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise RuntimeError(_first_line(exc)) from None
        stats = _commit_group(manifest, out_dir, staging, [u.key for u in group_units])
        session["images"] += stats["images"]
        session["errors"] += stats["errors"]
        session["rows_out"] += stats["rows"]
        if log is not None:
            log(
                f"group {gi + 1}/{len(groups)}: {stats['images']} images, {stats['rows']} rows, "
                f"{stats['errors']} errors committed"
            )

    seconds = time.perf_counter() - t_start
    rate = session["images"] / seconds if seconds > 0 else 0.0
    throughput = {"images": session["images"], "seconds": round(seconds, 3), "images_per_s": round(rate, 2)}
    manifest.data["sessions"].append({**throughput, "device": device, "ended": time.time()})
    manifest.data["throughput"] = throughput
    manifest.data["status"] = "complete"
    manifest.save()
    return {
        "output": str(out_dir),
        "status": "complete",
        "images": session["images"],
        "errors": session["errors"],
        "rows_out": session["rows_out"],
        "seconds": round(seconds, 3),
        "images_per_s": round(rate, 2),
        "resumed_units": len(job.units) - len(pending),
        "removed_partial_files": removed,
        "totals": dict(manifest.data["totals"]),
        "target_layer": job.target_layer,
        "device": device,
        "groups": len(groups),
    }


__all__ = [
    "BatchSpec",
    "ExplainBatches",
    "RayNotInstalled",
    "RayJob",
    "RayOptions",
    "explain_dataset",
    "prepare_ray",
    "run_ray",
    "spec_from_job",
    "spec_from_schema",
]
