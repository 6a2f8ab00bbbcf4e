"""Fused CAM kernel vs the torch reference vs the naive unfused chain, on CUDA.

    python benchmarks/bench_kernel.py [--batch 256] [--classes 1 5] [--channels 2048]

Shapes default to the issue's: B=256, C in {1, 5}, K=2048, 7x7 -> 224x224, bf16 activations,
uint8 heatmaps. For each implementation it prints the median time, the achieved bandwidth over
the minimum traffic, and that bandwidth as a fraction of a device-to-device copy measured in
the same run.

Minimum traffic (bytes): read the activations and weights once, write the cams and heatmaps once:
    B*K*h*w*2 + B*C*K*4 + B*C*h*w*4 + B*C*H*W*1
The copy moves half that many bytes, so that it too reads and writes that total; its bandwidth
is (bytes read + bytes written) / time, counted like the kernels'.

Without a CUDA device the script says so and exits 0. ``make bench`` (pytest-benchmark) also
collects the two ``test_bench_*`` functions, which skip without CUDA.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys

import torch
import torch.nn.functional as F


def unfused_chain(acts: torch.Tensor, weights: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """einsum -> relu -> interpolate -> amin/amax -> normalize -> uint8, one torch op at a time."""
    cams = torch.einsum("bck,bkhw->bchw", weights, acts.float())
    cams = torch.relu(cams)
    up = F.interpolate(cams, size=out_size, mode="bilinear", align_corners=False)
    lo = up.amin(dim=(2, 3), keepdim=True)
    hi = up.amax(dim=(2, 3), keepdim=True)
    heat = (up - lo) / (hi - lo).clamp_min(1e-12)
    return (heat * 255 + 0.5).floor().clamp(0, 255).to(torch.uint8)


def time_ms(fn, reps: int, warmup: int = 5) -> float:
    """Median of CUDA-event timings, one event pair per call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def min_bytes(b: int, c: int, k: int, h: int, w: int, out_h: int, out_w: int, act_bytes: int) -> int:
    return b * k * h * w * act_bytes + b * c * k * 4 + b * c * h * w * 4 + b * c * out_h * out_w


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--classes", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--channels", type=int, default=2048)
    parser.add_argument("--feature", type=int, default=7, help="feature map side h = w")
    parser.add_argument("--size", type=int, default=224, help="heatmap side H = W")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--channels-last", action="store_true", help="NHWC activations")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_kernel: needs a CUDA GPU; none found, nothing measured.")
        return 0

    import triton

    from gradcam_batch.kernels import fused_cam, fused_cam_reference

    dev = torch.device("cuda")
    b, k, h, out = args.batch, args.channels, args.feature, args.size
    print(
        f"# {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, triton {triton.__version__}, "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"
    )
    given = sys.argv[1:] if argv is None else argv
    print(f"# command: python benchmarks/bench_kernel.py {' '.join(given)}")
    layout = "NHWC" if args.channels_last else "NCHW"
    print(f"# B={b}, K={k}, {h}x{h} -> {out}x{out}, bf16 {layout} activations, uint8 heatmaps")
    print()
    print("| C | implementation | time (ms) | GB/s (min. bytes) | vs copy | speed-up vs unfused |")
    print("|---:|---|---:|---:|---:|---:|")
    gen = torch.Generator(device=dev).manual_seed(0)
    for c in args.classes:
        acts = torch.randn(b, k, h, h, device=dev, generator=gen).to(torch.bfloat16)
        if args.channels_last:
            acts = acts.contiguous(memory_format=torch.channels_last)
        weights = torch.randn(b, c, k, device=dev, generator=gen) / k**0.5
        size = (out, out)

        fused = fused_cam(acts, weights, size, backend="triton")
        ref = fused_cam_reference(acts, weights, size)
        worst = (fused.heatmaps.int() - ref.heatmaps.int()).abs().max().item()
        if worst > 1:
            print(f"fused kernel differs from the reference by {worst} LSB at C={c}", file=sys.stderr)
            return 1

        nbytes = min_bytes(b, c, k, h, h, out, out, acts.element_size())
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        t_copy = time_ms(lambda src=src, dst=dst: dst.copy_(src), args.reps)
        copy_gbs = 2 * (nbytes // 2) / t_copy / 1e6
        runs = {
            "fused Triton kernel": lambda a=acts, w=weights, s=size: fused_cam(a, w, s, backend="triton"),
            "torch reference": lambda a=acts, w=weights, s=size: fused_cam_reference(a, w, s),
            "unfused chain": lambda a=acts, w=weights, s=size: unfused_chain(a, w, s),
        }
        times = {name: time_ms(fn, args.reps) for name, fn in runs.items()}
        for name, t in times.items():
            gbs = nbytes / t / 1e6
            print(f"| {c} | {name} | {t:.3f} | {gbs:.0f} | {gbs / copy_gbs:.0%} | {times['unfused chain'] / t:.2f}x |")
        print(f"| {c} | device-to-device copy ({nbytes // 2 / 1e6:.0f} MB) | {t_copy:.3f} | {copy_gbs:.0f} | 100% | |")
        del acts, weights, fused, ref, src, dst
        torch.cuda.empty_cache()
    return 0


def _bench_inputs(c: int):
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    acts = torch.randn(256, 2048, 7, 7, device=dev, generator=gen).to(torch.bfloat16)
    weights = torch.randn(256, c, 2048, device=dev, generator=gen) / 2048**0.5
    return acts, weights


def _synced(fn):
    def run():
        fn()
        torch.cuda.synchronize()

    return run


def test_bench_fused_kernel(benchmark):
    """pytest-benchmark form (``make bench``): the fused kernel at the issue's C=5 shape."""
    import pytest

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from gradcam_batch.kernels import fused_cam

    acts, weights = _bench_inputs(5)
    benchmark(_synced(lambda: fused_cam(acts, weights, (224, 224), backend="triton")))


def test_bench_unfused_chain(benchmark):
    """pytest-benchmark form: the unfused torch chain at the same shape."""
    import pytest

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    acts, weights = _bench_inputs(5)
    benchmark(_synced(lambda: unfused_chain(acts, weights, (224, 224))))


if __name__ == "__main__":
    raise SystemExit(main())
