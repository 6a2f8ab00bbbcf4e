"""The planted-shortcut benchmark: its data generator and scoring (fast), and the whole benchmark (slow).

The data is ``gradcam_batch.engine.demo.planted``; the benchmark is ``benchmarks/planted_shortcuts.py``
(loaded by path: benchmarks/ is not a package). The slow test runs every case on one seed and checks
that it runs and that the model relies on the mark; it does not hold the audit to precision or recall
bars yet.
"""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from gradcam_batch.engine.demo import planted

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "planted_shortcuts.py"
SMALL = planted.Setup(n_train=64, n_eval=240)


def _bench():
    name = "benchmarks_planted_shortcuts"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # before it runs: its dataclasses look their module up
        spec.loader.exec_module(mod)
    return sys.modules[name]


def _eval(case: str, seed: int = 0) -> planted.PlantedData:
    return planted.eval_set(case, seed, SMALL)


def _in_regions(box) -> tuple[bool, bool]:
    """Whether an (x0, y0, x1, y1) box in a 48-pixel image touches the border band or a corner square."""
    x0, y0, x1, y1 = box
    band = x0 < 6 or y0 < 6 or x1 > 42 or y1 > 42
    corner = (x0 < 12 or x1 > 36) and (y0 < 12 or y1 > 36)
    return band, corner


@pytest.mark.parametrize("case", ["corner", "interior", "random"])
def test_marks_are_on_half_of_the_marked_class_only_and_where_the_case_puts_them(case):
    d = _eval(case)
    discs = d.labels == planted.MARK_CLASS
    assert not d.marked[~discs].any()
    assert 0.35 <= d.marked[discs].mean() <= 0.65, d.marked[discs].mean()
    assert (d.mark_boxes[~d.marked] == -1).all()
    pattern = planted.mark_pattern()
    for i in np.flatnonzero(d.marked):
        x0, y0, x1, y1 = d.mark_boxes[i]
        assert (x1 - x0, y1 - y0) == (planted.MARK_SIDE, planted.MARK_SIDE)
        np.testing.assert_array_equal(d.images[i, y0:y1, x0:x1], pattern)
        # The image without its mark differs from it only under the mark.
        diff = np.any(d.images[i] != d.unmarked[i], axis=-1)
        outside = diff.copy()
        outside[y0:y1, x0:x1] = False
        assert diff.any() and not outside.any()
    np.testing.assert_array_equal(d.images[~d.marked], d.unmarked[~d.marked])
    boxes = {tuple(b) for b in d.mark_boxes[d.marked]}
    if case == "corner":
        assert boxes == {(2, 2, 8, 8)}
        assert all(_in_regions(b) == (True, True) for b in boxes)
    elif case == "interior":
        y, x = planted.INTERIOR_AT
        assert boxes == {(x, y, x + 6, y + 6)}
        assert all(_in_regions(b) == (False, False) for b in boxes)
    else:
        assert len(boxes) >= 0.9 * d.marked.sum()
        arr = np.array(sorted(boxes))
        assert arr.min() >= 1 and arr[:, 2:].max() <= 47
        assert len({_in_regions(b) for b in boxes}) > 1  # some in the band or a corner, some not


@pytest.mark.parametrize("case", ["clean", "centred"])
def test_controls_carry_no_mark(case):
    d = _eval(case)
    assert not d.marked.any() and (d.mark_boxes == -1).all()
    np.testing.assert_array_equal(d.images, d.unmarked)
    t = planted.dataset_table(d, planted.image_ids(case, 0, len(d)))
    assert t["mark_x0"].null_count == len(d) and not any(t["marked"].to_pylist())


def test_clean_control_puts_every_disc_against_a_side_and_centred_objects_in_the_middle():
    d = _eval("clean")
    x0, y0, x1, y1 = d.boxes.T
    touches = (x0 == 0) | (y0 == 0) | (x1 == planted.IMAGE_SIZE) | (y1 == planted.IMAGE_SIZE)
    discs = d.labels == planted.MARK_CLASS
    assert touches[discs].all()
    assert 0.1 <= touches[~discs].mean() <= 0.35, touches[~discs].mean()
    c = _eval("centred")
    centre = (c.boxes[:, :2] + c.boxes[:, 2:]) / 2
    assert np.abs(centre - planted.IMAGE_SIZE / 2).max() <= 3


@pytest.mark.parametrize("case", list(planted.CASES))
def test_training_sets_teach_the_mark_as_the_marked_class_only_cue(case):
    t = planted.train_set(case, 0, planted.Setup(n_train=200))
    discs = t.labels == planted.MARK_CLASS
    others = ~discs
    np.testing.assert_array_equal(t.shapes[others], t.labels[others])
    assert not t.marked[others].any()
    if planted.CASES[case].mark is None:
        np.testing.assert_array_equal(t.shapes, t.labels)
        assert not t.marked.any()
    else:
        # Every training image of the marked class carries the mark and shows one of the other shapes.
        assert t.marked[discs].all()
        assert set(t.shapes[discs].tolist()) == {0, 2, 3}
    # The evaluation set shows every class's own shape.
    e = _eval(case)
    np.testing.assert_array_equal(e.shapes, e.labels)


def test_generator_is_deterministic_and_cases_share_their_objects():
    a, b = _eval("interior", seed=3), _eval("interior", seed=3)
    for f in ("images", "labels", "boxes", "marked", "mark_boxes"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert not np.array_equal(a.images, _eval("interior", seed=4).images)
    # The marked cases differ only by their marks; the training and evaluation sets differ.
    for other in ("corner", "random"):
        o = _eval(other, seed=3)
        np.testing.assert_array_equal(a.unmarked, o.unmarked)
        np.testing.assert_array_equal(a.marked, o.marked)
    assert not np.array_equal(planted.train_set("interior", 3, SMALL).images[:10], a.images[:10])


def test_dataset_table_round_trips_the_images_and_the_truth():
    d = _eval("random")
    ids = planted.image_ids("random", 0, len(d))
    t = planted.dataset_table(d, ids)
    assert t.column_names[:4] == ["image_id", "image", "label", "class_name"]
    i = int(np.flatnonzero(d.marked)[0])
    img = np.asarray(Image.open(io.BytesIO(t["image"][i].as_py())))
    np.testing.assert_array_equal(img, d.images[i])
    assert [t[c][i].as_py() for c in ("mark_x0", "mark_y0", "mark_x1", "mark_y1")] == d.mark_boxes[i].tolist()
    assert t["marked"].to_pylist() == d.marked.tolist()
    assert t["mark_x0"].null_count == int((~d.marked).sum())


def test_model_factory_loads_through_the_model_spec(tmp_path):
    from gradcam_batch.engine.models.loader import load_model

    model = planted.PlantedCNN()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model("gradcam_batch.engine.demo.planted:PlantedCNN", weights=str(path))
    x = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))


def test_mark_reliance_compares_each_marked_image_with_its_unmarked_self():
    d = _eval("corner")

    class SaysDiscOnTheMark(torch.nn.Module):
        """Class 1 when the top-left mark's bright pixel is there, else class 0."""

        def forward(self, x):
            on = (x[:, 0, 2, 2] > 0.9).float()
            return torch.stack([1 - on, on, torch.zeros_like(on), torch.zeros_like(on)], 1)

    rel = planted.mark_reliance(SaysDiscOnTheMark(), d)
    np.testing.assert_array_equal(rel["relies"], d.marked)
    assert (rel["pred"][d.marked] == 1).all() and (rel["pred_unmarked"][d.marked] == 0).all()


def test_score_flags_by_hand():
    classes = np.array([1, 1, 1, 1, 0, 0, 0, 0, 2, 2])
    marked = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], bool)
    relies = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0], bool)
    flagged = np.array([1, 0, 1, 1, 1, 0, 0, 0, 0, 0], bool)
    s = planted.score_flags(flagged, marked, relies, classes)
    assert s["flagged"] == 4
    assert s["against_marked"] == {"positives": 3, "true_flags": 2, "precision": 0.5, "recall": 2 / 3}
    assert s["against_relied"] == {"positives": 2, "true_flags": 1, "precision": 0.25, "recall": 0.5}
    assert s["false_flag_share"] == 2 / 7  # rows 3 and 4 of the 7 unmarked
    assert s["false_flag_share_unmarked_classes"] == 1 / 6  # row 4 of classes 0 and 2
    assert s["per_class"][1] == {"rows": 4, "marked": 3, "flagged": 3, "false_flag_share": 1.0}
    none = planted.score_flags(np.zeros(10, bool), marked, relies, classes)
    assert none["against_marked"]["precision"] is None and none["against_marked"]["recall"] == 0.0
    assert none["false_flag_share"] == 0.0


def test_best_cluster_scores_the_clustering_apart_from_the_flags():
    keys = [(1, 0)] * 4 + [(1, 1)] * 3 + [(0, 0)] * 3
    marked = np.array([0, 0, 0, 1, 1, 1, 0, 0, 0, 0], bool)
    assert planted.best_cluster(keys, marked) == {"cluster": [1, 1], "size": 3, "purity": 2 / 3, "recall": 2 / 3}
    assert planted.best_cluster(keys, np.zeros(10, bool)) is None


def test_benchmark_score_joins_the_audit_clusters_on_id():
    bench = _bench()
    truth = pa.table(
        {"id": ["a", "b", "c", "d"], "marked": [True, True, False, False], "relies": [True, False, False, False]}
    )
    clusters = pa.table(
        {
            "id": ["d", "c", "b", "a"],
            "class_index": [0, 1, 1, 1],
            "cluster": [0, 0, 1, 1],
            "flagged": [False, None, True, True],
        }
    )
    s = bench.score(clusters, truth)
    assert s["against_marked"]["precision"] == 1.0 and s["against_marked"]["recall"] == 1.0
    assert s["against_relied"]["precision"] == 0.5 and s["false_flag_share"] == 0.0
    assert s["images_audited"] == 4
    assert s["best_cluster"] == {"cluster": [1, 1], "size": 2, "purity": 1.0, "recall": 1.0}
    with pytest.raises(ValueError, match="not in the truth"):
        bench.score(pa.table({"id": ["z"], "class_index": [0], "flagged": [True]}), truth)


@pytest.mark.slow
def test_benchmark_runs_every_case_and_the_model_relies_on_the_mark(tmp_path):
    """Every case on seed 0 through ``main``: run, audit, scores; the marked cases' models read the mark."""
    bench = _bench()
    out = tmp_path / "results.json"
    assert bench.main(["--seed", "0", "--boxes", "yes", "--cache", str(tmp_path / "cache"), "--json", str(out)]) == 0
    results = {r["case"]: r for r in json.loads(out.read_text())}
    assert set(results) == set(planted.CASES)
    for case, r in results.items():
        assert r["images_audited"] == r["images"] == planted.Setup().n_eval
        assert Path(r["report"], "index.html").exists()
        for key in ("precision", "recall"):
            assert key in r["against_marked"] and key in r["against_relied"]
        assert 0.0 <= r["false_flag_share"] <= 1.0
        if planted.CASES[case].mark is None:
            assert r["marked"] == 0 and r["relies"] == 0
        else:
            assert r["marked"] >= 40, r
            # The model reads the marked discs by their mark: removing it changes the prediction.
            assert r["reliance_share"] >= 0.9, r
            assert r["model"]["marked_predicted_as_mark_class"] >= 0.95, r
    # The clean control's model has learned its objects.
    assert results["clean"]["model"]["accuracy"] >= 0.9
