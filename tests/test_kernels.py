"""The fused CAM kernel against its torch reference, and the reference against plain torch.

On a machine without CUDA the Triton kernel runs on CPU tensors under TRITON_INTERPRET=1
(set in conftest.py); with CUDA the same tests run the compiled kernel on the GPU.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gradcam_batch.kernels import DEFAULT_EPS, fused_cam, fused_cam_reference

fc = pytest.importorskip("gradcam_batch.kernels.cam_kernel")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Heatmap tolerances after normalization, per output dtype (1 LSB for uint8, 1 ulp near 1 for halves).
HEAT_ATOL = {torch.uint8: 1, torch.float32: 1e-5, torch.float16: 2**-11, torch.bfloat16: 2**-8}


# -- helpers ----------------------------------------------------------------------------------------
def make_inputs(b, c, k, h, w, *, dtype=torch.float32, channels_last=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    acts = torch.randn(b, k, h, w, generator=gen)
    weights = torch.randn(b, c, k, generator=gen)
    if h >= 3 and w >= 3 and c > 0:
        # Random maps often peak on a border plateau (a tie); give class 0 an interior peak so
        # that every case compares at least one peak.
        acts[:, 0, h // 2, w // 2] += 8.0 * k**0.5
        weights[:, 0, 0] = weights[:, 0, 0].abs() + 1.0
    acts = acts.to(dtype)
    if channels_last:
        acts = acts.contiguous(memory_format=torch.channels_last)
    return acts.to(DEVICE), weights.to(DEVICE)


def assert_close(actual, expected, atol, what):
    """Like allclose, but says where and by how much the values differ."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double().cpu(), expected.double().cpu()
    assert not torch.isnan(a).any(), f"{what}: NaN at {torch.nonzero(torch.isnan(a))[:5].tolist()}"
    err = (a - e).abs()
    bad = err > atol
    if bad.any():
        idx = torch.nonzero(bad)[:5]
        rows = [f"  at {i.tolist()}: got {a[tuple(i)].item():.8g}, want {e[tuple(i)].item():.8g}" for i in idx]
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} elements differ by more than {atol:g} "
            f"(worst {err.max().item():.3g}, {err.max().item() / atol:.3g}x the tolerance)\n" + "\n".join(rows)
        )


def unique_peak_mask(cams, out_size, margin=1e-4):
    """(B, C) bool: maps whose upsampled maximum beats every other pixel by margin * range (float64)."""
    up = F.interpolate(cams.double().cpu(), size=out_size, mode="bilinear", align_corners=False).flatten(2)
    top = up.topk(2, dim=2).values
    rng = up.amax(2) - up.amin(2)
    return (top[..., 0] - top[..., 1]) > margin * rng.clamp_min(1e-30)


def check_against_reference(acts, weights, out_size, *, out_dtype=torch.uint8, relu=True, normalize=True):
    """Runs both backends and compares every output; returns the number of peaks compared."""
    got = fused_cam(acts, weights, out_size, relu=relu, normalize=normalize, out_dtype=out_dtype, backend="triton")
    want = fused_cam_reference(acts, weights, out_size, relu=relu, normalize=normalize, out_dtype=out_dtype)
    # cams and cam_max: fp32 sums in another order, so relative to the size of the terms
    scale = torch.einsum("bck,bkhw->bchw", weights.abs().float(), acts.abs().float()).amax().item()
    assert_close(got.cams, want.cams, 1e-5 * max(scale, 1.0), "cams")
    assert_close(got.cam_max, want.cam_max, 1e-5 * max(scale, 1.0), "cam_max")
    assert got.heatmaps.dtype == out_dtype
    assert_close(got.heatmaps, want.heatmaps, HEAT_ATOL[out_dtype], f"heatmaps ({out_dtype})")
    assert got.peaks.dtype == torch.int64 and got.peaks.shape == want.peaks.shape
    size = out_size if out_size is not None else tuple(acts.shape[-2:])
    unique = unique_peak_mask(want.cams, size)
    assert torch.equal(got.peaks.cpu()[unique], want.peaks.cpu()[unique]), "peaks differ where the max is unique"
    # Peaks elsewhere must still point at a maximum (within rounding) of the upsampled map.
    up = F.interpolate(want.cams.double().cpu(), size=size, mode="bilinear", align_corners=False)
    b_idx, c_idx = torch.meshgrid(torch.arange(up.shape[0]), torch.arange(up.shape[1]), indexing="ij")
    at_peak = up[b_idx, c_idx, got.peaks.cpu()[..., 0], got.peaks.cpu()[..., 1]]
    top = up.flatten(2).amax(2)
    assert (top - at_peak <= 1e-5 * top.abs().clamp_min(1e-6)).all(), "a peak is not at the map's maximum"
    return int(unique.sum())


# -- the Triton kernel against the reference --------------------------------------------------------
SHAPES = [
    # (B, C, K, h, w, H, W)
    pytest.param(1, 2, 5, 7, 7, 224, 224, id="7x7->224x224"),
    pytest.param(1, 1, 3, 14, 14, 513, 377, id="14x14->513x377,C=1"),
    pytest.param(2, 2, 4, 1, 1, 32, 32, id="1x1->32x32"),
    pytest.param(2, 3, 6, 3, 5, 17, 9, id="3x5->17x9"),
    pytest.param(1, 2, 70, 5, 3, 41, 23, id="5x3->41x23,K=70"),
    pytest.param(1, 37, 3, 4, 4, 8, 8, id="C=37"),
    pytest.param(1, 2, 4, 1, 6, 5, 17, id="1x6->5x17"),
    pytest.param(1, 2, 4, 9, 11, 5, 4, id="9x11->5x4,downsample"),
    pytest.param(1, 2, 33, 6, 5, 6, 5, id="same-size"),
]


@pytest.mark.parametrize(("b", "c", "k", "h", "w", "out_h", "out_w"), SHAPES)
def test_triton_matches_reference_uint8(b, c, k, h, w, out_h, out_w):
    acts, weights = make_inputs(b, c, k, h, w)
    compared = check_against_reference(acts, weights, (out_h, out_w))
    if h >= 3 and w >= 3:
        assert compared > 0, "no map with a unique peak: the peak check compared nothing"


@pytest.mark.parametrize(
    ("b", "c", "k", "h", "w", "out_h", "out_w"),
    [
        pytest.param(1, 2, 5, 7, 7, 224, 224, id="7x7->224x224"),
        pytest.param(2, 3, 6, 3, 5, 17, 9, id="3x5->17x9"),
        pytest.param(2, 2, 4, 1, 1, 32, 32, id="1x1->32x32"),
    ],
)
def test_triton_matches_reference_float32(b, c, k, h, w, out_h, out_w):
    acts, weights = make_inputs(b, c, k, h, w, seed=1)
    check_against_reference(acts, weights, (out_h, out_w), out_dtype=torch.float32)


@pytest.mark.slow
def test_triton_matches_reference_float32_large():
    acts, weights = make_inputs(1, 2, 3, 14, 14, seed=2)
    check_against_reference(acts, weights, (513, 377), out_dtype=torch.float32)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_half_heatmaps(out_dtype):
    acts, weights = make_inputs(1, 3, 5, 3, 5, seed=3)
    check_against_reference(acts, weights, (17, 9), out_dtype=out_dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_half_activations_and_channels_last(dtype, channels_last):
    acts, weights = make_inputs(2, 2, 40, 7, 7, dtype=dtype, channels_last=channels_last, seed=4)
    assert acts.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert check_against_reference(acts, weights, (45, 61)) > 0


def test_channels_last_fp32_and_strided_views():
    acts, weights = make_inputs(2, 2, 9, 6, 6, channels_last=True, seed=5)
    check_against_reference(acts, weights, (40, 30))
    base, _ = make_inputs(2, 1, 18, 5, 5, seed=6)
    # Every other channel: a strided NCHW view, used in place.
    check_against_reference(base[:, ::2], weights, (40, 30))
    # Starts 25 floats (100 bytes) into the allocation: misaligned, so the launcher copies it.
    assert base[:, 1:10].data_ptr() % 16 != 0
    check_against_reference(base[:, 1:10], weights, (40, 30))
    # Spatial axes swapped: (y, x) no longer flatten to one stride, so it is made contiguous.
    check_against_reference(base[:, :9].transpose(2, 3), weights, (40, 30))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_misaligned_views_are_read_with_the_copys_strides(channels_last):
    """A misaligned view is copied before its strides are read: a stale stride would mix channels."""
    base, _ = make_inputs(2, 1, 19, 5, 7, channels_last=channels_last, seed=14)
    _, weights = make_inputs(2, 3, 9, 5, 7, seed=15)
    # Channels 1..9: starts 4 bytes (channels-last) or 140 bytes (NCHW) into the allocation.
    shifted = base[:, 1:10]
    # Every other channel from channel 1: misaligned and strided in both layouts.
    strided = base[:, 1::2]
    for view in (shifted, strided):
        assert view.data_ptr() % 16 != 0
        # The channels-last slice keeps adjacent channels (the kernel's NHWC path), the others do not.
        assert (view.stride(1) == 1) == (channels_last and view is shifted)
        assert check_against_reference(view, weights, (23, 31)) > 0


def test_launch_runs_under_the_tensors_cuda_device():
    """The launcher makes the tensors' device current, so a tensor on cuda:1 is not launched on cuda:0."""
    guard = fc._device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(fc._device_guard(torch.device("cpu")), torch.cuda.device)


@pytest.mark.gpu
def test_second_gpu_matches_reference():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    acts, weights = make_inputs(2, 3, 9, 7, 7, seed=16)
    with torch.cuda.device(0):
        assert check_against_reference(acts.to("cuda:1"), weights.to("cuda:1"), (45, 61)) > 0


@pytest.mark.parametrize(("relu", "normalize"), [(False, True), (True, False), (False, False)])
def test_relu_and_normalize_switches(relu, normalize):
    acts, weights = make_inputs(1, 3, 5, 4, 6, seed=7)
    out_dtype = torch.float32 if not normalize else torch.uint8
    check_against_reference(acts, weights, (19, 23), relu=relu, normalize=normalize, out_dtype=out_dtype)


def test_no_heatmap_requested():
    acts, weights = make_inputs(2, 3, 5, 4, 6, seed=8)
    got = fused_cam(acts, weights, None, backend="triton")
    want = fused_cam_reference(acts, weights, None)
    assert got.heatmaps.shape == (2, 3, 0, 0)
    assert_close(got.cams, want.cams, 1e-5, "cams")
    assert torch.equal(got.peaks, want.peaks)


def test_empty_class_dimension():
    acts, weights = make_inputs(2, 0, 5, 4, 6)
    got = fused_cam(acts, weights, (8, 8), backend="triton")
    assert got.cams.shape == (2, 0, 4, 6) and got.heatmaps.shape == (2, 0, 8, 8) and got.peaks.shape == (2, 0, 2)


# -- poisoned outputs: an element the kernel never writes keeps its sentinel ----------------------
@pytest.mark.parametrize("out_dtype", [torch.uint8, torch.float32])
def test_poisoned_outputs_are_all_overwritten(monkeypatch, out_dtype):
    acts, weights = make_inputs(2, 3, 5, 3, 5, seed=9)
    want = fused_cam_reference(acts, weights, (17, 9), out_dtype=out_dtype)
    results = []
    # Two different sentinels: an unwritten uint8 element cannot match the reference in both runs.
    for int_fill, float_fill in ((0, float("nan")), (255, float("inf"))):

        def poisoned(shape, dtype, device, _i=int_fill, _f=float_fill):
            fill = _f if dtype.is_floating_point else (_i if dtype == torch.uint8 else -(_i + 1))
            return torch.full(shape, fill, dtype=dtype, device=device)

        monkeypatch.setattr(fc, "_alloc", poisoned)
        got = fused_cam(acts, weights, (17, 9), out_dtype=out_dtype, backend="triton")
        for name in ("cams", "cam_max", "heatmaps"):
            assert torch.isfinite(getattr(got, name).float()).all(), f"{name} has unwritten elements"
        assert (got.peaks >= 0).all(), "peaks has unwritten elements"
        assert_close(got.heatmaps, want.heatmaps, HEAT_ATOL[out_dtype], "heatmaps")
        results.append(got)
    assert torch.equal(results[0].heatmaps, results[1].heatmaps)
    assert torch.equal(results[0].cams, results[1].cams)
    assert torch.equal(results[0].peaks, results[1].peaks)


# -- the normalization trap -------------------------------------------------------------------------
def _spike_inputs(h, w, where, value):
    acts = torch.full((1, 1, h, w), 0.1)
    acts[0, 0, where[0], where[1]] = value
    return acts.to(DEVICE), torch.ones(1, 1, 1, device=DEVICE)


@pytest.mark.parametrize(
    ("h", "w", "out_size"), [(7, 7, (224, 224)), (7, 7, (10, 10)), (5, 6, (13, 17))], ids=["x32", "x10/7", "odd"]
)
def test_normalization_uses_upsampled_extremes(h, w, out_size):
    """An interior spike is never sampled exactly, so the upsampled max is below the low-res max.

    Normalizing with the low-res extremes would leave the heatmap's top below 255 (and below
    1.0); the reference anchors where the extremes must come from, and the kernel must agree.
    """
    acts, weights = _spike_inputs(h, w, (h // 2, w // 2), 1.0)
    want = fused_cam_reference(acts, weights, out_size, out_dtype=torch.uint8)
    got = fused_cam(acts, weights, out_size, out_dtype=torch.uint8, backend="triton")
    up = F.interpolate(want.cams.double().cpu(), size=out_size, mode="bilinear", align_corners=False)
    lo_res = want.cams.double().cpu()
    wrong = torch.floor(255 * (up - lo_res.min()) / (lo_res.max() - lo_res.min()) + 0.5)
    # The trap is real: low-res extremes move the brightest pixels by more than the 1 LSB tolerance.
    assert (wrong - want.heatmaps.double().cpu()).abs().max() > 1
    assert int(got.heatmaps.max()) == 255 and int(got.heatmaps.min()) == 0
    assert_close(got.heatmaps, want.heatmaps, 1, "heatmaps")
    got32 = fused_cam(acts, weights, out_size, out_dtype=torch.float32, backend="triton")
    assert got32.heatmaps.max().item() == pytest.approx(1.0, abs=1e-6)


def test_normalization_uses_upsampled_minimum_without_relu():
    acts, weights = _spike_inputs(7, 7, (3, 3), -1.0)
    want = fused_cam_reference(acts, weights, (224, 224), relu=False, out_dtype=torch.float32)
    got = fused_cam(acts, weights, (224, 224), relu=False, out_dtype=torch.float32, backend="triton")
    assert got.heatmaps.min().item() == pytest.approx(0.0, abs=1e-6)
    assert_close(got.heatmaps, want.heatmaps, 1e-5, "heatmaps")


# -- constant maps become 0, never NaN --------------------------------------------------------------
@pytest.mark.parametrize("out_dtype", [torch.uint8, torch.float32])
def test_constant_maps_become_zero(out_dtype):
    gen = torch.Generator().manual_seed(10)
    one_pixel = torch.rand(2, 3, 1, 1, generator=gen).to(DEVICE)  # 1x1 maps upsample to a constant
    all_negative = -torch.rand(1, 3, 4, 4, generator=gen).to(DEVICE)  # ReLU leaves all zeros
    nearly_flat = (1.0 + 1e-7 * torch.rand(1, 3, 4, 4, generator=gen)).to(DEVICE)  # range <= eps * max
    for acts in (one_pixel, all_negative, nearly_flat):
        weights = torch.zeros(acts.shape[0], 2, acts.shape[1], device=DEVICE)
        weights[..., 0] = 1.0
        got = fused_cam(acts, weights, (16, 12), out_dtype=out_dtype, backend="triton")
        assert not torch.isnan(got.heatmaps.float()).any()
        assert (got.heatmaps == 0).all()
        assert torch.equal(got.heatmaps, fused_cam_reference(acts, weights, (16, 12), out_dtype=out_dtype).heatmaps)


def test_eps_is_honoured():
    # A range of 1e-4 relative: a normal map with the default eps, constant with eps = 1e-3.
    acts = torch.ones(1, 1, 3, 3, device=DEVICE)
    acts[0, 0, 1, 1] = 1.0001
    weights = torch.ones(1, 1, 1, device=DEVICE)
    assert fused_cam(acts, weights, (9, 9), backend="triton", eps=DEFAULT_EPS).heatmaps.max() == 255
    assert fused_cam(acts, weights, (9, 9), backend="triton", eps=1e-3).heatmaps.max() == 0


# -- the reference against plain torch --------------------------------------------------------------
@pytest.mark.parametrize(("h", "w", "out_size"), [(7, 7, (224, 224)), (3, 5, (17, 9)), (14, 14, (513, 377))])
def test_reference_matches_plain_interpolate_and_minmax(h, w, out_size):
    gen = torch.Generator().manual_seed(11)
    acts = torch.randn(3, 6, h, w, generator=gen, dtype=torch.float64)
    weights = torch.randn(3, 4, 6, generator=gen, dtype=torch.float64)
    cams = F.relu(torch.einsum("bck,bkhw->bchw", weights, acts))
    up = F.interpolate(cams, size=out_size, mode="bilinear", align_corners=False)
    lo = up.amin(dim=(2, 3), keepdim=True)
    hi = up.amax(dim=(2, 3), keepdim=True)
    expected = (up - lo) / (hi - lo)
    ref = fused_cam_reference(acts, weights, out_size, out_dtype=torch.float64)
    assert_close(ref.cams, cams, 1e-12, "reference cams")
    assert_close(ref.heatmaps, expected, 1e-12, "reference heatmaps")
    assert torch.equal(ref.cam_max, cams.amax(dim=(2, 3)))
    flat = up.flatten(2).argmax(2)
    assert torch.equal(ref.peaks, torch.stack([flat // out_size[1], flat % out_size[1]], dim=-1))
    ref8 = fused_cam_reference(acts, weights, out_size, out_dtype=torch.uint8)
    assert torch.equal(ref8.heatmaps, torch.round(expected * 255).to(torch.uint8))


def test_reference_in_float32_matches_float64_within_tolerance():
    gen = torch.Generator().manual_seed(12)
    acts = torch.randn(2, 8, 7, 7, generator=gen, dtype=torch.float64)
    weights = torch.randn(2, 3, 8, generator=gen, dtype=torch.float64)
    exact = fused_cam_reference(acts, weights, (224, 224), out_dtype=torch.float64)
    approx = fused_cam_reference(acts.float(), weights.float(), (224, 224), out_dtype=torch.float32)
    assert_close(approx.heatmaps, exact.heatmaps, 1e-5, "float32 reference vs float64")


# -- the dispatcher ---------------------------------------------------------------------------------
@pytest.fixture
def triton_calls(monkeypatch):
    """Counts calls of the Triton launcher through the dispatcher."""
    calls = []
    real = fc.fused_cam_triton

    def spy(*args, **kwargs):
        calls.append(args[0].device)
        return real(*args, **kwargs)

    monkeypatch.setattr(fc, "fused_cam_triton", spy)
    monkeypatch.delenv("GRADCAM_BATCH_KERNEL", raising=False)
    return calls


def test_dispatch_auto_uses_triton_on_cuda_only(triton_calls):
    acts, weights = make_inputs(1, 2, 3, 3, 3)
    fused_cam(acts, weights, (6, 6))
    assert len(triton_calls) == (1 if DEVICE.type == "cuda" else 0)
    fused_cam(acts, weights, (6, 6), backend="torch")
    assert len(triton_calls) == (1 if DEVICE.type == "cuda" else 0)
    fused_cam(acts, weights, (6, 6), backend="triton")
    assert len(triton_calls) == (2 if DEVICE.type == "cuda" else 1)


@pytest.mark.parametrize(("env", "expected"), [("triton", 1), ("torch", 0), ("TORCH", 0)])
def test_dispatch_environment_variable(triton_calls, monkeypatch, env, expected):
    monkeypatch.setenv("GRADCAM_BATCH_KERNEL", env)
    acts, weights = make_inputs(1, 2, 3, 3, 3)
    fused_cam(acts, weights, (6, 6))
    assert len(triton_calls) == expected
    # An explicit argument beats the environment.
    fused_cam(acts, weights, (6, 6), backend="torch")
    assert len(triton_calls) == expected


def test_dispatch_rejects_bad_backends(monkeypatch):
    acts, weights = make_inputs(1, 2, 3, 3, 3)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        fused_cam(acts, weights, (6, 6), backend="cuda")
    monkeypatch.setenv("GRADCAM_BATCH_KERNEL", "fast")
    with pytest.raises(ValueError, match="GRADCAM_BATCH_KERNEL"):
        fused_cam(acts, weights, (6, 6))


def test_forced_triton_never_falls_back(monkeypatch):
    acts, weights = make_inputs(1, 2, 3, 3, 3)
    with pytest.raises(ValueError, match="float64"):
        fused_cam(acts.double(), weights, (6, 6), backend="triton")
    # auto on a CPU float64 input is the reference, without complaint
    assert fused_cam(acts.double().cpu(), weights.cpu(), (6, 6)).heatmaps.shape == (1, 2, 6, 6)
    # Triton missing: a forced backend says so instead of quietly using torch.
    monkeypatch.setitem(sys.modules, "gradcam_batch.kernels.cam_kernel", None)
    with pytest.raises(RuntimeError, match="Triton cannot be imported"):
        fused_cam(acts, weights, (6, 6), backend="triton")
    monkeypatch.setenv("GRADCAM_BATCH_KERNEL", "triton")
    with pytest.raises(RuntimeError, match="Triton cannot be imported"):
        fused_cam(acts, weights, (6, 6))


def test_launcher_refuses_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.setattr(fc, "interpreter_active", lambda: False)
    acts, weights = make_inputs(1, 2, 3, 3, 3)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fc.fused_cam_triton(acts.cpu(), weights.cpu(), (6, 6))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_inputs_raise_value_errors(backend):
    acts, weights = make_inputs(1, 2, 3, 3, 3)
    with pytest.raises(ValueError, match="weights must be"):
        fused_cam(acts, weights[:, :, :2], (6, 6), backend=backend)
    with pytest.raises(ValueError, match="acts must be"):
        fused_cam(acts[0], weights, (6, 6), backend=backend)
    with pytest.raises(ValueError, match="out_size"):
        fused_cam(acts, weights, (0, 6), backend=backend)
    with pytest.raises(ValueError, match="heatmap dtype"):
        fused_cam(acts, weights, (6, 6), out_dtype=torch.int32, backend=backend)


# -- wired into the engine --------------------------------------------------------------------------
def test_explain_runs_the_triton_kernel_end_to_end(triton_calls, monkeypatch):
    from gradcam_batch import explain

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, stride=4, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    ).to(DEVICE)
    images = torch.randn(2, 3, 28, 20, device=DEVICE)
    monkeypatch.setenv("GRADCAM_BATCH_KERNEL", "torch")
    want = explain(model, images, top_k=2, out_dtype=torch.uint8)
    assert len(triton_calls) == 0
    monkeypatch.setenv("GRADCAM_BATCH_KERNEL", "triton")
    got = explain(model, images, top_k=2, out_dtype=torch.uint8)
    assert len(triton_calls) == 1
    assert got.heatmaps.dtype == torch.uint8 and got.heatmaps.shape == (2, 2, 28, 20)
    assert torch.equal(got.classes, want.classes)
    assert_close(got.cams, want.cams, 1e-5 * max(want.cams.abs().max().item(), 1.0), "engine cams")
    assert_close(got.heatmaps, want.heatmaps, 1, "engine heatmaps")


# -- CUDA only: the production shape, bf16 activations --------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_production_shape(channels_last):
    acts, weights = make_inputs(16, 5, 2048, 7, 7, dtype=torch.bfloat16, channels_last=channels_last, seed=13)
    weights = weights / 2048**0.5
    assert check_against_reference(acts, weights, (224, 224)) > 0


# -- the launch grid: more maps than one grid dimension holds ---------------------------------------
def _poison(shape, dtype, device):
    fill = float("nan") if dtype.is_floating_point else (0 if dtype == torch.uint8 else -1)
    return torch.full(shape, fill, dtype=dtype, device=device)


@pytest.mark.parametrize(("b", "c"), [(7, 1), (3, 4), (1, 13)])
def test_launches_are_split_at_the_grid_limit(monkeypatch, b, c):
    """Map methods, metrics and guided Grad-CAM pass B*C maps as b = B*C images of one class each: more than
    a grid dimension holds (65,535 on CUDA's y and z) must still work. The limit is injected small here."""
    acts, weights = make_inputs(b, c, 5, 3, 4, seed=21)
    want = fused_cam_reference(acts, weights, (7, 6), out_dtype=torch.uint8)
    launches: list[tuple] = []
    kernel = fc._cam_fwd_kernel

    class Recorder:
        def __getitem__(self, grid):
            launches.append(tuple(grid))
            assert all(g <= 5 for g in grid), f"grid {grid} exceeds the injected limit"
            return kernel[grid]

    monkeypatch.setattr(fc, "MAX_GRID", 5)
    monkeypatch.setattr(fc, "_cam_fwd_kernel", Recorder())
    monkeypatch.setattr(fc, "_alloc", _poison)
    got = fused_cam(acts, weights, (7, 6), out_dtype=torch.uint8, backend="triton")
    assert sum(g[0] for g in launches) == b * c and len(launches) == -(-(b * c) // 5)
    assert_close(got.cams, want.cams, 1e-5, "cams")
    assert_close(got.heatmaps, want.heatmaps, 1, "heatmaps")
    assert_close(got.cam_max, want.cam_max, 1e-5, "cam_max")
    assert torch.equal(got.peaks.cpu(), want.peaks.cpu())


@pytest.mark.gpu
def test_gpu_more_maps_than_grid_y():
    """The real limit: 70,000 one-class maps (layercam at batch 512 with top-128 passes 65,536)."""
    acts, weights = make_inputs(70_000, 1, 4, 2, 3, seed=22)
    want = fused_cam_reference(acts, weights, (4, 5), out_dtype=torch.uint8)
    got = fused_cam(acts, weights, (4, 5), out_dtype=torch.uint8, backend="triton")
    assert_close(got.heatmaps, want.heatmaps, 1, "heatmaps")
    assert_close(got.cams, want.cams, 1e-5, "cams")
