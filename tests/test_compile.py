"""The compiled backbone: same cams as eager, and a one-warning fallback when compilation fails."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from gradcam_batch.engine.explain import compiled as compiled_mod
from gradcam_batch.engine.explain.compiled import CompiledBackbone, backbone_context, check_precision
from gradcam_batch.engine.explain.explainer import Explainer


def _tiny(head: str = "gap") -> nn.Module:
    torch.manual_seed(0)
    layers = [
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()),
    ]
    if head == "gap":
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)]
    else:  # a non-linear head: the VJP path
        layers += [nn.Flatten(), nn.Linear(16 * 8 * 8, 12), nn.Tanh(), nn.Linear(12, 5)]
    model = nn.Sequential(*layers).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.3, 0.3)
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def _compare(a, b):
    assert torch.equal(a.classes, b.classes)
    assert b.cams.abs().max() > 0
    err = float((a.cams - b.cams).abs().max() / b.cams.abs().max())
    assert err < 1e-4, f"compiled cams differ from eager: max relative error {err:.2e}"
    assert torch.allclose(a.scores, b.scores, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("head", ["gap", "mlp"])
def test_dynamo_captured_backbone_matches_eager(head):
    """Dynamo + AOT autograd capture of the FX backbone (no inductor codegen: fast on CPU)."""
    model = _tiny(head)
    images = torch.randn(4, 3, 16, 16)
    eager = Explainer(model)(images, top_k=3)
    exp = Explainer(model)
    exp._prepare(images)
    exp._backbone = CompiledBackbone(exp._split.backbone, backend="aot_eager")
    got = exp(images, top_k=3)
    assert exp._backbone.active and exp._backbone.compiled_ok
    assert got.closed_form is (head == "gap")
    _compare(got, eager)


@pytest.mark.slow
def test_inductor_compiled_matches_eager():
    """torch.compile with the default (inductor) backend; slow on a CPU (C++ codegen)."""
    model = _tiny("mlp")
    images = torch.randn(4, 3, 16, 16)
    eager = Explainer(model)(images, top_k=3)
    exp = Explainer(model, compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would warn: fail instead
        got = exp(images, top_k=3)
    assert exp._backbone.compiled_ok
    _compare(got, eager)


def test_compile_failure_falls_back_with_one_warning(monkeypatch):
    calls = {"n": 0}

    def broken_compile(fn, **kwargs):
        def run(*args):
            calls["n"] += 1
            raise RuntimeError("backend exploded\nsecond line that must not be shown")

        return run

    monkeypatch.setattr(compiled_mod.torch, "compile", broken_compile)
    model = _tiny("gap")
    images = torch.randn(2, 3, 16, 16)
    exp = Explainer(model, compile=True)
    with pytest.warns(RuntimeWarning, match="torch.compile failed for the backbone") as record:
        first = exp(images, top_k=2)
        second = exp(images, top_k=2)
    msgs = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "\n" not in msgs[0] and "backend exploded" in msgs[0]
    assert calls["n"] == 1  # never retried after the failure
    assert not exp._backbone.active
    ref = Explainer(model)(images, top_k=2)
    _compare(first, ref)
    _compare(second, ref)


def test_compile_raising_at_wrap_time_also_falls_back(monkeypatch):
    def refuse(fn, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(compiled_mod.torch, "compile", refuse)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        cb = CompiledBackbone(nn.Identity())
    x = torch.randn(3)
    assert torch.equal(cb(x), x)


def test_bad_options_are_clear_errors():
    model = _tiny()
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        Explainer(model, precision="fp8")
    with pytest.raises(ValueError, match="unknown compile mode 'turbo'"):
        Explainer(model, compile=True, compile_mode="turbo")
    with pytest.raises(ValueError, match="unknown reshape"):
        Explainer(model, reshape="patches")
    assert check_precision("bf16") == "bf16"


def test_bf16_backbone_on_cpu_is_close_and_head_runs_fp32():
    """Autocast on the backbone only: activations come back as fp32 for the head and the kernel."""
    model = _tiny("mlp")
    images = torch.randn(2, 3, 16, 16)
    ref = Explainer(model)(images, classes=torch.tensor([0, 3]))
    got = Explainer(model, precision="bf16")(images, classes=torch.tensor([0, 3]))
    assert got.cams.dtype == torch.float32 and got.weights.dtype == torch.float32
    err = float((got.cams - ref.cams).abs().max() / ref.cams.abs().max())
    assert 0 < err < 5e-2  # bf16 has 8 bits of mantissa: close, and not bit-identical
    with backbone_context(images.device, "bf16"):
        assert torch.is_autocast_enabled("cpu")
    with backbone_context(images.device, "fp32"):
        assert not torch.is_autocast_enabled("cpu")
