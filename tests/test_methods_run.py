"""`gradcam-batch run --method a,b[,...]`: a `method` column, one row per (image, class, method), the
same maps as one-method runs, class_rank ranking the classes, the guided column and the fingerprint."""

from __future__ import annotations

import dataclasses
import json
import textwrap
import warnings

import numpy as np
import pyarrow as pa
import pytest
import torch
from run_support import base_args, bytes_table, invoke, model_file, png_bytes, read_output, shapes, write_table

from gradcam_batch.engine.explain.explainer import explain
from gradcam_batch.engine.job.config import RunConfig, RunWarning
from gradcam_batch.engine.job.plan import build_plan
from gradcam_batch.engine.job.preprocess import IMAGENET_MEAN, IMAGENET_STD

METHODS = "gradcam,gradcam++,layercam,eigencam"


def _by_key(table: pa.Table) -> dict:
    return {(r["id"], r["class_index"], r.get("method")): r for r in table.to_pylist()}


def test_method_list_adds_a_method_column_and_equals_single_runs(tmp_path):
    inp = write_table(tmp_path / "in.parquet", bytes_table(5))
    out = tmp_path / "multi"
    res = invoke(["run", str(inp), *base_args(tmp_path, out, "make_mlp"), "--top-k", "2", "--method", METHODS])
    assert res.exit_code == 0, res.output
    t = read_output(out)
    assert t.schema.field("method").type == pa.dictionary(pa.int32(), pa.string())
    assert t.num_rows == 5 * 2 * 4
    rows = t.to_pylist()
    # Input order, then class rank, then the methods in the order asked.
    for i in range(5):
        mine = [r for r in rows if r["id"] == f"in.parquet:{i}"]
        assert [r["class_rank"] for r in mine] == [0] * 4 + [1] * 4
        assert [r["method"] for r in mine] == METHODS.split(",") * 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["methods"] == METHODS.split(",")
    multi = _by_key(t)
    for method in METHODS.split(","):
        single_out = tmp_path / method
        args = [*base_args(tmp_path, single_out, "make_mlp"), "--top-k", "2", "--method", method]
        res = invoke(["run", str(inp), *args])
        assert res.exit_code == 0, res.output
        single = read_output(single_out)
        assert "method" not in single.column_names
        for r in single.to_pylist():
            m = multi[(r["id"], r["class_index"], method)]
            assert m["class_rank"] == r["class_rank"] and m["score"] == r["score"]
            np.testing.assert_allclose(np.asarray(m["cam"], np.float32), np.asarray(r["cam"], np.float32), atol=1e-3)
            assert np.abs(np.asarray(m["heatmap"], int) - np.asarray(r["heatmap"], int)).max() <= 1


def test_label_slot_and_guided_column_with_several_methods(tmp_path):
    n = 4
    data = shapes(n)
    table = pa.table({"image": [png_bytes(im) for im in data.images], "truth": pa.array([0, 1, 2, 3], pa.int64())})
    inp = write_table(tmp_path / "l.parquet", table)
    out = tmp_path / "out"
    args = ["--top-k", "1", "--label-column", "truth", "--method", "gradcam,xgradcam", "--guided"]
    res = invoke(["run", str(inp), *base_args(tmp_path, out), *args])
    assert res.exit_code == 0, res.output
    t = read_output(out)
    assert tuple(t.schema.field("guided").type.shape) == (3, 32, 32)
    levels = set()
    for i in range(n):
        rows = [r for r in t.to_pylist() if r["id"] == f"l.parquet:{i}"]
        per_method = {m: [r["class_index"] for r in rows if r["method"] == m] for m in ("gradcam", "xgradcam")}
        assert per_method["gradcam"] == per_method["xgradcam"]  # the label slot is dropped or kept alike
        assert len(set(per_method["gradcam"])) == len(per_method["gradcam"])
        for r in rows:
            g = np.asarray(r["guided"], np.uint8)
            assert g.shape == (3 * 32 * 32,) and g.max() in (0, 255)  # min-max normalized (0: a constant map)
            levels |= set(np.unique(g).tolist())
    assert len(levels) > 16  # grey levels, not only {0, 255}


@pytest.mark.parametrize("heatmap_dtype", ["uint8", "float16"])
def test_guided_column_equals_the_python_api(tmp_path, heatmap_dtype):
    """The run's guided column is explain(..., guided=True) quantized once to uint8: within 1 LSB, not binary."""
    data = shapes(3)
    inp = write_table(tmp_path / "g.parquet", pa.table({"image": [png_bytes(im) for im in data.images]}))
    out = tmp_path / "out"
    args = ["--top-k", "2", "--guided", "--heatmap-dtype", heatmap_dtype]
    res = invoke(["run", str(inp), *base_args(tmp_path, out), *args])
    assert res.exit_code == 0, res.output
    t = read_output(out)
    ns: dict = {}
    exec(model_file(tmp_path).read_text(), ns)
    model = ns["make"]().eval()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (torch.from_numpy(np.stack(data.images)).permute(0, 3, 1, 2).float() / 255 - mean) / std
    classes = torch.tensor(np.asarray(t["class_index"].to_pylist()).reshape(3, 2))
    exp = explain(model, x, classes=classes, guided=True)
    want = torch.floor(exp.guided * 255 + 0.5).clamp(0, 255).numpy().reshape(6, -1)
    got = t["guided"].combine_chunks().to_numpy_ndarray().reshape(6, -1).astype(int)
    assert np.abs(got - want).max() <= 1
    assert len(np.unique(got)) > 2  # a grey-level map, not {0, 255}


ACTIVATIONS = textwrap.dedent(
    """
    import torch
    import torch.nn as nn


    class Net(nn.Module):
        def __init__(self, act, functional=False):
            super().__init__()
            self.conv1, self.act, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), act, nn.Conv2d(8, 8, 3, padding=1)
            self.functional = functional
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            a = self.act(self.conv1(x))
            a = self.conv2(a)
            a = torch.relu(a) if self.functional else a
            return self.fc(a.mean(dim=(2, 3)))


    def gelu():
        torch.manual_seed(0)
        return Net(nn.GELU())


    def relu_and_functional():
        torch.manual_seed(0)
        return Net(nn.ReLU(), functional=True)


    def relu():
        torch.manual_seed(0)
        return Net(nn.ReLU())
    """
)


def _guided_warnings(tmp_path, factory: str) -> list[str]:
    path = tmp_path / "models" / "acts.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(ACTIVATIONS)
    inp = write_table(tmp_path / "in.parquet", bytes_table(2))
    cfg = RunConfig(inputs=[str(inp)], output=str(tmp_path / "o"), model=f"{path}:{factory}", resize=32, crop=32,
                    guided=True)  # fmt: skip
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        build_plan(cfg)
        build_plan(dataclasses.replace(cfg, guided=False))  # nothing to say without --guided
    return [str(w.message) for w in record if issubclass(w.category, RunWarning) and "guided" in str(w.message)]


def test_guided_on_a_model_without_nn_relu_warns_that_it_changes_nothing(tmp_path):
    (said,) = _guided_warnings(tmp_path, "gelu")
    assert "no nn.ReLU" in said and "changes nothing" in said and "\n" not in said


def test_guided_names_the_functional_relus_it_leaves_plain(tmp_path):
    (said,) = _guided_warnings(tmp_path, "relu_and_functional")
    assert "1 nn.ReLU call" in said and "1 functional relu call" in said


def test_guided_on_nn_relus_only_says_nothing(tmp_path):
    assert _guided_warnings(tmp_path, "relu") == []


def test_method_list_is_part_of_the_fingerprint(tmp_path):
    inp = write_table(tmp_path / "in.parquet", bytes_table(3))
    out = tmp_path / "out"
    assert invoke(["run", str(inp), *base_args(tmp_path, out), "--method", "gradcam,layercam"]).exit_code == 0
    # The same list, spelled differently: the same run, complete already.
    res = invoke(["run", str(inp), *base_args(tmp_path, out), "--method", "GradCAM, layercam"])
    assert res.exit_code == 0 and "complete already" in res.output
    res = invoke(["run", str(inp), *base_args(tmp_path, out), "--method", "gradcam,hirescam"])
    assert res.exit_code == 2 and "other settings" in res.output


def test_unknown_method_is_a_usage_error(tmp_path):
    inp = write_table(tmp_path / "in.parquet", bytes_table(2))
    res = invoke(["run", str(inp), *base_args(tmp_path, tmp_path / "out"), "--method", "gradcam,gradcam+"])
    assert res.exit_code == 2 and "unknown method 'gradcam+'" in res.output and "layercam" in res.output
