"""Every CAM method, Score-CAM and the metrics on an ONNX export, against the torch result of the same model.

The ONNX model is a split model (engine/models/onnx_backend.py): an ONNX Runtime session up to the target
tensor, and the rest of the graph rebuilt in torch, which the Explainer differentiates like any head. Three
small CNNs, exported by the TorchScript exporter (opset 17, fast): a GAP -> linear head (every gradient
method in closed form), a flatten -> MLP head (the vmapped VJP), and a skip connection around the target
(the head takes a tensor from before the cut). Relative error bounds as in test_methods.py: 1e-4, and 1e-3
for the eigen methods.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from engine_reference import FlattenMLPNet, GapLinearNet, assert_close_rel, random_images, seeded

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from gradcam_batch.engine.explain.explainer import Explainer, explain  # noqa: E402
from gradcam_batch.engine.explain.methods import METHODS  # noqa: E402
from gradcam_batch.engine.models.onnx_backend import OnnxModel  # noqa: E402


class SkipNet(nn.Module):
    """The target (``act``) is added to a tensor from before it: the head needs that tensor as well."""

    def __init__(self, num_classes: int = 6):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 10, 3, padding=1, stride=2), nn.ReLU())
        self.conv = nn.Conv2d(10, 10, 3, padding=1)
        self.act = nn.ReLU()
        self.mix = nn.Conv2d(10, 10, 1)
        self.fc = nn.Linear(10, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        a = self.act(self.conv(s))
        return self.fc(torch.relu(self.mix(a) + s).mean(dim=(2, 3)))


# name: (factory, input size, torch target layer, closed form)
MODELS = {
    "gap_linear": (lambda: GapLinearNet(num_classes=7, width=12), (20, 26), "features", True),
    "flatten_mlp": (lambda: FlattenMLPNet(num_classes=10, size=(32, 40)), (32, 40), "features", False),
    "skip": (SkipNet, (24, 28), "act", False),
}
_CACHE: dict = {}


def _export(model: nn.Module, size: tuple[int, int], path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(2, 3, *size),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        )


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(torch model, its ONNX export, images, torch target layer, closed form), exported once per model."""

    def get(name: str):
        if name not in _CACHE:
            factory, size, layer, closed = MODELS[name]
            model = seeded(factory)
            with torch.no_grad():  # BatchNorm statistics that are not the identity
                for m in model.modules():
                    if isinstance(m, nn.BatchNorm2d):
                        m.running_mean.uniform_(-0.2, 0.2)
                        m.running_var.uniform_(0.5, 1.5)
            path = tmp_path_factory.mktemp("onnx") / f"{name}.onnx"
            _export(model, size, path)
            _CACHE[name] = (model, path, random_images(3, size, seed=2), layer, closed)
        return _CACHE[name]

    return get


def _target_tensor(onnx_model: OnnxModel, images: torch.Tensor, layer: str | None = None) -> str:
    """The auto-detected tensor, or the output of the torch module ``layer`` (its ONNX node is ``/layer/...``)."""
    if layer is None:
        return onnx_model.resolve_target_layer(None, images[:1])
    infos = onnx_model.probe_layers(images[:1])
    return [i.name for i in infos if i.name.startswith(f"/{layer}/")][-1]


def _methods(closed: bool) -> tuple[str, ...]:
    return tuple(m for m in METHODS if closed or m != "cam")


def _tol(method: str) -> float:
    return 1e-3 if method.startswith("eigen") else 1e-4


@pytest.mark.parametrize("counterfactual", [False, True], ids=["plain", "counterfactual"])
@pytest.mark.parametrize("name", list(MODELS))
def test_every_method_on_onnx_matches_torch(case, name, counterfactual):
    model, path, images, layer, closed = case(name)
    methods = _methods(closed)
    ref = Explainer(model, target_layer=layer, method=methods, scorecam_batch=16)(
        images, top_k=2, counterfactual=counterfactual, relu=False
    )
    onnx_model = OnnxModel(path)
    # The skip model's auto-detected tensor is the ReLU after the addition; the torch target is the one before.
    target = _target_tensor(onnx_model, images, layer) if name == "skip" else None
    explainer = Explainer(onnx_model, target_layer=target, method=methods, scorecam_batch=16)
    got = explainer(images, top_k=2, counterfactual=counterfactual, relu=False)
    assert explainer.closed_form is closed
    if name == "skip":
        assert explainer._split.n_extra == 1  # the head reads the stem's output from the backbone session
    assert list(got) == list(methods)
    for method in methods:
        r, g = ref[method], got[method]
        assert g.closed_form is closed and g.method == method
        assert torch.equal(g.classes, r.classes), method
        assert_close_rel(g.scores, r.scores, 1e-5, f"{name} {method} scores")
        assert r.cams.abs().max() > 0, method
        assert_close_rel(g.cams, r.cams, _tol(method), f"{name} {method}")
        assert (g.weights is None) == (r.weights is None), method
        torch.testing.assert_close(g.heatmaps, r.heatmaps, rtol=0, atol=2e-3 if method.startswith("eigen") else 2e-4)


@pytest.mark.parametrize("name", ["gap_linear", "flatten_mlp"])
def test_metrics_on_onnx_match_torch(case, name):
    model, path, images, layer, _ = case(name)
    names = ("deletion", "insertion", "confidence")
    ref = explain(model, images, target_layer=layer, top_k=2, metrics=names)
    got = explain(OnnxModel(path), images, top_k=2, metrics=names)
    assert set(got.metrics) == {"deletion_auc", "insertion_auc", "confidence_drop", "confidence_increase"}
    for key, value in ref.metrics.items():
        torch.testing.assert_close(got.metrics[key], value, rtol=1e-4, atol=1e-4, msg=key)


@pytest.fixture
def ort_runs(monkeypatch):
    """Every ONNX Runtime run, as the list of the output names it fetched."""
    runs: list[tuple[str, ...]] = []

    class Counted(ort.InferenceSession):
        def run(self, output_names, *args, **kwargs):
            runs.append(tuple(output_names or [o.name for o in self.get_outputs()]))
            return super().run(output_names, *args, **kwargs)

        def run_with_iobinding(self, binding, *args, **kwargs):
            runs.append(tuple(o.name for o in self.get_outputs()))
            return super().run_with_iobinding(binding, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", Counted)
    return runs


@pytest.mark.parametrize("name", ["gap_linear", "flatten_mlp"])
def test_a_method_list_costs_one_backbone_run(case, name, ort_runs):
    """One ONNX Runtime run per batch for any number of methods, and it stops at the target tensor:
    the head, the VJP and the methods run in torch."""
    _, path, images, _, closed = case(name)
    onnx_model = OnnxModel(path)
    target = _target_tensor(onnx_model, images)
    methods = [m for m in _methods(closed) if m != "scorecam"]
    explainer = Explainer(onnx_model, target_layer=target, method=methods)
    explainer(images, top_k=2)
    ort_runs.clear()
    explainer(images, top_k=2)
    assert ort_runs == [(target,)]


def test_scorecam_forwards_run_the_backbone_only(case, ort_runs):
    _, path, images, _, _ = case("gap_linear")
    onnx_model = OnnxModel(path)
    target = _target_tensor(onnx_model, images)
    explainer = Explainer(onnx_model, target_layer=target, method="scorecam", scorecam_batch=8)
    ort_runs.clear()  # the layer probe's run
    explainer(images[:1], top_k=1)
    # 12 channels of one image in masked batches of 8: two more runs of the backbone, never of the whole graph.
    assert ort_runs == [(target,)] * 3


def test_guided_is_refused_for_onnx_with_one_line(case):
    _, path, _, _, _ = case("gap_linear")
    with pytest.raises(ValueError, match="guided") as info:
        Explainer(OnnxModel(path), guided=True)
    assert "\n" not in str(info.value)
    assert "ONNX" in str(info.value)


def test_reshape_is_refused_for_onnx_with_one_line(case):
    """An ONNX target is a 4-D tensor: ``reshape='tokens'`` is refused up front, as before the split, instead
    of reading an NCHW map as a (B, H, W, C) grid."""
    _, path, _, _, _ = case("gap_linear")
    with pytest.raises(ValueError, match="reshape") as info:
        Explainer(OnnxModel(path), reshape="tokens")
    assert "\n" not in str(info.value)
    assert "4-D target tensor" in str(info.value)


def test_a_run_explains_an_onnx_model_with_several_methods_and_metrics(tmp_path, case):
    """`gradcam-batch run` on the ONNX export: every method of the list and the metric columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from click.testing import CliRunner
    from PIL import Image

    from gradcam_batch.cli import cli

    _, path, _, _, _ = case("gap_linear")
    rng = np.random.default_rng(0)
    images = []
    for _ in range(3):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (26, 26, 3), dtype=np.uint8)).save(buf, "PNG")
        images.append(buf.getvalue())
    pq.write_table(pa.table({"image": images}), tmp_path / "in.parquet")
    methods = "gradcam,layercam,eigencam,scorecam"
    out = tmp_path / "out"
    args = ["run", str(tmp_path / "in.parquet"), "-o", str(out), "--model", str(path), "--resize", "none",
            "--crop", "20x26", "--method", methods, "--metrics", "deletion,confidence", "--no-progress"]  # fmt: skip
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    assert table.num_rows == 3 * 4
    assert sorted(set(table.column("method").to_pylist())) == sorted(methods.split(","))
    for col in ("deletion_auc", "confidence_drop"):
        values = np.asarray(table.column(col).to_pylist(), dtype=float)
        assert np.isfinite(values).all(), col
