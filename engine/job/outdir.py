"""Which files of an output directory are the tool's own: the only ones a run ever deletes or overwrites.

A file is the tool's own only when it can be attributed, never by its name alone:

- ``manifest.json`` when it parses as this tool's manifest (``sink.manifest_problem``: the format
  key, a fingerprint, and a file list of part-file names with counts and units); then
  ``commits.jsonl`` beside it, the part files that the two list, and the part files and temp
  files of the names that an ``open`` line of the log names (the writer appends that line before
  it creates the file);
- ``.lock`` and ``.manifest.json.tmp`` by their content (a pid and host, or a manifest's opening).

Everything else is foreign. A resume deletes the uncommitted files of its run and stops, naming
them, at foreign files in the tool's names (it could take them for output); an overwrite deletes
the run's files and stops at any foreign file; a directory without a run must be empty.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from gradcam_batch.engine.job.sink import (
    COMMIT_LOG,
    FORMAT,
    LOCK,
    MANIFEST,
    MANIFEST_TMP,
    PART_RE,
    Manifest,
    NotARun,
    first_line_of,
    fsync_path,
)

_TMP_RE = re.compile(r"^\.(part-\d{5,}\.parquet)\.tmp$")
# The names the sink writes: a foreign file of such a name stops a resume.
_OWN_RE = re.compile(
    r"^(part-\d{5,}\.parquet|\.part-\d{5,}\.parquet\.tmp|manifest\.json|\.manifest\.json\.tmp|commits\.jsonl|\.lock)$"
)
_LOCK_TEXT = re.compile(rb"^(\d+ \S+\n?)?$")  # what OutputLock writes: "pid host", or nothing once released
_MANIFEST_HEAD = re.compile(rb'^\{\s*"format":\s*"gradcam-batch/')  # how Manifest.save starts its JSON


@dataclass
class OutputSurvey:
    """What an output directory holds, sorted into the tool's own files and everything else."""

    out_dir: Path
    manifest: Manifest | None  # the run there; None when manifest.json is absent or not this tool's
    problem: str | None  # why manifest.json is not this tool's (None: absent, or a run's)
    own: list[str]  # names the tool wrote: those of the run, its temp files, the lock
    uncommitted: list[str]  # of ``own``: temp and part files opened in the log that no commit lists
    foreign: list[str]  # every other name, sorted

    @property
    def is_empty(self) -> bool:
        """Nothing but the lock (and a manifest temp file): a run killed before its first manifest."""
        return self.manifest is None and self.problem is None and not self.foreign

    @property
    def in_our_names(self) -> list[str]:
        """The foreign names that the tool's own files could have: a resume would take them for output."""
        return [n for n in self.foreign if _OWN_RE.match(n)]

    def missing(self) -> list[str]:
        """Part files that the run lists and that are gone."""
        if self.manifest is None:
            return []
        return [f["name"] for f in self.manifest.files if not (self.out_dir / f["name"]).is_file()]


def _head(path: Path, n: int = 64) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError:
        return None


def survey(out_dir: Path) -> OutputSurvey:
    """Sort the entries of ``out_dir`` (which may not exist) into the tool's own and foreign ones. Reads only.

    A file is the tool's own only when it can be attributed: ``manifest.json`` that parses as this
    tool's manifest, and then its log and the part files that the two list or the log names as
    opened (and those names' temp files); the lock and the manifest's temp file by their content.
    """
    out_dir = Path(out_dir)
    try:
        entries = sorted(os.scandir(out_dir), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        entries = []
    names = {e.name: e for e in entries}
    manifest, problem = None, None
    if MANIFEST in names:
        try:
            manifest = Manifest.load(out_dir)
        except NotARun as exc:
            problem = first_line_of(exc)
    listed = {f["name"] for f in manifest.files} if manifest is not None else set()
    opened = manifest.opened_files() if manifest is not None else set()
    own, uncommitted, foreign = [], [], []
    for name, entry in names.items():
        regular = entry.is_file(follow_symlinks=False)
        tmp = _TMP_RE.match(name)
        if not regular:
            mine = False
        elif name == LOCK:
            head = _head(out_dir / name, 4096)
            mine = head is not None and bool(_LOCK_TEXT.match(head))
        elif name == MANIFEST_TMP:
            head = _head(out_dir / name)
            mine = head is not None and (head == b"" or bool(_MANIFEST_HEAD.match(head)))
        elif name in (MANIFEST, COMMIT_LOG):
            mine = manifest is not None
        elif PART_RE.match(name):
            mine = name in listed or name in opened
            if mine and name not in listed:
                uncommitted.append(name)
        elif tmp:
            mine = tmp.group(1) in opened and tmp.group(1) not in listed
            if mine:
                uncommitted.append(name)
        else:
            mine = False
        (own if mine else foreign).append(name)
    if MANIFEST_TMP in own:  # a crash in the middle of Manifest.save
        uncommitted.append(MANIFEST_TMP)
    return OutputSurvey(out_dir, manifest, problem, own, uncommitted, foreign)


def describe_names(names: list[str], limit: int = 6) -> str:
    """'a, b and c', or the first ``limit`` names and how many more."""
    shown = names[:limit]
    if len(names) > limit:
        return f"{', '.join(shown)} and {len(names) - limit} more"
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} and {shown[-1]}"


def output_problem(s: OutputSurvey, *, fingerprint: str, overwrite: bool) -> str | None:
    """Why a run with ``fingerprint`` may not start in the surveyed directory; None when it may.

    It may when the directory is absent or empty, or holds this run (a resume), or holds a
    gradcam-batch run and ``overwrite`` is set and every file in it is the run's.
    """
    out = s.out_dir
    if s.problem is not None:
        return f"the output directory {out} holds no gradcam-batch run: {s.problem}; choose another"
    if s.manifest is None:
        if s.foreign:
            return (
                f"the output directory {out} is not empty and holds no gradcam-batch run "
                f"({describe_names(s.foreign)}); choose another"
            )
        return None
    if overwrite:
        if s.foreign:
            return (
                f"--overwrite deletes only the files of the gradcam-batch run in {out}, and it also holds "
                f"{describe_names(s.foreign)}; move them out of the directory, or choose another"
            )
        return None
    if s.manifest.data.get("format") != FORMAT:
        # Its schema and fingerprint are another version's, and its commits carry no tally: upgrading
        # would mean reading every part file back, so it is refused and the README says so.
        return (
            f"{out} holds a run of an earlier version (manifest format {s.manifest.data.get('format')!r}), "
            "which this version does not resume; pass --overwrite to start it again, or choose another "
            "output directory"
        )
    if s.manifest.data.get("fingerprint") != fingerprint:
        return (
            f"{out} holds a run with other settings, model or inputs; pass --overwrite to replace it, "
            "or choose another output directory"
        )
    theirs = s.in_our_names
    if theirs:
        return (
            f"{out} holds {describe_names(theirs)}, which the run there did not write (no commit or open "
            "line of its log names them); move them out of the directory and rerun"
        )
    missing = s.missing()
    if missing:
        return f"{out}: the manifest lists {missing[0]}, which is missing; pass --overwrite to start over"
    return None


def remove_own(s: OutputSurvey, names: list[str]) -> None:
    """Delete these names of the tool's own files: part and temp files first, the manifest last.

    A crash part-way then leaves a manifest whose listed files are missing (an overwrite takes it
    up again) or nothing of the run at all, never a part file that nothing names.
    """
    if not set(names) <= set(s.own) or LOCK in names:  # a guard that survives python -O
        raise RuntimeError(f"refusing to delete {sorted(set(names) - set(s.own)) or [LOCK]}: not the run's own")
    order = {COMMIT_LOG: 1, MANIFEST: 2}
    for name in sorted(names, key=lambda n: order.get(n, 0)):
        with contextlib.suppress(FileNotFoundError):
            (s.out_dir / name).unlink()
    fsync_path(s.out_dir)


def clean_uncommitted(out_dir: Path) -> tuple[Manifest, list[str]]:
    """Delete the uncommitted temp and part files of the run in ``out_dir``; returns its manifest and their names.

    Raises ``ValueError`` when the directory holds no run, a foreign file in the tool's names, or
    lacks a listed file; nothing is deleted then.
    """
    s = survey(out_dir)
    if s.manifest is None:
        raise ValueError(s.problem or f"{out_dir} holds no gradcam-batch run")
    problem = output_problem(s, fingerprint=s.manifest.data.get("fingerprint"), overwrite=False)
    if problem is not None:
        raise ValueError(problem)
    remove_own(s, s.uncommitted)
    return s.manifest, sorted(s.uncommitted)


__all__ = ["OutputSurvey", "clean_uncommitted", "describe_names", "output_problem", "remove_own", "survey"]
