"""Grad-CAM throughput per backend: torch eager vs torch.compile vs ONNX Runtime (and, on CUDA,
bf16 + channels_last and the ORT CUDA/TensorRT providers).

    python benchmarks/bench_backends.py --models resnet18,resnet50 --batch-size 16 --top-k 1,5

Random-weight torchvision models, random inputs; img/s = batch / median seconds per batch over
``--iters`` timed batches after ``--warmup`` (compilation and ORT session set-up happen in the
warm-up). "inference" is the plain forward pass of the same model, the limit to compare with.
Prints a Markdown table; ``--json FILE`` also writes the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    if hasattr(os, "getloadavg"):
        text += f", load average {os.getloadavg()[0]:.1f} at the end"
    if torch.cuda.is_available():
        text += f"; GPU {torch.cuda.get_device_name()}"
    return text


def _time_rounds(fns: dict[str, object], warmup: int, iters: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call. Each round runs every contender once, so load from other processes
    on a shared machine falls on all of them alike instead of on whichever ran last."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for key, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _export_onnx(model: torch.nn.Module, size: int, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(2, 3, size, size),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["images"],
            dynamic_axes={"images": {0: "batch"}},
        )


def run(args) -> list[dict]:
    from gradcam_batch.engine.explain.explainer import Explainer
    from gradcam_batch.engine.models.loader import load_model

    device = torch.device(args.device)
    top_ks = [int(k) for k in args.top_k.split(",")]
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_backends_"))
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = load_model(f"torchvision:{name}", device=device)
        images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)

        contenders: dict[str, object] = {}
        contenders["eager"] = Explainer(model)
        if "compiled" in args.backends:
            contenders["compiled"] = Explainer(model, compile=True, compile_mode=args.compile_mode)
        if device.type == "cuda" and "bf16" in args.backends:
            contenders["compiled bf16 + channels_last"] = Explainer(model, compile=True, precision="bf16")
        if "onnx" in args.backends:
            path = tmp / f"{name}.onnx"
            _export_onnx(model.cpu(), args.image_size, path)
            model.to(device)
            onnx_model = load_model(str(path), device=device)
            onnx_model.threads = args.threads or None
            contenders[f"onnxruntime ({onnx_model.providers[0].replace('ExecutionProvider', '')})"] = Explainer(
                onnx_model
            )

        def infer(model=model, images=images):
            with torch.inference_mode():
                model(images)

        fns: dict[tuple[str, int | None], object] = {("inference (forward only)", None): infer}
        for label, exp in contenders.items():
            for k in top_ks:
                fns[label, k] = lambda exp=exp, k=k, images=images: exp(images, top_k=k)
        medians = _time_rounds(fns, args.warmup, args.iters, device)
        for (label, k), t in medians.items():
            closed = getattr(contenders.get(label), "closed_form", None)
            img_s = args.batch_size / t
            rows.append({"model": name, "backend": label, "top_k": k, "img_s": img_s, "closed_form": closed})
            what = f"top-{k}" if k is not None else "     "
            print(f"{name:10s} {label:30s} {what} {img_s:8.2f} img/s", flush=True)
    return rows


def markdown(rows: list[dict], args) -> str:
    models = list(dict.fromkeys(r["model"] for r in rows))
    top_ks = [int(k) for k in args.top_k.split(",")]
    backends = list(dict.fromkeys(r["backend"] for r in rows if r["top_k"] is not None))
    head = "| model | " + " | ".join(f"{b} top-{k}" for b in backends for k in top_ks) + " | inference only |"
    sep = "|---" * (len(backends) * len(top_ks) + 2) + "|"
    lines = [head, sep]
    for m in models:
        cells = []
        for b in backends:
            for k in top_ks:
                hit = [r for r in rows if r["model"] == m and r["backend"] == b and r["top_k"] == k]
                cells.append(f"{hit[0]['img_s']:.1f}" if hit else "-")
        inf = [r for r in rows if r["model"] == m and r["top_k"] is None]
        cells.append(f"{inf[0]['img_s']:.1f}" if inf else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,resnet50")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--top-k", default="1,5")
    ap.add_argument("--backends", default="compiled,onnx,bf16", help="besides eager: compiled, onnx, bf16 (CUDA)")
    ap.add_argument("--compile-mode", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch and ORT intra-op threads (0: their defaults)")
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    print()
    size = f"{args.image_size}x{args.image_size}"
    print(f"machine: {_machine()}; torch {torch.__version__}; batch {args.batch_size}, {size}")
    print(markdown(rows, args))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"machine": _machine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
