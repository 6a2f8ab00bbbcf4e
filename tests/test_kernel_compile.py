"""The fused CAM kernel compiles for real GPUs (sm_90, sm_80) with no GPU present.

The Triton interpreter accepts programs the GPU compiler rejects, so CPU-only CI compiles the
kernel ahead of time to PTX and a cubin. The compiler runs in a child process (Triton in this
process was imported in interpreter mode). The default run compiles a covering set (every dtype,
block size and layout at least once, on both architectures); the slow run compiles every variant.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
aot = pytest.importorskip("gradcam_batch.kernels.aot")
fc = pytest.importorskip("gradcam_batch.kernels.cam_kernel")

from gradcam_batch.kernels import fused_cam  # noqa: E402  (after the skips above)

# Triton 3.6, what the GPU machines run, spills on sm_90 where Triton 3.8 does not: 24 bytes in the
# 16 x 64 NCHW variants and 8 in the 8 x 256 NHWC uint8 ones. The kernel spilled the same before its
# interpreter fix. Capping registers (maxnreg=128) removes the spills but raises the count to 104-122
# (lower occupancy), so that choice waits for a measurement on the GPU (benchmarks/RESULTS.md).
TRITON_3_6_SM90_SPILL_LIMIT = 24 if triton.__version__.startswith("3.6.") else 0


def _rows_by_key(rows):
    return {(row["variant"], row["arch"]): row for row in rows}


@pytest.fixture(scope="module")
def covering_rows():
    return _rows_by_key(aot.compile_in_subprocess(covering=True))


@pytest.fixture(scope="module")
def all_rows():
    return _rows_by_key(aot.compile_in_subprocess(covering=False))


def _check_row(rows, variant, arch):
    row = rows.get((variant.name, arch))
    assert row is not None, f"{variant.name} on sm_{arch} was not compiled"
    assert row["error"] is None, f"{variant.name} on sm_{arch} does not compile: {row['error']}"
    assert row["ptx_target"] == (f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"), row
    assert row["cubin_is_elf"], f"{variant.name} on sm_{arch}: the cubin is not an ELF image"
    assert 0 < row["registers"] <= 255, row
    if arch == 90 and 0 < row["spill_bytes"] <= TRITON_3_6_SM90_SPILL_LIMIT:
        pytest.xfail(f"Triton 3.6 spills {row['spill_bytes']} bytes in {variant.name} on sm_90 (known)")
    assert row["spill_bytes"] == 0, f"{variant.name} on sm_{arch} spills registers: {row}"


@pytest.mark.parametrize("arch", aot.ARCHS, ids=[f"sm_{a}" for a in aot.ARCHS])
@pytest.mark.parametrize("variant", aot.covering_variants(), ids=lambda v: v.name.replace(" ", "-"))
def test_covering_variants_compile(covering_rows, variant, arch):
    _check_row(covering_rows, variant, arch)


@pytest.mark.slow
@pytest.mark.parametrize("arch", aot.ARCHS, ids=[f"sm_{a}" for a in aot.ARCHS])
@pytest.mark.parametrize("variant", aot.variants(), ids=lambda v: v.name.replace(" ", "-"))
def test_every_variant_compiles(all_rows, variant, arch):
    _check_row(all_rows, variant, arch)


def test_compiling_in_an_interpreter_process_says_what_to_do():
    if not fc.interpreter_active():
        pytest.skip("Triton runs compiled here")
    with pytest.raises(RuntimeError, match="compile_in_subprocess"):
        aot.compile_variant(aot.covering_variants()[0], 90)


def test_covering_set_covers_every_option():
    chosen = aot.covering_variants()
    assert {v.act_dtype for v in chosen} == set(fc.ACT_DTYPES)
    assert {v.out_dtype for v in chosen} == set(fc.OUT_DTYPES)
    assert {v.block_x for v in chosen} == {b["BLOCK_X"] for b in fc.BLOCK_CHOICES}
    assert {v.channels_last for v in chosen} == {False, True}
    assert set(chosen) <= set(aot.variants())


def test_block_choices_are_all_the_heuristic_returns():
    returned = {tuple(sorted(fc.block_sizes(width).items())) for width in range(1, 4097)}
    assert returned == {tuple(sorted(b.items())) for b in fc.BLOCK_CHOICES}


class _LaunchRecorder:
    """Stands in for the jitted kernel, records each launch, then runs the real kernel."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((args, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize(
    ("act_dtype", "out_dtype", "channels_last", "out_size"),
    [
        (torch.float32, torch.uint8, False, (5, 7)),
        (torch.bfloat16, torch.float32, True, (9, 70)),
        (torch.float16, torch.float16, False, None),
        (torch.float32, torch.bfloat16, True, (3, 3)),
    ],
)
def test_launches_are_among_the_compiled_variants(monkeypatch, act_dtype, out_dtype, channels_last, out_size):
    """What the launcher really launches (dtypes, constants, alignment) is a variant that aot.py compiles."""
    recorder = _LaunchRecorder(fc._cam_fwd_kernel)
    monkeypatch.setattr(fc, "_cam_fwd_kernel", recorder)
    acts = torch.randn(2, 4, 3, 3).to(act_dtype)
    if channels_last:
        acts = acts.contiguous(memory_format=torch.channels_last)
    weights = torch.randn(2, 2, 4)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fused_cam(acts.to(device), weights.to(device), out_size, out_dtype=out_dtype, backend="triton")
    assert len(recorder.launches) == 1
    args, kwargs = recorder.launches[0]
    bound = dict(zip(recorder.kernel.arg_names, args, strict=False))
    variant = aot.Variant(bound["A"].dtype, bound["HEAT"].dtype, kwargs["BLOCK_X"], kwargs["CHANNELS_LAST"])
    assert variant in aot.variants()
    assert variant.channels_last == channels_last
    expected = variant.constexprs()
    assert {k: kwargs[k] for k in expected} == expected
    for name in ("A", "Wt", "CAM", "HEAT", "CMAX", "PEAK"):
        assert bound[name].data_ptr() % 16 == 0, f"{name} is not 16-byte aligned"
    assert bound["Wt"].dtype == torch.float32 and bound["PEAK"].dtype == torch.int64
