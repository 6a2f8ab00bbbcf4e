"""Target-layer auto-detection on the architectures people use, and the `layers` command."""

from __future__ import annotations

import textwrap
import warnings

import pytest
import torch
from click.testing import CliRunner

torchvision = pytest.importorskip("torchvision")

from gradcam_batch.cli import cli  # noqa: E402
from gradcam_batch.engine.explain.explainer import Explainer, default_score_fn, eval_mode  # noqa: E402
from gradcam_batch.engine.explain.layers import detect_target_layer, probe_layers  # noqa: E402
from gradcam_batch.engine.models.loader import load_model  # noqa: E402

SIZE = 64  # stride-32 backbones end in 2x2 maps: still spatial, and fast


def _detect(model: torch.nn.Module) -> str:
    with eval_mode(model):
        return detect_target_layer(model, torch.randn(1, 3, SIZE, SIZE), default_score_fn)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("resnet18", "layer4.1"),  # the last block of layer4
        ("mobilenet_v3_small", "features.12"),  # the last conv stage (1x1 conv -> BN -> Hardswish)
        ("mobilenet_v2", "features.18"),
        ("efficientnet_b0", "features.8"),
        ("vgg11", "features.19"),  # the last ReLU, before the last max-pool (features.20)
        ("convnext_tiny", "features.7"),  # the last stage
    ],
)
def test_auto_detection_picks_the_expected_layer(name, expected):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10)
    assert _detect(model) == expected
    if name == "vgg11":
        assert isinstance(model.features[19], torch.nn.ReLU)
        assert isinstance(model.features[20], torch.nn.MaxPool2d)


def test_probe_marks_exactly_one_chosen_candidate():
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    infos = probe_layers(model, torch.randn(1, 3, SIZE, SIZE), default_score_fn)
    chosen = [i for i in infos if i.chosen]
    assert [i.name for i in chosen] == ["layer4.1"]
    assert chosen[0].candidate and chosen[0].shape == (1, 512, 2, 2)
    by_name = {i.name: i for i in infos}
    assert not by_name["avgpool"].candidate  # 1x1: not a spatial map
    assert by_name["fc"].shape == (1, 10)


FACTORY = textwrap.dedent(
    """
    import torch
    import torch.nn as nn


    class Stem(nn.Module):
        def __init__(self, c_in, c_out):
            super().__init__()
            self.conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
            self.act = nn.GELU()

        def forward(self, x):
            return self.act(self.conv(x))


    class ThirdPartyNet(nn.Module):
        def __init__(self, num_classes=5):
            super().__init__()
            self.stem = Stem(3, 8)
            self.body = nn.ModuleDict({"a": Stem(8, 16), "b": Stem(16, 24)})
            self.refine = nn.Conv2d(24, 24, 1)
            self.pool = nn.AdaptiveMaxPool2d(1)
            self.head = nn.Linear(24, num_classes)

        def forward(self, x):
            x = self.body["b"](self.body["a"](self.stem(x)))
            x = torch.relu(self.refine(x))  # a functional ReLU: the conv is the last module
            return self.head(self.pool(x).flatten(1))


    def build(num_classes=5):
        return ThirdPartyNet(num_classes)
    """
)


def test_third_party_module_from_factory_file(tmp_path):
    path = tmp_path / "third_party.py"
    path.write_text(FACTORY)
    model = load_model(f"{path}:build", num_classes=4)
    assert type(model).__name__ == "ThirdPartyNet" and model.head.out_features == 4
    assert _detect(model) == "refine"
    exp = Explainer(model)(torch.randn(2, 3, 32, 32), top_k=2)
    assert exp.target_layer == "refine"
    assert exp.cams.shape == (2, 2, 4, 4)
    assert torch.isfinite(exp.cams).all()


def _invoke(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_layers_command_torch():
    res = _invoke(["layers", "--model", "torchvision:resnet18", "--num-classes", "10", "--input-size", "64"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    marked = [ln for ln in lines if ln.startswith("*")]
    assert len(marked) == 1
    assert marked[0].split()[1:] == ["layer4.1", "BasicBlock", "1x512x2x2"]
    assert lines[-1] == "auto-detected: layer4.1"
    assert not any(ln.split()[0] == "fc" for ln in lines[1:-1])  # not a candidate: hidden without --all
    res_all = _invoke(
        ["layers", "--model", "torchvision:resnet18", "--num-classes", "10", "--input-size", "64", "--all"]
    )
    assert any(ln.split()[:3] == ["fc", "Linear", "1x10"] for ln in res_all.output.splitlines())


def test_layers_command_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    path = tmp_path / "r18.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, SIZE, SIZE),), str(path), dynamo=False, opset_version=17)
    res = _invoke(["layers", "--model", str(path), "--input-size", "64x64"])
    assert res.exit_code == 0, res.output
    marked = [ln for ln in res.output.splitlines() if ln.startswith("*")]
    assert len(marked) == 1
    name, op, shape = marked[0].split()[1:]
    assert op == "Relu" and shape == "1x512x2x2" and "layer4.1" in name
    assert res.output.splitlines()[-1] == f"auto-detected: {name}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "torchvision:nope"], "unknown torchvision model 'nope'"),
        # the message of run's sizes (--crop big), from the one size parser
        (["--model", "torchvision:resnet18", "--input-size", "big"], "'big' is not a size: expected N, HxW"),
        (["--model", "missing_file.onnx"], "model file not found"),
        (["--model", "no_colon_and_no_file"], "cannot parse model spec"),
    ],
)
def test_layers_command_errors(args, message):
    res = CliRunner().invoke(cli, ["layers", *args])
    assert res.exit_code == 2, res.output  # a bad invocation, as in `run`
    assert message in res.output
    assert "Traceback" not in res.output


def test_layers_and_run_refuse_a_bad_model_directory_alike(tmp_path):
    """An hf: directory that is not a save_pretrained one: exit 2 and one line, from both commands."""
    from run_support import bytes_table, write_table

    bad = tmp_path / "not_a_model"
    bad.mkdir()
    inp = write_table(tmp_path / "in" / "x.parquet", bytes_table(2))
    for args in (
        ["layers", "--model", f"hf:{bad}"],
        ["run", str(inp), "-o", str(tmp_path / "o"), "--model", f"hf:{bad}"],
    ):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 2, (args[0], res.output)
        assert res.output.strip().splitlines() == [f"Error: hf:{bad} has no config.json; it is not a directory "
                                                   "written by save_pretrained"], (args[0], res.output)  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_layers_command_help():
    res = _invoke(["layers", "--help"])
    assert res.exit_code == 0 and "--input-size" in res.output
