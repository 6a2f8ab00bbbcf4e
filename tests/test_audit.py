"""The audit: SpRAy on planted structure, the eigengap rule, flags, the streaming reader, the files, the CLI.

The runs here are synthetic part files (``engine/audit/synthetic.py``): Gaussian-blob heatmaps, no
model. Most tests use the spectral 2-D view, which is instant; one checks t-SNE on a small class.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from run_support import invoke

from gradcam_batch.engine.audit import AuditInputError, audit
from gradcam_batch.engine.audit.flags import place_words, region_shares
from gradcam_batch.engine.audit.reader import resample_matrix, row_keys
from gradcam_batch.engine.audit.spray import eigengap_k
from gradcam_batch.engine.audit.synthetic import write_synthetic_run

FAST = {"spray": {"view": "spectral"}}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Class 0: half its maps in the top-left corner, half on the object. Class 1: all on the object."""
    out = tmp_path_factory.mktemp("planted")
    truth = write_synthetic_run(out, rows_per_class={0: 240, 1: 200}, planted={0: 0.5}, rows_per_file=150, seed=3)
    return out, truth


@pytest.fixture(scope="module")
def planted_report(planted, tmp_path_factory):
    out, truth = planted
    report = tmp_path_factory.mktemp("report")
    return audit(out, report, **FAST), report, truth


def _purity(labels: np.ndarray, truth: np.ndarray) -> float:
    """Share of rows whose cluster's majority truth value is their own."""
    total = 0
    for c in np.unique(labels):
        total += max(Counter(truth[labels == c].tolist()).values())
    return total / len(labels)


def test_spray_separates_planted_groups_and_flags_the_corner(planted_report):
    result, report, truth = planted_report
    c0 = result[0]
    assert (c0.k, c0.eigengap_k, c0.rows, c0.sampled) == (2, 2, 240, 240)
    t = pq.read_table(report / "clusters.parquet")
    corner_of = dict(zip(truth["ids"].tolist(), truth["corner"].tolist(), strict=True))
    rows0 = t.filter(t["class_index"].to_numpy() == 0)
    labels = rows0["cluster"].to_numpy()
    is_corner = np.array([corner_of[i] for i in rows0["id"].to_pylist()])
    assert _purity(labels, is_corner) >= 0.9
    flagged = c0.flagged
    assert len(flagged) == 1
    corner_cluster = flagged[0].cluster
    # The flagged cluster is the corner one, and its reason says where its mass is.
    assert is_corner[labels == corner_cluster].mean() >= 0.9
    assert "top-left corner" in flagged[0].flags[0]
    assert rows0.filter(rows0["flagged"])["cluster"].to_pylist() == [corner_cluster] * int(
        (labels == corner_cluster).sum()
    )


def test_eigengap_picks_one_cluster_without_structure(planted_report):
    result, _, _ = planted_report
    c1 = result[1]
    assert (c1.k, c1.eigengap_k) == (1, 1)
    assert not c1.flagged
    # Flagged classes come first.
    assert [c.class_index for c in result.classes] == [0, 1]


def test_eigengap_rule_on_given_spectra():
    assert eigengap_k(np.array([0, 0, 0.03, 0.031, 0.05]), 30) == 2
    assert eigengap_k(np.array([0, 1e-4, 2e-4, 0.2, 0.21, 0.22]), 30) == 3
    # A steadily rising spectrum (a continuum of maps) has ratios of at most 2: one cluster.
    assert eigengap_k(np.array([0, 0.012, 0.013, 0.027, 0.042, 0.048, 0.063]), 30) == 1
    assert eigengap_k(np.array([0.0]), 30) == 1
    assert eigengap_k(np.array([0, 0, 0.03]), 1) == 1  # max_clusters caps k


def test_fixed_cluster_count(planted, tmp_path):
    out, _ = planted
    result = audit(out, None, classes=[1], spray={"view": "spectral", "clusters": 3})
    assert [c.class_index for c in result.classes] == [1]
    assert result[1].k == 3 and result[1].eigengap_k == 1
    assert sum(k.size for k in result[1].clusters) == 200


def test_files(planted_report):
    result, report, _ = planted_report
    t = pq.read_table(report / "clusters.parquet")
    assert t.column_names == [
        "id", "class_index", "method", "cluster", "embedding_x", "embedding_y", "flagged",
        "shortcut_score", "evidence", "position_score", "pattern_score", "attention_y", "attention_x",
    ]  # fmt: skip
    assert t.num_rows == 440 and set(t["method"].to_pylist()) == {"gradcam"}
    assert t["flagged"].null_count == 0
    summary = json.loads((report / "summary.json").read_text())
    assert summary == json.loads(json.dumps(result.summary))
    assert summary["totals"]["flagged_clusters"] == 1
    assert summary["spray"]["neighbors"] == 10 and summary["spray"]["eigenvalues"] == 32
    c0 = summary["classes"][0]
    assert c0["class_index"] == 0 and c0["flagged_clusters"] and c0["clusters"][0]["flagged"]
    assert np.asarray(c0["mean_heatmap"]).shape == (32, 32)
    assert {"size", "share", "spread", "prototype", "regions", "metrics", "flags"} <= set(c0["clusters"][0])
    page = (report / "index.html").read_text()
    # Self-contained: images inline, nothing fetched from anywhere.
    assert "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page and "<link" not in page
    assert page.index('id="class-0-gradcam"') < page.index('id="class-1-gradcam"')
    assert "1 finding:" in page and "near the top-left corner" in page


def test_metric_columns_are_used_when_present(tmp_path):
    out = tmp_path / "run"
    write_synthetic_run(out, rows_per_class={0: 120, 1: 60}, planted={0: 0.5}, box_energy=True, seed=5)
    result = audit(out, tmp_path / "rep", **FAST)
    c0 = result[0]
    assert c0.metrics["box_energy"] == pytest.approx(c0.metrics["box_energy"])
    assert set(c0.metrics) == {"box_energy"}
    flagged = c0.flagged[0]
    assert "boxes" in flagged.evidence and any("inside the labelled boxes" in f for f in flagged.flags)
    assert flagged.metrics["box_energy"] < 0.1
    # Worst-localized rows: the lowest box energies, lowest first.
    assert len(c0.worst_ids) == 8 and c0.worst_values == sorted(c0.worst_values) and c0.worst_values[0] < 0.1
    assert "Worst-localized images" in (tmp_path / "rep" / "index.html").read_text()


def test_subsample_is_fixed_by_the_seed_and_reported(planted, tmp_path):
    out, _ = planted
    a = audit(out, tmp_path / "a", max_per_class=50, **FAST)
    audit(out, tmp_path / "b", max_per_class=50, **FAST)
    assert a[0].sampled == 50 and a[0].rows == 240
    assert (
        pq.read_table(tmp_path / "a" / "clusters.parquet")["id"].to_pylist()
        == pq.read_table(tmp_path / "b" / "clusters.parquet")["id"].to_pylist()
    )
    assert any("subsample of 50" in n for n in a.summary["notes"])
    assert "uniform subsample" in (tmp_path / "a" / "index.html").read_text()


def test_streaming_in_chunks_equals_one_pass(planted):
    """A memory budget below one class's maps reads the maps once per class: the same result."""
    out, _ = planted
    whole = audit(out, None, **FAST)
    tiny = audit(out, None, memory_mb=0, **FAST)
    for a, b in zip(whole.classes, tiny.classes, strict=True):
        assert a.class_index == b.class_index and a.k == b.k
        np.testing.assert_allclose(a.mean_heatmap, b.mean_heatmap)
        assert [k.size for k in a.clusters] == [k.size for k in b.clusters]


def test_mean_heatmap_covers_every_row(planted):
    out, _ = planted
    t = pq.read_table(sorted(out.glob("part-*.parquet")))
    maps = t["heatmap"].combine_chunks().to_numpy_ndarray().astype(np.float64) / 255
    cls = t["class_index"].to_numpy()
    result = audit(out, None, max_per_class=20, **FAST)
    np.testing.assert_allclose(result[1].mean_heatmap, maps[cls == 1].mean(0), atol=1e-6)


def test_resample_matrix():
    m = resample_matrix(8, 4)
    np.testing.assert_allclose(m.sum(1), 1)
    np.testing.assert_allclose(m @ np.arange(8.0), [0.5, 2.5, 4.5, 6.5])
    m = resample_matrix(7, 3)  # uneven: overlapping pixel shares, still averages
    np.testing.assert_allclose(m.sum(1), 1)
    np.testing.assert_allclose(m @ np.ones(7), 1)
    up = resample_matrix(2, 4)  # bilinear, half-pixel centres
    np.testing.assert_allclose(up @ np.array([0.0, 1.0]), [0, 0.25, 0.75, 1])


def test_row_keys_are_a_fixed_permutation():
    k = row_keys(np.arange(1000), 0)
    assert len(np.unique(k)) == 1000
    np.testing.assert_array_equal(k, row_keys(np.arange(1000), 0))
    assert not np.array_equal(k, row_keys(np.arange(1000), 1))


def test_regions_describe_never_flag():
    """Corners and the band are words for where mass or a spot is; no rule flags by them."""
    corner = np.zeros((32, 32))
    corner[:6, :6] = 1
    assert region_shares(corner)["top-left corner"] == pytest.approx(1)
    assert place_words((2.0, 3.0), (32, 32)) == "near the top-left corner"
    assert place_words((30.0, 16.0), (32, 32)) == "in the border band"
    assert place_words((10.0, 20.0), (32, 32)) == "inside the image"


def test_tsne_view(tmp_path):
    out = tmp_path / "run"
    write_synthetic_run(out, rows_per_class={2: 60}, planted={2: 0.5}, seed=1)
    result = audit(out, None, spray={"perplexity": 10})
    c = result[2]
    assert c.view == "tsne" and c.embedding.shape == (60, 2) and np.isfinite(c.embedding).all()
    assert c.k == 2


def test_errors_and_bad_inputs(tmp_path):
    with pytest.raises(AuditInputError, match="no part"):
        audit(tmp_path, None)
    res = invoke(["audit", str(tmp_path), "-o", str(tmp_path / "r")])
    assert res.exit_code == 2 and "holds no part-*.parquet" in res.output


def test_cli(planted, tmp_path):
    out, _ = planted
    res = invoke(["audit", str(out), "-o", str(tmp_path / "r"), "--view", "spectral", "--no-overlays"])
    assert res.exit_code == 0, res.output
    assert "audited 440 heatmaps in 2 classes: 3 clusters, 1 flagged" in res.output
    assert re.search(r"flagged, strength 0\.\d\d \(position[a-z+]*\): class 0, cluster", res.output), res.output
    assert "top-left corner" in res.output
    assert f"report: {tmp_path / 'r' / 'index.html'}" in res.output
    res = invoke(["audit", str(out), "-o", str(tmp_path / "r"), "--clusters", "x"])
    assert res.exit_code == 2 and "expected auto or a positive integer" in res.output


def test_package_exports_audit_lazily():
    import subprocess
    import sys

    code = "import sys, gradcam_batch; gradcam_batch.audit; gradcam_batch.AuditResult; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
