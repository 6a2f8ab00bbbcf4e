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

import queue
import threading

from gradcam_batch.engine.job.config import RunConfig
from gradcam_batch.engine.job.plan import ModelHandle, build_plan
from gradcam_batch.engine.job.session import OutputSession, execute, existing_manifest
from gradcam_batch.engine.job.step import BatchExplainer


class LocalRun:
    """A planned run on this process's device; ``run()`` executes it. Made by ``prepare``."""

    def __init__(self, config: RunConfig):
        # The plan's probe loads the model, builds the Explainer and traces the model on the run's
        # device; the batch step runs that same Explainer.
        handle = ModelHandle(config)
        self.device = handle.device
        self.plan = build_plan(config, model=handle)
        self.step = BatchExplainer(self.plan, self.device, explainer=handle.explainer)
        self.manifest = existing_manifest(self.plan)

    @property
    def config(self) -> RunConfig:
        return self.plan.config

    def run(self) -> dict:
        """Explain every pending unit; returns the summary (also recorded in the manifest)."""
        return execute(self, str(self.device), self._stream)

    def _stream(self, session: OutputSession) -> None:
        source = session.source()
        inbox: queue.Queue = queue.Queue(maxsize=self.plan.sink.queue_depth)
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
                for db in source.batches(session.units):
                    if not put(db):
                        return
            except BaseException as exc:  # handed to the compute loop
                reader_error.append(exc)
            finally:
                put(done_marker)

        def finish(launched) -> None:
            out = self.step.finish(launched)
            db = launched.batch
            session.write(out.table, out.images, out.errors, db.unit.key if db.unit_done else None)
            session.advance(out.images)

        reader = threading.Thread(target=read, name="gradcam-reader", daemon=True)
        reader.start()
        in_flight = None  # the previous batch, whose results are still coming back from the device
        try:
            with session.writing():
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
        finally:
            stop.set()
            reader.join(timeout=10)


def prepare(config: RunConfig) -> LocalRun:
    """Validate ``config`` (raises ``RunSetupError``, writes nothing) and load the model."""
    return LocalRun(config)


def run_job(config: RunConfig) -> dict:
    """Run a whole explanation job; returns the summary dict (see ``LocalRun.run``)."""
    return prepare(config).run()


__all__ = [
    "LocalRun",
    "prepare",
    "run_job",
]
