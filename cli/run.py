"""``gradcam-batch run``: Parquet in, Grad-CAM heatmaps out, resumable."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from gradcam_batch.cli.options import (
    BadInvocation,
    compute_options,
    model_options,
    parse_floats3,
    parse_int_list,
    parse_size,
    split_names,
)


def _is_default(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) in (click.core.ParameterSource.DEFAULT, None)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1, metavar="INPUT...")
@click.option(
    "-o", "--output", type=click.Path(file_okay=False), required=True, help="Output directory (never an input one)."
)
@model_options
@click.option("--top-k", type=click.IntRange(min=1), help="Explain the K highest-scoring classes. [default: 1]")
@click.option("--classes", "classes_text", metavar="3,17,42", help="Explain these classes for every image.")
@click.option(
    "--label-column", metavar="COL", help="Ground-truth class column; explained too, and combined with --top-k."
)
@click.option("--image-column", metavar="COL", help="Column with the images (bytes, HF struct, or paths). Auto.")
@click.option("--id-column", metavar="COL", help="Column to use as id. [default: <input file>:<row>]")
@click.option("--keep-columns", multiple=True, metavar="A,B", help="Input columns passed through to the output.")
@click.option("--resize", default="256", show_default=True, help="Shorter side N, exact HxW, or none.")
@click.option("--crop", default="224", show_default=True, help="Center crop N or HxW, or none.")
@click.option("--mean", default="0.485,0.456,0.406", show_default=True, help="Normalization mean (R,G,B).")
@click.option("--std", default="0.229,0.224,0.225", show_default=True, help="Normalization std (R,G,B).")
@compute_options
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Decode threads; with --ray, Ray actors (one model each). [default: min(8, CPUs); with --ray, GPUs/actor]",
)
@click.option("--ray", "use_ray", is_flag=True, help="Run on Ray Data: all local GPUs, or a cluster (--ray-address).")
@click.option("--ray-address", metavar="ADDR", help="With --ray: auto (this machine's cluster) or ray://HOST:PORT.")
@click.option(
    "--num-gpus-per-worker",
    type=click.FloatRange(min=0),
    help="With --ray: GPUs per actor (0.5 puts two on a GPU). [default: 1 when the cluster has GPUs, else 0]",
)
@click.option(
    "--device-jpeg/--no-device-jpeg",
    default=False,
    show_default=True,
    help="Decode JPEGs with torchvision on the compute device (nvJPEG on CUDA); other formats stay on Pillow.",
)
@click.option(
    "--heatmap-size", default="input", show_default=True, help="N, HxW, input (the model's input size), or none."
)
@click.option("--heatmap-dtype", type=click.Choice(["uint8", "float16"]), default="uint8", show_default=True)
@click.option(
    "--rows-per-file", default=10_000, show_default=True, type=click.IntRange(min=1), help="Output rows per file."
)
@click.option(
    "--resume/--overwrite",
    default=True,
    show_default=True,
    help="Continue an interrupted run in OUTPUT, or replace what is there.",
)
@click.option("--limit", type=click.IntRange(min=0), help="Explain only the first N input rows.")
@click.option("--fail-on-error", is_flag=True, help="Exit with status 1 when any image could not be explained.")
@click.option("--progress/--no-progress", default=None, help="Progress bar. [default: when stderr is a terminal]")
@click.option("--summary-json", type=click.Path(dir_okay=False), help="Also write the summary as JSON here.")
@click.pass_context
def run(ctx: click.Context, inputs, output, model_spec, weights, num_classes, providers, reshape, token_grid,
        target_layer, method, counterfactual,
        top_k, classes_text, label_column, image_column, id_column, keep_columns, resize, crop, mean, std, batch_size,
        device, precision, compile, workers, device_jpeg, heatmap_size, heatmap_dtype, rows_per_file, resume, limit,
        fail_on_error, progress, summary_json, use_ray, ray_address, num_gpus_per_worker) -> None:  # fmt: skip
    """Explain every image of Parquet INPUT files (files, directories, globs or URIs) into OUTPUT.

    One output row per explained (image, class): id, kept columns, class_index, class_rank, label,
    score, probability, cam, heatmap, peak_y, peak_x, cam_max, status, error; zstd Parquet files
    and a manifest.json. Killed runs resume exactly once when the same command is run again.

    With no INPUT and no --model, the embedded demo sample and checkpoint are used.

    \b
    Example:
      gradcam-batch run data/ -o out/ --model torchvision:resnet50 --weights r50.pt \\
          --top-k 3 --label-column label --keep-columns path
    """
    from gradcam_batch.engine.pipeline import RunConfig, RunSetupError, prepare, summary_line

    demo = not inputs and not model_spec
    if demo:
        from gradcam_batch.engine import demo_assets

        inputs = (str(demo_assets.SAMPLE),)
        model_spec, weights = demo_assets.MODEL_SPEC, str(demo_assets.CHECKPOINT)
        prep = demo_assets.PREPROCESS
        if _is_default(ctx, "resize"):
            resize = str(prep["resize"])
        if _is_default(ctx, "crop"):
            crop = "{}x{}".format(*prep["crop"])
        if _is_default(ctx, "mean"):
            mean = ",".join(str(v) for v in prep["mean"])
        if _is_default(ctx, "std"):
            std = ",".join(str(v) for v in prep["std"])
        if label_column is None and top_k is None and classes_text is None:
            label_column = "label"
    elif not inputs:
        raise BadInvocation("no INPUT given (Parquet files, directories or globs)")
    elif not model_spec:
        raise BadInvocation("--model is required with an INPUT (e.g. --model torchvision:resnet50)")

    config = RunConfig(
        inputs=list(inputs),
        output=output,
        model=model_spec,
        weights=weights,
        num_classes=num_classes,
        target_layer=target_layer,
        method=method,
        counterfactual=counterfactual,
        top_k=top_k,
        classes=parse_int_list(classes_text, what="--classes"),
        label_column=label_column,
        image_column=image_column,
        id_column=id_column,
        keep_columns=split_names(keep_columns),
        resize=parse_size(resize, what="--resize"),
        crop=_square(parse_size(crop, what="--crop")),
        mean=parse_floats3(mean, what="--mean"),
        std=parse_floats3(std, what="--std"),
        batch_size=batch_size,
        device=device,
        precision=precision,
        compile=compile,
        reshape=reshape,
        token_grid=token_grid,
        providers=split_names(providers) or None,
        workers=workers,
        device_jpeg=device_jpeg,
        heatmap_size=_square(parse_size(heatmap_size, what="--heatmap-size", allow=("none", "input"))),
        heatmap_dtype=heatmap_dtype,
        rows_per_file=rows_per_file,
        overwrite=not resume,
        limit=limit,
        progress=sys.stderr.isatty() if progress is None else progress,
    )
    if not use_ray and (ray_address or num_gpus_per_worker is not None):
        raise BadInvocation("--ray-address and --num-gpus-per-worker need --ray")
    try:
        job = _prepare_ray(config, ray_address, workers, num_gpus_per_worker) if use_ray else prepare(config)
    except RunSetupError as exc:
        raise BadInvocation(str(exc)) from None
    if job.manifest is not None and job.manifest.data.get("status") == "complete":
        click.echo(f"{output} is complete already; nothing to do (--overwrite recomputes it)", err=True)
    try:
        summary = job.run()
    except (OSError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise click.ClickException(f"the run stopped: {first}; rerun the same command to resume") from None
    click.echo(summary_line(summary))
    if summary_json:
        Path(summary_json).write_text(json.dumps(summary, indent=2) + "\n")
    if fail_on_error and summary["totals"]["errors"]:
        raise click.ClickException(
            f"{summary['totals']['errors']} images could not be explained (rows with status='error')"
        )


def _prepare_ray(config, address, workers, num_gpus_per_worker):
    """``--ray``: the same job on Ray Data (``engine/ray_job.py``); Ray is imported only here."""
    from gradcam_batch.engine.ray_job import RayOptions, prepare_ray

    options = RayOptions(address=address, workers=workers, num_gpus_per_worker=num_gpus_per_worker)
    return prepare_ray(config, options, log=lambda line: click.echo(line, err=True))


def _square(size):
    return (size, size) if isinstance(size, int) else size
