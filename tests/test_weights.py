"""Weights files: safetensors, state dicts, training checkpoints, DDP and torch.compile prefixes, one-line errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from gradcam_batch.engine.models.loader import ModelSpecError, load_model
from gradcam_batch.engine.models.weights import load_weights, read_weights

torchvision = pytest.importorskip("torchvision")


def _net(num_classes: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, num_classes),
    )


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def src():
    torch.manual_seed(3)
    net = _net()
    with torch.no_grad():
        net[1].running_mean.normal_()  # buffers travel too
    return net


def _prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


def test_safetensors_round_trip(src, tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    path = tmp_path / "net.safetensors"
    safetensors.save_file(src.state_dict(), str(path))
    dst = _net()
    assert not _same(src, dst)
    load_weights(dst, path)
    assert _same(src, dst)


@pytest.mark.parametrize(
    ("layout", "prefix"),
    [
        ("state_dict", "module."),  # DDP
        ("model", "module."),
        ("model_state_dict", "_orig_mod."),  # torch.compile
        ("ema", ""),
        ("state_dict", "module._orig_mod."),  # compiled, then wrapped in DDP
        ("state_dict", "_orig_mod.module."),
        (None, "_orig_mod."),  # a bare state dict of a compiled model
    ],
)
def test_checkpoint_layouts_and_prefixes(src, tmp_path, layout, prefix):
    state = _prefixed(src.state_dict(), prefix)
    payload = state if layout is None else {layout: state, "epoch": 7, "optimizer": {"lr": 0.1}}
    path = tmp_path / "ckpt.pth"
    torch.save(payload, path)
    dst = _net()
    load_weights(dst, path)
    assert _same(src, dst)


def test_first_checkpoint_key_wins(src, tmp_path):
    other = _net()
    torch.save({"model": src.state_dict(), "ema": other.state_dict()}, tmp_path / "both.pt")
    dst = _net()
    load_weights(dst, tmp_path / "both.pt")
    assert _same(src, dst)


def test_prefix_the_model_has_too_is_kept(tmp_path):
    """A model whose own names start with module. keeps the file's module. keys."""

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = nn.Linear(2, 2)

    a, b = Wrapped(), Wrapped()
    torch.save(a.state_dict(), tmp_path / "w.pt")
    load_weights(b, tmp_path / "w.pt")
    assert _same(a, b)


def test_wrong_shape_names_the_tensor_in_one_line(tmp_path):
    torch.save({"state_dict": _prefixed(_net(num_classes=5).state_dict(), "module.")}, tmp_path / "five.pt")
    with pytest.raises(ModelSpecError) as info:
        load_weights(_net(num_classes=3), tmp_path / "five.pt")
    msg = str(info.value)
    assert "\n" not in msg
    assert "5.weight has shape (5, 4), the model expects (3, 4)" in msg and "set num_classes" in msg


def test_missing_and_unexpected_keys_are_named(src, tmp_path):
    state = src.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["0.bias"]
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(ModelSpecError, match=r"1 missing keys \(first: 0.bias\); 1 unexpected keys \(first: extra"):
        load_weights(_net(), tmp_path / "odd.pt")
    # Not strict: both are allowed, with one warning that counts them.
    dst = _net()
    with pytest.warns(UserWarning, match="1 model tensors keep their initial values and 1 tensors of the file"):
        load_weights(dst, tmp_path / "odd.pt", strict=False)
    assert torch.equal(dst[0].weight, src[0].weight)


def test_non_strict_still_refuses_shapes_and_strangers(tmp_path):
    torch.save(_net(num_classes=5).state_dict(), tmp_path / "five.pt")
    with pytest.raises(ModelSpecError, match="5.weight has shape"):
        load_weights(_net(num_classes=3), tmp_path / "five.pt", strict=False)
    torch.save({"encoder.w": torch.zeros(2)}, tmp_path / "stranger.pt")
    with pytest.raises(ModelSpecError, match="no tensor of the file matches"):
        load_weights(_net(), tmp_path / "stranger.pt", strict=False)


def test_not_a_state_dict(tmp_path):
    torch.save({"epoch": 3, "config": {"lr": 0.1}}, tmp_path / "meta.pt")
    with pytest.raises(ModelSpecError, match="holds none under state_dict, model, model_state_dict, ema"):
        read_weights(tmp_path / "meta.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    pytest.importorskip("safetensors")
    with pytest.raises(ModelSpecError, match="cannot read bad.safetensors as safetensors"):
        read_weights(tmp_path / "bad.safetensors")


def test_load_model_takes_safetensors_and_strictness(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    src = torchvision.models.resnet18(weights=None, num_classes=4)
    state = {k: v for k, v in src.state_dict().items() if not k.startswith("fc.")}
    safetensors.save_file(state, str(tmp_path / "backbone.safetensors"))
    with pytest.raises(ModelSpecError, match=r"2 missing keys \(first: fc.weight\)"):
        load_model("torchvision:resnet18", weights=tmp_path / "backbone.safetensors", num_classes=4)
    with pytest.warns(UserWarning, match="2 model tensors keep their initial values"):
        model = load_model(
            "torchvision:resnet18", weights=tmp_path / "backbone.safetensors", num_classes=4, weights_strict=False
        )
    assert torch.equal(model.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
