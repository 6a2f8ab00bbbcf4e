"""Shared code of the engine tests: the float64 reference Grad-CAM, small models, comparisons.

The reference is deliberately the slow, obvious implementation that the engine replaces: a deep
copy of the model in float64, one full forward and one plain ``loss.backward()`` through the
whole network per explained class column, a forward hook that keeps A and ``retain_grad()`` on it.
It shares no code with the engine.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-5  # the constant-map rule of the spec: range <= EPS * max -> all zeros


def reference_gradcam(
    model: nn.Module,
    images: torch.Tensor,
    layer: str,
    classes: torch.Tensor,
    *,
    score_fn=None,
    counterfactual: bool = False,
    method: str = "gradcam",
) -> dict[str, torch.Tensor]:
    """Grad-CAM in float64 for ``classes`` (B, C), class column by class column.

    Images are independent in eval mode, so one backward of the sum over the batch of
    y^{classes[b, j]} gives every image's gradient for column j.

    Returns ``acts`` (B, K, h, w), ``scores_all`` (B, N), ``scores`` (B, C), ``alpha`` (B, C, K)
    and ``cams`` (B, C, h, w), all float64.
    """
    # A trainable float64 copy: the textbook set-up, whatever the caller froze.
    ref = copy.deepcopy(model).double().eval().requires_grad_(True)
    score_fn = score_fn or (lambda out: out)
    module = ref.get_submodule(layer)
    captured: list[torch.Tensor] = []

    def hook(mod, args, out):
        out.retain_grad()
        captured.append(out)

    handle = module.register_forward_hook(hook)
    try:
        scores = score_fn(ref(images.detach().double()))
    finally:
        handle.remove()
    assert len(captured) == 1, "the reference expects the target layer to run once"
    a = captured[0]
    b, c = classes.shape
    alphas, cams = [], []
    for j in range(c):
        # One plain backward through the whole model per class column; the graph is kept
        # between columns only to save the repeated forward.
        a.grad = None
        loss = scores[torch.arange(b), classes[:, j]].sum()
        if counterfactual:
            loss = -loss
        loss.backward(retain_graph=j < c - 1)
        alpha = a.grad.mean(dim=(2, 3))  # (B, K): (1/Z) sum_ij dy^c/dA^k_ij
        if method == "cam":
            alpha = alpha * (a.shape[2] * a.shape[3])
        alphas.append(alpha)
        cams.append(torch.relu(torch.einsum("bk,bkhw->bhw", alpha, a.detach())))
    acts, scores_all = a.detach(), scores.detach()
    return {
        "acts": acts,
        "scores_all": scores_all,
        "scores": scores_all.gather(1, classes),
        "alpha": torch.stack(alphas, dim=1),
        "cams": torch.stack(cams, dim=1),
    }


def reference_heatmaps(cams: torch.Tensor, size: tuple[int, int], eps: float = EPS) -> torch.Tensor:
    """Bilinear upsampling (align_corners=False), then per-map min-max; near-constant maps -> 0."""
    up = F.interpolate(cams.double(), size=size, mode="bilinear", align_corners=False)
    out = torch.zeros_like(up)
    for bi in range(up.shape[0]):
        for ci in range(up.shape[1]):
            m = up[bi, ci]
            lo, hi = m.min(), m.max()
            if hi - lo > eps * hi.abs():
                out[bi, ci] = (m - lo) / (hi - lo)
    return out


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (absolute error when expected is all zeros)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """Relative-error check that says where the worst element is when it fails."""
    err = rel_err(actual, expected)
    if not err < tol:
        a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
        diff = (a - e).abs()
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{what}: relative error {err:.3e} >= {tol:.0e}; worst at index {idx}: "
            f"got {a[idx].item():.9g}, expected {e[idx].item():.9g}"
        )


class FlattenMLPNet(nn.Module):
    """A small CNN whose head flattens the map into an MLP: no global pooling, no closed form."""

    def __init__(self, num_classes: int = 10, size: tuple[int, int] = (32, 40)):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, stride=2),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, stride=2),
            nn.ReLU(),
        )
        h, w = size[0] // 4, size[1] // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * h * w, 32),
            nn.Tanh(),
            nn.Dropout(0.5),
            nn.Linear(32, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class GapLinearNet(nn.Module):
    """conv stack -> global average pool -> linear: the head of the CAM paper."""

    def __init__(self, num_classes: int = 7, width: int = 12):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, stride=2),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class UntraceableNet(nn.Module):
    """Python control flow on a tensor value: torch.fx cannot trace it, the engine uses hooks."""

    def __init__(self, num_classes: int = 6):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 12, 3, padding=1, stride=2),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.features(x)
        if x.sum() > 0:  # data-dependent branch
            a = a * 1.5
        return self.head(a.mean(dim=(2, 3)))


def seeded(factory, seed: int = 0, **kwargs) -> nn.Module:
    """Build a model with a fixed seed, without disturbing the global RNG stream."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return factory(**kwargs).eval()


def random_images(
    b: int, size: int | tuple[int, int], seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, w, generator=gen).to(dtype)


def model_state(model: nn.Module) -> dict[str, object]:
    """Everything of a model the engine must leave alone, in a comparable form."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "grads": {k: p.grad for k, p in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "hooks": {
            k: (
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(m._backward_hooks),
                len(getattr(m, "_backward_pre_hooks", {})),
            )
            for k, m in model.named_modules()
        },
        "modules": [k for k, _ in model.named_modules()],
    }


def assert_state_equal(before: dict[str, object], after: dict[str, object]) -> None:
    assert after["modules"] == before["modules"], "the module tree changed"
    for k, v in before["tensors"].items():
        w = after["tensors"][k]
        assert w.dtype == v.dtype and w.shape == v.shape, f"{k}: dtype/shape changed"
        # Bit-identical, NaN-safe: compare the raw bytes.
        assert torch.equal(w.view(-1).view(torch.uint8), v.view(-1).view(torch.uint8)), f"{k} changed"
    assert after["requires_grad"] == before["requires_grad"], "requires_grad flags changed"
    changed = [k for k, g in after["grads"].items() if g is not before["grads"][k]]
    assert not changed, f".grad changed for {changed[:5]}"
    assert after["training"] == before["training"], "train/eval flags changed"
    assert after["hooks"] == before["hooks"], "hooks were left on (or removed from) the model"
