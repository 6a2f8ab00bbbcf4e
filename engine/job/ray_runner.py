"""The Ray Data runner: the job of ``gradcam-batch run`` on several GPUs or several machines.

It is driven by the plan's units (``RunPlan.units``: row ranges of the input files)::

    ray.data.from_items(read_tasks(pending units))         # one item per row group with pending units
      -> map_batches(read_units, num_cpus=0, <= 2 tasks per node)
                                                           # Ray tasks: pyarrow streams each row group
                                                           #   once, one table of undecoded rows per unit
      -> repartition(target_num_rows_per_block=4 batches)   # so that the decode spreads over tasks
      -> map_batches(decode_rows, num_cpus=R)              # Ray tasks: Pillow decodes a batch of rows in
                                                           #   a pool of R threads (ParquetSource)
      -> map_batches(ExplainActor, compute=ActorPoolStrategy(size=N), num_gpus=G, num_cpus=W)
                                                           # one BatchExplainer (the batch step) per actor
      -> iter_batches() on the driver, in input order -> UnitAssembler -> HeatmapWriter

Each row carries its unit and its row number from the read, so its file, its default id and the
unit it completes are known exactly. Warnings raised in an actor (a decode fallback, a compile
fallback) ride on its next output rows to the driver, which says each once, as the local runner
does; Ray's own log forwarding is off by default. The driver writes a unit once all its rows are back, through
the same ``HeatmapWriter`` and manifest as the local runner (``engine/job/local.py``): resume works
per unit, and each runner resumes the other's output. The driver holds the output directory's lock.

Reads: a unit is not a read task of its own. pyarrow cannot start a read inside a row group, so a
task per unit would stream its row group from the first row up to the unit: O(units^2) rows for a
big row group. One task streams a row group once, and the decode tasks take its rows as they come,
so a single huge row group still decodes on every node's CPUs.

Order and driver memory: Ray Data is asked to keep the input order (``preserve_order``), so the
output rows reach the driver unit after unit. The driver holds the rows of one incomplete unit at
a time (at most ``DRIVER_UNITS_HELD``; more stops the run), and writes units in input order, as
the local runner does. Rows that finish early wait in Ray's object store, which Ray bounds and
spills, not in the driver's memory.

Why decode is its own stage, apart from the GPU actors (as in Ray's batch-inference examples):
decoding is CPU work that scales with the CPUs of every node, while the actors are as many as the
GPUs. In one stage a GPU would wait for its actor's few decode threads; separate, Ray runs as
many decode tasks as the cluster's free CPUs allow and streams uint8 pixels (a quarter of float32)
to the actors. The cost is the pixels' trip through the object store, small beside a forward pass.

``explain_dataset(ds, ...)`` is the API for a Ray Dataset already in hand: the same two stages
over its rows, returning a lazy Dataset of output rows. Its rows have no file and row number, so
it needs an id column.

One module past 500 lines: the stages, the resource check and the driver loop are one runner, and
nothing outside Ray imports them.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from gradcam_batch.engine.errors import first_line
from gradcam_batch.engine.job.config import RunConfig, RunSetupError, RunWarning
from gradcam_batch.engine.job.inputs import InputFile, Unit
from gradcam_batch.engine.job.plan import RunPlan, build_plan, plan_for_schema
from gradcam_batch.engine.job.session import OutputSession, execute, existing_manifest, is_transient
from gradcam_batch.engine.job.source import DecodedBatch, ParquetSource, assemble_images, result_sizes
from gradcam_batch.source_root import drop_source_root

# Columns that travel between the stages beside the input's own (check_column_roles keeps "__" names out).
UNIT, ROW, ERROR, PIXELS, JPEG, FIRST, SIZE = "__unit", "__row", "__error", "__pixels", "__jpeg", "__first", "__size"
WARNINGS = "__warnings"  # an actor's new warnings, as JSON [[category, key, message], ...] on one row
_INTERNAL = (UNIT, ROW, FIRST, WARNINGS)
_NO_UNIT = -1  # rows of a user's Dataset
DECODE_BLOCK_BATCHES = 4  # rows of one decode task, in batches


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
    this machine belongs to; ``"HOST:PORT"`` or ``"ray://HOST:10001"`` names one. Ignored when
    Ray is already initialized in this process.
    ``workers``: actors in the pool (one model each). Default: the cluster's GPUs divided by
    ``num_gpus_per_worker``, or 1 on a cluster without GPUs.
    ``num_gpus_per_worker``: GPUs per actor. Default: 1 when the cluster has GPUs, else 0.
    ``num_cpus_per_worker``: CPUs per actor. Default 1.
    ``num_cpus_per_read``: CPUs per decode task (its decode threads). Default 1. The read tasks,
    which only stream Parquet rows, reserve none.
    """

    address: str | None = None
    workers: int | None = None
    num_gpus_per_worker: float | None = None
    num_cpus_per_worker: float | None = None
    num_cpus_per_read: float | None = None
    quiet: bool = True  # keep Ray's INFO logging and worker output off the terminal


# -- stage 1: read and decode (Ray tasks) ------------------------------------------------------------


def _decode_threads(cpus: float | None) -> int:
    return max(1, round(cpus or 1))


def encode_decoded(db: DecodedBatch, units: np.ndarray | int, plan: RunPlan) -> pa.Table:
    """A decoded batch as Arrow rows for the next stage: row columns, unit, row, error, pixels, JPEG.

    ``units``: each row's unit index (or one for all rows).
    """
    h, w = plan.prep.out_size
    size = h * w * 3
    n = db.num_rows
    ok_pos = np.flatnonzero(db.ok)
    pixels = np.zeros((n, size), np.uint8)
    if len(ok_pos):
        pixels[ok_pos] = db.images.reshape(len(ok_pos), size)
    jpegs: list[bytes | None] = [None] * n
    for pos, data in db.jpegs:
        jpegs[ok_pos[pos]] = data
    cols = {name: db.rows.column(name) for name in plan.input_columns}
    cols[UNIT] = pa.array(np.broadcast_to(np.asarray(units, np.int32), (n,)))
    cols[ROW] = pa.array(db.row_index.astype(np.int64))
    cols[ERROR] = pa.array(db.errors, pa.string())
    cols[PIXELS] = pa.FixedSizeBinaryArray.from_buffers(pa.binary(size), n, [None, pa.py_buffer(pixels)])
    cols[JPEG] = pa.array(jpegs, pa.binary())
    if db.sizes is not None:
        cols[SIZE] = pa.FixedSizeListArray.from_arrays(pa.array(db.sizes.reshape(-1).astype(np.int64)), 2)
    return pa.table(cols)


def _source(plan: RunPlan, files, cpus: float | None) -> ParquetSource:
    return plan.source.open(files, threads=_decode_threads(cpus))


def read_tasks(plan: RunPlan, pending: list[int]) -> list[dict]:
    """The read stage's items: the pending units (in order), one item per row group they fall in.

    One task reads a row group once, however many units it holds: a task per unit would stream
    the row group from its first row up to each unit, O(units^2) rows for a big row group.
    """
    tasks: list[dict] = []
    last = None
    for i in pending:
        u = plan.units[i]
        if tasks and (u.file_index, u.row_group) == last:
            tasks[-1]["units"].append(i)
        else:
            tasks.append({"units": [i]})
            last = (u.file_index, u.row_group)
    return tasks


def read_units(batch: pa.Table, *, plan: RunPlan) -> Iterator[pa.Table]:
    """Stage 1 for a planned run: items of ``read_tasks`` in, each unit's rows out, undecoded.

    A stream of tables (one per unit), so the decode tasks start on a big row group's first
    units while the rest is still being read.
    """
    drop_source_root()
    source = _source(plan, plan.files, 1)
    for group in batch.column("units").to_pylist():
        units = [plan.units[i] for i in group]
        for index, (unit, rows) in zip(group, source.unit_rows(units), strict=True):
            rows = rows.append_column(UNIT, pa.array(np.full(unit.rows, index, np.int32)))
            yield rows.append_column(ROW, pa.array(np.arange(unit.start, unit.stop, dtype=np.int64)))


def decode_rows(batch: pa.Table, *, plan: RunPlan, cpus: float | None) -> pa.Table:
    """The decode stage: rows with encoded images in (from ``read_units``, or a user's Dataset),
    decoded rows out, decoded in a pool of as many threads as the task has CPUs."""
    drop_source_root()
    n = batch.num_rows
    if UNIT in batch.column_names:
        units = batch.column(UNIT).to_numpy()
        files = [plan.files[plan.units[u].file_index] for u in units.tolist()]
        row_index = batch.column(ROW).to_numpy()
        source = _source(plan, plan.files, cpus)
    else:  # a user's Dataset: no file, no row number
        units = np.full(n, _NO_UNIT, np.int32)
        files = [_cwd_file(plan)] * n
        row_index = np.full(n, -1, np.int64)
        source = _source(plan, files[:1], cpus)
    results = source.decode_values(batch.column(plan.image_column).to_pylist(), files)
    images, ok, jpegs = assemble_images(results, plan.prep.out_size)
    db = DecodedBatch(
        unit=None,
        unit_done=False,
        rows=batch.select(plan.input_columns),
        row_index=row_index,
        images=images,
        ok=ok,
        errors=[r[1] for r in results],
        jpegs=jpegs,
        sizes=result_sizes(results) if source.want_sizes else None,
    )
    return encode_decoded(db, units, plan)


def _cwd_file(plan: RunPlan) -> InputFile:
    """A stand-in input file for rows without one: relative image paths resolve from the cwd."""
    schema = pa.schema([pa.field(plan.image_column, _KIND_TYPES[plan.image_kind])])
    return InputFile("", os.path.join(os.getcwd(), "_"), pafs.LocalFileSystem(), "", True, (), schema)


_KIND_TYPES = {
    "bytes": pa.binary(),
    "path": pa.string(),
    "struct": pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
}


# -- stage 2: the batch step (Ray actors) -------------------------------------------------------------


def decoded_batches(table: pa.Table, plan: RunPlan):
    """Stage 1's rows back into ``DecodedBatch`` objects, one per unit present (input order kept)."""
    h, w = plan.prep.out_size
    units = table.column(UNIT).to_numpy()
    for index in dict.fromkeys(units.tolist()):
        part = table.filter(pa.array(units == index)) if len(set(units.tolist())) > 1 else table
        n = part.num_rows
        errors = part.column(ERROR).to_pylist()
        ok = np.array([e is None for e in errors], dtype=bool)
        pix = part.column(PIXELS).combine_chunks()
        flat = np.frombuffer(pix.buffers()[1], np.uint8, count=(pix.offset + n) * h * w * 3)
        images = flat[pix.offset * h * w * 3 :].reshape(n, h, w, 3)[ok]
        jpeg_col = part.column(JPEG).to_pylist()
        ok_pos = np.cumsum(ok) - 1
        jpegs = [(int(ok_pos[i]), data) for i, data in enumerate(jpeg_col) if data is not None]
        yield (
            DecodedBatch(
                unit=plan.units[index] if index != _NO_UNIT else None,
                unit_done=False,
                rows=part.select(plan.input_columns),
                row_index=part.column(ROW).to_numpy(),
                images=np.ascontiguousarray(images),
                ok=ok,
                errors=errors,
                jpegs=jpegs,
                sizes=_sizes(part),
            ),
            index,
        )


def _sizes(part: pa.Table) -> np.ndarray | None:
    if SIZE not in part.column_names:
        return None
    return part.column(SIZE).combine_chunks().flatten().to_numpy().reshape(-1, 2)


class WarningRelay:
    """Warnings recorded in one process, each kind once (``RunWarning.key``, else the text), to pass on."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.pending: list[list[str]] = []

    @contextlib.contextmanager
    def record(self):
        with warnings.catch_warnings(record=True) as caught:
            try:
                yield
            finally:
                for w in caught:
                    key = getattr(w.message, "key", None) or str(w.message)
                    if key not in self.seen:
                        self.seen.add(key)
                        self.pending.append([w.category.__name__, key, str(w.message)])

    def take(self) -> list[list[str]]:
        out, self.pending = self.pending, []
        return out


def say_warning(category: str, key: str, message: str) -> None:
    """Warn on this process (the driver) as the actor did: a ``RunWarning`` keeps its key."""
    if category == RunWarning.__name__:
        warnings.warn(RunWarning(message, key), stacklevel=2)
        return
    cls = getattr(builtins, category, None)
    warnings.warn(message, cls if isinstance(cls, type) and issubclass(cls, Warning) else UserWarning, stacklevel=2)


class ExplainActor:
    """Stage 2: one ``BatchExplainer`` per actor, loaded once; decoded rows in, output rows out.

    With ``tag_rows`` (a planned run, whose driver reads the rows) the warnings raised here go to
    the driver on the output rows (``WARNINGS``); for a user's Dataset they stay with the worker.
    """

    def __init__(self, plan: RunPlan, *, tag_rows: bool = True):
        # Ray puts the driver's working directory on the workers' sys.path; from a checkout that
        # is the source root, whose kernels/ folder would shadow Hugging Face's `kernels`.
        drop_source_root()
        from gradcam_batch.engine.job.config import resolve_device
        from gradcam_batch.engine.job.step import BatchExplainer

        self.plan = plan
        self.tag_rows = tag_rows
        self.relay = WarningRelay()
        with self.relay.record() if tag_rows else contextlib.nullcontext():
            self.step = BatchExplainer(plan, resolve_device(plan.device))

    def __call__(self, table: pa.Table) -> pa.Table:
        outs = []
        with self.relay.record() if self.tag_rows else contextlib.nullcontext():
            for db, index in decoded_batches(table, self.plan):
                out = self.step(db)
                t = out.table
                if self.tag_rows:
                    src = out.source_rows
                    first = np.ones(len(src), dtype=bool)
                    first[1:] = src[1:] != src[:-1]
                    t = t.append_column(UNIT, pa.array(np.full(len(src), index, np.int32)))
                    t = t.append_column(ROW, pa.array(db.row_index[src].astype(np.int64)))
                    t = t.append_column(FIRST, pa.array(first))
                outs.append(t)
        if not outs:
            return _empty_output(self.plan, self.tag_rows)  # the warnings wait for rows to ride on
        result = pa.concat_tables(outs)
        if self.tag_rows:
            said = [None] * result.num_rows
            if result.num_rows and self.relay.pending:
                said[0] = json.dumps(self.relay.take())
            result = result.append_column(WARNINGS, pa.array(said, pa.string()))
        return result


def _empty_output(plan: RunPlan, tagged: bool) -> pa.Table:
    schema = plan.schema
    if tagged:
        schema = schema.append(pa.field(UNIT, pa.int32())).append(pa.field(ROW, pa.int64()))
        schema = schema.append(pa.field(FIRST, pa.bool_())).append(pa.field(WARNINGS, pa.string()))
    return schema.empty_table()


# -- resources ------------------------------------------------------------------------------------------


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


def check_schedulable(nodes: list[dict], workers: int, actor: dict, read: dict) -> None:
    """Stop at once when the cluster cannot hold the actors and still run one read task.

    ``nodes``: each alive node's total resources (``{"CPU": 2, "GPU": 1}``); ``actor``/``read``:
    what one actor and one read task reserve. Places the actors first-fit on the nodes with the
    most room, then looks for a node with room for a read task: without one, Ray would wait for
    ever with the actors holding every CPU ("Pending Demands").
    """
    free = [dict(n) for n in nodes]
    for i in range(workers):
        fits = [f for f in free if all(f.get(k, 0.0) + 1e-9 >= v for k, v in actor.items())]
        if not fits:
            need = ", ".join(f"{v:g} {k}" for k, v in actor.items() if v)
            have = "; ".join(", ".join(f"{n.get(k, 0):g} {k}" for k in actor) for n in nodes)
            raise RunSetupError(
                f"the Ray cluster cannot place {workers} actors of {need} each (actor {i + 1} does not fit; "
                f"nodes have: {have}); lower --workers or --num-cpus-per-worker / --num-gpus-per-worker"
            )
        best = max(fits, key=lambda f: f.get("CPU", 0.0))
        for k, v in actor.items():
            best[k] = best.get(k, 0.0) - v
    if not any(all(f.get(k, 0.0) + 1e-9 >= v for k, v in read.items()) for f in free):
        left = ", ".join(f"{f.get('CPU', 0.0):g}" for f in free)
        raise RunSetupError(
            f"the Ray cluster has no CPU left for the read tasks: {workers} actors hold the CPUs they reserve "
            f"(CPUs left per node: {left}), and a read task needs {read.get('CPU', 0):g} CPU; lower --workers, "
            "--num-cpus-per-worker or --num-cpus-per-read"
        )


def _alive_nodes(ray) -> list[dict]:
    return [
        {k: float(v) for k, v in n.get("Resources", {}).items() if k in ("CPU", "GPU")}
        for n in ray.nodes()
        if n.get("Alive")
    ]


def _spread() -> dict:
    return {"scheduling_strategy": "SPREAD"}


def _stages(ds, plan: RunPlan, workers: int, gpus: float, options: RayOptions, *, readers: int | None):
    """The stages after ``ds``: with ``readers``, ds holds ``read_tasks`` items and a read stage of at
    most that many tasks at once comes first; without, ds holds the rows of a user's Dataset."""
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    read_cpus = 1.0 if options.num_cpus_per_read is None else options.num_cpus_per_read
    with warnings.catch_warnings():
        # Deprecated in Ray 2.60 in favour of named arguments, none of which keeps the stages apart.
        warnings.filterwarnings("ignore", message=".*ray_remote_args_fn.*")
        if readers is not None:
            # Streams Parquet rows (I/O and decompression, no decode): it reserves no CPU, so it can
            # never hold the CPUs that the decode tasks wait for; its task count is capped instead.
            ds = ds.map_batches(
                read_units,
                fn_kwargs={"plan": plan},
                batch_size=1,
                batch_format="pyarrow",
                num_cpus=0,
                compute=TaskPoolStrategy(size=readers),
                ray_remote_args_fn=_spread,
            )
        # A task takes whole blocks, and Ray merges a task's outputs into blocks of up to 128 MiB: a
        # row group's undecoded rows would reach one decode task. Blocks of a few batches spread the
        # decode; blocks of one batch were slower (per-task overhead; 94 s against 56 s on a test cluster).
        ds = ds.repartition(target_num_rows_per_block=DECODE_BLOCK_BATCHES * plan.source.batch_size)
        ds = ds.map_batches(
            decode_rows,
            fn_kwargs={"plan": plan, "cpus": read_cpus},
            batch_size=plan.source.batch_size,
            batch_format="pyarrow",
            num_cpus=read_cpus,
            # Spread the decodes over the nodes. Remote args from a function also keep Ray from fusing
            # the stages, which would undo the separation (see the module docstring).
            ray_remote_args_fn=_spread,
        )
    actor_kwargs = {"num_gpus": gpus} if gpus else {}
    if options.num_cpus_per_worker is not None:
        actor_kwargs["num_cpus"] = options.num_cpus_per_worker
    return ds.map_batches(
        ExplainActor,
        fn_constructor_kwargs={"plan": plan, "tag_rows": readers is not None},
        batch_size=plan.source.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=workers),
        **actor_kwargs,
    )


# -- the run ----------------------------------------------------------------------------------------------


def _quiet_ray_data() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False
    # Ray Data logs every execution at INFO and warns that its bars are off.
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)


_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)): (.+)$")
# Ray's errors for a lost worker, actor, node or object: a rerun can get past them.
_TRANSIENT_RAY = (
    "ActorDiedError",
    "ActorUnavailableError",
    "NodeDiedError",
    "ObjectLostError",
    "ObjectFetchTimedOutError",
    "OwnerDiedError",
    "RayActorError",
    "WorkerCrashedError",
    "OutOfMemoryError",
)


def _original_error(exc: BaseException) -> tuple[str, str] | None:
    """(type name, message) of the original error behind a Ray error, or None when there is none.

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
    return None if found is None else (found.group(1).rsplit(".", 1)[-1], found.group(2))


def _error_line(exc: BaseException) -> str:
    """The original error behind a Ray error, in one line."""
    found = _original_error(exc)
    if found is not None:
        name, message = found
        # The engine's own errors already read as one line; others keep their type.
        engine_errors = ("RunSetupError", "ModelSpecError", "SourceError", "TargetLayerError")
        return message if name in engine_errors else f"{name}: {message}"
    return first_line(exc)


_OS_ERRORS = {"OSError", "IOError", "InputReadError", "ConnectionError", "TimeoutError", "MemoryError"}


def _is_transient(exc: BaseException) -> bool:
    """A lost node, actor or object, or an I/O error: a rerun can get past it. An error that the
    user's code or model raised (inside an actor too, even when Ray reports the actor dead) cannot."""
    if is_transient(exc):
        return True
    original = _original_error(exc)
    if original is not None:
        return original[0] in _OS_ERRORS or original[0].endswith(("OSError", "IOError"))
    names = {type(e).__name__ for e in (exc, exc.__cause__, exc.__context__) if e is not None}
    return bool(names & set(_TRANSIENT_RAY))


# The most units whose output rows the driver holds at once (rows of a unit not yet complete, or
# of a complete unit waiting for an earlier one). Ray Data delivers the rows in input order, so a
# run holds one; more means that the order broke, and the run stops rather than grow without bound.
DRIVER_UNITS_HELD = 2


class UnitAssembler:
    """The driver's side of a run: output rows of the pending units in, in any batches; each unit
    out to ``put(unit, table, errors)`` once all its rows are back, in the order of ``pending``.

    Holds at most ``bound`` units; ``peak`` is the most it held.
    """

    def __init__(self, plan: RunPlan, pending: list[int], put, *, bound: int = DRIVER_UNITS_HELD):
        self.plan, self.put, self.bound = plan, put, bound
        self.order = list(pending)
        self.next = 0  # position in ``order`` of the next unit to hand to ``put``
        self.buffers: dict[int, list[pa.Table]] = {}
        self.seen: dict[int, int] = {}
        self.peak = 0

    def add(self, batch: pa.Table) -> int:
        """Takes a batch of output rows; returns how many images of it were new."""
        units = batch.column(UNIT).to_numpy()
        firsts = batch.column(FIRST).to_numpy(zero_copy_only=False)
        new_images = 0
        for index in dict.fromkeys(units.tolist()):
            mask = units == index
            self.buffers.setdefault(index, []).append(batch.filter(pa.array(mask)))
            images = int(firsts[mask].sum())
            self.seen[index] = self.seen.get(index, 0) + images
            new_images += images
        while self.next < len(self.order):
            index = self.order[self.next]
            if self.seen.get(index, 0) != self.plan.units[index].rows:
                break
            self._hand_over(index)
            self.next += 1
        self.peak = max(self.peak, len(self.buffers))
        if len(self.buffers) > self.bound:
            waiting = self.plan.units[self.order[self.next]].key
            raise RuntimeError(
                f"Ray returned rows of {len(self.buffers)} units while unit {waiting} is incomplete, out of "
                f"input order; the driver holds at most {self.bound}"
            )
        return new_images

    def _hand_over(self, index: int) -> None:
        unit = self.plan.units[index]
        table = pa.concat_tables(self.buffers.pop(index))
        del self.seen[index]
        table = table.sort_by([(ROW, "ascending"), ("class_rank", "ascending")])
        errors = int(pc.sum(pc.equal(table.column("status"), "error")).as_py() or 0)
        self.put(unit, table.drop_columns([c for c in _INTERNAL if c in table.column_names]), errors)

    def finish(self) -> None:
        """After the last batch: every unit must have been handed over."""
        if self.next < len(self.order):
            index = self.order[self.next]
            unit = self.plan.units[index]
            raise RuntimeError(f"Ray returned {self.seen.get(index, 0)} of the {unit.rows} rows of unit {unit.key}")


class RayRun:
    """A planned ``--ray`` run; ``run()`` executes it. Made by ``prepare_ray``."""

    def __init__(self, config: RunConfig, options: RayOptions, log: Callable[[str], None] | None = None):
        self.options = options
        self.log = log
        self.ray = ray = _import_ray()
        if config.device != "auto" and not config.device.startswith(("cpu", "cuda")):
            raise RunSetupError(f"unsupported device {config.device!r}; expected auto, cpu, cuda or cuda:N")
        for name, value in (
            ("CPUs per worker", options.num_cpus_per_worker),
            ("CPUs per read", options.num_cpus_per_read),
        ):
            if value is not None and value < 0:
                raise RunSetupError(f"{name} must be >= 0, got {value}")
        # The driver probes the model on the CPU: it must not hold GPU memory that an actor needs,
        # and a Ray Client driver may have no GPU at all. Its warnings pass through the relay that
        # the actors' warnings pass through, so that a warning both give is said once.
        self.relay = WarningRelay()
        try:
            with self.relay.record():
                self.plan = build_plan(config, device="cpu")
        finally:
            self._say_warnings([])
        if len({type(f.filesystem).__name__ for f in self.plan.files}) > 1:
            raise RunSetupError("with --ray all inputs must be on one filesystem (all local, or one URI scheme)")
        self.manifest = existing_manifest(self.plan)
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
                    f"cannot start or reach Ray at {options.address or 'local'}: {_error_line(exc)}"
                ) from None
            self._started = True
        try:
            if options.quiet:
                _quiet_ray_data()
            self.workers, self.gpus = _pool(ray, options, self.plan.device)
            actor = {"CPU": 1.0 if options.num_cpus_per_worker is None else options.num_cpus_per_worker}
            if self.gpus:
                actor["GPU"] = self.gpus
            read = {"CPU": 1.0 if options.num_cpus_per_read is None else options.num_cpus_per_read}
            check_schedulable(_alive_nodes(ray), self.workers, actor, read)
        except BaseException:
            self.close()
            raise

    @property
    def config(self) -> RunConfig:
        return self.plan.config

    @property
    def device_label(self) -> str:
        return f"ray ({self.workers} x {self.gpus:g} GPU)" if self.gpus else f"ray ({self.workers} x CPU)"

    def _say_warnings(self, payloads: list[str]) -> None:
        """Say the warnings recorded here and those of the actors' rows (JSON), each kind once."""
        for payload in payloads:
            for category, key, message in json.loads(payload):
                if key not in self.relay.seen:
                    self.relay.seen.add(key)
                    self.relay.pending.append([category, key, message])
        for category, key, message in self.relay.take():
            say_warning(category, key, message)

    def close(self) -> None:
        """Shut down the Ray that this run started (not one that was running before)."""
        if self._started:
            self.ray.shutdown()
            self._started = False

    def run(self) -> dict:
        """Explain every pending unit; returns the summary (the keys of the local runner's)."""
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> dict:
        extra = {"ray": self.ray.__version__}
        return execute(
            self, self.device_label, self._stream, extra_versions=extra, describe=_error_line, transient=_is_transient
        )

    def _stream(self, session: OutputSession) -> None:
        plan = self.plan
        ds = self.ray.data.from_items(read_tasks(plan, session.pending))
        readers = 2 * max(1, len(_alive_nodes(self.ray)))
        ds = _stages(ds, plan, self.workers, self.gpus, self.options, readers=readers)

        def put(unit: Unit, table: pa.Table, errors: int) -> None:
            session.write(table, unit.rows, errors, unit.key)

        units = UnitAssembler(plan, session.pending, put)
        # Ray Data hands the rows over in input order: the driver then holds one unit at a time,
        # and the part files are in input order, as in a local run.
        ds.context.execution_options.preserve_order = True
        try:
            with session.writing(), warnings.catch_warnings():
                # Ray Data warns when it plans fewer input blocks than the tasks or actors it may run:
                # the read stage's input is one item per row group, the blocks after it come later.
                warnings.filterwarnings("ignore", message=r".*number of concurrent (tasks|actors) for 'MapBatches")
                for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                    self._say_warnings(batch.column(WARNINGS).drop_null().to_pylist())
                    session.advance(units.add(batch))
                units.finish()
        finally:
            if self.log is not None and session.images:
                self.log(f"ray: {session.images} images, {session.rows_out} rows, {session.errors} errors")


def prepare_ray(config: RunConfig, options: RayOptions | None = None, *, log=None) -> RayRun:
    """Validate a ``--ray`` run (raises ``RunSetupError``, writes nothing) and start or join Ray.

    Everything ``build_plan`` checks is checked here, on this machine, and so is whether the
    cluster can schedule the actors and the read tasks. Inputs and the output directory must be
    reachable from every node (a shared filesystem, or URIs for the inputs); only the driver
    writes the output.
    """
    return RayRun(config, options or RayOptions(), log)


def run_ray(config: RunConfig, options: RayOptions | None = None, *, log: Callable[[str], None] | None = None) -> dict:
    """``gradcam-batch run --ray``: the job on Ray Data; returns the summary of the local runner."""
    return prepare_ray(config, options, log=log).run()


# -- a user's Dataset ------------------------------------------------------------------------------------


def _arrow_schema(ds) -> pa.Schema:
    schema = ds.schema()
    if schema is None:
        raise ValueError("the dataset has no schema (is it empty?)")
    base = getattr(schema, "base_schema", schema)
    if not isinstance(base, pa.Schema):
        raise ValueError("the dataset is not Arrow-backed; read it with ray.data.read_parquet or map it to Arrow")
    return base


def explain_dataset(
    ds,
    config: RunConfig | None = None,
    *,
    workers: int | None = None,
    num_gpus_per_worker: float | None = None,
    num_cpus_per_worker: float | None = None,
    num_cpus_per_read: float | None = None,
    **options,
):
    """Explain the images of a Ray Dataset; returns a lazy ``ray.data.Dataset`` of output rows.

    The rows and their schema are those of ``gradcam-batch run`` (see the README's output
    schema); write them with ``.write_parquet(dir)`` or consume them with ``.iter_batches()``.

    Args:
        ds: a ``ray.data.Dataset`` with an image column (encoded bytes, a Hugging Face
            ``struct<bytes, path>`` image, or paths/URIs) and an id column.
        config: a ``RunConfig``; its ``inputs``/``output``/resume fields are ignored. Or give
            the same fields as keywords: ``model=``, ``id_column=``, ``top_k=``, ...
        workers, num_gpus_per_worker, num_cpus_per_worker, num_cpus_per_read: as ``RayOptions``.

    A Dataset's rows have no input file and row number to name them by, so ``id_column`` is
    required. Ray must be initialized (``ray.init()``) or it starts a local one.
    """
    ray = _import_ray()
    if config is None:
        if "model" not in options:
            raise ValueError("explain_dataset needs a model: model='torchvision:resnet50' or a RunConfig")
        config = RunConfig(inputs=(), output="", **options)
    elif options:
        config = dataclasses.replace(config, **options)
    if config.id_column is None:
        raise ValueError(
            "explain_dataset needs id_column=: a Ray Dataset's rows have no file and row number to name them by"
        )
    plan = plan_for_schema(config, _arrow_schema(ds))
    if not ray.is_initialized():
        ray.init()  # what Ray Data would do on the first execution; the pool size needs the cluster now
    opts = RayOptions(
        workers=workers,
        num_gpus_per_worker=num_gpus_per_worker,
        num_cpus_per_worker=num_cpus_per_worker,
        num_cpus_per_read=num_cpus_per_read,
    )
    n_workers, gpus = _pool(ray, opts, plan.device)
    ds = ds.select_columns(list(dict.fromkeys([plan.image_column, *plan.input_columns])))
    return _stages(ds, plan, n_workers, gpus, opts, readers=None)


__all__ = [
    "ExplainActor",
    "RayNotInstalled",
    "RayOptions",
    "RayRun",
    "check_schedulable",
    "explain_dataset",
    "prepare_ray",
    "run_ray",
]
