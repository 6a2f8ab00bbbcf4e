"""Throughput benchmark: gradcam-batch next to pure inference, pytorch-grad-cam and captum.

``run_bench(BenchConfig(...))`` is what ``gradcam-batch bench`` calls. How it keeps the
comparison fair:

- Every contender gets the same model weights, target layer (the one the ``Explainer``
  resolves), batches, device and precision, and produces heatmaps at input size (except
  pure inference, the limit, which only computes the scores).
- Precision is what the engine does: the model stays float32 and forwards run under
  ``torch.autocast`` to bf16/fp16 (the engine's head then runs in float32). The inputs are
  channels_last for everyone (on the CPU too), the memory format the engine feeds its backbone.
  ``compile`` compiles the engine's backbone and adds a
  compiled-model row next to the eager inference limit (the reference of every ratio); the
  baselines run eager, as their users run them.
- Inputs are random normal batches (not zeros), rotated among ``n_batches`` so that no
  contender sees the same tensor twice in a row.
- Repetitions are interleaved: one round runs every contender once, and the order rotates
  from round to round, so drift in machine load (this CPU is shared) hits all of them alike.
  The median of the rounds after warm-up is reported. On CUDA each call is timed with
  events after a synchronize.
- The baselines explain top-k with k calls (each takes one target per image), and are handed
  the top-k classes for free: they are computed once, outside the timed region. That favours
  the baselines; gradcam-batch picks its classes inside the timed call.
- pytorch-grad-cam keeps its hooks on the model for the lifetime of its ``GradCAM`` object,
  so it gets its own copy of the model (same weights); otherwise its hooks would also run,
  and slow down, the other contenders' forwards.

Where the maps differ by design (``check_parity`` compares the raw low-resolution maps, which
agree): pytorch-grad-cam min-max normalizes each map with a 1e-7 epsilon and resizes it with
OpenCV's bilinear ``cv2.resize`` on the host; captum returns the un-normalized map and
resizes it with ``F.interpolate(mode="bilinear")`` (align_corners=False); gradcam-batch
resizes like captum, then min-max normalizes the upsampled map (a constant map becomes 0).

One module past 500 lines: the contenders, the interleaved rounds and the report share one
config and one fairness contract; splitting them would spread that contract over files.
"""

from __future__ import annotations

import copy
import datetime
import importlib.metadata
import importlib.util
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from gradcam_batch.engine.bench import (  # noqa: E402  (names the CLI reads without importing torch)
    BASELINES,
    CAPTUM,
    END_TO_END,
    INFERENCE,
    INFERENCE_COMPILED,
    METHOD_BASELINES,
    OURS,
    PYTORCH_GRAD_CAM,
    TORCHCAM,
)
from gradcam_batch.engine.explain.compiled import backbone_context, prepare_input
from gradcam_batch.engine.explain.explainer import VJP_STRATEGIES, Explainer

# The import module and PyPI name that provide each library baseline.
_BASELINE_PACKAGES = {
    PYTORCH_GRAD_CAM: ("pytorch_grad_cam", "grad-cam"),
    CAPTUM: ("captum", "captum"),
    TORCHCAM: ("torchcam", "torchcam"),
}
PRECISIONS = ("fp32", "bf16", "fp16")
PARITY_MIN_PEARSON = 0.999


# -- models ---------------------------------------------------------------------------------------
def load_model(spec: str, weights: str | None = None) -> nn.Module:
    """A torch model from ``spec`` (``torchvision:NAME`` with random weights, ``file.py:FACTORY``, ...).

    The specs are those of ``gradcam_batch.engine.models.loader.load_model``; the benchmark needs an
    ``nn.Module`` that every contender can run, so ONNX files and compiled programs are refused.
    """
    from gradcam_batch.engine.models.loader import load_model as load_any

    model = load_any(spec, weights=weights)
    if not isinstance(model, nn.Module) or getattr(model, "explain_unsupported", None):
        raise ValueError(f"bench needs a torch nn.Module that the baselines can run too; {spec!r} is not one")
    return model


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested, but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    return dev


def parse_top_ks(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"1,5"`` -> (1, 5), positive, unique, in the given order."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[int] = []
    for item in items:
        try:
            k = int(str(item).strip())
        except ValueError:
            raise ValueError(f"top-k must be a comma-separated list of positive integers, got {text!r}") from None
        if k < 1:
            raise ValueError(f"top-k values must be positive, got {k}")
        if k not in out:
            out.append(k)
    if not out:
        raise ValueError("top-k is empty")
    return tuple(out)


def parse_names(text: str | Sequence[str], allowed: Sequence[str], what: str) -> tuple[str, ...]:
    items = text.split(",") if isinstance(text, str) else list(text)
    out = tuple(dict.fromkeys(s.strip() for s in items if s.strip()))
    bad = [s for s in out if s not in allowed]
    if bad:
        raise ValueError(f"unknown {what} {bad[0]!r}; expected some of {', '.join(allowed)}")
    if not out:
        raise ValueError(f"no {what} given; expected some of {', '.join(allowed)}")
    return out


# -- configuration and results --------------------------------------------------------------------
@dataclass
class BenchConfig:
    model: str = "torchvision:resnet50"
    weights: str | None = None
    batch_size: int = 16
    image_size: int = 224
    top_k: tuple[int, ...] = (1, 5)
    device: str = "auto"
    precision: str = "fp32"
    iters: int = 10
    warmup: int = 2
    baselines: tuple[str, ...] | None = None  # None: BASELINES, or METHOD_BASELINES with methods
    vjp_strategies: tuple[str, ...] = ("vmap",)
    compile: bool = False
    end_to_end: bool = False
    e2e_images: int | None = None  # JPEGs in the end-to-end dataset; default 4 batches
    n_batches: int = 4
    seed: int = 0
    check: bool = False
    methods: tuple[str, ...] = ()  # CAM methods to time against the libraries (engine/bench/methods.py)
    scorecam_batch: int = 64

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch size must be positive, got {self.batch_size}")
        if self.image_size < 8:
            raise ValueError(f"image size must be at least 8, got {self.image_size}")
        if self.iters < 1:
            raise ValueError(f"iters must be at least 1, got {self.iters}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be non-negative, got {self.warmup}")
        if self.e2e_images is not None and self.e2e_images < 1:
            raise ValueError(f"e2e_images must be positive, got {self.e2e_images}")
        if self.n_batches < 1:
            raise ValueError(f"n_batches must be at least 1, got {self.n_batches}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; expected one of {', '.join(PRECISIONS)}")
        self.top_k = parse_top_ks(self.top_k)
        if self.methods:
            from gradcam_batch.engine.explain.methods import parse_methods

            self.methods = parse_methods(self.methods)
        if self.baselines is None:
            self.baselines = METHOD_BASELINES if self.methods else BASELINES
        self.baselines = parse_names(self.baselines, METHOD_BASELINES if self.methods else BASELINES, "baseline")
        if self.scorecam_batch < 1:
            raise ValueError(f"scorecam batch must be positive, got {self.scorecam_batch}")
        self.vjp_strategies = parse_names(self.vjp_strategies, VJP_STRATEGIES, "vjp strategy")
        resolve_device(self.device)


@dataclass
class Result:
    """One contender at one top-k (None for pure inference)."""

    contender: str
    top_k: int | None
    status: str  # "ok", "skipped" (not installed) or "failed"
    reason: str = ""
    times_s: list[float] = field(default_factory=list)  # per batch, after warm-up
    median_s: float | None = None
    img_per_s: float | None = None
    vs_inference: float | None = None  # img/s over pure inference's img/s
    speedup: dict[str, float] = field(default_factory=dict)  # ours only: img/s over each baseline's


@dataclass
class ParityResult:
    baseline: str
    min_pearson: float
    maps: int  # how many (image, class) maps were compared
    passed: bool


@dataclass
class BenchReport:
    config: dict
    environment: dict
    target_layer: str
    closed_form: bool
    results: list[Result]
    parity: list[ParityResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def result(self, contender: str, top_k: int | None = None) -> Result:
        for r in self.results:
            if r.contender == contender and r.top_k == top_k:
                return r
        raise KeyError((contender, top_k))

    def format_table(self) -> str:
        """The results as an aligned plain-text table, followed by skipped/failed notes."""
        c = self.config
        ours = [r.contender for r in self.results if r.contender.startswith(OURS)]
        base = [
            b
            for b in (PYTORCH_GRAD_CAM, CAPTUM, TORCHCAM)
            if any(r.contender == b or r.contender.startswith(f"{b}[") for r in self.results)
        ]
        header = ["contender", "top-k", "img/s", "ms/batch", "x inference", *[f"x {b}" for b in base]]
        rows = [header]
        notes = []
        for r in self.results:
            if r.status != "ok":
                notes.append(f"{r.contender}" + (f" (top-{r.top_k})" if r.top_k else "") + f": {r.status}, {r.reason}")
                continue
            row = [
                r.contender,
                "-" if r.top_k is None else str(r.top_k),
                f"{r.img_per_s:.1f}",
                f"{r.median_s * 1000:.1f}",
                _fmt_ratio(r.vs_inference),
            ]
            row += [_fmt_ratio(r.speedup.get(b)) if r.contender in ours else "" for b in base]
            rows.append(row)
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [
            f"model {c['model']}  batch {c['batch_size']}  image {c['image_size']}x{c['image_size']}  "
            f"{c['precision']}  device {self.environment['device']}  layer {self.target_layer}"
            + ("  (closed form)" if self.closed_form else ""),
            f"median of {c['iters']} interleaved rounds after {c['warmup']} warm-up",
        ]
        for i, row in enumerate(rows):
            cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)]
            lines.append("  ".join(cells).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines += notes
        lines += _all_methods_notes(self.results)
        for p in self.parity:
            verdict = "ok" if p.passed else "FAILED"
            lines.append(
                f"parity vs {p.baseline}: min Pearson {p.min_pearson:.6f} over {p.maps} raw maps "
                f"(>= {PARITY_MIN_PEARSON}) {verdict}"
            )
        return "\n".join(lines)


def _all_methods_notes(results: list[Result]) -> list[str]:
    """'all N methods in one call: X.XXx the time of gradcam alone', per top-k, in method mode."""
    from gradcam_batch.engine.bench.methods import ours_name

    out = []
    for r in results:
        if r.status == "ok" and r.contender.startswith(f"{OURS}[") and r.contender.endswith(" methods]"):
            alone = next((o for o in results if o.contender == ours_name("gradcam") and o.top_k == r.top_k), None)
            if alone is not None and alone.status == "ok":
                what = r.contender[len(OURS) + 1 : -1]
                out.append(f"top-{r.top_k}: {what} in one call take {r.median_s / alone.median_s:.2f}x gradcam's time")
    return out


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


# -- timing ---------------------------------------------------------------------------------------
class _Timer:
    """Wall time of one call; on CUDA, events recorded around it after a synchronize."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


@dataclass
class _Contender:
    name: str
    top_k: int | None
    run: Callable[[int], object]  # batch index -> runs one batch
    release: Callable[[], None] = lambda: None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# -- contenders -----------------------------------------------------------------------------------
def _pytorch_grad_cam(model, layer, batches, classes, k, ctx) -> _Contender:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    own = copy.deepcopy(model)
    cam = GradCAM(model=own, target_layers=[own.get_submodule(layer)])
    targets = [[[ClassifierOutputTarget(int(c)) for c in cls[:, r].tolist()] for r in range(k)] for cls in classes]

    def run(i: int) -> object:
        with ctx():
            return [cam(input_tensor=batches[i], targets=targets[i][r]) for r in range(k)]

    return _Contender(PYTORCH_GRAD_CAM, k, run, release=cam.activations_and_grads.release)


def _captum(model, layer, batches, classes, k, ctx) -> _Contender:
    from captum.attr import LayerAttribution, LayerGradCam

    gc = LayerGradCam(model, model.get_submodule(layer))
    size = tuple(batches[0].shape[-2:])

    def run(i: int) -> object:
        out = []
        with ctx():
            for r in range(k):
                attr = gc.attribute(batches[i], target=classes[i][:, r], relu_attributions=True)
                out.append(LayerAttribution.interpolate(attr, size, "bilinear"))
        return out

    return _Contender(CAPTUM, k, run)


def _method_contenders(cfg, model, explainers, batches, classes, ctx) -> tuple[list[_Contender], list[Result]]:
    """``--methods``: inference, our explainers (one per method, one for the list), each library's methods."""
    from gradcam_batch.engine.bench.methods import LIBRARIES, library_name

    contenders, unavailable = _inference_contenders(cfg, model, batches, ctx), []
    layer = next(iter(explainers.values())).target_layer
    for k in cfg.top_k:
        for name, explainer in explainers.items():
            contenders.append(_Contender(name, k, lambda i, e=explainer, k=k: e(batches[i], top_k=k)))
        for lib, (known, make) in LIBRARIES.items():
            if lib not in cfg.baselines:
                continue
            module, dist = _BASELINE_PACKAGES[lib]
            for m in cfg.methods:
                name = library_name(lib, m)
                if m not in known:
                    unavailable.append(Result(name, k, "skipped", f"{lib} has no {m}"))
                elif not _installed(module):
                    unavailable.append(Result(name, k, "skipped", f"not installed (pip install {dist})"))
                else:
                    try:
                        run, release = make(model, layer, m, batches, classes, k, ctx, cfg.scorecam_batch)
                        contenders.append(_Contender(name, k, run, release=release))
                    except Exception as e:  # a library that cannot even be set up is reported, not fatal
                        unavailable.append(Result(name, k, "failed", _one_line(e)))
    return contenders, unavailable


def _inference_contenders(cfg, model, batches, ctx) -> list[_Contender]:
    contenders: list[_Contender] = []
    if INFERENCE in cfg.baselines:
        # The limit runs under the same autocast as the engine's backbone. It stays eager (the
        # reference of the ratios); with compile, the compiled model is a second row, so the
        # table shows both what compiling buys and how close the compiled engine gets to it.
        variants = [(INFERENCE, model)]
        if cfg.compile:
            variants.append((INFERENCE_COMPILED, torch.compile(model)))
        for name, m in variants:

            def infer(i: int, m=m) -> object:
                with torch.inference_mode(), ctx():
                    return m(batches[i])

            contenders.append(_Contender(name, None, infer))
    return contenders


def _build_contenders(cfg, model, explainers, batches, classes, ctx) -> tuple[list[_Contender], list[Result]]:
    contenders: list[_Contender] = _inference_contenders(cfg, model, batches, ctx)
    unavailable: list[Result] = []
    layer = next(iter(explainers.values())).target_layer
    for k in cfg.top_k:
        for strategy, explainer in explainers.items():
            name = OURS if len(explainers) == 1 else f"{OURS}[{strategy}]"
            contenders.append(_Contender(name, k, lambda i, e=explainer, k=k: e(batches[i], top_k=k)))
        for b, make in ((PYTORCH_GRAD_CAM, _pytorch_grad_cam), (CAPTUM, _captum)):
            if b not in cfg.baselines:
                continue
            module, dist = _BASELINE_PACKAGES[b]
            if not _installed(module):
                unavailable.append(Result(b, k, "skipped", f"not installed (pip install {dist})"))
                continue
            try:
                contenders.append(make(model, layer, batches, classes, k, ctx))
            except Exception as e:  # a baseline that cannot even be set up is reported, not fatal
                unavailable.append(Result(b, k, "failed", _one_line(e)))
    return contenders, unavailable


# -- the benchmark --------------------------------------------------------------------------------
def make_batches(cfg: BenchConfig, device: torch.device) -> list[torch.Tensor]:
    """float32 random normal batches, channels_last as the engine feeds its backbone; every
    contender, pure inference included, gets these same tensors."""
    gen = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.batch_size, 3, cfg.image_size, cfg.image_size)
    return [prepare_input(torch.randn(shape, generator=gen).to(device)) for _ in range(cfg.n_batches)]


def environment(device: torch.device) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    for module, dist in _BASELINE_PACKAGES.values():
        if _installed(module):
            try:
                env[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:  # importable, but not installed by pip
                env[dist] = "unknown version"
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_bench(
    cfg: BenchConfig,
    model: nn.Module | None = None,
    progress: Callable[[str], None] | None = None,
) -> BenchReport:
    """Run the benchmark described by ``cfg``; ``model`` overrides ``cfg.model`` when given.

    The model is moved to the device and put in eval mode. Bad settings raise ``ValueError``.
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    if model is None:
        model = load_model(cfg.model, cfg.weights)
    model = model.to(device).eval()
    torch.manual_seed(cfg.seed)

    parity: list[ParityResult] = []
    if cfg.check:
        # Parity is a property of the math, checked in float32 whatever precision is timed
        # (pytorch-grad-cam cannot run in bf16: it converts to numpy).
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        shape = (min(cfg.batch_size, 8), 3, cfg.image_size, cfg.image_size)
        x = torch.randn(shape, generator=gen).to(device)
        parity = check_parity(model, x, top_k=max(cfg.top_k), baselines=cfg.baselines)

    # Precision as the engine runs it: an fp32 model, the backbone (here: every contender's
    # forward) under autocast to bf16/fp16.
    def ctx():
        return backbone_context(device, cfg.precision)

    batches = make_batches(cfg, device)
    if cfg.methods:
        from gradcam_batch.engine.bench.methods import our_contenders

        explainers = our_contenders(
            model,
            cfg.methods,
            batches,
            precision=cfg.precision,
            compile=cfg.compile,
            scorecam_batch=cfg.scorecam_batch,
        )
    else:
        explainers = {
            s: Explainer(model, vjp_strategy=s, precision=cfg.precision, compile=cfg.compile)
            for s in cfg.vjp_strategies
        }
    kmax = max(cfg.top_k)
    classes = []
    # no_grad, not inference_mode: captum feeds the targets into autograd-tracked indexing.
    with torch.no_grad(), ctx():
        for x in batches:
            scores = model(x)
            if kmax > scores.shape[1]:
                raise ValueError(f"top-k {kmax} exceeds the model's {scores.shape[1]} classes")
            classes.append(scores.float().topk(kmax, dim=1).indices.clone())
    for e in explainers.values():
        # Resolves the target layer and the graph split (and compiles) untimed, at the timed shape;
        # Score-CAM's K forwards per image make one image enough there.
        e(batches[0][:1] if "scorecam" in e.methods else batches[0], top_k=1)
    first = next(iter(explainers.values()))

    build = _method_contenders if cfg.methods else _build_contenders
    contenders, results = build(cfg, model, explainers, batches, classes, ctx)
    timer = _Timer(device)
    times: dict[int, list[float]] = {i: [] for i in range(len(contenders))}
    failed: dict[int, str] = {}
    try:
        rounds = cfg.warmup + cfg.iters
        for it in range(rounds):
            if progress is not None:
                progress(f"round {it + 1}/{rounds}" + (" (warm-up)" if it < cfg.warmup else ""))
            n = len(contenders)
            for j in range(n):
                idx = (j + it) % n  # rotate the order so no contender always runs first
                if idx in failed:
                    continue
                batch_index = (it + idx) % len(batches)
                try:
                    dt = timer(lambda c=contenders[idx], b=batch_index: c.run(b))
                except Exception as e:  # e.g. a baseline that does not support bf16
                    failed[idx] = _one_line(e)
                    continue
                if it >= cfg.warmup:
                    times[idx].append(dt)
    finally:
        for c in contenders:
            c.release()

    for i, c in enumerate(contenders):
        if i in failed:
            results.append(Result(c.name, c.top_k, "failed", failed[i]))
            continue
        med = statistics.median(times[i])
        results.append(Result(c.name, c.top_k, "ok", times_s=times[i], median_s=med, img_per_s=cfg.batch_size / med))
    if cfg.end_to_end:
        results += run_end_to_end(cfg, progress)
    _fill_ratios(results)
    order = {name: i for i, name in enumerate([INFERENCE, *(c.name for c in contenders), PYTORCH_GRAD_CAM, CAPTUM])}
    results.sort(key=lambda r: (r.top_k or 0, order.get(r.contender, len(order))))
    return BenchReport(
        config=asdict(cfg),
        environment=environment(device),
        target_layer=first.target_layer or "",
        closed_form=first.closed_form,
        results=results,
        parity=parity,
    )


# -- end to end -----------------------------------------------------------------------------------
def write_jpeg_dataset(path: str, n: int, size: int, seed: int = 0, row_group_rows: int = 256) -> str:
    """A Parquet file of ``n`` JPEG images (``id``, ``image``), size x size, smooth random colours.

    Smooth (upsampled noise) rather than white noise, so the JPEGs have realistic sizes and
    decode cost.
    """
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = max(2, size // 16)
    blobs = []
    for _ in range(n):
        small = Image.fromarray(rng.integers(0, 256, (coarse, coarse, 3), dtype=np.uint8))
        buf = io.BytesIO()
        small.resize((size, size), Image.Resampling.BILINEAR).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    table = pa.table({"id": [f"img-{i:07d}" for i in range(n)], "image": pa.array(blobs, pa.binary())})
    pq.write_table(table, path, row_group_size=row_group_rows)
    return path


def run_end_to_end(cfg: BenchConfig, progress: Callable[[str], None] | None = None) -> list[Result]:
    """``gradcam-batch run`` (decode -> explain -> Parquet written) on generated JPEGs, per top-k.

    Runs after the interleaved rounds, once per top-k; img/s is the pipeline's own count over
    its whole run (the first batch, and with compile the compilation, included).
    """
    import os
    import tempfile

    try:
        from gradcam_batch.engine.job.config import RunConfig
        from gradcam_batch.engine.job.local import run_job
    except ImportError as e:
        return [Result(END_TO_END, k, "skipped", f"the run pipeline is not available ({e})") for k in cfg.top_k]
    n = cfg.e2e_images or 4 * cfg.batch_size
    out: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="gradcam-batch-bench-") as tmp:
        data = write_jpeg_dataset(os.path.join(tmp, "images.parquet"), n, cfg.image_size, cfg.seed)
        for k in cfg.top_k:
            if progress is not None:
                progress(f"end-to-end: {n} JPEGs, top-{k}")
            run_cfg = RunConfig(
                inputs=[data],
                output=os.path.join(tmp, f"out-top{k}"),
                model=cfg.model,
                weights=cfg.weights,
                top_k=k,
                resize=cfg.image_size,
                crop=(cfg.image_size, cfg.image_size),
                batch_size=cfg.batch_size,
                device=cfg.device,
                precision=cfg.precision,
                compile=cfg.compile,
            )
            try:
                summary = run_job(run_cfg)
            except Exception as e:  # reported in the table; the timed rounds stay valid
                out.append(Result(END_TO_END, k, "failed", _one_line(e)))
                continue
            ips = float(summary["images_per_s"])
            per_batch = cfg.batch_size / ips if ips > 0 else float("nan")
            out.append(
                Result(END_TO_END, k, "ok", times_s=[float(summary["seconds"])], median_s=per_batch, img_per_s=ips)
            )
    return out


def _fill_ratios(results: list[Result]) -> None:
    ok = {(r.contender, r.top_k): r for r in results if r.status == "ok"}
    inf = ok.get((INFERENCE, None))
    for r in ok.values():
        if inf is not None:
            r.vs_inference = r.img_per_s / inf.img_per_s
        if r.contender.startswith(OURS):
            # --methods: gradcam-batch[m] against library[m]; otherwise against the library's Grad-CAM.
            method = r.contender[len(OURS) + 1 : -1] if r.contender.startswith(f"{OURS}[") else None
            for b in (PYTORCH_GRAD_CAM, CAPTUM, TORCHCAM):
                other = ok.get((f"{b}[{method}]", r.top_k)) or ok.get((b, r.top_k))
                if other is not None:
                    r.speedup[b] = r.img_per_s / other.img_per_s


# -- parity ---------------------------------------------------------------------------------------
def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each pair of maps over the last two dims, in float64.

    Two constant maps that are equal correlate perfectly (1.0); a constant map against a
    varying one gives 0.0.
    """
    a = a.detach().to("cpu", torch.float64).flatten(-2)
    b = b.detach().to("cpu", torch.float64).flatten(-2)
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    num = (a * b).sum(-1)
    den = (a.square().sum(-1) * b.square().sum(-1)).sqrt()
    out = num / den
    both_flat = den == 0
    same = torch.isclose(a, b).all(-1)
    return torch.where(both_flat, torch.where(same, 1.0, 0.0).to(out.dtype), out)


def ours_raw_cams(explainer: Explainer, images: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(classes (B, k), raw cams (B, k, h, w)): sum_k alpha_k A^k before ReLU, no upsampling."""
    exp = explainer(images, top_k=top_k, relu=False, heatmaps=False)
    return exp.classes, exp.cams


def pytorch_grad_cam_raw(model: nn.Module, layer: str, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's map before its ReLU, resize and normalization: (B, k, h, w)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    module = model.get_submodule(layer)
    maps = []
    with GradCAM(model=model, target_layers=[module]) as cam:
        for r in range(classes.shape[1]):
            targets = [ClassifierOutputTarget(int(c)) for c in classes[:, r].tolist()]
            cam(input_tensor=images, targets=targets)
            acts = cam.activations_and_grads.activations[0].numpy()
            grads = cam.activations_and_grads.gradients[0].numpy()
            maps.append(torch.from_numpy(cam.get_cam_image(images, module, targets, acts, grads)))
    return torch.stack(maps, dim=1)


def captum_raw(model: nn.Module, layer: str, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """captum's LayerGradCam map without ReLU or interpolation: (B, k, h, w)."""
    from captum.attr import LayerGradCam

    gc = LayerGradCam(model, model.get_submodule(layer))
    maps = [gc.attribute(images, target=classes[:, r], relu_attributions=False)[:, 0] for r in range(classes.shape[1])]
    return torch.stack(maps, dim=1).detach()


def check_parity(
    model: nn.Module,
    images: torch.Tensor,
    *,
    top_k: int = 1,
    baselines: Sequence[str] = (PYTORCH_GRAD_CAM, CAPTUM),
    explainer: Explainer | None = None,
) -> list[ParityResult]:
    """Our raw low-resolution cams against each installed baseline's, same layer and classes."""
    explainer = explainer or Explainer(model)
    classes, ours = ours_raw_cams(explainer, images, top_k)
    layer = explainer.target_layer
    assert layer is not None
    out = []
    for b, fn in ((PYTORCH_GRAD_CAM, pytorch_grad_cam_raw), (CAPTUM, captum_raw)):
        if b not in baselines or not _installed(_BASELINE_PACKAGES[b][0]):
            continue
        theirs = fn(model, layer, images, classes)
        r = pearson(ours, theirs)
        low = float(r.min())
        out.append(ParityResult(b, low, r.numel(), bool(low >= PARITY_MIN_PEARSON and not math.isnan(low))))
    return out


__all__ = [
    "BASELINES",
    "BenchConfig",
    "BenchReport",
    "ParityResult",
    "Result",
    "check_parity",
    "load_model",
    "make_batches",
    "parse_top_ks",
    "pearson",
    "resolve_device",
    "run_bench",
]
