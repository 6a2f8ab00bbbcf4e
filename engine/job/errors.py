"""What can go wrong reading and decoding a run's inputs, and how it is said in one line.

A ``SourceError`` stops the run before it starts; an ``InputReadError`` stops it after (the unit
stays pending, and a rerun resumes it); a ``DecodeError`` becomes one row's ``error``. The
README's ``gradcam-batch run`` section is the user's guide to error rows.
"""

from __future__ import annotations


class SourceError(ValueError):
    """The inputs cannot be read as asked (missing file, not Parquet, missing column, ...)."""


class DecodeError(Exception):
    """One image could not be read or decoded; the message becomes the row's ``error``."""


class InputReadError(OSError):
    """Rows of an input file could not be read (after retries); the original error is the cause.

    Raised, never turned into error rows: the unit stays pending and a rerun resumes it.
    """


__all__ = ["DecodeError", "InputReadError", "SourceError"]
