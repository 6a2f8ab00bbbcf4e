"""SpRAy's parts on hand-built data: the kNN graph, k-means, the other clusterings, the view rule.

The kNN search and k-means are numpy (no per-call library overhead, for audits of many small
classes); these tests hold them to brute force and to scikit-learn on data with a clear answer.
"""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from gradcam_batch.engine.audit import spray as sp


def _blobs(n_per: int, centres: list[tuple[float, ...]], scale: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.concatenate([np.asarray(c) + scale * rng.standard_normal((n_per, len(c))) for c in centres])
    return x, np.repeat(np.arange(len(centres)), n_per)


def test_knn_graph_equals_brute_force():
    rng = np.random.default_rng(0)
    x = rng.random((300, 40))
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    want = np.argsort(d, axis=1)[:, :5]
    a = sp.knn_affinity(x, 5).toarray()
    for i in range(len(x)):
        # Row i of (A + A^T) / 2 holds i's neighbours (at 0.5 or 1) and those that chose i.
        assert set(want[i]) <= set(np.flatnonzero(a[i]))
    np.testing.assert_array_equal(a, a.T)
    assert np.diag(a).sum() == 0
    assert set(np.unique(a)) <= {0.0, 0.5, 1.0}


def test_knn_graph_in_blocks_equals_one_block(monkeypatch):
    x = np.random.default_rng(1).random((97, 12))
    whole = sp.knn_affinity(x, 4).toarray()
    monkeypatch.setattr(sp, "KNN_CHUNK_BYTES", 4 * 97 * 3)  # blocks of 3 rows
    np.testing.assert_array_equal(sp.knn_affinity(x, 4).toarray(), whole)


def test_knn_graph_with_duplicates_has_no_self_edges():
    x = np.zeros((6, 3))
    x[3:] = 1.0
    a = sp.knn_affinity(x, 2).toarray()
    assert np.diag(a).sum() == 0 and (a[:3, 3:] == 0).all()


def test_kmeans_finds_separated_blobs_like_scikit_learn():
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    x, truth = _blobs(80, [(1, 0, 0), (0, 1, 0), (0, 0, 1), (-1, 0, 0)], 0.08, seed=2)
    labels = sp.kmeans(x, 4, seed=0)
    assert adjusted_rand_score(truth, labels) == 1.0
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    with threadpool_limits(1):  # scikit-learn's threads are slow on a shared machine
        ref = KMeans(n_clusters=4, n_init=10, random_state=0).fit_predict(u)
    assert adjusted_rand_score(ref, labels) == 1.0
    np.testing.assert_array_equal(labels, sp.kmeans(x, 4, seed=0))  # fixed by the seed


def test_kmeans_edge_cases():
    assert (sp.kmeans(np.ones((5, 3)), 1) == 0).all()
    assert sp.kmeans(np.zeros((0, 3)), 3).shape == (0,)
    labels = sp.kmeans(np.random.default_rng(0).random((4, 6)), 9)  # more clusters than points
    assert len(labels) == 4 and labels.max() < 4


def test_other_clusterings():
    assert sp.other_ks(1, 100) == [1, 2, 3, 4, 5]
    assert sp.other_ks(3, 100) == [2, 3, 4, 5]
    assert sp.other_ks(9, 100) == [2, 3, 4, 5, 8, 9, 10]
    assert sp.other_ks(2, 3) == [1, 2, 3]
    from gradcam_batch.engine.audit.synthetic import blob_maps

    centres, _ = _blobs(40, [(4, 4), (4, 20), (20, 12)], 1.0, seed=3)  # three places, jittered
    maps = blob_maps(centres.astype(np.float32), 24, 2.5, np.random.default_rng(3)) / 255.0
    res = sp.spray(maps, sp.SprayParams(view="spectral"))
    assert res.k == 3 and sorted(res.clusterings) == [2, 3, 4, 5]
    np.testing.assert_array_equal(res.clusterings[3], res.labels)
    for k, labels in res.clusterings.items():
        sizes = np.bincount(labels)
        assert len(sizes) == k and (np.diff(sizes) <= 0).all()  # numbered by size, largest first


def test_view_rule():
    assert sp.resolve_view("auto", 5000, 50) == ("tsne", None)
    view, why = sp.resolve_view("auto", 5001, 2)
    assert view == "spectral" and "5,001 maps in 2 classes" in why and "--view tsne" in why
    assert sp.resolve_view("auto", 100, 51)[0] == "spectral"
    assert sp.resolve_view("tsne", 10**6, 1000) == ("tsne", None)


@pytest.mark.parametrize("library", ["openTSNE", "scikit-learn"])
def test_tsne_with_either_library(monkeypatch, library):
    if library == "openTSNE":
        pytest.importorskip("openTSNE")
    else:
        monkeypatch.setattr(sp, "tsne_library", lambda: "scikit-learn")
    x, _ = _blobs(20, [(0,) * 6, (5,) * 6], 0.2, seed=4)
    with threadpool_limits(1):
        xy, used = sp.view_2d(x, "tsne", perplexity=30, seed=0)
    assert used == "tsne" and xy.shape == (40, 2) and np.isfinite(xy).all()
    a, b = xy[:20].mean(0), xy[20:].mean(0)
    assert np.linalg.norm(a - b) > 2 * max(xy[:20].std(0).max(), xy[20:].std(0).max())


def test_the_view_and_its_library_are_said(tmp_path, monkeypatch):
    from gradcam_batch.engine.audit import audit, pipeline
    from gradcam_batch.engine.audit.synthetic import write_synthetic_run

    out = tmp_path / "run"
    write_synthetic_run(out, rows_per_class={0: 40, 1: 30}, planted={0: 0.5}, seed=6)
    monkeypatch.setattr(sp, "AUTO_TSNE_MAPS", 50)  # 70 maps: above it
    result = audit(out, tmp_path / "rep")
    assert {c.view for c in result.classes} == {"spectral"} and result.summary["spray"]["view_used"] == "spectral"
    note = next(n for n in result.summary["notes"] if n.startswith("2-D view: spectral"))
    assert "70 maps in 2 classes" in note and note in (tmp_path / "rep" / "index.html").read_text()
    monkeypatch.setattr(sp, "AUTO_TSNE_MAPS", 5000)
    monkeypatch.setattr(pipeline, "tsne_library", lambda: "scikit-learn")
    monkeypatch.setattr(sp, "tsne_library", lambda: "scikit-learn")
    with threadpool_limits(1):
        result = audit(out, None)
    assert {c.view for c in result.classes} == {"tsne"}
    assert any(n.startswith("t-SNE by scikit-learn, since openTSNE is not installed") for n in result.summary["notes"])
