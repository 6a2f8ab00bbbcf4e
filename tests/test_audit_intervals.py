"""The per-class metric means' 95% intervals: the formulas, the streamed sums, the files."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gradcam_batch.engine.audit import audit
from gradcam_batch.engine.audit.intervals import mean_interval, share_interval, t_quantile
from gradcam_batch.engine.audit.synthetic import write_synthetic_run


def test_t_quantile_matches_scipy():
    from scipy.stats import t

    for df in (1, 2, 5, 6, 9, 30, 200, 10**6):
        assert t_quantile(df) == pytest.approx(t.ppf(0.975, df), rel=1e-4), df


def test_mean_interval_by_hand():
    x = np.array([0.2, 0.4, 0.6, 0.8])
    lo, hi = mean_interval(len(x), x.sum(), (x * x).sum())
    half = 3.182446305 * x.std(ddof=1) / 2
    assert (lo, hi) == pytest.approx((0.5 - half, 0.5 + half))
    assert mean_interval(1, 0.3, 0.09) is None
    assert mean_interval(3, 1.5, 0.75) == pytest.approx((0.5, 0.5))  # no spread, no width


def test_share_interval_wilson():
    # Wilson's interval for 8 of 10 (textbook value: 0.490 to 0.943).
    assert share_interval(10, 8) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    lo, hi = share_interval(20, 0)
    assert lo == 0 and 0.1 < hi < 0.2  # not zero-width at 0%
    assert share_interval(0, 0) is None


def test_normal_interval_covers_about_95_percent():
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(2000):
        x = rng.beta(2, 5, 40)
        lo, hi = mean_interval(40, x.sum(), (x * x).sum())
        hits += lo <= 2 / 7 <= hi
    assert 0.93 <= hits / 2000 <= 0.97


def test_class_intervals_from_the_rows_present(tmp_path):
    """A metric computed on a share of the rows (the rest null) gets its interval from that share."""
    out = tmp_path / "run"
    write_synthetic_run(out, rows_per_class={0: 120, 1: 80}, box_energy=True, rows_per_file=70, seed=5)
    values = {}
    for path in sorted(out.glob("part-*.parquet")):
        t = pq.read_table(path)
        e = t["box_energy"].to_numpy().astype(np.float64)
        rng = np.random.default_rng(len(values))
        keep = rng.random(len(e)) < 0.3  # a 30% metrics sample
        col = pa.array(np.where(keep, e, 0), pa.float32(), mask=~keep)
        hit = pa.array(e > 0.5, pa.bool_(), mask=~keep)
        t = t.set_column(t.schema.get_field_index("box_energy"), "box_energy", col).append_column("pointing_hit", hit)
        pq.write_table(t, path)
        for c, v, k in zip(t["class_index"].to_pylist(), e, keep, strict=True):
            if k:
                values.setdefault(c, []).append(float(np.float32(v)))
    result = audit(out, tmp_path / "rep", spray={"view": "spectral"})
    for c, vals in values.items():
        x = np.asarray(vals)
        cls = result[c]
        assert cls.metric_rows == {"box_energy": len(x), "pointing_hit": len(x)}
        assert cls.metrics["box_energy"] == pytest.approx(x.mean())
        lo, hi = cls.metric_intervals["box_energy"]
        half = t_quantile(len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
        assert (lo, hi) == pytest.approx((x.mean() - half, x.mean() + half), rel=1e-6)
        assert cls.metric_intervals["pointing_hit"] == pytest.approx(share_interval(len(x), float((x > 0.5).sum())))
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    c0 = next(c for c in summary["classes"] if c["class_index"] == 0)
    assert c0["metric_rows"]["box_energy"] == len(values[0])
    lo, hi = c0["metric_intervals"]["box_energy"]
    assert lo <= c0["metrics"]["box_energy"] <= hi
    page = (tmp_path / "rep" / "index.html").read_text()
    assert f"{lo:.3f}–{hi:.3f}" in page


def test_a_mean_interval_is_clipped_to_the_values_range():
    from gradcam_batch.engine.audit.intervals import mean_interval

    values = np.array([0.0, 0.05, 0.9])  # three areas: the unclipped interval reaches below 0 and above 1
    low, high = mean_interval(3, values.sum(), (values**2).sum())
    assert low < 0 and high > 1
    low, high = mean_interval(3, values.sum(), (values**2).sum(), bounds=(0.0, 1.0))
    assert (low, high) == (0.0, 1.0)
    wide = mean_interval(200, 100.0, 60.0, bounds=(0.0, 1.0))  # far from the bounds: unchanged
    assert wide == mean_interval(200, 100.0, 60.0)
