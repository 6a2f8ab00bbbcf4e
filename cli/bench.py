"""``gradcam-batch bench``: throughput next to pure inference, pytorch-grad-cam and captum."""

from __future__ import annotations

import json

import click

from gradcam_batch.engine.bench import BASELINES, METHOD_BASELINES


@click.command()
@click.option(
    "--model",
    "model_spec",
    default="torchvision:resnet50",
    show_default=True,
    help="Model spec: torchvision:NAME (random weights unless --weights).",
)
@click.option("--weights", type=click.Path(dir_okay=False), help="State dict file for the model (weights_only load).")
@click.option("--batch-size", default=16, show_default=True, type=int, help="Images per batch.")
@click.option("--image-size", default=224, show_default=True, type=int, help="Height and width of the inputs.")
@click.option("--top-k", default="1,5", show_default=True, help="Comma-separated numbers of classes to explain.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16", "fp16"]), help="Model dtype."
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
    "--compile/--no-compile",
    "compile_",
    default=False,
    show_default=True,
    help="torch.compile the engine's backbone (and the model, for the inference limit).",
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
def bench(
    model_spec, weights, batch_size, image_size, top_k, device, precision, iters, warmup, baselines, methods,
    scorecam_batch, vjp_strategy, compile_, end_to_end, e2e_images, check, json_path, seed,
) -> None:  # fmt: skip
    """Time Grad-CAM on synthetic batches next to pure inference and the usual libraries.

    Every contender gets the same model, target layer, batches, device and precision; rounds
    are interleaved and the median after warm-up is reported.
    """
    from gradcam_batch.engine.bench.harness import BenchConfig, load_model, run_bench

    cfg = BenchConfig(
        model=model_spec,
        weights=weights,
        batch_size=batch_size,
        image_size=image_size,
        top_k=top_k,
        device=device,
        precision=precision,
        iters=iters,
        warmup=warmup,
        baselines=baselines,
        vjp_strategies=vjp_strategy,
        compile=compile_,
        end_to_end=end_to_end,
        e2e_images=e2e_images,
        seed=seed,
        check=check,
        methods=methods or (),
        scorecam_batch=scorecam_batch,
    )
    try:
        cfg.validate()
        model = load_model(cfg.model, cfg.weights)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
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
