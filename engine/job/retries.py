"""Reading again after a transient ``OSError``: which errors are worth another try, and how long to wait.

``call_with_retries`` takes its ``sleep`` as an argument, so that tests count the waits instead of
sleeping them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

# A transient OSError while reading is tried again, READ_ATTEMPTS tries in all, waiting
# READ_RETRY_DELAY_S, then twice as long each time, at most READ_RETRY_MAX_DELAY_S.
READ_ATTEMPTS = 3
READ_RETRY_DELAY_S = 0.05
READ_RETRY_MAX_DELAY_S = 2.0

_T = TypeVar("_T")


def is_permanent_os_error(exc: OSError) -> bool:
    """True for errors that another try cannot fix: missing, not a file, no permission."""
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return True
    # pyarrow reports a directory as a plain OSError.
    text = str(exc).lower()
    return "is a directory" in text or "not a file" in text


def call_with_retries(
    fn: Callable[[], _T],
    *,
    attempts: int = READ_ATTEMPTS,
    delay: float = READ_RETRY_DELAY_S,
    max_delay: float = READ_RETRY_MAX_DELAY_S,
    sleep: Callable[[float], object] = time.sleep,
) -> _T:
    """``fn()``, tried up to ``attempts`` times while it raises a transient ``OSError``.

    Waits ``delay``, ``2 * delay``, ... (at most ``max_delay``) between tries. A permanent error
    (``is_permanent_os_error``) and the last try's error are raised as they are, so a transient
    error that escapes has always been tried ``attempts`` times.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except OSError as exc:
            if attempt == attempts or is_permanent_os_error(exc):
                raise
            sleep(min(max_delay, delay * 2 ** (attempt - 1)))
    raise AssertionError("unreachable")


__all__ = [
    "READ_ATTEMPTS",
    "READ_RETRY_DELAY_S",
    "READ_RETRY_MAX_DELAY_S",
    "call_with_retries",
    "is_permanent_os_error",
]
