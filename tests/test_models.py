"""The model-spec loader: every spec form, and a clear one-line error for every bad one."""

from __future__ import annotations

import textwrap
import warnings

import pytest
import torch
import torch.nn as nn

from gradcam_batch.engine.explain.explainer import Explainer
from gradcam_batch.engine.models.loader import CompiledProgram, ModelSpecError, load_model

torchvision = pytest.importorskip("torchvision")

FACTORY_SRC = textwrap.dedent(
    """
    import torch.nn as nn


    class Net(nn.Module):
        def __init__(self, num_classes=3):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.act = nn.ReLU()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(4, num_classes)

        def forward(self, x):
            return self.fc(self.pool(self.act(self.conv(x))).flatten(1))


    def build(num_classes=3):
        return Net(num_classes)


    def broken():
        raise RuntimeError("factory is broken")


    def not_a_module():
        return 42
    """
)


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "user_model.py"
    path.write_text(FACTORY_SRC)
    return path


def test_torchvision_spec_builds_random_eval_model():
    model = load_model("torchvision:resnet18", num_classes=7)
    assert isinstance(model, torchvision.models.ResNet)
    assert model.fc.out_features == 7 and not model.training
    assert next(model.parameters()).device.type == "cpu"


def test_weights_round_trip_and_checkpoint_layout(tmp_path):
    torch.manual_seed(0)
    src = torchvision.models.resnet18(weights=None, num_classes=5)
    plain = tmp_path / "plain.pt"
    torch.save(src.state_dict(), plain)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": src.state_dict(), "epoch": 3}, wrapped)
    for path in (plain, wrapped):
        model = load_model("torchvision:resnet18", weights=path, num_classes=5)
        assert torch.equal(model.fc.weight, src.fc.weight)
        assert torch.equal(model.layer4[1].bn2.running_var, src.layer4[1].bn2.running_var)


def test_weight_errors(tmp_path):
    torch.save(torchvision.models.resnet18(weights=None, num_classes=5).state_dict(), tmp_path / "r18.pt")
    with pytest.raises(ModelSpecError, match=r"fc.weight has shape \(5, 512\).*set num_classes"):
        load_model("torchvision:resnet18", weights=tmp_path / "r18.pt")
    with pytest.raises(ModelSpecError, match="missing"):
        load_model("torchvision:resnet34", weights=tmp_path / "r18.pt", num_classes=5)
    with pytest.raises(ModelSpecError, match="weights file not found"):
        load_model("torchvision:resnet18", weights=tmp_path / "nope.pt")
    # A pickled module is code, not a state dict: weights_only refuses it.
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(ModelSpecError, match=r"weights_only=True"):
        load_model("torchvision:resnet18", weights=tmp_path / "module.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ModelSpecError, match="not a state dict"):
        load_model("torchvision:resnet18", weights=tmp_path / "list.pt")


def test_factory_file_spec(factory_file, tmp_path):
    model = load_model(f"{factory_file}:build")
    assert type(model).__name__ == "Net" and model.fc.out_features == 3 and not model.training
    model9 = load_model(f"{factory_file}:build", num_classes=9)
    assert model9.fc.out_features == 9
    torch.save(model9.state_dict(), tmp_path / "net.pt")
    again = load_model(f"{factory_file}:build", num_classes=9, weights=tmp_path / "net.pt")
    assert torch.equal(again.conv.weight, model9.conv.weight)
    exp = Explainer(again)(torch.randn(2, 3, 8, 8), top_k=2)
    assert exp.target_layer == "act" and exp.closed_form


def test_module_spec(factory_file, monkeypatch):
    monkeypatch.syspath_prepend(str(factory_file.parent))
    model = load_model("user_model:build", num_classes=4)
    assert model.fc.out_features == 4


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty model spec"),
        ("torchvision:resnet_does_not_exist", "unknown torchvision model"),
        ("{dir}/user_model.py:missing", "has no callable 'missing'"),
        ("{dir}/user_model.py:broken", "factory is broken"),
        ("{dir}/user_model.py:not_a_module", "returned int, not a torch nn.Module"),
        ("{dir}/nope.py:build", "model factory file not found"),
        ("{dir}/user_model.py:not-an-identifier", "cannot parse model spec"),
        ("no_such_package_xyz.models:build", "cannot import module 'no_such_package_xyz.models'"),
        ("resnet18", "cannot parse model spec 'resnet18'"),
        ("{dir}/missing.onnx", "model file not found"),
        ("{dir}/missing.pt2", "model file not found"),
    ],
)
def test_bad_specs_raise_one_line(factory_file, spec, message):
    with pytest.raises(ModelSpecError, match=message) as info:
        load_model(spec.format(dir=factory_file.parent))
    assert "\n" not in str(info.value)


def test_bad_factory_import_and_options(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import no_such_module_abc\n")
    with pytest.raises(ModelSpecError, match="importing .*bad.py failed: ModuleNotFoundError"):
        load_model(f"{bad}:build")
    with pytest.raises(ModelSpecError, match="num_classes must be a positive integer"):
        load_model("torchvision:resnet18", num_classes=0)


def _tiny_classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_loads_runs_and_refuses_to_explain(tmp_path):
    model = _tiny_classifier()
    x = torch.randn(2, 3, 8, 8)
    ts = tmp_path / "model.ts"
    torch.jit.script(model).save(str(ts))
    loaded = load_model(str(ts))
    assert isinstance(loaded, CompiledProgram)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    # TorchScript runs its submodules without Python hooks: a clear error, not a traceback.
    with pytest.raises(ValueError, match="cannot be cut at a target layer"):
        Explainer(loaded)(x)
    with pytest.raises(ModelSpecError, match="weights= and num_classes= apply to"):
        load_model(str(ts), num_classes=3)


def test_exported_program_is_explained_like_the_original(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    pt2 = tmp_path / "r18.pt2"
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(pt2))
    loaded = load_model(str(pt2))
    assert not isinstance(loaded, CompiledProgram)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    ref = Explainer(model)(x, top_k=2)
    got = Explainer(loaded)(x, top_k=2)
    assert got.target_layer == "layer4.1"
    assert torch.equal(got.classes, ref.classes)
    assert ref.cams.abs().max() > 0
    torch.testing.assert_close(got.cams, ref.cams, rtol=1e-4, atol=1e-6)
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip archive")
    with pytest.raises(ModelSpecError, match="cannot load bad.pt2 as a torch.export program"):
        load_model(str(bad))


def test_state_dict_file_given_as_model_points_to_weights(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(_tiny_classifier().state_dict(), path)
    with pytest.raises(ModelSpecError, match="not a TorchScript archive.*--weights weights.pth"):
        load_model(str(path))


def test_onnx_file_spec(tmp_path):
    pytest.importorskip("onnxruntime")
    from gradcam_batch.engine.models.onnx_backend import OnnxModel

    path = tmp_path / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_tiny_classifier(), (torch.randn(1, 3, 8, 8),), str(path), dynamo=False, opset_version=17)
    model = load_model(str(path), providers=["CPUExecutionProvider"])
    assert isinstance(model, OnnxModel) and model.providers == ["CPUExecutionProvider"]
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf")
    with pytest.raises(ValueError, match="cannot read bad.onnx as an ONNX model"):
        load_model(str(bad))
