"""Ahead-of-time compilation of the fused CAM kernel for real GPUs, with no GPU present.

The Triton interpreter accepts programs that the GPU compiler rejects, so the kernel is also
compiled to PTX and a cubin for each variant the launcher can launch. The launcher's variants
are exactly: activation dtype x heatmap dtype x block sizes x memory layout. Sizes and strides
are declared ``do_not_specialize`` in the kernel and pointers are always 16-byte aligned (the
launcher copies a misaligned view), so nothing else changes the compiled code.

Compilation needs a process in which Triton was imported *without* TRITON_INTERPRET: Triton's
own helpers (the combine functions of ``tl.sum``/``tl.max``) are jitted at import, and in
interpreter mode the GPU code generator cannot use them. ``compile_in_subprocess`` runs this
module as a clean child process, which is how the tests call it.

    python -m gradcam_batch.kernels.aot            # markdown table, every variant, sm_90 and sm_80
    python -m gradcam_batch.kernels.aot --covering --json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget

from gradcam_batch.kernels import cam_kernel as _kernel_module
from gradcam_batch.kernels.cam_kernel import ACT_DTYPES, BLOCK_CHOICES, NUM_WARPS, OUT_DTYPES, SEG_BLOCK

ARCHS = (90, 80)
_TRITON_TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.uint8: "u8",
    torch.int64: "i64",
}
# The pointer arguments and their element dtype (None: the variant's own dtype).
_POINTERS = {
    "A": None,
    "Wt": torch.float32,
    "CAM": torch.float32,
    "HEAT": None,
    "CMAX": torch.float32,
    "PEAK": torch.int64,
}
_FLOATS = ("scale_h", "scale_w", "eps")


@dataclass(frozen=True)
class Variant:
    """One compiled form of the kernel, as the launcher would launch it."""

    act_dtype: torch.dtype
    out_dtype: torch.dtype
    block_x: int
    channels_last: bool

    @property
    def name(self) -> str:
        layout = "nhwc" if self.channels_last else "nchw"
        return f"{_TRITON_TYPES[self.act_dtype]}->{_TRITON_TYPES[self.out_dtype]} X{self.block_x} {layout}"

    def constexprs(self) -> dict[str, object]:
        blocks = next(b for b in BLOCK_CHOICES if b["BLOCK_X"] == self.block_x)
        return {
            **blocks,
            "SEG": SEG_BLOCK,
            "QUANTIZE": self.out_dtype == torch.uint8,
            "CHANNELS_LAST": self.channels_last,
        }


def variants() -> list[Variant]:
    """Every variant the launcher can launch."""
    return [
        Variant(a, o, blocks["BLOCK_X"], cl)
        for a, o, blocks, cl in itertools.product(ACT_DTYPES, OUT_DTYPES, BLOCK_CHOICES, (False, True))
    ]


def covering_variants() -> list[Variant]:
    """A few variants in which every dtype, block size and layout appears at least once."""
    axes = (ACT_DTYPES, OUT_DTYPES, [b["BLOCK_X"] for b in BLOCK_CHOICES], (False, True))
    n = max(len(axis) for axis in axes)
    return [Variant(*(axis[i % len(axis)] for axis in axes)) for i in range(n)]


def _kernel():
    if _kernel_module.interpreter_active():
        raise RuntimeError(
            "Triton was imported with TRITON_INTERPRET=1, so the kernel cannot be compiled for a GPU in this "
            "process; use compile_in_subprocess()"
        )
    return _kernel_module.jit_kernel()


def ast_source(variant: Variant) -> triton.compiler.ASTSource:
    """The kernel's source with the argument types and constants of one variant.

    The signature maps every argument name to a Triton type string ("*bf16", "i32", "fp32") or
    "constexpr"; the 16-byte alignment the JIT would infer for each pointer is given as an attribute.
    """
    fn = _kernel()
    names = fn.arg_names
    constexprs = variant.constexprs()
    signature: dict[str, str] = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _POINTERS:
            dtype = _POINTERS[name] or (variant.act_dtype if name == "A" else variant.out_dtype)
            signature[name] = "*" + _TRITON_TYPES[dtype]
        elif name in _FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in _POINTERS}
    return triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def compile_variant(variant: Variant, arch: int = 90):
    """Compiles one variant for ``sm_<arch>``; raises when Triton or ptxas rejects it."""
    target = GPUTarget("cuda", arch, 32)
    return triton.compile(ast_source(variant), target=target, options={"num_warps": NUM_WARPS})


def _ptxas() -> str:
    try:
        from triton import knobs

        return knobs.nvidia.ptxas.path
    except (ImportError, AttributeError):  # older Triton keeps the binary beside its backend
        import triton.backends.nvidia as nv

        path = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
        return path if os.path.exists(path) else (shutil.which("ptxas") or "ptxas")


def resource_usage(compiled, arch: int) -> dict[str, int]:
    """Registers per thread, spill bytes (stores + loads) and static shared memory of a compiled variant.

    Triton reads registers and spills from the driver when it loads a kernel, which needs a GPU;
    here ptxas reports them for the same PTX instead (``ptxas -v``).
    """
    gpu_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(compiled.asm["ptx"])
        proc = subprocess.run(
            [_ptxas(), "-v", f"--gpu-name={gpu_name}", src, "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    log = proc.stdout + proc.stderr
    regs = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    return {
        "registers": int(regs.group(1)) if regs else -1,
        "spill_bytes": (int(stores.group(1)) if stores else 0) + (int(loads.group(1)) if loads else 0),
        "shared_bytes": int(compiled.metadata.shared),
    }


def check_variant(variant: Variant, arch: int) -> dict[str, object]:
    """Compiles one variant and describes the result; ``error`` is None when it compiled."""
    row: dict[str, object] = {"variant": variant.name, "arch": arch, "error": None}
    row.update(variant.constexprs())
    try:
        compiled = compile_variant(variant, arch)
        row["ptx_target"] = (re.search(r"^\.target (\S+)", compiled.asm["ptx"], re.MULTILINE) or [None, None])[1]
        row["cubin_is_elf"] = compiled.asm["cubin"][:4] == b"\x7fELF"
        row.update(resource_usage(compiled, arch))
    except Exception as exc:  # reported per variant, so one failure does not hide the others
        row["error"] = f"{type(exc).__name__}: {exc}"
    return row


def compile_in_subprocess(covering: bool = True, archs: tuple[int, ...] = ARCHS, timeout: float = 1800) -> list[dict]:
    """Runs this module in a child process without TRITON_INTERPRET and returns its rows."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "gradcam_batch.kernels.aot", "--json"]
    cmd += ["--covering"] if covering else []
    for arch in archs:
        cmd += ["--arch", str(arch)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if not proc.stdout.strip():
        raise RuntimeError(f"ahead-of-time compilation produced no output:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile every fused CAM kernel variant and print its resources.")
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (default: 90 and 80)")
    parser.add_argument("--covering", action="store_true", help="only the few variants that cover every option")
    parser.add_argument("--json", action="store_true", help="one JSON list of rows instead of a markdown table")
    args = parser.parse_args(argv)
    chosen = covering_variants() if args.covering else variants()
    archs = args.arch or list(ARCHS)
    if not args.json:
        print(f"triton {triton.__version__}, num_warps={NUM_WARPS}")
        print("| arch | acts -> heatmap | BLOCK_Y x BLOCK_X | layout | registers | spill bytes | shared bytes |")
        print("|---|---|---|---|---:|---:|---:|")
    rows = []
    for arch in archs:
        for v in chosen:
            row = check_variant(v, arch)
            rows.append(row)
            if args.json:
                continue
            if row["error"]:
                print(f"| sm_{arch} | {v.name} | FAILED: {row['error'].splitlines()[0]} |||||", flush=True)
                continue
            print(
                f"| sm_{arch} | {_TRITON_TYPES[v.act_dtype]} -> {_TRITON_TYPES[v.out_dtype]} "
                f"| {row['BLOCK_Y']} x {row['BLOCK_X']} | {'nhwc' if v.channels_last else 'nchw'} "
                f"| {row['registers']} | {row['spill_bytes']} | {row['shared_bytes']} |",
                flush=True,
            )
    if args.json:
        print(json.dumps(rows))
    return 1 if any(row["error"] for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
