"""A run's output directory as the audit sees it: its manifest, its part files, how far it got.

``RunOutput.open`` reads the manifest (with its commit log folded in) and every part file's footer
before anything is written, so a damaged file stops the audit with one line that names it.
``row_groups`` streams the part files a row group at a time and closes each file after use.
``unit_progress`` says whether the run is complete and, if not, how many of its units are
committed. See the README's "Auditing a model".
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from gradcam_batch.engine.errors import first_line as _first_line
from gradcam_batch.engine.job.columns import Layout, audited

# The metric columns: those the column registry marks as read by the audit; each is used when present.
FLOAT_METRICS = tuple(c.name for c in audited() if not pa.types.is_boolean(c.arrow_type(Layout())))
BOOL_METRICS = tuple(c.name for c in audited() if pa.types.is_boolean(c.arrow_type(Layout())))
METRICS = FLOAT_METRICS + BOOL_METRICS
BOX_METRICS = tuple(c.name for c in audited() if c.option == "box_column")


class AuditError(ValueError):
    """The audit cannot do what was asked; the message is one line for the user."""


class AuditInputError(AuditError):
    """The output directory cannot be audited as asked (no run, no maps, an unknown method, a damaged file)."""


class AuditOutputError(AuditError):
    """The report cannot be written where asked (a read-only file system, a path below a file)."""


@contextlib.contextmanager
def open_parquet(path: Path) -> Iterator[pq.ParquetFile]:
    """``path`` opened for reading and closed on exit; a file that is not readable Parquet is an input error."""
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise AuditInputError(f"{path}: not a readable Parquet file ({_first_line(exc)})") from None
    with pf:
        yield pf


def _damaged(path: Path, exc: BaseException) -> AuditInputError:
    return AuditInputError(f"{path}: damaged Parquet data ({_first_line(exc)})")


@dataclass
class RunOutput:
    """What the audit needs to know about a run's output directory."""

    out_dir: Path
    files: list[Path]
    schema: pa.Schema
    config: dict  # the run's resolved config from its manifest ({} when there is none)
    totals: dict
    map_column: str  # "heatmap", or "cam" where the run stored no heatmap
    map_shape: tuple[int, int]
    has_label: bool  # the run has ground truth per row: a label column, or a positive column (tasks)
    has_method: bool
    metrics: tuple[str, ...]  # the metric columns this run has
    row_groups: list[tuple[int, ...]] = field(default_factory=list)  # per file, its row groups' row counts
    # A run that is still running or was stopped: {"units_done": N, "units_total": M or None}; None otherwise.
    partial: dict | None = None
    # Where "the row is its image's ground truth" is read: "label" (class_index == label), or "positive"
    # (a multi-label run's positive labels, a segmentation run's classes of the true mask); None: neither.
    truth: str | None = None

    @classmethod
    def open(cls, out_dir: str | Path, inputs: Sequence[str] | None = None) -> RunOutput:
        """Read the manifest and every part file's footer; ``inputs``: where the run's inputs are now."""
        out = Path(out_dir)
        if not out.is_dir():
            raise AuditInputError(f"{out} is not a directory")
        manifest = _load_manifest(out)
        if manifest is not None:
            try:
                files = [out / f["name"] for f in manifest.files]
            except (KeyError, TypeError):
                raise AuditInputError(f"{manifest.path} lists its files in a form this version cannot read") from None
            config, totals = manifest.data.get("config", {}), manifest.data.get("totals", {})
        else:  # part files without a manifest (copied elsewhere, or written by another tool)
            files, config, totals = sorted(out.glob("part-*.parquet")), {}, {}
        files = [f for f in files if f.exists()]
        if not files:
            raise AuditInputError(f"{out} holds no part-*.parquet files of a gradcam-batch run")
        # Every footer now, before anything is written: a truncated file stops the audit here.
        row_groups, schema = [], None
        for path in files:
            with open_parquet(path) as pf:
                meta = pf.metadata
                row_groups.append(tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups)))
                if schema is None:
                    schema = pf.schema_arrow
                elif pf.schema_arrow.names != schema.names:
                    raise AuditInputError(f"{path.name} has other columns than {files[0].name}: not one run's output")
        names = set(schema.names)
        missing = {"class_index", "status"} - names
        if missing:
            raise AuditInputError(f"{files[0].name} lacks the column(s) {sorted(missing)}: not a gradcam-batch output")
        map_column = "heatmap" if "heatmap" in names else "cam"
        if map_column not in names:
            raise AuditInputError(f"{files[0].name} has neither a heatmap nor a cam column")
        shape = tuple(int(s) for s in schema.field(map_column).type.shape)
        return cls(
            out_dir=out,
            files=files,
            schema=schema,
            config=config,
            totals=totals,
            map_column=map_column,
            map_shape=shape,  # type: ignore[arg-type]
            has_label="label" in names or "positive" in names,
            truth="positive" if "positive" in names else "label" if "label" in names else None,
            has_method="method" in names,
            metrics=tuple(m for m in METRICS if m in names),
            row_groups=row_groups,
            partial=None if manifest is None else unit_progress(manifest, inputs),
        )

    @property
    def methods(self) -> tuple[str, ...] | None:
        """The run's methods, in the order it was asked for them; None where the manifest does not say."""
        for key in ("methods", "method"):
            value = self.config.get(key)
            if isinstance(value, str):
                value = [m for m in value.split(",") if m]
            if isinstance(value, list) and value:
                return tuple(str(m) for m in value)
        return None if self.has_method else ("gradcam",)


def _load_manifest(out: Path):
    """The run's manifest (its commit log folded in), None without one; a damaged one is an input error."""
    from gradcam_batch.engine.job.sink import MANIFEST, Manifest

    path = out / MANIFEST
    if not path.exists():
        return None
    # The sink's own message advises `run --overwrite`, which is no advice for an audit.
    aside = "move it aside to audit the part files without it"
    try:
        json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise AuditInputError(f"{path} is not readable JSON ({_first_line(exc)}); {aside}") from None
    try:
        return Manifest.load(out)
    except OSError as exc:
        raise AuditInputError(f"{out}: the run's manifest or commit log cannot be read ({_first_line(exc)})") from None
    except (ValueError, KeyError, TypeError):
        raise AuditInputError(f"{path} is not a gradcam-batch manifest that this version reads; {aside}") from None


def unit_progress(manifest, inputs: Sequence[str] | None = None) -> dict | None:
    """``{"units_done": N, "units_total": M}`` for a run whose manifest is not complete; None for a complete one.

    M is the manifest's ``units_total`` (what the run planned). A run of an earlier version did not
    record it: M then comes from planning the units again from the run's inputs (``inputs``, or the
    files in the manifest), its ``unit_rows`` and ``limit``, exactly as the run did; None when the
    inputs cannot be read or no longer hold every committed unit.
    """
    if manifest.data.get("status") == "complete":
        return None
    done = manifest.completed_units()
    total = manifest.data.get("units_total")
    if not isinstance(total, int) or isinstance(total, bool):
        total = _planned_units(manifest.data.get("config") or {}, inputs, done)
    if total is not None and len(done) >= total:
        return None  # every unit is committed: stopped between its last commit and its close
    return {"units_done": len(done), "units_total": total}


def _planned_units(config: dict, inputs: Sequence[str] | None, done: set[str]) -> int | None:
    files = list(inputs or config.get("files") or [])
    unit_rows, limit = config.get("unit_rows"), config.get("limit")
    if not files or not isinstance(unit_rows, int) or not (limit is None or isinstance(limit, int)):
        return None
    # The manifest does not record M (the run side may later); planned again with pyarrow alone, no torch.
    from gradcam_batch.engine.audit.inputs import find_inputs, unit_keys

    try:
        keys = set(unit_keys(find_inputs(files), unit_rows, limit))
    except (ValueError, OSError):
        return None
    return len(keys) if done <= keys else None


def row_groups(files: Sequence[Path], columns: list[str], skip: set[tuple[int, int]] = frozenset()) -> Iterator:
    """(file index, row group index, first global row position, table) for every row group not in ``skip``.

    Each file is closed before the next opens; use it inside ``contextlib.closing`` so that a
    consumer that stops early closes the file it was reading.
    """
    base = 0
    for fi, path in enumerate(files):
        with open_parquet(path) as pf:
            for rg in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(rg).num_rows
                if (fi, rg) not in skip:
                    try:
                        table = pf.read_row_group(rg, columns=columns)
                    except (pa.ArrowException, OSError) as exc:
                        raise _damaged(path, exc) from None
                    yield fi, rg, base, table
                base += n


def partial_line(partial: dict) -> str:
    """The one line that says a run is not complete (``summary["run"]["partial"]``), for the CLI and the report."""
    done, total = partial["units_done"], partial["units_total"]
    if total is None:
        return (
            f"partial: {done:,} units committed, of a total not known here (the run's inputs were not found to "
            "count them; --images says where they are now); the audit covers the committed units only"
        )
    return (
        f"partial: {done:,} of {total:,} units (the run is still running, or stopped before its end: rerun its "
        "command to finish it); the audit covers the committed units only"
    )


__all__ = [
    "BOX_METRICS",
    "METRICS",
    "AuditError",
    "AuditInputError",
    "AuditOutputError",
    "RunOutput",
    "open_parquet",
    "partial_line",
    "row_groups",
    "unit_progress",
]
