"""The audit's evidence rules on hand-built maps and images: where maps look, what they see, and when a
subset of a class is flagged for it (issue 19, items 1, 2 and 5).

Unit tests of ``evidence.py`` / ``class_evidence.py`` on arrays, then whole audits of small synthetic
runs with images (``synthetic.write_image_run``): identical shapes anywhere or centred (no flag), a
fixed mark and a moving mark on part of the class (flagged, split into a cluster of their own).
"""

from __future__ import annotations

import html
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gradcam_batch.engine.audit import audit
from gradcam_batch.engine.audit import class_evidence as cev
from gradcam_batch.engine.audit import evidence as ev
from gradcam_batch.engine.audit.images import InputImages
from gradcam_batch.engine.audit.synthetic import MARK_AT, write_image_run

P = ev.FlagParams()
FAST = {"spray": {"view": "spectral"}}


def _blobs(centres: np.ndarray, size: int = 32, sigma: float = 2.0) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    d2 = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
    return np.exp(-d2 / (2 * sigma**2)).astype(np.float32)


# -- where the maps look ---------------------------------------------------------------------------


def test_attention_point_is_the_centroid_of_the_plateau():
    maps = _blobs(np.array([[10.0, 20.0], [3.3, 28.7]]))
    maps[1, 0:2, :] = 0  # the second blob cut by the border
    flat = np.zeros((1, 32, 32), np.float32)
    pts, ok = ev.attention_points(np.concatenate([maps, flat]), half=4)
    np.testing.assert_allclose(pts[0], [10.0, 20.0], atol=0.05)
    assert abs(pts[1, 1] - 28.7) < 0.2 and pts[1, 0] > 3.3  # pulled inward, off the cut rows
    assert ok.tolist() == [True, True, False]


def test_position_scores_tell_a_spot_from_a_spread():
    rng = np.random.default_rng(0)
    spread = rng.uniform(0, 32, size=(200, 2))
    spot = np.vstack([spread[:120], np.full((80, 2), 8.0) + rng.normal(0, 0.2, size=(80, 2))])
    s_spread = ev.position_scores(spread, (32, 32), P)
    s_spot = ev.position_scores(spot, (32, 32), P)
    assert np.median(s_spread) < 0.15
    assert np.median(s_spot[120:]) > 0.7 and np.median(s_spot[:120]) < 0.15


@pytest.mark.parametrize(
    ("layout", "found"),
    [("spot-and-spread", True), ("spread", False), ("whole-class-spot", False), ("rest-around-the-spot", False)],
)
def test_position_subset_needs_a_proper_subset_while_the_rest_moves(layout, found):
    rng = np.random.default_rng(1)
    n = 200
    at_spot = np.full((n, 2), 12.0) + rng.normal(0, 0.2, size=(n, 2))
    if layout == "spot-and-spread":
        pts = np.vstack([at_spot[:80], rng.uniform(0, 32, size=(120, 2))])
    elif layout == "spread":
        pts = rng.uniform(0, 32, size=(n, 2))
    elif layout == "whole-class-spot":  # a centre-cropped dataset: every map in one place
        pts = at_spot
    else:  # centred objects of varying size: the rest sits around the same spot
        pts = np.vstack([at_spot[:80], 12 + rng.uniform(-4, 4, size=(120, 2))])
    sub, spot = ev.position_subset(pts, np.ones(n, bool), (32, 32), P, np.random.default_rng(0))
    assert spot is not None
    assert (sub is not None) == found
    if found:
        assert sub.members[:80].all() and sub.members[80:].mean() < 0.05
        assert sub.strength >= P.threshold and sub.p_value <= P.alpha
        np.testing.assert_allclose(sub.figures["centre"], [12, 12], atol=0.3)


def test_two_groups_keeps_the_share_bounds_and_the_permutation_test_sees_a_shift():
    x = np.r_[np.zeros(90), np.ones(10)]
    cut = ev.two_groups(x, 0.05, 0.8)
    assert 0 < cut < 1
    assert ev.two_groups(np.r_[np.zeros(99), 1.0], 0.05, 0.8) is None  # 1% is no proper subset
    assert ev.two_groups(np.ones(50), 0.05, 0.8) is None  # nothing to split
    rng = np.random.default_rng(0)
    assert ev.permutation_p(rng.normal(1, 1, 30), rng.normal(0, 1, 30), 500, rng) < 0.01
    assert ev.permutation_p(rng.normal(0, 1, 30), rng.normal(0, 1, 30), 500, rng) > 0.05


# -- what the maps see -----------------------------------------------------------------------------


def _checker(side: int = 6) -> np.ndarray:
    yy, xx = np.mgrid[0:side, 0:side]
    return np.where(((yy // 2 + xx // 2) % 2).astype(bool)[..., None], (250, 250, 250), (250, 210, 30)).astype(np.uint8)


def test_crops_line_up_one_mark_seen_at_different_offsets():
    rng = np.random.default_rng(0)
    crops = []
    for dy, dx in [(0, 0), (3, -2), (-2, 3), (1, 1)]:
        img = (80 + rng.normal(0, 10, size=(48, 48, 3))).clip(0, 255).astype(np.uint8)
        img[20 + dy : 26 + dy, 20 + dx : 26 + dx] = _checker()
        crops.append(ev.crop_at(img, (23.0, 23.0), 12, 12))  # the attention point misses the mark's centre
    sim, ok = ev.similarity_top(np.stack(crops), np.arange(4), 1, P.flat_std)
    assert ok.all() and np.tanh(sim).min() > 0.9  # nearly the same crop in all four


def test_similarity_never_compares_a_crop_with_itself_and_skips_flat_crops():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, size=(3, 14, 14, 3)).astype(np.uint8)
    flat = np.full((1, 14, 14, 3), 128, np.uint8)
    crops = np.concatenate([noise, flat])
    sim, ok = ev.similarity_top(crops, np.arange(4), 1, P.flat_std)
    assert ok.tolist() == [True, True, True, False] and np.isnan(sim[3])
    assert np.tanh(sim[:3]).max() < 0.5  # unrelated noise: far from its own perfect match


def test_box_point_is_inside_the_box_and_away_from_the_attention():
    box = np.array([10.0, 20.0, 30.0, 40.0])  # x0, y0, x1, y1
    y, x = ev.box_point(box, (2.0, 2.0), 6.0)
    assert (y, x) == (30.0, 20.0)  # the centre, far enough
    y, x = ev.box_point(box, (30.0, 20.0), 4.0)  # at the centre: a point a quarter of the box away
    assert 20 <= y <= 40 and 10 <= x <= 30 and max(abs(y - 30), abs(x - 20)) >= 4
    y, x = ev.box_point(box, (30.0, 20.0), 50.0)  # nothing that far: the farthest candidate
    assert max(abs(y - 30), abs(x - 20)) == 5.0


# -- decisions -------------------------------------------------------------------------------------


def test_box_rule_needs_the_cluster_to_separate_from_the_rest():
    rng = np.random.default_rng(0)
    members = np.r_[np.ones(40, bool), np.zeros(100, bool)]
    apart = np.r_[rng.uniform(0.0, 0.1, 40), rng.uniform(0.4, 0.8, 100)]
    f = cev.box_finding(apart, members, P, rng)
    assert f is not None and f.flagged and f.kinds == ("boxes",)
    # A cluster lower on average but overlapping the rest (a control case the old rule flagged).
    overlap = np.r_[rng.uniform(0.08, 0.26, 40), rng.uniform(0.2, 0.6, 100)]
    f = cev.box_finding(overlap, members, P, rng)
    assert f is None or not f.flagged


def test_a_class_alike_as_a_whole_is_flagged_only_when_its_peaks_miss_its_boxes():
    n = 60
    ce = cev.ClassEvidence(np.zeros((n, 2)), np.ones(n, bool), np.zeros(n), 2, None, spot_share=0.95)
    assert cev._whole_class(ce, np.ones(n), P) is None  # centred objects, peaks on them: the object
    assert cev._whole_class(ce, None, P) is None  # no boxes: no independent evidence
    f = cev._whole_class(ce, np.r_[np.ones(6), np.zeros(n - 6)], P)
    assert f is not None and f.whole_class and f.flagged and f.members.all()


def _spot_evidence(spot: tuple[float, float], pattern: float | None) -> tuple[cev.ClassEvidence, cev.Finding]:
    """A class of 60 maps whose first 15 peak at ``spot``; pattern scores ``pattern`` (None: crops not read)."""
    rng = np.random.default_rng(0)
    n = 60
    points = rng.uniform(6, 26, size=(n, 2))
    points[:15] = np.asarray(spot) + rng.normal(0, 0.3, size=(15, 2))
    ce = cev.ClassEvidence(points, np.ones(n, bool), np.zeros(n), 2, None, spot_share=0.25)
    ce.size, ce.cell = (32, 32), 32 / 8
    ce.pattern = None if pattern is None else np.full(n, pattern)
    members = np.r_[np.ones(15, bool), np.zeros(n - 15, bool)]
    f = cev.Finding(("position",), members, 0.9, True, {"position": {"centre": list(spot)}}, location=spot)
    return ce, f


def test_a_spot_in_a_corner_cell_with_nothing_alike_is_not_flagged_on_its_position_alone():
    ce, f = _spot_evidence((1.0, 30.5), pattern=0.0)  # the top-right corner cell, crops read, nothing alike
    cev._corner_cell_check(ce, f)
    assert not f.flagged and f.figures["position"]["corner_cell"] and "zero padding" in f.extra["not_flagged"]
    # The same spot one cell further in (the planted corner mark's place) stays flagged.
    ce, f = _spot_evidence((6.0, 25.0), pattern=0.0)
    cev._corner_cell_check(ce, f)
    assert f.flagged
    # Without images nothing tells padding from a mark: flagged as before.
    ce, f = _spot_evidence((1.0, 30.5), pattern=None)
    cev._corner_cell_check(ce, f)
    assert f.flagged
    # A spot with pattern evidence is not position alone.
    ce, f = _spot_evidence((1.0, 1.0), pattern=0.0)
    f.kinds = ("position", "pattern")
    cev._corner_cell_check(ce, f)
    assert f.flagged


def test_corner_cells_are_one_cell_wide_on_every_side():
    size, cell = (64, 64), 8.0
    assert cev.in_corner_cell((7.9, 7.9), size, cell) and cev.in_corner_cell((56.1, 56.1), size, cell)
    assert cev.in_corner_cell((0.5, 63.5), size, cell) and cev.in_corner_cell((63.5, 0.5), size, cell)
    # One pixel further in, on either side: no longer the corner cell (mirror images of each other).
    assert not cev.in_corner_cell((8.5, 8.5), size, cell) and not cev.in_corner_cell((55.5, 55.5), size, cell)
    assert not cev.in_corner_cell((55.2, 55.2), size, cell)  # pixel 55 lies in the seventh cell of eight


def test_carve_gives_a_flagged_subset_its_own_cluster():
    labels = np.zeros(10, np.int64)
    members = np.r_[np.ones(4, bool), np.zeros(6, bool)]
    f = cev.Finding(("pattern",), members, 0.9, True, {})
    weak = cev.Finding(("position",), ~members, 0.2, False, {})
    out = cev.carve(labels, [f, weak])
    assert out.tolist() == [1] * 4 + [0] * 6 and f.cluster == 1 and weak.cluster is None
    same = cev.Finding(("pattern",), out == 1, 0.9, True, {})
    assert cev.carve(out, [same]).tolist() == out.tolist() and same.cluster == 1  # already one cluster


# -- whole audits of runs with images --------------------------------------------------------------


def _audit(tmp_path, case: str, **options):
    truth = write_image_run(
        tmp_path / "run", tmp_path / "in" / "images.parquet", case=case, identical=case in ("anywhere", "centred")
    )
    result = audit(tmp_path / "run", tmp_path / "rep", images=[str(tmp_path / "in")], **FAST, **options)
    t = pq.read_table(tmp_path / "rep" / "clusters.parquet")
    marked = dict(zip(truth["ids"].tolist(), truth["marked"].tolist(), strict=True))
    is_marked = np.array([marked[i] for i in t["id"].to_pylist()])
    return result, t, is_marked


@pytest.mark.parametrize("case", ["anywhere", "centred"])
def test_no_flag_on_identical_shapes_anywhere_or_centred(tmp_path, case):
    """Identical shapes at random places (some cut by the border), or all centred: their object, no shortcut."""
    result, t, _ = _audit(tmp_path, case)
    assert not result.flagged and not t["flagged"].to_numpy(zero_copy_only=False).any()
    assert result.summary["findings"] == [] and result.summary["evidence"]["images_read"] == 150
    assert "pattern" in result.summary["evidence"]["kinds"]


def test_a_fixed_mark_is_flagged_by_position_and_pattern_and_split_into_its_own_cluster(tmp_path):
    result, t, marked = _audit(tmp_path, "fixed")
    flagged = t["flagged"].to_numpy(zero_copy_only=False)
    assert flagged[marked].mean() >= 0.9 and marked[flagged].mean() >= 0.95
    c = result[0]
    (cl,) = c.flagged
    assert cl.evidence == "position+pattern" and cl.strength >= P.threshold
    assert set(t.filter(t["flagged"])["evidence"].to_pylist()) == {"position+pattern"}
    assert set(t.filter(t["flagged"])["cluster"].to_pylist()) == {cl.cluster}
    assert c.k > c.spray_k and cl.cluster == c.k - 1  # the split shows as a cluster of its own
    (finding,) = result.summary["findings"]
    assert finding["evidence"] == "position+pattern" and finding["strength"] == round(cl.strength, 4)
    assert np.abs(np.asarray(finding["location"]) - (np.asarray(MARK_AT) + 3)).max() <= 3  # the mark's centre
    assert "inside the image" in finding["sentence"] and finding["sentence"] == cl.flags[0]
    # The page shows the evidence: strength, sentence, the ringed prototype, overlays and attended crops
    # of the flagged cluster and of the class's unflagged cluster for contrast.
    page = (tmp_path / "rep" / "index.html").read_text()
    card = page[page.index("<div class=fcard") : page.index("<div class=legend>")]
    assert f'data-strength="{cl.strength:.4f}"' in card and "strength " in card and "position</span>" in card
    contrast = max((k for k in c.clusters if not k.flagged), key=lambda k: k.size)
    assert f"flagged: cluster {cl.cluster}" in card and f"contrast: cluster {contrast.cluster} " in card
    assert "the ring: the spot" in card
    assert card.count('alt="attended"') == 12 and card.count('alt="overlay"') == 12
    assert html.escape(cl.flags[0]) in card
    # Sorting by shortcut_score puts the marked images first.
    order = np.argsort(-t["shortcut_score"].fill_null(-1).to_numpy())
    assert marked[order[: int(marked.sum())]].mean() >= 0.9


def test_a_moving_mark_is_flagged_by_pattern(tmp_path):
    result, t, marked = _audit(tmp_path, "moving")
    flagged = t["flagged"].to_numpy(zero_copy_only=False)
    assert flagged[marked].mean() >= 0.9 and marked[flagged].mean() >= 0.95
    (cl,) = result[0].flagged
    assert cl.evidence == "pattern" and "wherever it sits in the image" in cl.flags[0]
    assert result[0].spray_k == 1 and result[0].k == 2
    # The page's class section says where the second cluster came from, and its scatter's chosen
    # clustering is the split one (SpRAy's other ks stay switchable).
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "2 clusters (eigengap: SpRAy's 1, and 1 that evidence split off)" in page
    data = json.loads(page.split('<script type="application/json" class=scatter-data>')[1].split("</script>")[0])
    shown = np.asarray(result[0].points)
    assert data["k"] == 2 and data["labels"]["2"] == "".join(str(v) for v in result[0].labels[shown])
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["classes"][0]["findings"][0]["flagged"] and summary["totals"]["flagged_rows"] == flagged.sum()


def test_without_images_the_pattern_evidence_is_skipped_and_the_report_says_so(tmp_path):
    result, t, marked = _audit(tmp_path, "moving", overlays=False)
    assert not result.flagged and t["pattern_score"].null_count == t.num_rows
    note = [n for n in result.summary["notes"] if n.startswith("pattern evidence skipped")]
    assert note and "--no-overlays" in note[0] and "pattern" not in result.summary["evidence"]["kinds"]
    assert "pattern evidence skipped" in (tmp_path / "rep" / "index.html").read_text()
    # A fixed mark still shows by its position.
    fixed = tmp_path / "fixed"
    result, t, marked = _audit(fixed, "fixed", overlays=False)
    (cl,) = result[0].flagged
    assert cl.evidence == "position"
    assert t["flagged"].to_numpy(zero_copy_only=False)[marked].mean() >= 0.9


def test_inputs_that_moved_skip_the_pattern_evidence_and_say_so(tmp_path):
    write_image_run(tmp_path / "run", tmp_path / "in" / "images.parquet", case="moving", identical=False)
    result = audit(tmp_path / "run", tmp_path / "rep", images=[str(tmp_path / "gone")], **FAST)
    assert not result.flagged
    assert any(
        n.startswith("pattern evidence skipped: the input images cannot be read") for n in result.summary["notes"]
    )


# -- the input images, read back without torch ------------------------------------------------------


def test_input_images_decode_and_boxes_match_the_run(tmp_path):
    from gradcam_batch.engine.job.boxes import to_input_frame
    from gradcam_batch.engine.job.decode import decode_image
    from gradcam_batch.engine.job.preprocess import Preprocess

    rng = np.random.default_rng(0)
    images = []
    for i, (w, h) in enumerate([(64, 40), (37, 90), (50, 50)]):
        arr = rng.integers(0, 255, size=(h, w, 3)).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG" if i == 1 else "PNG")
        images.append(buf.getvalue())
    boxes = [[[4.0, 5.0, 30.0, 20.0], [1.0, 1.0, 3.0, 3.0]], [[0.0, 10.0, 37.0, 80.0]], None]
    path = tmp_path / "in.parquet"
    pq.write_table(
        pa.table({"id": ["a", "b", "c"], "img": pa.array(images, pa.binary()), "boxes": pa.array(boxes)}), path
    )
    config = {"files": [str(path)], "image_column": "img", "id_column": "id", "resize": 36, "crop": [32, 32],
              "interpolation": "bicubic", "box_column": "boxes"}  # fmt: skip
    src = InputImages.open(config)
    got = {}
    assert src.read(["c", "a", "b", "zz"], lambda i, img, box: got.__setitem__(i, (img, box))) == (3, 0)
    prep = Preprocess(resize=36, crop=(32, 32), interpolation="bicubic")
    for i, data in zip("abc", images, strict=True):
        np.testing.assert_array_equal(got[i][0], decode_image(data, prep))
    w, h = Image.open(io.BytesIO(images[0])).size
    expected, _ = to_input_frame(np.asarray(boxes[0]), None, (w, h), prep)
    np.testing.assert_allclose(got["a"][1], expected[0])  # the largest box, as the run maps it
    assert got["c"][1] is None


# -- the bars, on the planted benchmark -------------------------------------------------------------


@pytest.mark.slow
def test_planted_benchmark_meets_the_bars(tmp_path):
    """Issue 19's bars on report seed 0 (the threshold was calibrated on seeds 10-19): a fixed mark's
    flagged rows have precision >= 0.9 and recall >= 0.8; the clean control and every unmarked class
    have at most 5% of their rows flagged; a moving mark's recall, the aim, is >= 0.8 too."""
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "planted_shortcuts.py"
    name = "benchmarks_planted_shortcuts"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, script)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    bench = sys.modules[name]
    for case in ("corner", "interior", "random", "clean"):
        r = bench.evaluate(case, 0, boxes=True, cache=tmp_path / "cache")
        assert (r["false_flag_share_unmarked_classes"] or 0) <= 0.05, r
        if case == "clean":
            assert r["false_flag_share"] <= 0.05, r
        else:
            assert r["against_marked"]["precision"] >= 0.9 and r["against_marked"]["recall"] >= 0.8, r
