"""95% intervals for the per-class metric means, from sums that the reader streams.

The interval is for the metric's mean over images like the class's: the audited rows are taken
as a random sample of them. It is computed from the rows that hold a value, so a run that
computed its metrics on a sampled share of the rows gets wider intervals, not wrong ones. No
finite-population correction: an audit of every image still has an interval, which says how far
another draw of the same kind of images could move the mean.

- A continuous metric (``deletion_auc``, ``insertion_auc``, ``confidence_drop``, ``box_energy``,
  ``box_iou``): mean +- t * s / sqrt(n), with s the sample standard deviation and t Student's
  0.975 quantile with n - 1 degrees of freedom (1.96 for large n). From the count, the sum and
  the sum of squares, so one streaming pass and three numbers per class are enough.
- A share (``pointing_hit``, ``confidence_increase``: booleans): the Wilson score interval, which
  stays inside [0, 1] and is not zero-width at 0% or 100%, where the normal one fails.

Why not the bootstrap: it needs every value of a class in memory (or a pass per resample), and
at the sizes where an interval matters (hundreds of rows and up), the normal and the bootstrap
interval of a mean agree to the digits the report shows.
"""

from __future__ import annotations

import math

Z = 1.959963984540054  # the standard normal's 0.975 quantile
_T_SMALL = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305, 4: 2.776445105, 5: 2.570581836, 6: 2.446911851}


def t_quantile(df: int) -> float:
    """Student's t 0.975 quantile: tabled for df <= 6, else four terms of the Cornish-Fisher expansion
    in 1/df (error under 5e-5)."""
    if df < 1:
        raise ValueError("df must be at least 1")
    if df in _T_SMALL:
        return _T_SMALL[df]
    z = Z
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
        + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * df**4)
    )


def mean_interval(
    n: int, total: float, total_sq: float, bounds: tuple[float, float] | None = None
) -> tuple[float, float] | None:
    """The 95% interval of a mean from n values' sum and sum of squares; None below two values.

    ``bounds``: the range the values lie in (and so their mean); the interval is clipped to it, so that a
    few rows of an area or an AUC never give an interval below 0 or above 1."""
    if n < 2:
        return None
    mean = total / n
    var = max(total_sq - n * mean * mean, 0.0) / (n - 1)
    half = t_quantile(n - 1) * math.sqrt(var / n)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return low, high


def share_interval(n: int, hits: float) -> tuple[float, float] | None:
    """The 95% Wilson score interval of a share ``hits / n``; None without values."""
    if n < 1:
        return None
    p = hits / n
    z2 = Z * Z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


__all__ = ["Z", "mean_interval", "share_interval", "t_quantile"]
