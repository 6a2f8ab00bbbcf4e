"""The local runner behind ``gradcam-batch run``: one process, one device, three threads.

``run_job(RunConfig(...))`` is ``prepare(config).run()``. ``prepare`` builds the ``RunPlan``
(``engine/job/plan.py``: every check, nothing written) and the batch step on the run's device;
``LocalRun.run`` streams the pending units::

    reader thread  ->  queue(depth)  ->  compute (this thread)  ->  queue(depth)  ->  writer thread
    (ParquetSource: row groups,          (BatchExplainer.launch for batch i+1,       (HeatmapWriter:
     decode in a thread pool)             then .finish for batch i)                   zstd Parquet, commits)

The output directory is locked for the whole run (``OutputLock``). A failure after the start is
a ``RunFailed`` that says whether rerunning can get past it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from pathlib import Path

from gradcam_batch.engine.job.columns import COLUMNS, add_tally, means, summary_labels, tally
from gradcam_batch.engine.job.config import (
    OutputBusy,
    RunConfig,
    RunFailed,
    RunSetupError,
    first_line,
    versions,
)
from gradcam_batch.engine.job.outdir import output_problem, remove_own, survey
from gradcam_batch.engine.job.plan import ModelHandle, RunPlan, build_plan
from gradcam_batch.engine.job.sink import (
    LOCK,
    Manifest,
    OutputLock,
    WriteItem,
)
from gradcam_batch.engine.job.source import InputFile, SourceError
from gradcam_batch.engine.job.step import BatchExplainer


def is_transient(exc: BaseException) -> bool:
    """Whether a rerun can get past ``exc``: I/O errors, a full disk, an interrupt.

    Pillow's ``UnidentifiedImageError`` is an ``OSError`` about an image's content: the same
    bytes fail the same way on every rerun.
    """
    from PIL import UnidentifiedImageError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, UnidentifiedImageError):
            return False
        if isinstance(exc, (OSError, KeyboardInterrupt, MemoryError)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def open_output(plan: RunPlan) -> tuple[Manifest, list[str]]:
    """The manifest of ``plan.out_dir`` (which the caller has locked): resumed, or new and not yet saved.

    The directory is checked again, under the lock, as the plan checked it: ``RunSetupError`` when
    it changed since (nothing deleted then). A resume deletes the uncommitted files of the run
    there, an overwrite all the run's files; nothing else (``outdir.survey``). Returns the manifest
    and the names of the uncommitted files deleted. Both runners call this, so the output of one
    can be resumed by the other.
    """
    out, overwrite = plan.out_dir, plan.sink.overwrite
    s = survey(out)
    problem = output_problem(s, fingerprint=plan.fingerprint, overwrite=overwrite)
    if problem is not None:
        raise RunSetupError(problem)
    if s.manifest is not None and not overwrite:
        remove_own(s, s.uncommitted)
        return s.manifest, sorted(s.uncommitted)
    remove_own(s, [n for n in s.own if n != LOCK])  # an overwrite, or a run killed before its first manifest
    return Manifest.new(out, fingerprint=plan.fingerprint, config=plan.manifest_config, versions={}), []


def make_output_dir(out: Path) -> list[Path]:
    """Create ``out`` and its missing parents; returns those created, deepest last.

    An ``OSError`` (a read-only file system, a path under a regular file) is a ``RunSetupError``,
    and the directories made before it are removed again.
    """
    missing = []
    p = out
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    made: list[Path] = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue  # made by someone else meanwhile
        except OSError as exc:
            remove_made_dirs(made)
            raise RunSetupError(f"cannot write the output {out}: {exc.strerror or first_line(exc)}") from None
        made.append(d)
    return made


def remove_made_dirs(made: list[Path]) -> None:
    """Remove the directories that ``make_output_dir`` made, if they are empty (or hold only the lock)."""
    for d in reversed(made):
        lock = d / LOCK
        with contextlib.suppress(OSError):
            if lock.is_file() and not lock.read_bytes():
                lock.unlink()
        with contextlib.suppress(OSError):
            d.rmdir()


def start_output(manifest: Manifest, device_label: str, extra_versions: dict | None = None) -> None:
    """Mark the output as being written, with the versions of this session."""
    manifest.data["status"] = "running"
    manifest.data["versions"] = {**versions(None), "runner": device_label, **(extra_versions or {})}
    manifest.save()


def metric_means(out_dir: Path, files: list[dict], schema) -> dict:
    """The dataset means of the summary's columns over the committed files (explained rows that have them)."""
    import pyarrow.parquet as pq

    names = [c.name for c in COLUMNS if c.mean is not None and c.name in schema.names]
    if not names:
        return {}
    total: dict[str, list[float]] = {}
    for f in files:
        add_tally(total, tally(pq.read_table(out_dir / f["name"], columns=names)))
    return means(total, schema)


def malformed_box_images(out_dir: Path, files: list[dict], plan: RunPlan) -> int | None:
    """How many explained images of the committed files have a malformed box (None: the run has no boxes).

    Each row of such an image carries the note (``boxes.BOX_NOTE``); one row per image and method has
    class rank 0.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from gradcam_batch.engine.job.boxes import BOX_NOTE

    if plan.boxes is None:
        return None
    rows = 0
    for f in files:
        t = pq.read_table(out_dir / f["name"], columns=["class_rank", "status", "error"])
        first = pc.and_(pc.equal(t["class_rank"], 0), pc.equal(t["status"], "ok"))
        rows += pc.sum(pc.and_(first, pc.match_substring(t["error"], BOX_NOTE))).as_py() or 0
    return rows // len(plan.methods)


def close_output(manifest: Manifest, session: dict, seconds: float, device_label: str, plan: RunPlan) -> None:
    means = metric_means(plan.out_dir, manifest.files, plan.schema)
    if means:
        manifest.data["metric_means"] = means
    malformed = malformed_box_images(plan.out_dir, manifest.files, plan)
    if malformed is not None:
        manifest.data["malformed_boxes"] = malformed
    rate = session["images"] / seconds if seconds > 0 else 0.0
    throughput = {"images": session["images"], "seconds": round(seconds, 3), "images_per_s": round(rate, 2)}
    manifest.data["sessions"].append({**throughput, "device": device_label, "ended": time.time()})
    manifest.data["throughput"] = throughput
    manifest.data["status"] = "complete"
    manifest.save()


def summary(plan: RunPlan, manifest: Manifest, session: dict, seconds: float, *, pending: int, removed, device) -> dict:
    rate = session["images"] / seconds if seconds > 0 else 0.0
    return {
        "output": str(plan.out_dir),
        "status": "complete",
        "images": session["images"],
        "errors": session["errors"],
        "rows_out": session["rows_out"],
        "seconds": round(seconds, 3),
        "images_per_s": round(rate, 2),
        "resumed_units": len(plan.units) - pending,
        "removed_partial_files": removed,
        "totals": dict(manifest.data["totals"]),
        "target_layer": plan.target_layer,
        "device": device,
        "metric_means": manifest.data.get("metric_means"),
        "malformed_boxes": manifest.data.get("malformed_boxes"),  # images of the output; None without boxes
    }


def execute(
    run, device_label: str, stream, *, extra_versions=None, describe=first_line, transient=is_transient
) -> dict:
    """The part of a run that both runners share, around their own ``stream(pending, manifest, session)``.

    Locks the output, resumes or starts its manifest, streams the pending units (indices into
    ``run.plan.units``), closes the manifest and returns the summary. A failure in ``stream``
    becomes a ``RunFailed`` whose message is ``describe(exc)`` and that says whether a rerun helps.
    """
    plan = run.plan
    t_start = time.perf_counter()
    made = make_output_dir(plan.out_dir)
    lock = OutputLock(plan.out_dir)
    try:
        lock.acquire()
    except OutputBusy:
        raise
    except OSError as exc:  # a read-only file system, no permission: nothing is written
        remove_made_dirs(made)
        raise RunSetupError(f"cannot write the output {plan.out_dir}: {exc.strerror or first_line(exc)}") from None
    try:
        try:
            manifest, removed = open_output(plan)
        except RunSetupError:  # the directory changed since the plan: a bad invocation, nothing written
            raise
        except (ValueError, OSError) as exc:
            raise RunFailed(first_line(exc), transient=isinstance(exc, OSError)) from exc
        run.manifest = manifest
        done = manifest.completed_units()
        pending = [i for i, u in enumerate(plan.units) if u.key not in done]
        session = {"images": 0, "errors": 0, "rows_out": 0}
        if pending or manifest.data["status"] != "complete":
            start_output(manifest, device_label, extra_versions)
            if pending:
                try:
                    stream(pending, manifest, session)
                except (KeyboardInterrupt, RunFailed):
                    raise
                except BaseException as exc:
                    raise RunFailed(describe(exc), transient=transient(exc)) from exc
            close_output(manifest, session, time.perf_counter() - t_start, device_label, plan)
        seconds = time.perf_counter() - t_start
        return summary(plan, manifest, session, seconds, pending=len(pending), removed=removed, device=device_label)
    finally:
        lock.release()


class LocalRun:
    """A planned run on this process's device; ``run()`` executes it. Made by ``prepare``."""

    def __init__(self, config: RunConfig):
        # The plan's probe loads the model, builds the Explainer and traces the model on the run's
        # device; the batch step runs that same Explainer.
        handle = ModelHandle(config)
        self.device = handle.device
        self.plan = build_plan(config, model=handle)
        self.step = BatchExplainer(self.plan, self.device, explainer=handle.explainer)
        out = self.plan.out_dir
        self.manifest = Manifest.load(out) if not self.plan.sink.overwrite and out.exists() else None

    @property
    def config(self) -> RunConfig:
        return self.plan.config

    def run(self) -> dict:
        """Explain every pending unit; returns the summary (also recorded in the manifest)."""
        return execute(
            self,
            str(self.device),
            lambda pending, m, session: self._stream([self.plan.units[i] for i in pending], m, session),
        )

    def _stream(self, pending, manifest: Manifest, session: dict) -> None:
        plan = self.plan
        source = plan.source.open()
        writer = plan.sink.writer(manifest)
        inbox: queue.Queue = queue.Queue(maxsize=plan.sink.queue_depth)
        stop = threading.Event()
        done_marker = object()
        reader_error: list[BaseException] = []

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    inbox.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    continue
            return False

        def read() -> None:
            try:
                for db in source.batches(pending):
                    if not put(db):
                        return
            except BaseException as exc:  # handed to the compute loop
                reader_error.append(exc)
            finally:
                put(done_marker)

        bar = None
        if plan.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(u.rows for u in pending), unit="img", dynamic_ncols=True, smoothing=0.1)

        def finish(launched) -> None:
            out = self.step.finish(launched)
            db = launched.batch
            writer.put(WriteItem(out.table, out.images, out.errors, db.unit.key if db.unit_done else None))
            session["images"] += out.images
            session["errors"] += out.errors
            session["rows_out"] += out.table.num_rows
            if bar is not None:
                bar.update(out.images)
                if session["errors"]:
                    bar.set_postfix(errors=session["errors"], refresh=False)

        reader = threading.Thread(target=read, name="gradcam-reader", daemon=True)
        reader.start()
        in_flight = None  # the previous batch, whose results are still coming back from the device
        try:
            while True:
                item = inbox.get()
                if item is done_marker:
                    break
                launched = self.step.launch(item)
                if in_flight is not None:
                    finish(in_flight)
                in_flight = launched
            if in_flight is not None:
                finish(in_flight)
            if reader_error:
                raise reader_error[0]
            writer.close()
        except BaseException:
            stop.set()
            # Keep the whole units already handed to the writer: a rerun then starts after them.
            try:
                writer.close()
            except BaseException:
                writer.abort()
            raise
        finally:
            stop.set()
            if bar is not None:
                bar.close()
            reader.join(timeout=10)


def prepare(config: RunConfig) -> LocalRun:
    """Validate ``config`` (raises ``RunSetupError``, writes nothing) and load the model."""
    return LocalRun(config)


def run_job(config: RunConfig) -> dict:
    """Run a whole explanation job; returns the summary dict (see ``LocalRun.run``)."""
    return prepare(config).run()


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def summary_line(summary: dict) -> str:
    """One line: totals, errors, throughput, where."""
    t = summary["totals"]
    resumed = f", {_count(summary['resumed_units'], 'unit')} already done" if summary.get("resumed_units") else ""
    means = summary.get("metric_means") or {}
    labels = summary_labels()
    shown = [labels[k].format(v) for k, v in means.items() if k in labels and v is not None]
    metrics = f"; {', '.join(shown)}" if shown else ""
    if summary.get("malformed_boxes"):
        metrics += f"; {_count(summary['malformed_boxes'], 'image')} with malformed boxes (no box metrics; see error)"
    return (
        f"explained {_count(summary['images'], 'image')} ({_count(summary['rows_out'], 'row')}, "
        f"{_count(summary['errors'], 'error')}) in "
        f"{summary['seconds']:.1f} s: {summary['images_per_s']:.1f} img/s on {summary['device']}{resumed}; "
        f"output {summary['output']}: {_count(t['rows_in'], 'image')}, {_count(t['rows_out'], 'row')}, "
        f"{_count(t['errors'], 'error')} in {_count(t['files'], 'file')}{metrics}"
    )


__all__ = [
    "InputFile",
    "LocalRun",
    "RunConfig",
    "RunFailed",
    "RunSetupError",
    "SourceError",
    "close_output",
    "open_output",
    "start_output",
    "prepare",
    "run_job",
    "summary_line",
]
