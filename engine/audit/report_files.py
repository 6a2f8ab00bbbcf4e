"""The report directory's files, written all or nothing.

``clusters.parquet``, ``summary.json`` and ``index.html`` are written under temporary names and
renamed into place together at the end. An audit that stops on the way (bad input, a read-only
file system, an interrupt) leaves the directory as it found it: an earlier report stays whole.
A directory that holds one of those names but no ``summary.json`` of this tool's format is someone
else's: the audit refuses it before it computes anything, and writes nothing there.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from gradcam_batch.engine.audit.run_output import AuditOutputError

FORMAT = "gradcam-batch-audit/2"  # summary.json's "format"; an earlier report is recognized by its prefix
FORMAT_PREFIX = "gradcam-batch-audit/"


def written_by_audit(report_dir: Path) -> bool:
    """Whether ``report_dir/summary.json`` is a JSON object whose ``format`` is this tool's."""
    try:
        data = json.loads((report_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and str(data.get("format", "")).startswith(FORMAT_PREFIX)


class ReportFiles:
    """A context for writing a report into ``report_dir``: ``tmp(name)`` to write, ``publish()`` at the end.

    On an exception the temporary files go, and so do the directories made here. An ``OSError``
    (the directory cannot be made or written) becomes one ``AuditOutputError`` line.
    """

    NAMES = ("clusters.parquet", "summary.json", "index.html")

    def __init__(self, report_dir: Path):
        self.dir = Path(report_dir)
        self.created: list[Path] = []  # the directories made here, deepest first

    def tmp(self, name: str) -> Path:
        return self.dir / f".{name}.tmp"

    def __enter__(self) -> ReportFiles:
        missing, p = [], self.dir
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        self.created = missing
        self.check_owned()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._cleanup()
            raise self._error(exc) from None
        return self

    def check_owned(self) -> None:
        """``AuditOutputError`` when the directory holds a report file that this tool did not write."""
        if not self.dir.is_dir():
            return
        present = [name for name in self.NAMES if (self.dir / name).exists() or (self.dir / name).is_symlink()]
        if present and not written_by_audit(self.dir):
            raise AuditOutputError(
                f"{self.dir} holds {', '.join(present)} not written by gradcam-batch audit (no summary.json of "
                "its format): choose another report directory"
            )

    def publish(self) -> None:
        for name in self.NAMES:
            os.replace(self.tmp(name), self.dir / name)

    def __exit__(self, typ, exc, tb) -> None:
        if exc is None:
            return
        self._cleanup()
        if isinstance(exc, OSError):
            raise self._error(exc) from None

    def _cleanup(self) -> None:
        for name in self.NAMES:
            with contextlib.suppress(OSError):
                self.tmp(name).unlink(missing_ok=True)
        for d in self.created:
            try:
                d.rmdir()
            except FileNotFoundError:
                continue  # mkdir stopped above it
            except OSError:
                break  # not empty: someone else's now

    def _error(self, exc: OSError) -> AuditOutputError:
        return AuditOutputError(f"cannot write the report into {self.dir}: {exc.strerror or exc}")


__all__ = ["FORMAT", "ReportFiles", "written_by_audit"]
