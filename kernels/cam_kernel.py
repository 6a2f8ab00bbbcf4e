"""The fused Grad-CAM post-processing kernel (Triton).

One program handles one (image b, class c) map, in three phases:

1. ``cam = ReLU(sum_k weights[b, c, k] * acts[b, k])`` at feature resolution, accumulated in
   fp32 over K in (BLOCK_K x BLOCK_HW) tiles, stored to the ``cams`` output (which the caller
   wants anyway) together with its max.
2. The min, max and first argmax of the *upsampled* map, without materializing it: bilinear
   interpolation is linear in the row weight inside each stretch of output rows that shares the
   same pair of source rows, so within a stretch every column is monotone in y and its extremes
   lie on the stretch's first or last row. Only those (at most 2h) rows are evaluated. (In
   float32 the lerp is monotone up to one rounding, so the extremes match a full scan to ~1 ulp;
   a peak can differ from torch's only where the maximum is tied within rounding.)
3. Every output tile is recomputed from the low-resolution cam (separably: rows of the cam are
   interpolated along x, then blended along y, the same order of operations as torch's kernels),
   normalized with the extremes of phase 2, quantized and written once.

Memory traffic per launch (the minimum any implementation needs):
    read  B*K*h*w * sizeof(acts) + B*C*K * 4              (activations and weights, once)
    write B*C*h*w * 4 + B*C*H*W * sizeof(out) + B*C*(4+16) (cams, heatmaps, cam_max, peaks)
The cams are re-read from L1/L2 by the program that wrote them (h*w*4 bytes, a few KB); the
full-resolution float32 map never exists in global memory. Programs are ordered with the class
fastest, so the C programs of one image run together and share its activations through L2.

The grid is one-dimensional, program ``first + i`` for map ``b * C + c``: the metrics, the map methods
and guided Grad-CAM pass B*C maps as that many one-class images, and CUDA's y and z grid dimensions
stop at 65,535. More maps than ``MAX_GRID`` (x's limit, 2**31 - 1) are launched in several parts.

The bilinear sampling follows ``F.interpolate(mode="bilinear", align_corners=False)``:
``scale = in / out`` in float32, ``src = max(scale * (dst + 0.5) - 0.5, 0)``,
``i0 = min(floor(src), in - 1)``, ``i1 = i0 + (i0 < in - 1)``, ``l1 = clamp(src - i0, 0, 1)``,
``l0 = 1 - l1``, and ``out = l0y * (l0x*c00 + l1x*c01) + l1y * (l0x*c10 + l1x*c11)``.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import triton
import triton.language as tl

from gradcam_batch.kernels.reference import DEFAULT_EPS, CamMaps

ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OUT_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)
NUM_WARPS = 4
# Programs per launch: CUDA's limit on gridDim.x. A launch with more maps is split (tests inject a small value).
MAX_GRID = 2**31 - 1
# Output rows counted per step while locating the row stretches of phase 2.
SEG_BLOCK = 256


@triton.jit
def _source_index(dst, scale, in_size):
    """torch's area_pixel_compute_source_index + guard_index_and_lambda, for scalars or vectors."""
    src = scale * (dst.to(tl.float32) + 0.5) - 0.5
    src = tl.maximum(src, 0.0)
    # src >= 0, so truncation is floor.
    i0 = tl.minimum(src.to(tl.int32), in_size - 1)
    l1 = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    l0 = 1.0 - l1
    i1 = tl.where(i0 < in_size - 1, i0 + 1, i0)
    return i0, i1, l0, l1


# Sizes and strides are never specialized on their values (a 1, or a multiple of 16), so the
# kernel compiles to exactly the variants that aot.py enumerates: dtypes x block sizes x layout.
@triton.jit(do_not_specialize=["first", "C", "K", "h", "w", "H", "W", "stride_ab", "stride_a"])
def _cam_fwd_kernel(
    A,  # activations, (B, K, h, w), fp32/fp16/bf16, NCHW or NHWC (pixels y * w + x share one stride)
    Wt,  # class weights alpha, (B, C, K), fp32, contiguous
    CAM,  # out: low-resolution cams, (B, C, h, w) fp32, contiguous
    HEAT,  # out: heatmaps, (B, C, H, W) uint8/fp16/bf16/fp32, contiguous (unused when write_heat == 0)
    CMAX,  # out: max of each low-resolution cam, (B, C) fp32
    PEAK,  # out: (y, x) of each upsampled map's first maximum, (B, C, 2) int64
    first,  # the map (b * C + c) of this launch's program 0
    C,  # classes per image
    K,  # channels
    h,  # feature-map height
    w,  # feature-map width
    H,  # heatmap height
    W,  # heatmap width
    stride_ab,  # acts stride between images
    stride_a,  # NCHW: acts stride between channels (pixels are adjacent); NHWC: between pixels
    scale_h,  # h / H in float32, as torch computes it
    scale_w,  # w / W in float32
    eps,  # constant-map threshold: range <= eps * |max| normalizes to 0
    relu,  # 1: clamp the cam at 0
    normalize,  # 1: min-max normalize with the upsampled extremes
    write_heat,  # 0: only cams, cam_max and peaks (no heatmap requested)
    BLOCK_K: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    BLOCK_Y: tl.constexpr,
    BLOCK_X: tl.constexpr,
    SEG: tl.constexpr,
    QUANTIZE: tl.constexpr,  # True: uint8 = floor(255 * x + 0.5) clamped to [0, 255]
    CHANNELS_LAST: tl.constexpr,  # True: channels are contiguous (stride 1) and pixels stride_a apart
):
    # int32 index arithmetic (the launcher keeps B*C below 2**31); 64-bit division spills registers.
    pid = tl.program_id(0) + first
    pid_b = pid // C
    bc = pid.to(tl.int64)
    a_base = A + pid_b.to(tl.int64) * stride_ab
    w_base = Wt + bc * K
    hw = h * w
    cam_base = CAM + bc * hw

    # -- phase 1: the low-resolution cam ------------------------------------------------------
    ks = tl.arange(0, BLOCK_K)
    cmax = tl.zeros([], dtype=tl.float32) - float("inf")
    # Loop bounds are written as expressions of the arguments, never through a variable: see
    # _scalar_args for why the interpreter needs that.
    for p0 in range(0, h * w, BLOCK_HW):
        p = p0 + tl.arange(0, BLOCK_HW)
        pmask = p < hw
        acc = tl.zeros([BLOCK_K, BLOCK_HW], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + ks
            kmask = k < K
            wk = tl.load(w_base + k, mask=kmask, other=0.0)
            # The unit stride is a constant, so the compiler sees which axis is contiguous.
            if CHANNELS_LAST:  # noqa: SIM108  (a compile-time branch on a constexpr, kept as a statement)
                a_off = k[:, None] + p[None, :] * stride_a
            else:
                a_off = k[:, None] * stride_a + p[None, :]
            a = tl.load(
                a_base + a_off,
                mask=kmask[:, None] & pmask[None, :],
                other=0.0,
            )
            acc += wk[:, None] * a.to(tl.float32)
        cam = tl.sum(acc, axis=0)
        cam = tl.where(relu != 0, tl.maximum(cam, 0.0), cam)
        tl.store(cam_base + p, cam, mask=pmask)
        cmax = tl.maximum(cmax, tl.max(tl.where(pmask, cam, float("-inf")), axis=0))
    tl.store(CMAX + bc, cmax)
    # Phases 2 and 3 read cam values written by other threads of this program.
    tl.debug_barrier()

    # -- phase 2: extremes and first argmax of the upsampled map --------------------------------
    # Output rows y with the same source row i0(y) = i form one stretch, and along a stretch each
    # column is a lerp between two cam rows with a weight that grows with y: its extremes lie on
    # the stretch's first or last row. A tile holds those two rows for BLOCK_Y // 2 stretches.
    lo = tl.zeros([], dtype=tl.float32) + float("inf")
    hi = tl.zeros([], dtype=tl.float32) - float("inf")
    n_cells = H * W
    best = tl.zeros([], dtype=tl.int32) + n_cells
    # Half-width tiles here: four gathered cam tiles are live at once (spills on sm_80 otherwise).
    PHASE2_X: tl.constexpr = BLOCK_X // 2
    r = tl.arange(0, BLOCK_Y)
    last = (r % 2) == 1
    for i_start in range(0, h, BLOCK_Y // 2):
        stretch = i_start + r // 2
        # first row = #rows with i0 < stretch; last row = #rows with i0 <= stretch, minus 1
        count = tl.zeros([BLOCK_Y], dtype=tl.int32)
        for y0 in range(0, H, SEG):
            ys = y0 + tl.arange(0, SEG)
            src_row, _i1, _l0, _l1 = _source_index(ys, scale_h, h)
            before = (src_row[None, :] < stretch[:, None]) | (last[:, None] & (src_row[None, :] == stretch[:, None]))
            count += tl.sum((before & (ys < H)[None, :]).to(tl.int32), axis=1)
        y_cand = tl.where(last, count - 1, count)
        i0, i1, l0, l1 = _source_index(y_cand, scale_h, h)
        # An empty stretch (downsampling) yields a row of another stretch: skip it.
        ymask = (stretch < h) & (y_cand >= 0) & (y_cand < H) & (i0 == stretch)
        for x0 in range(0, W, PHASE2_X):
            xs = x0 + tl.arange(0, PHASE2_X)
            xmask = xs < W
            j0, j1, m0, m1 = _source_index(xs, scale_w, w)
            mask = ymask[:, None] & xmask[None, :]
            row0 = cam_base + i0[:, None] * w
            row1 = cam_base + i1[:, None] * w
            c00 = tl.load(row0 + j0[None, :], mask=mask, other=0.0)
            c01 = tl.load(row0 + j1[None, :], mask=mask, other=0.0)
            c10 = tl.load(row1 + j0[None, :], mask=mask, other=0.0)
            c11 = tl.load(row1 + j1[None, :], mask=mask, other=0.0)
            # The same operations, in the same order, as phase 3 (so both see identical values).
            up = tl.zeros([BLOCK_Y, PHASE2_X], dtype=tl.float32)
            up += l0[:, None] * (m0[None, :] * c00 + m1[None, :] * c01)
            up += l1[:, None] * (m0[None, :] * c10 + m1[None, :] * c11)
            vmax = tl.max(tl.max(tl.where(mask, up, float("-inf")), axis=1), axis=0)
            vmin = tl.min(tl.min(tl.where(mask, up, float("inf")), axis=1), axis=0)
            flat = y_cand[:, None] * W + xs[None, :]
            first = tl.min(tl.min(tl.where(mask & (up == vmax), flat, n_cells), axis=1), axis=0)
            # Rows are visited out of order, so ties go to the smaller row-major index.
            take = (vmax > hi) | ((vmax == hi) & (first < best))
            best = tl.where(take, first, best)
            hi = tl.maximum(hi, vmax)
            lo = tl.minimum(lo, vmin)
    tl.store(PEAK + bc * 2, (best // W).to(tl.int64))
    tl.store(PEAK + bc * 2 + 1, (best % W).to(tl.int64))

    # -- phase 3: recompute, normalize, quantize, write ----------------------------------------
    rng = hi - lo
    constant = rng <= eps * tl.abs(hi)
    inv = tl.where(constant, 0.0, tl.math.div_rn(1.0, tl.where(constant, 1.0, rng)))
    shift = tl.where(normalize != 0, lo, 0.0)
    inv = tl.where(normalize != 0, inv, 1.0)
    heat_base = HEAT + bc * n_cells
    for x0 in range(0, W * write_heat, BLOCK_X):
        xs = x0 + tl.arange(0, BLOCK_X)
        xmask = xs < W
        j0, j1, m0, m1 = _source_index(xs, scale_w, w)
        for y0 in range(0, H, BLOCK_Y):
            ys = y0 + tl.arange(0, BLOCK_Y)
            ymask = ys < H
            i0, i1, l0, l1 = _source_index(ys, scale_h, h)
            i_lo = tl.min(tl.where(ymask, i0, h), axis=0)
            i_hi = tl.max(tl.where(ymask, i1, 0), axis=0)
            up = tl.zeros([BLOCK_Y, BLOCK_X], dtype=tl.float32)
            # Adds l0 * row(i0), then l1 * row(i1); the other cam rows of the tile add exact zeros.
            # A while loop: its bounds are computed here, and the interpreter cannot range() over those.
            i = i_lo
            while i <= i_hi:
                left = tl.load(cam_base + i * w + j0, mask=xmask, other=0.0)
                right = tl.load(cam_base + i * w + j1, mask=xmask, other=0.0)
                row = m0 * left + m1 * right
                up += tl.where(i0 == i, l0, 0.0)[:, None] * row[None, :]
                up += tl.where(i1 == i, l1, 0.0)[:, None] * row[None, :]
                i += 1
            val = (up - shift) * inv
            if QUANTIZE:
                val = tl.minimum(tl.maximum(tl.floor(val * 255.0 + 0.5), 0.0), 255.0)
            tl.store(
                heat_base + ys[:, None] * W + xs[None, :],
                val.to(HEAT.dtype.element_ty),
                mask=ymask[:, None] & xmask[None, :],
            )


def block_sizes(out_w: int) -> dict[str, int]:
    """The launcher's block sizes: few enough specializations to compile each ahead of time.

    Phase 1 walks the feature map in 64-pixel chunks with 32 channels per step (a 2048-element
    fp32 accumulator; a 7x7 map is one chunk). Output tiles are 8 rows of 256 for image-sized
    heatmaps and 16 rows of 64 for narrow ones, which would waste most lanes of a 256-wide tile.
    Measured with ptxas before choosing (sm_90): 64 channels per step took fp32 activations to
    214 registers per thread, and 32 x 64 or 16 x 128 output tiles to 210-240, against about
    100-130 for these sizes (benchmarks/RESULTS.md has the table for every variant).
    """
    if out_w <= 64:
        return {"BLOCK_K": 32, "BLOCK_HW": 64, "BLOCK_Y": 16, "BLOCK_X": 64}
    return {"BLOCK_K": 32, "BLOCK_HW": 64, "BLOCK_Y": 8, "BLOCK_X": 256}


# Every block-size combination block_sizes() can return (for the ahead-of-time compile checks).
BLOCK_CHOICES = (block_sizes(64), block_sizes(256))


def interpreter_active() -> bool:
    """True when Triton was imported with TRITON_INTERPRET=1 (kernels run on CPU tensors)."""
    return not isinstance(_cam_fwd_kernel, triton.runtime.JITFunction)


def jit_kernel():
    """The ``@triton.jit`` kernel itself, for the ahead-of-time compile (``kernels/aot.py``); launch it through
    ``fused_cam_triton``."""
    return _cam_fwd_kernel


def _float32_ratio(n_in: int, n_out: int) -> float:
    # torch computes in / out in float32; passing that exact value avoids the GPU's approximate
    # division and double rounding.
    return float(np.float32(n_in) / np.float32(n_out))


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output the kernel writes is allocated here (the tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    # The compiled variants assume 16-byte aligned pointers (what allocations give); a view that
    # starts mid-allocation is copied rather than compiling a variant nobody checked. The copy is
    # dense and keeps the view's memory format, so its strides differ from the view's.
    return t if t.data_ptr() % 16 == 0 else t.clone(memory_format=torch.preserve_format)


def _layout(acts: torch.Tensor) -> tuple[torch.Tensor, bool, int]:
    """(acts, channels_last, stride_a): NCHW or NHWC as they are, anything else copied to NCHW."""
    # Align first: the strides below must be those of the tensor the kernel reads.
    acts = _aligned(acts)
    _, k, h, w = acts.shape
    s_k, s_y, s_x = acts.stride(1), acts.stride(2), acts.stride(3)
    if w > 1:
        s_p, flat = s_x, h == 1 or s_y == w * s_x
    else:
        s_p, flat = (s_y if h > 1 else 1), True
    if flat and (s_p == 1 or h * w == 1):
        return acts, False, s_k
    if flat and (s_k == 1 or k == 1):
        return acts, True, s_p
    acts = acts.contiguous()  # a new allocation, hence aligned
    return acts, False, acts.stride(1)


def _scalar_args(*values: int) -> tuple:
    """The kernel's integer arguments, as the launch passes them.

    Compiled, they are plain ints. Triton 3.6's interpreter turns a plain int into a 1-element array,
    and ``range()`` over it fails with numpy 2.4 or newer (``int()`` needs a 0-dimensional array
    there); a ``tl.constexpr`` reaches the kernel as the int it holds. The interpreter also turns
    every assigned value into an array, so the kernel writes its loop bounds as expressions of the
    arguments, and loops over bounds it computes with ``while``.
    """
    return tuple(tl.constexpr(v) for v in values) if interpreter_active() else values


def _device_guard(device: torch.device):
    # Triton launches on the current CUDA device: make it the tensors' device (cuda:1 stays on cuda:1).
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def fused_cam_triton(
    acts: torch.Tensor,
    weights: torch.Tensor,
    out_size: tuple[int, int] | None,
    *,
    relu: bool = True,
    normalize: bool = True,
    out_dtype: torch.dtype = torch.uint8,
    eps: float = DEFAULT_EPS,
) -> CamMaps:
    """The Triton implementation of ``fused_cam``; same contract as ``fused_cam_reference``."""
    if acts.dim() != 4:
        raise ValueError(f"acts must be (B, K, h, w), got shape {tuple(acts.shape)}")
    if acts.dtype not in ACT_DTYPES:
        raise ValueError(f"the Triton kernel takes float32, float16 or bfloat16 activations, got {acts.dtype}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"unsupported heatmap dtype {out_dtype}; use uint8, float16 or float32")
    b, k, h, w = acts.shape
    if weights.dim() != 3 or weights.shape[0] != b or weights.shape[2] != k:
        raise ValueError(f"weights must be (B, C, K) = ({b}, C, {k}), got {tuple(weights.shape)}")
    if not weights.is_floating_point():
        raise ValueError(f"weights must be a float tensor, got {weights.dtype}")
    if weights.device != acts.device:
        raise ValueError(f"acts are on {acts.device} but weights on {weights.device}")
    if acts.device.type == "cpu" and not interpreter_active():
        raise RuntimeError(
            "the Triton kernel got CPU tensors but Triton's interpreter is off: set TRITON_INTERPRET=1 "
            "before gradcam_batch.kernels is imported, or use backend='torch'"
        )
    if h * w == 0:
        raise ValueError(f"acts have an empty feature map ({h}x{w})")
    c = weights.shape[1]
    if out_size is None:
        out_h, out_w, write_heat = h, w, False
    else:
        out_h, out_w, write_heat = int(out_size[0]), int(out_size[1]), True
        if out_h <= 0 or out_w <= 0:
            raise ValueError(f"out_size must be positive, got {tuple(out_size)}")
    if out_h * out_w >= 2**31:
        raise ValueError(f"heatmaps of {out_h}x{out_w} are too large for the kernel's int32 pixel index")
    if b * c >= 2**31:
        raise ValueError(f"{b}x{c} maps are too many for the kernel's int32 map index; explain fewer at once")

    dev = acts.device
    weights = _aligned(weights.to(torch.float32).contiguous())
    acts, channels_last, stride_a = _layout(acts)

    cams = _alloc((b, c, h, w), torch.float32, dev)
    cam_max = _alloc((b, c), torch.float32, dev)
    peaks = _alloc((b, c, 2), torch.int64, dev)
    if write_heat:
        heat = _alloc((b, c, out_h, out_w), out_dtype, dev)
        heat_arg = heat
    else:
        heat = _alloc((b, c, 0, 0), out_dtype, dev)
        heat_arg = _alloc((1,), out_dtype, dev)
    if b * c == 0:
        return CamMaps(cams, heat, cam_max, peaks)

    blocks = block_sizes(out_w)
    sizes = _scalar_args(c, k, h, w, out_h, out_w, acts.stride(0), stride_a)
    switches = _scalar_args(int(relu), int(normalize), int(write_heat))
    n_maps = b * c
    with _device_guard(dev):
        for first in range(0, n_maps, MAX_GRID):
            _cam_fwd_kernel[(min(MAX_GRID, n_maps - first),)](
                acts,
                weights,
                cams,
                heat_arg,
                cam_max,
                peaks,
                *_scalar_args(first),
                *sizes,
                _float32_ratio(h, out_h),
                _float32_ratio(w, out_w),
                float(eps),
                *switches,
                SEG=SEG_BLOCK,
                QUANTIZE=out_dtype == torch.uint8,
                CHANNELS_LAST=channels_last,
                num_warps=NUM_WARPS,
                **blocks,
            )
    return CamMaps(cams, heat, cam_max, peaks)
