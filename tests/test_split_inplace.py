"""The no-grad backbone writes residual additions in place, as eager code does (``split.add_in_place``).

FX records ``out += identity`` as an out-of-place add; rewritten, the backbone allocates no extra
activation per block (the gap to inference on the CPU: ``benchmarks/RESULTS.md``). These tests hold the
rewrite to the eager model's values, bit for bit, and to the places where a write in place is safe.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn

from gradcam_batch.engine.explain.split import add_in_place, add_into, split_at


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.shared = nn.BatchNorm2d(4)
        self.squeeze = nn.Conv2d(4, 4, 1)
        self.target = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        out = self.bn(self.conv(x))
        out += x  # fresh BN output, read once: in place
        y = self.shared(self.conv2(out))
        z = y + out  # y is read again below: must stay out of place
        z = z * y
        s = self.squeeze(z.mean((2, 3), keepdim=True))  # (B, C, 1, 1) + (B, C, H, W) broadcasts: not into s
        z = s + z
        a = self.target(z)
        return self.fc(a.mean((2, 3)))


def _eager_target(model: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    seen = {}
    handle = model.get_submodule(name).register_forward_hook(lambda m, i, o: seen.setdefault("a", o))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen["a"]


def test_only_the_safe_add_is_rewritten_and_the_values_are_the_eager_ones():
    torch.manual_seed(0)
    model = Residual().eval()
    x = torch.randn(2, 4, 8, 8)
    split = split_at(model, "target")
    adds = [n for n in split.backbone.graph.nodes if n.op == "call_function"]
    assert [n.target for n in adds].count(add_into) == 2  # out += x, and s + z (decided at run time)
    assert [n.target for n in adds].count(operator.add) == 1  # y + out: y has another reader
    with torch.inference_mode():
        a, *_ = split.backbone(x)
    assert torch.equal(a, _eager_target(model, x, "target"))
    assert add_in_place(split.backbone) == 0  # the rewrite is done once, at the cut


def test_add_into_writes_only_where_the_result_is_the_same_tensor():
    a, b = torch.ones(2, 3), torch.full((2, 3), 2.0)
    assert add_into(a, b) is a and torch.equal(a, torch.full((2, 3), 3.0))
    small, big = torch.ones(2, 1), torch.ones(2, 3)
    out = add_into(small, big)  # broadcasting: the result is larger than the first operand
    assert out is not small and out.shape == (2, 3) and torch.equal(small, torch.ones(2, 1))
    half, full = torch.ones(2, dtype=torch.float16), torch.ones(2)
    assert add_into(half, full).dtype == torch.float32 and half.dtype == torch.float16  # promotion: out of place
    leaf = torch.ones(2, requires_grad=True)
    assert add_into(leaf, torch.ones(2)) is not leaf  # autograd: never in place


def _torchvision_cut(name: str, layer: str) -> list:
    """The rewritten adds of a random torchvision model cut at ``layer``, once its backbone's output has been
    checked against the eager model's, bit for bit."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(tv.models, name)(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    split = split_at(model, layer)
    with torch.inference_mode():
        a, *_ = split.backbone(x)
    assert torch.equal(a, _eager_target(model, x, layer))
    return [n for n in split.backbone.graph.nodes if n.target is add_into]


def test_torchvision_resnet_blocks_add_in_place_and_match_eager_bit_for_bit():
    # One residual add per BasicBlock of layer1 to layer3, every one in place (layer4, the target, is one leaf
    # call: its blocks run as eager code, in place already).
    assert len(_torchvision_cut("resnet18", "layer4")) == 6


def test_an_inverted_residual_adds_into_the_blocks_output_bit_for_bit():
    rewritten = _torchvision_cut("mobilenet_v2", "features.18")
    assert len(rewritten) == 10  # x + conv(x): the fresh operand, the block's last BatchNorm, goes first
    assert all(n.args[0].op == "call_module" for n in rewritten)
