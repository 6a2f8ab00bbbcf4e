"""timm:NAME: random-weight timm models at small input sizes, against pytorch-grad-cam and a hand reshape.

Nothing is downloaded: every model is built with pretrained=False.
"""

from __future__ import annotations

import json

import pytest
import torch

from gradcam_batch.engine.bench.harness import pearson
from gradcam_batch.engine.explain.explainer import Explainer
from gradcam_batch.engine.models.loader import ModelSpecError, load_model, model_preprocessing
from gradcam_batch.engine.models.weights import state_digest

timm = pytest.importorskip("timm")
pytest.importorskip("pytorch_grad_cam")

from pytorch_grad_cam import GradCAM  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402
from run_support import bytes_table, invoke, write_table  # noqa: E402

# vmap over the attention backward has no batching rule on CPU yet: correct, only slower.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

TOP_K = 2


def _vit(size: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=size).eval()


def _pgc_raw(model, layer: str, images, classes, reshape=None):
    """pytorch-grad-cam's maps before its ReLU and resize, one call per class rank."""
    module = model.get_submodule(layer)
    maps = []
    with GradCAM(model=model, target_layers=[module], reshape_transform=reshape) as cam:
        for r in range(classes.shape[1]):
            targets = [ClassifierOutputTarget(int(c)) for c in classes[:, r]]
            cam(input_tensor=images, targets=targets)
            acts = cam.activations_and_grads.activations[0].numpy()
            grads = cam.activations_and_grads.gradients[0].numpy()
            maps.append(torch.from_numpy(cam.get_cam_image(images, module, targets, acts, grads)))
    return torch.stack(maps, 1)


def _vit_reshape(tokens: torch.Tensor) -> torch.Tensor:
    b, n, d = tokens.shape
    s = int((n - 1) ** 0.5)
    return tokens[:, 1:].reshape(b, s, s, d).permute(0, 3, 1, 2)


@pytest.mark.parametrize(
    ("name", "size", "layer"),
    [
        ("resnet18", 128, "layer4.1"),
        ("convnext_atto", 128, "stages.3"),
        ("vit_tiny_patch16_224", 64, "blocks.11.norm1"),
    ],
)
def test_maps_match_pytorch_grad_cam(name, size, layer):
    torch.manual_seed(0)
    kwargs = {"img_size": size} if name.startswith("vit") else {}
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    explainer = Explainer(model)
    exp = explainer(images, top_k=TOP_K, relu=False, heatmaps=False)
    assert exp.target_layer == layer
    assert explainer.reshape == ("tokens" if name.startswith("vit") else None)
    assert exp.cams.shape == (2, TOP_K, 4, 4)
    assert bool((exp.cams.flatten(2).std(dim=2) > 0).all())
    theirs = _pgc_raw(model, layer, images, exp.classes, _vit_reshape if name.startswith("vit") else None)
    r = pearson(exp.cams, theirs)
    assert float(r.min()) >= 0.999, f"{name}: Pearson {float(r.min()):.6f}"


def _hand_tokens(model, layer: str, images, classes, n_extra: int, channels_last: bool = False):
    """Plain autograd, one class at a time, reshaped by hand."""
    captured = {}

    def hook(module, args, output):
        output.retain_grad()
        captured["t"] = output

    handle = model.get_submodule(layer).register_forward_hook(hook)
    cams = []
    try:
        for c in range(classes.shape[1]):
            model.zero_grad()
            model(images).gather(1, classes[:, c : c + 1]).sum().backward()
            t, g = captured["t"].detach(), captured["t"].grad
            if channels_last:  # (B, H, W, C)
                a, grad = t.permute(0, 3, 1, 2), g.permute(0, 3, 1, 2)
            else:
                b, n, d = t.shape
                s = int((n - n_extra) ** 0.5)
                a = t[:, n_extra:].reshape(b, s, s, d).permute(0, 3, 1, 2)
                grad = g[:, n_extra:].reshape(b, s, s, d).permute(0, 3, 1, 2)
            alpha = grad.mean(dim=(2, 3))
            cams.append(torch.relu((alpha[:, :, None, None] * a).sum(1)))
    finally:
        handle.remove()
    return torch.stack(cams, 1)


@pytest.mark.parametrize("vjp_strategy", ["auto", "vmap", "loop"])
def test_vit_matches_hand_reshape(vjp_strategy):
    model = _vit()
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    exp = Explainer(model, vjp_strategy=vjp_strategy)(images, top_k=3)
    ref = _hand_tokens(model, "blocks.11.norm1", images, exp.classes, n_extra=1)
    assert ref.abs().max() > 0
    torch.testing.assert_close(exp.cams / ref.abs().max(), ref / ref.abs().max(), atol=1e-4, rtol=0)


def test_deit_distilled_drops_both_extra_tokens():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=6, img_size=48).eval()
    images = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    exp = Explainer(model)(images, top_k=2)
    assert exp.target_layer == "blocks.11.norm1" and exp.cams.shape == (2, 2, 3, 3)
    ref = _hand_tokens(model, "blocks.11.norm1", images, exp.classes, n_extra=2)
    torch.testing.assert_close(exp.cams / ref.abs().max(), ref / ref.abs().max(), atol=1e-4, rtol=0)


def test_swin_channels_last_grid():
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    # swin_tiny's class and layout, at a fraction of its width and depth.
    model = SwinTransformer(
        img_size=64, window_size=2, embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), num_classes=5
    ).eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    explainer = Explainer(model)
    assert explainer.reshape is None  # decided at set-up, from the graph
    exp = explainer(images, top_k=2)
    assert exp.target_layer == "norm" and exp.cams.shape == (2, 2, 2, 2)
    assert explainer.reshape == "tokens"
    ref = _hand_tokens(model, "norm", images, exp.classes, n_extra=0, channels_last=True)
    assert ref.abs().max() > 0
    torch.testing.assert_close(exp.cams / ref.abs().max(), ref / ref.abs().max(), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("name", "expected"), [("efficientnet_b0", "bn2.act"), ("regnety_002", "s4.b7"), ("convnext_atto", "stages.3")]
)
def test_auto_detection_takes_the_last_stage(name, expected):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=4).eval()
    exp = Explainer(model)(torch.randn(1, 3, 64, 64), heatmaps=False)
    assert exp.target_layer == expected


def test_spec_weights_and_errors(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("resnet18", pretrained=False, num_classes=3)
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 1}, tmp_path / "ddp.pt")
    model = load_model("timm:resnet18", num_classes=3, weights=tmp_path / "ddp.pt")
    assert not model.training and torch.equal(model.fc.weight, src.fc.weight)
    with pytest.raises(ModelSpecError, match=r"fc.weight has shape \(3, 512\), the model expects \(1000, 512\)"):
        load_model("timm:resnet18", weights=tmp_path / "ddp.pt")
    with pytest.raises(ModelSpecError, match="unknown timm model 'resnet_eighteen'"):
        load_model("timm:resnet_eighteen")


def test_data_config_becomes_the_preprocessing():
    vit = model_preprocessing("timm:vit_tiny_patch16_224")
    # timm: crop_pct 0.9, so the shorter side goes to floor(224 / 0.9) = 248; bicubic; mean and std 0.5.
    assert (vit.resize, vit.crop, vit.interpolation) == (248, (224, 224), "bicubic")
    assert vit.mean == (0.5, 0.5, 0.5) and vit.std == (0.5, 0.5, 0.5)
    r18 = model_preprocessing("timm:resnet18")
    assert (r18.resize, r18.crop) == (235, (224, 224))  # crop_pct 0.95
    assert model_preprocessing("torchvision:resnet18") is None


def test_run_uses_the_data_config(tmp_path):
    """The data config reaches Preprocess (the manifest records the plan's), and an explicit option wins."""
    data = write_table(tmp_path / "in.parquet", bytes_table(2, size=40))
    common = [str(data), "--model", "timm:vit_tiny_patch16_224", "--num-classes", "4", "--no-progress"]
    res = invoke(["run", *common, "-o", str(tmp_path / "a"), "--heatmap-size", "none"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "a" / "manifest.json").read_text())["config"]
    assert cfg["resize"] == 248 and cfg["crop"] == [224, 224] and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == [0.5, 0.5, 0.5] and cfg["target_layer_resolved"] == "blocks.11.norm1"


@pytest.mark.slow
def test_explicit_preprocessing_option_wins_and_is_fingerprinted(tmp_path):
    data = write_table(tmp_path / "in.parquet", bytes_table(1, size=40))
    common = [str(data), "--model", "timm:vit_tiny_patch16_224", "--num-classes", "4", "--no-progress"]
    assert invoke(["run", *common, "-o", str(tmp_path / "a"), "--heatmap-size", "none"]).exit_code == 0
    res = invoke(["run", *common, "-o", str(tmp_path / "b"), "--heatmap-size", "none", "--resize", "224"])
    assert res.exit_code == 0, res.output
    manifest_b = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest_b["config"]["resize"] == 224 and manifest_b["config"]["interpolation"] == "bicubic"
    # The resolved preprocessing is part of the fingerprint.
    manifest_a = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest_a["fingerprint"] != manifest_b["fingerprint"]


def test_layers_command_prints_the_preprocessing():
    res = invoke(["layers", "--model", "timm:convnext_atto", "--input-size", "64"])
    assert res.exit_code == 0, res.output
    first = res.output.splitlines()[0]
    assert first.startswith("preprocessing: resize shorter side to 256, center crop 224x224, bicubic")
    assert "timm data config of convnext_atto" in first
    assert res.output.rstrip().endswith("auto-detected: stages.3")
    res = invoke(["layers", "--model", "timm:vit_tiny_patch16_224"])
    assert res.exit_code == 0, res.output
    assert "auto-detected: blocks.11.norm1 (reshape: tokens)" in res.output
    assert "* blocks.11.norm1" in res.output and "LayerNorm   1x197x192" in res.output


def test_fingerprint_holds_the_weights_and_timms_version_not_its_init_file(tmp_path, monkeypatch):
    from gradcam_batch.engine.job.config import RunConfig
    from gradcam_batch.engine.job.plan import build_plan, fingerprint

    inp = write_table(tmp_path / "in.parquet", bytes_table(1))
    cfg = RunConfig(inputs=[str(inp)], output=str(tmp_path / "o"), model="timm:resnet10t", num_classes=3,
                    resize=32, crop=32, heatmap_size=None)  # fmt: skip
    plan = build_plan(cfg)
    model = load_model("timm:resnet10t", num_classes=3)  # a seeded random init: the plan's weights
    assert plan.model_digest == state_digest(model)
    assert fingerprint(plan) == plan.fingerprint
    monkeypatch.setattr(timm, "__version__", "0.0.1")
    assert fingerprint(plan) != plan.fingerprint
