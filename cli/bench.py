"""``gradcam-batch bench``: throughput next to pure inference, pytorch-grad-cam and captum."""

from __future__ import annotations

import json

import click

from gradcam_batch.cli.options import BadInvocation, compute_options, model_source_options
from gradcam_batch.engine.bench import BASELINES, METHOD_BASELINES

DEFAULT_MODEL = "torchvision:resnet50"


@click.command()
@model_source_options
@compute_options(batch_size=16)
@click.option("--image-size", default=224, show_default=True, type=int, help="Height and width of the inputs.")
@click.option(
    "--top-k",
    default="1,5",
    show_default=True,
    help="Comma-separated numbers of classes to explain (--task segmentation: one number, default 3).",
)
@click.option("--iters", default=10, show_default=True, type=int, help="Timed rounds (each runs every contender).")
@click.option("--warmup", default=2, show_default=True, type=int, help="Untimed rounds first.")
@click.option(
    "--baselines",
    help=f"Comma-separated contenders besides gradcam-batch. [default: {','.join(BASELINES)}; with --methods: "
    f"{','.join(METHOD_BASELINES)}]",
)
@click.option(
    "--methods",
    metavar="NAME[,NAME...]",
    help="Time these CAM methods instead of Grad-CAM alone: each against pure inference and against "
    "pytorch-grad-cam's and torchcam's implementation of it, and the whole list in one call.",
)
@click.option(
    "--scorecam-batch", default=64, show_default=True, type=int, help="Score-CAM's masked images per forward."
)
@click.option(
    "--vjp-strategy",
    default="vmap",
    show_default=True,
    help="Comma-separated engine VJP strategies to time (vmap, loop, batched_grad); non-linear heads only.",
)
@click.option(
    "--end-to-end",
    is_flag=True,
    help="Also time the full `run` pipeline (JPEG decode -> explain -> Parquet) on generated JPEGs.",
)
@click.option("--e2e-images", type=int, help="JPEGs in the end-to-end dataset [default: 4 batches].")
@click.option("--check", is_flag=True, help="Also check raw-cam parity (Pearson) with the baselines.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), help="Write the results as JSON.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the synthetic inputs.")
@click.option(
    "--task",
    type=click.Choice(["classification", "segmentation"]),
    default="classification",
    show_default=True,
    help="segmentation: the top-K predicted regions of a segmentation model (default "
    "torchvision:lraspp_mobilenet_v3_large) against its inference and pytorch-grad-cam class by class.",
)
@click.pass_context
def bench(
    ctx, model_spec, weights, weights_strict, num_classes, batch_size, device, precision, compile, image_size, top_k,
    iters, warmup, baselines, methods, scorecam_batch, vjp_strategy, end_to_end, e2e_images, check, json_path, seed,
    task,
) -> None:  # fmt: skip
    """Time Grad-CAM on synthetic batches next to pure inference and the usual libraries.

    Every contender gets the same model, target layer, batches, device and precision; rounds
    are interleaved and the median after warm-up is reported. The model is torchvision:resnet50
    (random weights) unless --model says otherwise; --compile compiles the engine's backbone and
    adds a compiled-model row next to the eager inference limit.
    """
    from gradcam_batch.engine.bench.harness import BenchConfig, load_model, run_bench

    if task == "segmentation":
        report = _segmentation(ctx, model_spec, weights, weights_strict, num_classes, top_k, baselines)
        click.echo(report.format_table())
        if json_path:
            with open(json_path, "w") as f:
                json.dump(report.to_dict(), f, indent=2)
            click.echo(f"wrote {json_path}", err=True)
        return
    try:
        cfg = BenchConfig.parse(
            top_k=top_k,
            baselines=baselines,
            vjp_strategies=vjp_strategy,
            methods=methods,
            model=model_spec or DEFAULT_MODEL,
            weights=weights,
            weights_strict=weights_strict,
            num_classes=num_classes,
            batch_size=batch_size,
            image_size=image_size,
            device=device,
            precision=precision,
            iters=iters,
            warmup=warmup,
            compile=compile,
            end_to_end=end_to_end,
            e2e_images=e2e_images,
            seed=seed,
            check=check,
            scorecam_batch=scorecam_batch,
        )
        cfg.validate()
        model = load_model(cfg.model, cfg.weights, num_classes=cfg.num_classes, weights_strict=cfg.weights_strict)
    except ValueError as e:  # a bad value, or the loader's ModelSpecError: one line, exit 2, as in `run`
        raise BadInvocation(str(e)) from None
    try:
        report = run_bench(cfg, model=model, progress=lambda msg: click.echo(msg, err=True))
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(report.format_table())
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
        click.echo(f"wrote {json_path}", err=True)
    if any(not p.passed for p in report.parity):
        raise click.ClickException("parity check failed: see the table above")


def _segmentation(ctx, model_spec, weights, weights_strict, num_classes, top_k, baselines):
    """``--task segmentation`` (``engine/bench/segmentation.py``): one top-K, CPU or the given device's
    figures at --image-size and --batch-size, --iters timed rounds after --warmup."""
    from gradcam_batch.engine.bench.harness import load_model
    from gradcam_batch.engine.bench.segmentation import DEFAULT_MODEL, run_segmentation_bench

    p = ctx.params
    for name, flag in (("methods", "--methods"), ("end_to_end", "--end-to-end"), ("check", "--check")):
        if p[name]:
            raise BadInvocation(f"{flag} applies to classifiers; --task segmentation times the top-K regions only")
    if p["compile"] or p["precision"] != "fp32" or p["device"] not in ("auto", "cpu"):
        raise BadInvocation("--task segmentation runs in fp32 on the CPU, uncompiled, for now")
    if ctx.get_parameter_source("top_k") == click.core.ParameterSource.DEFAULT:
        top_k = "3"  # the classifiers' default, 1,5, is two figures; a segmentation bench times one top-K
    try:
        k = [int(v) for v in str(top_k).split(",")]
    except ValueError:
        raise BadInvocation(f"--top-k must be one positive integer with --task segmentation, got {top_k!r}") from None
    if len(k) != 1 or k[0] < 1:
        raise BadInvocation(f"--top-k must be one positive integer with --task segmentation, got {top_k!r}")
    chosen = tuple(b.strip() for b in (baselines or "inference,pytorch-grad-cam").split(",") if b.strip())
    unknown = [b for b in chosen if b not in ("inference", "pytorch-grad-cam")]
    if unknown:
        raise BadInvocation(
            f"unknown baseline {unknown[0]!r} for --task segmentation; expected inference, pytorch-grad-cam"
        )
    if p["iters"] < 1 or p["warmup"] < 0 or p["image_size"] < 8 or p["batch_size"] < 1:
        raise BadInvocation("--iters and --batch-size must be >= 1, --warmup >= 0 and --image-size >= 8")
    spec = model_spec or DEFAULT_MODEL
    try:
        model = load_model(spec, weights, num_classes=num_classes, weights_strict=weights_strict)
        return run_segmentation_bench(
            model,
            spec=spec,
            size=p["image_size"],
            batch=p["batch_size"],
            top_k=k[0],
            repeats=p["iters"],
            warmup=p["warmup"],
            vary_weights=weights is None,
            baselines=("inference", *[b for b in chosen if b != "inference"]),
            seed=p["seed"],
        )
    except ValueError as e:  # a bad model spec, a model that is not a segmentation model: one line, exit 2
        raise BadInvocation(str(e).splitlines()[0]) from None
