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

import dataclasses
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
from gradcam_batch.engine.errors import first_line
from gradcam_batch.engine.explain.compiled import backbone_context, prepare_input
from gradcam_batch.engine.explain.explainer import VJP_STRATEGIES, Explainer
from gradcam_batch.engine.job.config import resolve_device

# The import module and PyPI name that provide each library baseline.
_BASELINE_PACKAGES = {
    PYTORCH_GRAD_CAM: ("pytorch_grad_cam", "grad-cam"),
    CAPTUM: ("captum", "captum"),
    TORCHCAM: ("torchcam", "torchcam"),
}
PRECISIONS = ("fp32", "bf16", "fp16")
PARITY_MIN_PEARSON = 0.999


# -- models ---------------------------------------------------------------------------------------
def load_model(
    spec: str, weights: str | None = None, *, num_classes: int | None = None, weights_strict: bool = True
) -> nn.Module:
    """A torch model from ``spec`` (``torchvision:NAME`` with random weights, ``file.py:FACTORY``, ...).

    The specs are those of ``gradcam_batch.engine.models.loader.load_model``; the benchmark needs an
    ``nn.Module`` that every contender can run, so ONNX files and compiled programs are refused.
    """
    from gradcam_batch.engine.models.loader import load_model as load_any

    model = load_any(spec, weights=weights, num_classes=num_classes, weights_strict=weights_strict)
    if not isinstance(model, nn.Module) or getattr(model, "explain_unsupported", None):
        raise ValueError(f"bench needs a torch nn.Module that the baselines can run too; {spec!r} is not one")
    return model


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
def default_baselines(methods: Sequence[str]) -> tuple[str, ...]:
    return METHOD_BASELINES if methods else BASELINES


@dataclass(frozen=True)
class BenchConfig:
    """What to time. The fields hold typed values; ``parse`` reads the command line's comma lists into them,
    and ``validate`` checks them (one ``ValueError`` per bad value) without converting anything."""

    model: str = "torchvision:resnet50"
    weights: str | None = None
    weights_strict: bool = True
    num_classes: int | None = None
    batch_size: int = 16
    image_size: int = 224
    top_k: tuple[int, ...] = (1, 5)
    device: str = "auto"
    precision: str = "fp32"
    iters: int = 10
    warmup: int = 2
    baselines: tuple[str, ...] | None = None  # None: default_baselines(methods)
    vjp_strategies: tuple[str, ...] = ("vmap",)
    compile: bool = False
    end_to_end: bool = False
    e2e_images: int | None = None  # JPEGs in the end-to-end dataset; default 4 batches
    n_batches: int = 4
    seed: int = 0
    check: bool = False
    methods: tuple[str, ...] = ()  # CAM methods to time against the libraries (engine/bench/methods.py)
    scorecam_batch: int = 64

    @classmethod
    def parse(
        cls, *, top_k: str, baselines: str | None, vjp_strategies: str, methods: str | None, **fields
    ) -> BenchConfig:
        """The command line's comma-separated lists as typed fields; the other fields pass as they are."""
        from gradcam_batch.engine.explain.methods import parse_methods

        chosen = parse_methods(methods) if methods else ()
        allowed = default_baselines(chosen)
        return cls(
            top_k=parse_top_ks(top_k),
            baselines=allowed if baselines is None else parse_names(baselines, allowed, "baseline"),
            vjp_strategies=parse_names(vjp_strategies, VJP_STRATEGIES, "vjp strategy"),
            methods=chosen,
            **fields,
        )

    def validate(self) -> None:
        for name in ("batch_size", "image_size", "iters", "warmup", "n_batches", "seed", "scorecam_batch"):
            _check_int(name, getattr(self, name))
        for name in ("e2e_images", "num_classes"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name))
        for name in ("weights_strict", "compile", "end_to_end", "check"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
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
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {self.num_classes}")
        if self.n_batches < 1:
            raise ValueError(f"n_batches must be at least 1, got {self.n_batches}")
        if self.scorecam_batch < 1:
            raise ValueError(f"scorecam batch must be positive, got {self.scorecam_batch}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; expected one of {', '.join(PRECISIONS)}")
        if not (
            isinstance(self.top_k, tuple)
            and self.top_k
            and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in self.top_k)
            and len(set(self.top_k)) == len(self.top_k)
        ):
            raise ValueError(f"top_k must be a tuple of positive integers, each once, got {self.top_k!r}")
        for name in ("methods", "vjp_strategies") + (("baselines",) if self.baselines is not None else ()):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{name} must be a tuple of names, got {value!r}")
        if self.methods:
            from gradcam_batch.engine.explain.methods import parse_methods

            if parse_methods(self.methods) != self.methods:  # raises for an unknown name
                raise ValueError(f"methods must be unique lower-case names, got {self.methods!r}")
        if self.baselines is not None:
            _check_names(self.baselines, default_baselines(self.methods), "baseline")
        _check_names(self.vjp_strategies, VJP_STRATEGIES, "vjp strategy")
        resolve_device(self.device)  # the engine's: the same message as `run`


def _check_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")


def _check_names(names: tuple[str, ...], allowed: Sequence[str], what: str) -> None:
    if parse_names(names, allowed, what) != names:
        raise ValueError(f"each {what} once, please; got {', '.join(names)}")


# -- contenders: identity as data -----------------------------------------------------------------
@dataclass(frozen=True)
class Contender:
    """Who is timed: a library (``engine/bench/__init__.py`` names them), the CAM methods of one call (empty for
    pure inference; several: the engine's whole list in one call), top-k (None for inference), and how it
    runs. Results, ratios and the table's order are keyed on it; ``label`` formats it for the table."""

    library: str
    methods: tuple[str, ...] = ()
    top_k: int | None = None
    precision: str = "fp32"
    compile: bool = False
    vjp_strategy: str | None = None  # the engine's contenders only


def contenders(cfg: BenchConfig) -> list[Contender]:
    """Every contender of ``cfg``, in the table's order: the one place that decides who runs.

    Libraries that lack a method or are not installed stay in the list; ``run_bench`` reports them skipped.
    """
    from gradcam_batch.engine.bench.methods import LIBRARIES

    baselines = cfg.baselines if cfg.baselines is not None else default_baselines(cfg.methods)
    p = cfg.precision
    out = []
    if INFERENCE in baselines:
        # The limit stays eager (the reference of the ratios); with compile, the compiled model is a second row.
        out.append(Contender(INFERENCE, precision=p))
        if cfg.compile:
            out.append(Contender(INFERENCE, precision=p, compile=True))
    ours = [(m,) for m in cfg.methods] + ([cfg.methods] if len(cfg.methods) > 1 else []) or [("gradcam",)]
    for k in cfg.top_k:
        out += [Contender(OURS, ms, k, p, cfg.compile, s) for s in cfg.vjp_strategies for ms in ours]
        for lib in LIBRARIES:
            if lib in baselines:
                out += [Contender(lib, (m,), k, p) for m in cfg.methods or ("gradcam",)]
    if cfg.end_to_end:
        out += [Contender(END_TO_END, ("gradcam",), k, p, cfg.compile) for k in cfg.top_k]
    return out


def label(c: Contender, cfg: BenchConfig) -> str:
    """The table's name of ``c``: the method in brackets with --methods, the VJP strategy when several are timed."""
    if c.library == INFERENCE:
        return INFERENCE_COMPILED if c.compile else INFERENCE
    if c.library == END_TO_END:
        return END_TO_END
    tags = []
    if cfg.methods:
        tags.append(c.methods[0] if len(c.methods) == 1 else f"{len(c.methods)} methods")
    if c.library == OURS and len(cfg.vjp_strategies) > 1:
        tags.append(str(c.vjp_strategy))
    return c.library + (f"[{', '.join(tags)}]" if tags else "")


@dataclass
class Result:
    """One contender at one top-k (None for pure inference)."""

    key: Contender
    contender: str  # the key's label, for the table and the JSON
    status: str  # "ok", "skipped" (not installed) or "failed"
    reason: str = ""
    times_s: list[float] = field(default_factory=list)  # per batch, after warm-up
    median_s: float | None = None
    img_per_s: float | None = None
    vs_inference: float | None = None  # img/s over pure inference's img/s
    speedup: dict[str, float] = field(default_factory=dict)  # ours only: img/s over each baseline's
    top_k: int | None = field(init=False)

    def __post_init__(self) -> None:
        self.top_k = self.key.top_k


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
        """The result whose label is ``contender`` (a convenience for readers of the table)."""
        for r in self.results:
            if r.contender == contender and r.top_k == top_k:
                return r
        raise KeyError((contender, top_k))

    def format_table(self) -> str:
        """The results as an aligned plain-text table, followed by skipped/failed notes."""
        c = self.config
        base = [b for b in (PYTORCH_GRAD_CAM, CAPTUM, TORCHCAM) if any(r.key.library == b for r in self.results)]
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
            row += [_fmt_ratio(r.speedup.get(b)) if r.key.library in (OURS, END_TO_END) else "" for b in base]
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
    ok = {r.key: r for r in results if r.status == "ok"}
    out = []
    for key, r in ok.items():
        if key.library == OURS and len(key.methods) > 1:
            alone = ok.get(dataclasses.replace(key, methods=("gradcam",)))
            if alone is not None:
                what = f"{len(key.methods)} methods"
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
class _Timed:
    key: Contender
    run: Callable[[int], object]  # batch index -> runs one batch
    release: Callable[[], None] = lambda: None


def _one_line(e: BaseException) -> str:
    """A contender's failure: its type, which says more than the text of a library's error, and its first line."""
    return f"{type(e).__name__}: {first_line(e)}" if str(e).strip() else type(e).__name__


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# -- contenders, ready to time ---------------------------------------------------------------------
def _explainer(model: nn.Module, key: Contender, cfg: BenchConfig) -> Explainer:
    methods = list(key.methods) if len(key.methods) > 1 else key.methods[0]
    return Explainer(
        model,
        method=methods,
        vjp_strategy=key.vjp_strategy or "auto",
        precision=key.precision,
        compile=key.compile,
        scorecam_batch=cfg.scorecam_batch,
    )


def _prepare(
    keys: list[Contender], cfg: BenchConfig, model, explainers, batches, classes, ctx
) -> tuple[list[_Timed], list[Result]]:
    """The timed calls of ``keys`` (inference, the engine's explainers, the libraries), and a skipped or failed
    result for each library that cannot run. The end-to-end contenders run after the rounds."""
    from gradcam_batch.engine.bench.methods import LIBRARIES

    timed: list[_Timed] = []
    unavailable: list[Result] = []
    layer = next(iter(explainers.values())).target_layer
    for key in keys:
        if key.library == INFERENCE:
            m = torch.compile(model) if key.compile else model

            def infer(i: int, m=m) -> object:
                with torch.inference_mode(), ctx():
                    return m(batches[i])

            timed.append(_Timed(key, infer))
        elif key.library == OURS:
            e, k = explainers[key.methods, key.vjp_strategy], key.top_k
            timed.append(_Timed(key, lambda i, e=e, k=k: e(batches[i], top_k=k)))
        elif key.library in LIBRARIES:
            known, make = LIBRARIES[key.library]
            module, dist = _BASELINE_PACKAGES[key.library]
            method = key.methods[0]
            if method not in known:
                unavailable.append(Result(key, label(key, cfg), "skipped", f"{key.library} has no {method}"))
            elif not _installed(module):
                unavailable.append(Result(key, label(key, cfg), "skipped", f"not installed (pip install {dist})"))
            else:
                try:
                    run, release = make(model, layer, method, batches, classes, key.top_k, ctx, cfg.scorecam_batch)
                    timed.append(_Timed(key, run, release))
                except Exception as e:  # a library that cannot even be set up is reported, not fatal
                    unavailable.append(Result(key, label(key, cfg), "failed", _one_line(e)))
    return timed, unavailable


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
    if cfg.baselines is None:
        cfg = dataclasses.replace(cfg, baselines=default_baselines(cfg.methods))
    cfg.validate()
    device = resolve_device(cfg.device)
    if model is None:
        model = load_model(cfg.model, cfg.weights, num_classes=cfg.num_classes, weights_strict=cfg.weights_strict)
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
    keys = contenders(cfg)
    explainers = {(key.methods, key.vjp_strategy): _explainer(model, key, cfg) for key in keys if key.library == OURS}
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

    timed, results = _prepare(keys, cfg, model, explainers, batches, classes, ctx)
    timer = _Timer(device)
    times: dict[int, list[float]] = {i: [] for i in range(len(timed))}
    failed: dict[int, str] = {}
    try:
        rounds = cfg.warmup + cfg.iters
        for it in range(rounds):
            if progress is not None:
                progress(f"round {it + 1}/{rounds}" + (" (warm-up)" if it < cfg.warmup else ""))
            n = len(timed)
            for j in range(n):
                idx = (j + it) % n  # rotate the order so no contender always runs first
                if idx in failed:
                    continue
                batch_index = (it + idx) % len(batches)
                try:
                    dt = timer(lambda c=timed[idx], b=batch_index: c.run(b))
                except Exception as e:  # e.g. a baseline that does not support bf16
                    failed[idx] = _one_line(e)
                    continue
                if it >= cfg.warmup:
                    times[idx].append(dt)
    finally:
        for c in timed:
            c.release()

    for i, c in enumerate(timed):
        name = label(c.key, cfg)
        if i in failed:
            results.append(Result(c.key, name, "failed", failed[i]))
            continue
        med = statistics.median(times[i])
        results.append(Result(c.key, name, "ok", times_s=times[i], median_s=med, img_per_s=cfg.batch_size / med))
    if cfg.end_to_end:
        results += run_end_to_end(cfg, [k for k in keys if k.library == END_TO_END], progress)
    _fill_ratios(results)
    order = {key: i for i, key in enumerate(keys)}
    results.sort(key=lambda r: (r.top_k or 0, order[r.key]))
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


def run_end_to_end(
    cfg: BenchConfig, keys: Sequence[Contender], progress: Callable[[str], None] | None = None
) -> list[Result]:
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
        return [Result(key, END_TO_END, "skipped", f"the run pipeline is not available ({e})") for key in keys]
    n = cfg.e2e_images or 4 * cfg.batch_size
    out: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="gradcam-batch-bench-") as tmp:
        data = write_jpeg_dataset(os.path.join(tmp, "images.parquet"), n, cfg.image_size, cfg.seed)
        for key in keys:
            k = key.top_k
            if progress is not None:
                progress(f"end-to-end: {n} JPEGs, top-{k}")
            run_cfg = RunConfig(
                inputs=[data],
                output=os.path.join(tmp, f"out-top{k}"),
                model=cfg.model,
                weights=cfg.weights,
                weights_strict=cfg.weights_strict,
                num_classes=cfg.num_classes,
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
                out.append(Result(key, END_TO_END, "failed", _one_line(e)))
                continue
            ips = float(summary["images_per_s"])
            per_batch = cfg.batch_size / ips if ips > 0 else float("nan")
            out.append(
                Result(key, END_TO_END, "ok", times_s=[float(summary["seconds"])], median_s=per_batch, img_per_s=ips)
            )
    return out


def _fill_ratios(results: list[Result]) -> None:
    """img/s over eager inference's, and the engine's img/s over each library's at the same methods and top-k."""
    ok = {r.key: r for r in results if r.status == "ok"}
    inf = next((r for key, r in ok.items() if key.library == INFERENCE and not key.compile), None)
    for key, r in ok.items():
        if inf is not None:
            r.vs_inference = r.img_per_s / inf.img_per_s
        if key.library in (OURS, END_TO_END):
            for b in (PYTORCH_GRAD_CAM, CAPTUM, TORCHCAM):
                other = next(
                    (o for k, o in ok.items() if (k.library, k.methods, k.top_k) == (b, key.methods, key.top_k)), None
                )
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
    "Contender",
    "ParityResult",
    "Result",
    "check_parity",
    "contenders",
    "label",
    "load_model",
    "make_batches",
    "parse_top_ks",
    "pearson",
    "run_bench",
]
