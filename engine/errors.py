"""The one line of an exception that an error message quotes: a leaf module, imported by every layer
(the audit's torch-free modules too), so it imports nothing."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first non-blank line of ``str(exc)``, or the exception's type name when it has no text."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = ["first_line"]
