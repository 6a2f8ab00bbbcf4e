"""reshape="tokens": Grad-CAM for (B, N, D) transformer outputs."""

from __future__ import annotations

import pytest
import torch

from gradcam_batch.engine.explain.explainer import Explainer, explain
from gradcam_batch.engine.explain.layers import TargetLayerError
from gradcam_batch.engine.explain.tokens import infer_grid, map_to_tokens, parse_grid, tokens_to_map

torchvision = pytest.importorskip("torchvision")
from torchvision.models.vision_transformer import VisionTransformer  # noqa: E402


def _hand_reference(model, layer: str, images: torch.Tensor, classes: torch.Tensor, grid, n_extra: int):
    """Plain autograd, one class at a time, reshaped by hand: the contract of reshape='tokens'."""
    captured = {}

    def hook(module, args, output):
        output.retain_grad()
        captured["t"] = output

    handle = model.get_submodule(layer).register_forward_hook(hook)
    cams = []
    try:
        for c in range(classes.shape[1]):
            model.zero_grad()
            scores = model(images)
            scores.gather(1, classes[:, c : c + 1]).sum().backward()
            t, g = captured["t"].detach(), captured["t"].grad
            b, n, d = t.shape
            h, w = grid
            a = t[:, n_extra:, :].reshape(b, h, w, d).permute(0, 3, 1, 2)  # (B, D, h, w)
            grad = g[:, n_extra:, :].reshape(b, h, w, d).permute(0, 3, 1, 2)
            alpha = grad.mean(dim=(2, 3))  # (B, D)
            cams.append(torch.relu((alpha[:, :, None, None] * a).sum(1)))
    finally:
        handle.remove()
    return torch.stack(cams, dim=1)


# vmap over the attention backward has no batching rule on CPU yet: correct, only slower.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def test_vit_b_16_small_image_matches_hand_reshape():
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None, image_size=48, num_classes=10).eval()
    with torch.no_grad():  # torchvision zero-initializes the classifier: no gradient would reach the tokens
        model.heads.head.weight.normal_(0, 0.05)
    images = torch.randn(2, 3, 48, 48)  # 3x3 patches of 16 px + the class token
    exp = Explainer(model, reshape="tokens")(images, top_k=2)
    last = "encoder.layers.encoder_layer_11.ln_1"
    assert exp.target_layer == last
    assert exp.cams.shape == (2, 2, 3, 3) and exp.heatmaps.shape == (2, 2, 48, 48)
    assert torch.isfinite(exp.cams).all() and torch.isfinite(exp.heatmaps).all()
    ref = _hand_reference(model, last, images, exp.classes, (3, 3), n_extra=1)
    assert ref.abs().max() > 0
    err = float((exp.cams - ref).abs().max() / ref.abs().max())
    assert err < 1e-4, f"token cams differ from the hand-reshaped reference: {err:.2e}"


@pytest.fixture
def small_vit():
    torch.manual_seed(1)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=7
    ).eval()
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.3)
    return model


def test_small_vit_explicit_layer_grid_and_counterfactual(small_vit):
    images = torch.randn(3, 3, 32, 32)
    layer = "encoder.layers.encoder_layer_1"  # a whole block's output, given by name
    classes = torch.tensor([[0, 6], [2, 2], [5, 1]])
    exp = explain(small_vit, images, target_layer=layer, classes=classes, reshape="tokens")
    ref = _hand_reference(small_vit, layer, images, classes, (4, 4), n_extra=1)
    assert ref.abs().max() > 0
    torch.testing.assert_close(exp.cams, ref, rtol=1e-4, atol=1e-6)
    grid = Explainer(small_vit, target_layer=layer, reshape="tokens", token_grid="4x4")(images, classes=classes)
    torch.testing.assert_close(grid.cams, exp.cams)
    cf = Explainer(small_vit, target_layer=layer, reshape="tokens")(images, classes=classes, counterfactual=True)
    torch.testing.assert_close(cf.weights, -exp.weights)


def test_auto_detection_picks_last_pre_attention_norm(small_vit):
    exp = Explainer(small_vit, reshape="tokens")(torch.randn(1, 3, 32, 32))
    # After the last attention only the class token reaches the head; ln_1 still feeds K and V.
    assert exp.target_layer == "encoder.layers.encoder_layer_2.ln_1"


def test_token_errors(small_vit):
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        zero_head = VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=8)
    with pytest.raises(TargetLayerError, match="zero-initialized classifier"):
        Explainer(zero_head.eval(), reshape="tokens")(images)
    with pytest.raises(TargetLayerError, match="needs 25 patch tokens"):
        Explainer(small_vit, target_layer="encoder.layers.encoder_layer_1", reshape="tokens", token_grid="5x5")(images)
    with pytest.raises(TargetLayerError, match=r"needs a \(B, N, D\) token output"):
        Explainer(small_vit, target_layer="conv_proj", reshape="tokens")(images)
    with pytest.raises(ValueError, match="HxW"):
        parse_grid("14 by 14")


def test_reshape_helpers_round_trip():
    torch.manual_seed(2)
    tokens = torch.randn(2, 1 + 6 * 8, 5)  # a class token and a 6x8 patch grid
    cam_map, prefix = tokens_to_map(tokens, (6, 8))
    assert cam_map.shape == (2, 5, 6, 8) and prefix.shape == (2, 1, 5)
    # Row-major patch order: token 1 + r*8 + c is pixel (r, c).
    assert torch.equal(cam_map[:, :, 2, 3], tokens[:, 1 + 2 * 8 + 3, :])
    assert torch.equal(map_to_tokens(cam_map, prefix), tokens)
    assert infer_grid(197) == (14, 14)
    assert infer_grid(201) == (14, 14)  # class token + 4 registers
    assert infer_grid(1 + 12 * 16, image_hw=(192, 256)) == (12, 16)
    assert parse_grid("12x16") == (12, 16) and parse_grid(None) is None
