"""The ONNX Runtime backend: parity with the torch engine, head conversion, errors."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
torchvision = pytest.importorskip("torchvision")

from gradcam_batch.engine.explain.explainer import Explainer  # noqa: E402
from gradcam_batch.engine.explain.layers import TargetLayerError  # noqa: E402
from gradcam_batch.engine.models.loader import load_model  # noqa: E402
from gradcam_batch.engine.models.onnx_backend import OnnxBackendError, OnnxModel  # noqa: E402

SIZE = 64


class FlattenMLP(nn.Module):
    """A conv trunk with a flatten -> MLP head (no global pooling: not closed form)."""

    def __init__(self, classes: int = 7):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 12, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(12 * 8 * 8, 32), nn.Sigmoid(), nn.Dropout(0.2), nn.Linear(32, classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = FlattenMLP() if name == "flatten_mlp" else torchvision.models.get_model(name, weights=None)
    model.eval()
    # Random BatchNorm statistics, so the parity does not hide behind identity normalization.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _export(model: nn.Module, path, exporter: str, batch: int = 2) -> None:
    x = torch.randn(batch, 3, SIZE, SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "opset17":
            # The TorchScript exporter writes a true opset 17 graph (the dynamo exporter cannot go below 18).
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=["images"],
                output_names=["logits"],
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            )
        else:
            torch.onnx.export(model, (x,), str(path), dynamic_shapes=({0: torch.export.Dim("batch")},))


CASES = [
    ("resnet18", "opset17", True),
    ("resnet18", "default", True),
    ("mobilenet_v3_small", "opset17", False),
    ("mobilenet_v3_small", "default", False),
    ("flatten_mlp", "opset17", False),
    ("flatten_mlp", "default", False),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache: dict[tuple[str, str], tuple[nn.Module, object]] = {}

    def get(name: str, exporter: str):
        if (name, exporter) not in cache:
            model = _build(name)
            path = tmp_path_factory.mktemp("onnx") / f"{name}_{exporter}.onnx"
            _export(model, path, exporter)
            cache[name, exporter] = (model, path)
        return cache[name, exporter]

    return get


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize(("name", "exporter", "closed"), CASES)
def test_onnx_cams_match_torch(exported, name, exporter, closed):
    model, path = exported(name, exporter)
    torch.manual_seed(1)
    images = torch.randn(3, 3, SIZE, SIZE)
    ref = Explainer(model)(images, top_k=3)
    onnx_model = load_model(str(path))
    assert isinstance(onnx_model, OnnxModel)
    got = Explainer(onnx_model)(images, top_k=3)
    assert got.closed_form is closed
    with torch.no_grad():
        torch.testing.assert_close(onnx_model.eval()(images), model(images), rtol=1e-4, atol=1e-5)
    assert ref.closed_form is closed
    assert torch.equal(got.classes, ref.classes)
    assert _rel_err(got.scores, ref.scores) < 1e-4
    assert ref.cams.abs().max() > 0
    err = _rel_err(got.cams, ref.cams)
    assert err < 1e-4, f"{name}/{exporter}: cams differ, max relative error {err:.2e}"
    assert _rel_err(got.weights, ref.weights) < 1e-4
    assert got.cams.shape == ref.cams.shape
    assert torch.isfinite(got.heatmaps).all()


def test_onnx_explicit_classes_counterfactual_and_target(exported):
    model, path = exported("mobilenet_v3_small", "opset17")
    onnx_model = OnnxModel(path)
    infos = onnx_model.probe_layers(torch.zeros(1, 3, SIZE, SIZE))
    # The output of block features.11 (its residual Add): the head then holds a conv block too.
    earlier = [i.name for i in infos if i.candidate and i.type == "Add" and "/features.11/" in i.name][-1]
    images = torch.randn(2, 3, SIZE, SIZE)
    classes = torch.tensor([[3, 500], [999, 0]])
    got = Explainer(onnx_model, target_layer=earlier)(images, classes=classes, counterfactual=True)
    assert got.target_layer == earlier
    assert torch.equal(got.classes, classes)
    assert not got.closed_form
    assert any(n.op == "Conv" for n in onnx_model.split_at(earlier).head.nodes)
    ref = Explainer(model, target_layer="features.11")(images, classes=classes, counterfactual=True)
    assert ref.cams.abs().max() > 0
    assert _rel_err(got.cams, ref.cams) < 1e-4


def test_fixed_batch_graph_runs_in_chunks(tmp_path):
    model = _build("flatten_mlp")
    path = tmp_path / "fixed.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, SIZE, SIZE),), str(path), dynamo=False, opset_version=17)
    onnx_model = OnnxModel(path)
    assert onnx_model.fixed_batch == 2
    images = torch.randn(5, 3, SIZE, SIZE)
    got = Explainer(onnx_model)(images, top_k=2)
    ref = Explainer(model)(images, top_k=2)
    assert got.cams.shape[0] == 5
    assert _rel_err(got.cams, ref.cams) < 1e-4


def test_layers_listing_marks_one_chosen_tensor(exported):
    _, path = exported("resnet18", "opset17")
    infos = OnnxModel(path).probe_layers(torch.zeros(1, 3, SIZE, SIZE))
    chosen = [i for i in infos if i.chosen]
    assert len(chosen) == 1
    assert chosen[0].type == "Relu" and chosen[0].shape == (1, 512, 2, 2)
    assert "layer4.1" in chosen[0].name
    pools = [i for i in infos if i.type == "GlobalAveragePool"]
    assert pools and not pools[0].candidate


def test_bad_target_and_providers(exported):
    _, path = exported("resnet18", "opset17")
    with pytest.raises(TargetLayerError, match="has no tensor"):
        Explainer(OnnxModel(path), target_layer="no_such_tensor")(torch.randn(1, 3, SIZE, SIZE))
    with pytest.raises(OnnxBackendError, match="not available"):
        OnnxModel(path, providers=["NoSuchExecutionProvider"])
    with pytest.raises(ValueError, match="providers apply to ONNX"):
        load_model("torchvision:resnet18", providers=["CPUExecutionProvider"])


def test_unsupported_head_op_is_named(tmp_path):
    class OddHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            a = torch.relu(self.conv(x))
            return self.fc(torch.cumsum(a, dim=2).mean(dim=(2, 3)))

    path = tmp_path / "odd.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(OddHead().eval(), (torch.randn(1, 3, 8, 8),), str(path), dynamo=False, opset_version=17)
    onnx_model = OnnxModel(path)
    relu = next(i.name for i in onnx_model.probe_layers(torch.zeros(1, 3, 8, 8)) if i.type == "Relu")
    with pytest.raises(OnnxBackendError, match="'CumSum'"):
        Explainer(onnx_model, target_layer=relu)(torch.randn(1, 3, 8, 8))


def test_cam_method_needs_linear_head(exported):
    _, path = exported("flatten_mlp", "opset17")
    with pytest.raises(ValueError, match="method='cam'"):
        Explainer(OnnxModel(path), method="cam")(torch.randn(1, 3, SIZE, SIZE))


def test_io_binding_path_matches_plain_feeds(exported):
    """The IO-binding code that CUDA uses, exercised on the CPU provider."""
    _, path = exported("mobilenet_v3_small", "opset17")
    images = torch.randn(2, 3, SIZE, SIZE)
    plain = Explainer(OnnxModel(path, io_binding=False))(images, top_k=2)
    bound = Explainer(OnnxModel(path, io_binding=True))(images, top_k=2)
    assert torch.equal(plain.classes, bound.classes)
    torch.testing.assert_close(bound.cams, plain.cams, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(bound.scores, plain.scores, rtol=1e-5, atol=1e-6)


def test_default_providers_order():
    from gradcam_batch.engine.models.onnx_backend import default_providers

    every = ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]
    assert default_providers(torch.device("cuda"), every) == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert default_providers(torch.device("cuda"), ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert default_providers(torch.device("cpu"), every) == ["CPUExecutionProvider"]


def test_small_convnext_head_with_layernorm_matches_torch(tmp_path):
    """ConvNeXt's head (avgpool -> LayerNorm2d -> flatten -> linear) exercises Transpose and
    LayerNormalization in the head converter; the target is the last stage, features.7."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(3)
    setting = [CNBlockConfig(8, 16, 1), CNBlockConfig(16, 24, 1), CNBlockConfig(24, 32, 1), CNBlockConfig(32, None, 1)]
    model = ConvNeXt(setting, num_classes=6).eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "layer_scale"):
                m.layer_scale.fill_(0.5)  # the 1e-6 default would make every block an identity
    path = tmp_path / "convnext.onnx"
    _export(model, path, "opset17")
    images = torch.randn(2, 3, SIZE, SIZE)
    ref = Explainer(model)(images, top_k=3)
    assert ref.target_layer == "features.7" and not ref.closed_form
    onnx_model = OnnxModel(path)
    got = Explainer(onnx_model)(images, top_k=3)
    assert got.target_layer.startswith("/features/features.7/")
    ops = {n.op for n in onnx_model.split_at(got.target_layer).head.nodes}
    assert {"Transpose", "LayerNormalization", "Gemm"} <= ops, ops
    assert torch.equal(got.classes, ref.classes)
    assert _rel_err(got.cams, ref.cams) < 1e-4


def _ort_vs_interpreter(nodes, inits, x: torch.Tensor, out_shape, opset: int):
    """Run a hand-built graph in ORT and in OnnxHead (target = the graph input); return both."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from gradcam_batch.engine.models.onnx_ops import OnnxHead, OnnxNode

    graph = helper.make_graph(
        nodes,
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        initializer=[numpy_helper.from_array(v, name=k) for k, v in inits.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = torch.from_numpy(sess.run(["y"], {"x": x.numpy()})[0])
    inodes = []
    for n in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        inodes.append(OnnxNode(n.op_type, n.name, list(n.input), list(n.output), attrs))
    head = OnnxHead(inodes, "x", [], "y", {t.name: t for t in graph.initializer}, opset)
    return head(x), expected


def test_head_interpreter_ops_match_onnxruntime():
    """The ops of typical heads, with their less common attributes, against ONNX Runtime itself."""
    import numpy as np
    from onnx import helper

    rng = np.random.default_rng(0)
    mk = helper.make_node
    inits = {
        "w_conv": rng.normal(size=(6, 4, 3, 3)).astype(np.float32),
        "b_conv": rng.normal(size=(6,)).astype(np.float32),
        "bn_s": rng.uniform(0.5, 1.5, size=(6,)).astype(np.float32),
        "bn_b": rng.normal(size=(6,)).astype(np.float32),
        "bn_m": rng.normal(size=(6,)).astype(np.float32),
        "bn_v": rng.uniform(0.5, 1.5, size=(6,)).astype(np.float32),
        "axes23": np.array([2, 3], dtype=np.int64),
        "axes0": np.array([0], dtype=np.int64),
        "shape0m1": np.array([0, -1], dtype=np.int64),
        "w_fc": rng.normal(size=(5, 6)).astype(np.float32),
        "b_fc": rng.normal(size=(5,)).astype(np.float32),
        "lo": np.array(-0.5, dtype=np.float32),
        "hi": np.array(0.7, dtype=np.float32),
        "starts": np.array([1], dtype=np.int64),
        "ends": np.array([np.iinfo(np.int64).max], dtype=np.int64),
        "sl_axes": np.array([1], dtype=np.int64),
        "idx": np.array([0, 2], dtype=np.int64),
    }
    nodes = [
        mk("Conv", ["x", "w_conv", "b_conv"], ["c"], pads=[1, 0, 2, 1], strides=[1, 2]),
        mk("BatchNormalization", ["c", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"], epsilon=1e-3),
        mk("HardSigmoid", ["bn"], ["hs"], alpha=0.3, beta=0.4),
        mk("Mul", ["bn", "hs"], ["gated"]),
        mk("MaxPool", ["gated"], ["mp"], kernel_shape=[2, 2], pads=[0, 0, 1, 1], ceil_mode=1),
        mk("ReduceMean", ["mp", "axes23"], ["gap"], keepdims=1),
        mk("Reshape", ["gap", "shape0m1"], ["flat"]),
        mk("Gemm", ["flat", "w_fc", "b_fc"], ["fc"], transB=1, alpha=0.5, beta=2.0),
        mk("Clip", ["fc", "lo", "hi"], ["clip"]),
        mk("Unsqueeze", ["clip", "axes0"], ["u"]),
        mk("Squeeze", ["u", "axes0"], ["sq"]),
        mk("Slice", ["sq", "starts", "ends", "sl_axes"], ["sl"]),
        mk("Gather", ["sl", "idx"], ["g"], axis=1),
        mk("Concat", ["sl", "g"], ["cat"], axis=1),
        mk("Softmax", ["cat"], ["y"], axis=-1),
    ]
    x = torch.from_numpy(rng.normal(size=(2, 4, 7, 6)).astype(np.float32))
    got, expected = _ort_vs_interpreter(nodes, inits, x, [2, 6], opset=18)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# -- session lifetime -------------------------------------------------------------------------------


@pytest.fixture
def live_sessions(monkeypatch):
    """A count of the ONNX Runtime sessions alive now (every session the backend creates is tracked)."""
    import gc
    import weakref

    import onnxruntime as ort

    live: weakref.WeakSet = weakref.WeakSet()

    class Tracked(ort.InferenceSession):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            live.add(self)

    monkeypatch.setattr(ort, "InferenceSession", Tracked)

    def count() -> int:
        gc.collect()
        return len(live)

    return count


def test_the_probe_session_is_released_and_the_cache_is_bounded(exported, live_sessions):
    from gradcam_batch.engine.models.onnx_backend import MAX_CACHED_SESSIONS

    model, path = exported("mobilenet_v3_small", "opset17")
    onnx_model = OnnxModel(path)
    sample = torch.zeros(1, 3, SIZE, SIZE)
    infos = onnx_model.probe_layers(sample)
    assert live_sessions() == 0  # the all-tensors session of the probe holds its arena no longer
    images = torch.randn(2, 3, SIZE, SIZE)
    ref = Explainer(onnx_model)(images, top_k=2)  # probes again (auto target), then explains
    assert live_sessions() == 1
    # Explaining at other tensors, then plain inference: the cache stays bounded.
    for name in [i.name for i in infos if i.candidate][-5:-1]:
        Explainer(onnx_model, target_layer=name)(images, top_k=2)
        assert live_sessions() <= MAX_CACHED_SESSIONS
    onnx_model(images)
    assert live_sessions() <= MAX_CACHED_SESSIONS
    # An evicted session is rebuilt on demand, with the same results.
    again = Explainer(onnx_model)(images, top_k=2)
    torch.testing.assert_close(again.cams, ref.cams)
    assert live_sessions() <= MAX_CACHED_SESSIONS


def test_a_run_keeps_one_session(tmp_path, exported, live_sessions):
    """Through the run's own path: the plan's probe and the batch step leave one live session."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gradcam_batch.engine.job.config import RunConfig
    from gradcam_batch.engine.job.plan import ModelHandle, build_plan
    from gradcam_batch.engine.job.step import BatchExplainer

    _, path = exported("resnet18", "opset17")
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(buf, "PNG")
    pq.write_table(pa.table({"image": [buf.getvalue()] * 3}), tmp_path / "in.parquet")
    cfg = RunConfig(inputs=[str(tmp_path / "in.parquet")], output=str(tmp_path / "out"), model=str(path),
                    top_k=2, resize=SIZE, crop=SIZE, batch_size=2)  # fmt: skip
    handle = ModelHandle(cfg, torch.device("cpu"))
    plan = build_plan(cfg, device="cpu", model=handle)
    assert live_sessions() <= 1
    step = BatchExplainer(plan, torch.device("cpu"), model=handle.get())
    from gradcam_batch.engine.job.source import ParquetSource

    source = ParquetSource(plan.files, plan.image_column, plan.input_columns, plan.prep, batch_size=2)
    for db in source.batches(plan.units):
        step(db)
    assert live_sessions() == 1


def test_a_host_round_trip_is_said_once(monkeypatch):
    """An ONNX Runtime whose outputs have no DLPack (1.20) copies them through host memory, and says so once."""
    from gradcam_batch.engine.models import onnx_backend

    class NoDlpack:
        def numpy(self):
            return np.arange(6, dtype=np.float32).reshape(2, 3)

    monkeypatch.setattr(onnx_backend, "_DLPACK_FALLBACK_SAID", False)
    with pytest.warns(RuntimeWarning, match="host memory") as record:
        a = onnx_backend._ortvalue_to_torch(NoDlpack(), torch.device("cpu"))
        b = onnx_backend._ortvalue_to_torch(NoDlpack(), torch.device("cpu"))
    assert len([w for w in record if "host memory" in str(w.message)]) == 1
    assert torch.equal(a, b) and a.shape == (2, 3)
