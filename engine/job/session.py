"""One output session: what both runners do around their own streaming of the pending units.

``execute(run, device_label, stream)`` makes and locks the output directory, resumes or starts its
manifest (``open_output``; either runner resumes the other's), hands an ``OutputSession`` to the
runner's ``stream(session)``, then closes the manifest and returns the summary. A failure in
``stream`` becomes a ``RunFailed`` that says whether a rerun can get past it.

The session is the runner's side of the output: the source and writer factories of the plan's
specs, the counters, the progress bar, and the close-or-abort path that keeps the whole units
already handed over. The summary's means are added up as files commit (``columns.tally``, kept
on each commit line), so closing reads no part file back.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa

from gradcam_batch.engine.errors import first_line
from gradcam_batch.engine.job import columns
from gradcam_batch.engine.job.config import OutputBusy, RunFailed, RunSetupError, versions
from gradcam_batch.engine.job.inputs import Unit
from gradcam_batch.engine.job.outdir import output_problem, remove_own, survey
from gradcam_batch.engine.job.plan import RunPlan
from gradcam_batch.engine.job.sink import LOCK, HeatmapWriter, Manifest, OutputLock, WriteItem
from gradcam_batch.engine.job.source import ParquetSource

MALFORMED_BOX_ROWS = "malformed_box_rows"  # a tally key: rows of class rank 0 whose image has a malformed box


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


# -- the output directory --------------------------------------------------------------------------------


def existing_manifest(plan: RunPlan) -> Manifest | None:
    """The manifest a resume would continue (None for a new output or an overwrite); reads only."""
    out = plan.out_dir
    return Manifest.load(out) if not plan.sink.overwrite and out.exists() else None


def open_output(plan: RunPlan) -> tuple[Manifest, list[str]]:
    """The manifest of ``plan.out_dir`` (which the caller has locked): resumed, or new and not yet saved.

    The directory is checked again, under the lock, as the plan checked it: ``RunSetupError`` when
    it changed since (nothing deleted then). A resume deletes the uncommitted files of the run
    there, an overwrite all the run's files; nothing else (``outdir.survey``). Returns the manifest
    and the names of the uncommitted files deleted.
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
    manifest = Manifest.new(out, fingerprint=plan.fingerprint, config=plan.manifest_config, versions={})
    manifest.data["units_total"] = len(plan.units)  # how far a partial run got, without planning it again
    return manifest, []


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


# -- the session -------------------------------------------------------------------------------------------


class OutputSession:
    """One runner's session on the output: its pending units, the parts it makes, what it counted.

    ``source()`` and ``writing()`` make the source and the writer from the plan's specs; the runner
    hands each finished table to ``write`` and says how many images it has seen with ``advance``.
    """

    def __init__(self, plan: RunPlan, manifest: Manifest, pending: list[int]):
        self.plan, self.manifest, self.pending = plan, manifest, pending
        self.images = self.errors = self.rows_out = 0
        self._writer: HeatmapWriter | None = None
        self._bar = None

    @property
    def units(self) -> list[Unit]:
        return [self.plan.units[i] for i in self.pending]

    def source(self, files=None, *, threads: int | None = None) -> ParquetSource:
        return self.plan.source.open(files, threads=threads)

    def tally(self, table: pa.Table) -> dict[str, float]:
        """What a table adds to its file's commit line: ``{column.sum, column.rows}`` of the registry's
        means, and the rows that note a malformed box."""
        out: dict[str, float] = {}
        for name, (s, n) in columns.tally(table).items():
            out[f"{name}.sum"], out[f"{name}.rows"] = s, n
        if self.plan.boxes is not None:
            import pyarrow.compute as pc

            from gradcam_batch.engine.job.boxes import BOX_NOTE

            first = pc.and_(pc.equal(table["class_rank"], 0), pc.equal(table["status"], "ok"))
            noted = pc.and_(first, pc.match_substring(table["error"], BOX_NOTE))
            out[MALFORMED_BOX_ROWS] = float(pc.sum(noted).as_py() or 0)
        return out

    @contextlib.contextmanager
    def writing(self) -> Iterator[HeatmapWriter]:
        """The writer (and the progress bar) for the body; closed at its end. On a failure the whole
        units already handed over are still committed (whole units only reach the writer), and the
        error goes on."""
        writer = self.plan.sink.writer(self.manifest, tally=self.tally)
        if self.plan.progress:
            from tqdm.auto import tqdm

            total = sum(u.rows for u in self.units)
            self._bar = tqdm(total=total, unit="img", dynamic_ncols=True, smoothing=0.1)
        self._writer = writer
        try:
            yield writer
            writer.close()
        except BaseException:
            try:
                writer.close()
            except BaseException:
                writer.abort()
            raise
        finally:
            self._writer = None
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    def write(self, table: pa.Table, images: int, errors: int, unit_key: str | None) -> None:
        """Hand one table to the writer; ``unit_key`` when it ends a unit. Counts it in the session."""
        assert self._writer is not None, "write() belongs inside writing()"
        self._writer.put(WriteItem(table, images, errors, unit_key))
        self.images += images
        self.errors += errors
        self.rows_out += table.num_rows

    def advance(self, images: int) -> None:
        """Move the progress bar by ``images`` images seen."""
        if self._bar is not None:
            self._bar.update(images)
            if self.errors:
                self._bar.set_postfix(errors=self.errors, refresh=False)

    def start(self, device_label: str, extra_versions: dict | None = None) -> None:
        """Mark the output as being written, with the versions of this session."""
        self.manifest.data["status"] = "running"
        self.manifest.data["versions"] = {**versions(None), "runner": device_label, **(extra_versions or {})}
        self.manifest.save()

    def close(self, seconds: float, device_label: str) -> None:
        """Mark the output complete, with the summary's means added up from the committed files' tallies."""
        m, plan = self.manifest, self.plan
        total: dict[str, float] = {}
        for f in m.files:
            for k, v in (f.get("tally") or {}).items():
                total[k] = total.get(k, 0.0) + v
        added = {c: [total.get(f"{c}.sum", 0.0), total.get(f"{c}.rows", 0)] for c in plan.schema.names}
        means = columns.means(added, plan.schema)
        if means:
            m.data["metric_means"] = means
        if plan.boxes is not None:
            m.data["malformed_boxes"] = int(total.get(MALFORMED_BOX_ROWS, 0)) // len(plan.methods)
        rate = self.images / seconds if seconds > 0 else 0.0
        throughput = {"images": self.images, "seconds": round(seconds, 3), "images_per_s": round(rate, 2)}
        m.data["sessions"].append({**throughput, "device": device_label, "ended": time.time()})
        m.data["throughput"] = throughput
        m.data["status"] = "complete"
        m.save()

    def summary(self, seconds: float, *, removed: list[str], device: str) -> dict:
        rate = self.images / seconds if seconds > 0 else 0.0
        return {
            "output": str(self.plan.out_dir),
            "status": "complete",
            "images": self.images,
            "errors": self.errors,
            "rows_out": self.rows_out,
            "seconds": round(seconds, 3),
            "images_per_s": round(rate, 2),
            "resumed_units": len(self.plan.units) - len(self.pending),
            "units_total": len(self.plan.units),
            "removed_partial_files": removed,
            "totals": dict(self.manifest.data["totals"]),
            "target_layer": self.plan.target_layer,
            "device": device,
            "metric_means": self.manifest.data.get("metric_means"),
            "malformed_boxes": self.manifest.data.get("malformed_boxes"),  # images of the output; None without boxes
        }


def execute(
    run,
    device_label: str,
    stream: Callable[[OutputSession], None],
    *,
    extra_versions: dict | None = None,
    describe: Callable[[BaseException], str] = first_line,
    transient: Callable[[BaseException], bool] = is_transient,
) -> dict:
    """A run around the runner's own ``stream(session)``: lock, resume or start, stream, close, summary.

    ``run`` has the ``plan``; its ``manifest`` is set to the one opened. A failure in ``stream``
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
        session = OutputSession(plan, manifest, [i for i, u in enumerate(plan.units) if u.key not in done])
        if session.pending or manifest.data["status"] != "complete":
            session.start(device_label, extra_versions)
            if session.pending:
                try:
                    stream(session)
                except (KeyboardInterrupt, RunFailed):
                    raise
                except BaseException as exc:
                    raise RunFailed(describe(exc), transient=transient(exc)) from exc
            session.close(time.perf_counter() - t_start, device_label)
        return session.summary(time.perf_counter() - t_start, removed=removed, device=device_label)
    finally:
        lock.release()


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def summary_line(summary: dict) -> str:
    """One line: totals, errors, throughput, where."""
    t = summary["totals"]
    resumed = f", {_count(summary['resumed_units'], 'unit')} already done" if summary.get("resumed_units") else ""
    means = summary.get("metric_means") or {}
    labels = columns.summary_labels()
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
    "OutputSession",
    "execute",
    "existing_manifest",
    "is_transient",
    "make_output_dir",
    "open_output",
    "remove_made_dirs",
    "summary_line",
]
