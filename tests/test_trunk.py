"""The default target layer: the trunk's last feature map, found from the graph (engine/explain/trunk.py).

Tiny timm configs of the families that once got their stem or a positional conv (LeViT, Mixer, Twins), the
torchvision segmentation models (random init, small input), and hand-built cases of each rule. The usual
CNN and ViT families keep their layers: tests/test_layers.py, tests/test_timm.py, tests/test_tokens.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from gradcam_batch.engine.explain.explainer import Explainer, default_score_fn, eval_mode
from gradcam_batch.engine.explain.layers import probe_layers
from gradcam_batch.engine.explain.trunk import TargetLayerNotice, last_feature_map, params_after, run_probe

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

# vmap over the attention backward has no batching rule on CPU yet: correct, only slower.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def _images(size: int, b: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(5))


def _levit() -> nn.Module:
    torch.manual_seed(0)
    # levit_128s's class (distilled: two heads) with three narrow one-block stages; 128 px leaves 2x2 tokens.
    return timm.create_model(
        "levit_128s",
        pretrained=False,
        num_classes=5,
        img_size=128,
        embed_dim=(32, 48, 64),
        depth=(1, 1, 1),
        num_heads=(1, 1, 1),
        key_dim=8,
    ).eval()


def _mixer() -> nn.Module:
    from timm.models.mlp_mixer import MlpMixer

    torch.manual_seed(0)
    # mixer_s16_224's class at a fraction of its width and depth (timm's mixer_* names fix embed_dim and depth).
    return MlpMixer(num_classes=5, img_size=64, patch_size=16, num_blocks=2, embed_dim=32).eval()


def _twins() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "twins_svt_small",
        pretrained=False,
        num_classes=5,
        img_size=64,
        embed_dims=(16, 32, 48, 64),
        depths=(1, 1, 1, 2),
        num_heads=(1, 1, 1, 1),
        wss=(2, 2, 2, 2),
    ).eval()


def test_levit_takes_the_last_stage_not_the_stem():
    model = _levit()
    images = _images(128, 2)
    explainer = Explainer(model)
    exp = explainer(images, top_k=2)
    assert exp.target_layer == "stages.2"  # was stem.conv4, with nearly every parameter after it
    assert explainer.reshape == "tokens" and exp.cams.shape == (2, 2, 2, 2)
    assert bool((exp.cams.flatten(2).amax(2) > 0).any())
    probe = run_probe(model, images[:1], default_score_fn)
    assert params_after(model, probe, exp.target_layer) < 0.05


def test_levit_forced_tokens_takes_the_same_stage_not_a_linear_norm():
    """--reshape tokens once took mlp.ln2, a Linear + BatchNorm named ...Norm."""
    exp = Explainer(_levit(), reshape="tokens")(_images(128), heatmaps=False)
    assert exp.target_layer == "stages.2"


def test_mixer_takes_the_final_norm_even_with_a_zero_head():
    model = _mixer()
    assert float(model.head.weight.abs().max()) == 0.0  # timm zero-initializes Mixer's classifier
    found = last_feature_map(model, _images(64), default_score_fn)
    assert (found.layer, found.layout, found.readout) == ("norm", "tokens", "pool")  # was stem.proj
    with torch.no_grad():
        model.head.weight.normal_(0, 0.1)
    exp = Explainer(model)(_images(64, 2), top_k=2)
    assert exp.target_layer == "norm" and exp.cams.shape == (2, 2, 4, 4)


def test_twins_takes_the_final_norm_and_says_why_once():
    model = _twins()
    explainer = Explainer(model)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        exp = explainer(_images(64, 2), top_k=2)
        Explainer(model)(_images(64))  # a second set-up on the same model: said once
    assert exp.target_layer == "norm"  # was pos_block.3.proj.0, a positional conv inside the last stage
    notes = [str(w.message) for w in record if issubclass(w.category, TargetLayerNotice)]
    assert len(notes) == 1, notes
    assert "'norm'" in notes[0] and "pos_block.3" in notes[0] and "pools" in notes[0] and "\n" not in notes[0]


def test_layers_listing_marks_the_trunk_end():
    model = _twins()
    with eval_mode(model):
        infos = probe_layers(model, _images(64), default_score_fn)
    by_name = {i.name: i for i in infos}
    assert [i.name for i in infos if i.chosen] == ["norm"]
    assert by_name["norm"].layout == "tokens" and by_name["pos_block.3.proj.0"].candidate


# -- segmentation: the decoder's input ------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    [
        "deeplabv3_mobilenet_v3_large",
        "lraspp_mobilenet_v3_large",
        pytest.param("fcn_resnet50", marks=pytest.mark.slow),  # 35M parameters to initialize
    ],
    ids=lambda n: n.split("_")[0],
)
def test_segmentation_models_take_the_backbones_last_map(name):
    """Not a layer inside ASPP (which has a pooling branch of its own), LR-ASPP or the FCN head."""
    from torchvision.models import segmentation

    torch.manual_seed(0)
    model = getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=4).eval()
    sample = _images(64)
    found = last_feature_map(model, sample)  # no score function: the dense output itself
    assert found.readout == "decoder" and found.layout == "spatial"
    assert found.layer.startswith("backbone.")
    # It is the very tensor the backbone hands the decoder ("out"; LR-ASPP's "high").
    captured = {}
    hooks = [
        model.backbone.register_forward_hook(lambda m, a, out: captured.update(backbone=out)),
        model.get_submodule(found.layer).register_forward_hook(lambda m, a, out: captured.update(layer=out)),
    ]
    with torch.no_grad():
        model(sample)
    for h in hooks:
        h.remove()
    handed = captured["backbone"]["high" if name.startswith("lraspp") else "out"]
    assert captured["layer"] is handed


def test_segformer_takes_its_last_stage():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.SegformerConfig(
        depths=[1, 1, 1, 1],
        hidden_sizes=[8, 16, 24, 32],
        num_attention_heads=[1, 1, 1, 1],
        decoder_hidden_size=32,
        num_labels=4,
    )
    model = transformers.SegformerForSemanticSegmentation(config).eval()
    found = last_feature_map(model, _images(64))  # the logits of a ModelOutput, (B, 4, 16, 16)
    assert found.readout == "decoder" and found.layer.startswith("segformer.")  # the encoder, not decode_head
    assert found.shape in ((1, 32, 2, 2), (1, 4, 32))  # the last stage: 32 channels at 1/32 of 64 px


def test_a_dense_model_in_one_container_keeps_the_frontier():
    """When the top-level module's input is the image, there is no decoder to step out of."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
    model = nn.Sequential(net).eval()
    found = last_feature_map(model, _images(16))
    assert found.layer == "0.3" and found.readout == "pool"


# -- hand-built cases of each rule -----------------------------------------------------------------------
class _BiasLate(nn.Module):
    """A map computed from parameters alone (a position bias) runs after the trunk's last map."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.table = nn.Parameter(torch.randn(1, 6, 4, 4))
        self.bias = nn.Identity()
        self.bias_conv = nn.Conv2d(6, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        a = self.conv(x)
        b = self.bias_conv(self.bias(self.table))  # (1, 6, 4, 4), no dependence on x
        return self.fc((a + b).mean((2, 3)))


def test_a_map_of_parameters_alone_is_not_a_feature_map():
    found = last_feature_map(_BiasLate().eval(), _images(8), default_score_fn)
    assert found.layer == "conv"


def test_an_explicit_token_layer_gets_the_token_reshape():
    """reshape=None with a (B, N, D) target layer: decided from its output, not from the model's attributes."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(1)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=7
    ).eval()
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.3)
    layer = "encoder.layers.encoder_layer_1.ln_1"
    images = _images(32, 2)
    auto = Explainer(model, target_layer=layer)
    got = auto(images, top_k=2)
    assert auto.reshape == "tokens"
    want = Explainer(model, target_layer=layer, reshape="tokens")(images, top_k=2)
    torch.testing.assert_close(got.cams, want.cams)
    assert Explainer(model)(images).target_layer == layer  # the default for a class-token ViT
