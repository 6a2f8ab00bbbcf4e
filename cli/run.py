"""``gradcam-batch run``: Parquet in, Grad-CAM heatmaps out, resumable."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import click

from gradcam_batch.cli.options import (
    BadInvocation,
    Interrupted,
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
@click.option(
    "--interpolation",
    type=click.Choice(["nearest", "bilinear", "bicubic", "lanczos"]),
    default="bilinear",
    show_default=True,
    help="Resize filter. timm: and hf: models bring their own resize, crop, mean, std and interpolation; "
    "these options override them.",
)
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
@click.option(
    "--heatmap-dtype",
    type=click.Choice(["uint8", "float16"]),
    default="uint8",
    show_default=True,
    help="Heatmap values: uint8 is round(255 x) of the [0, 1] map.",
)
@click.option(
    "--cam-dtype",
    type=click.Choice(["float16", "float32"]),
    default="float16",
    show_default=True,
    help="The cam column's dtype; float32 keeps cams above float16's 65504 (those are error rows in float16).",
)
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
@click.option(
    "--max-image-pixels",
    default="178956970",
    show_default=True,
    help="Images with more pixels (a JPEG: after decoding at reduced scale) become error rows; "
    "the default is Pillow's own limit.",
)
@click.option(
    "--decode-memory-mb",
    default=1024,
    show_default=True,
    type=click.IntRange(min=0),
    help="Full-size pixels the decode threads may hold at once; huge images decode one at a time. 0: no bound.",
)
@click.option(
    "--metrics",
    "metrics_text",
    metavar="deletion,insertion,confidence",
    help="Faithfulness metrics per row: deletion and insertion AUC (RISE), average drop/increase in confidence.",
)
@click.option(
    "--metrics-steps", default=20, show_default=True, type=click.IntRange(min=1), help="Deletion/insertion steps."
)
@click.option(
    "--metrics-batch", type=click.IntRange(min=1), help="Perturbed images per forward pass. [default: --batch-size]"
)
@click.option(
    "--box-column",
    metavar="COL|X0,Y0,X1,Y1",
    help="Ground-truth boxes (list<list<float>[4]>, list<float>[4], HF struct<bbox, category>, or four coordinate "
    "columns): adds pointing_hit, box_energy, pred_box, box_iou.",
)
@click.option(
    "--box-format",
    type=click.Choice(["xyxy", "coco"]),
    default="xyxy",
    show_default=True,
    help="Box coordinates: x0,y0,x1,y1 or COCO's x,y,width,height.",
)
@click.option(
    "--pointing-tolerance",
    default=15.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Pixels (pointing game).",
)
@click.option(
    "--box-threshold",
    default=0.15,
    show_default=True,
    type=click.FloatRange(min=0, max=1, min_open=True),
    help="Share of the map's max that bounds the paper's box.",
)
@click.option("--num-cpus-per-worker", type=click.FloatRange(min=0), help="With --ray: CPUs per actor. [default: 1]")
@click.option(
    "--num-cpus-per-read", type=click.FloatRange(min=0), help="With --ray: CPUs per read-and-decode task. [default: 1]"
)
@click.pass_context
def run(ctx: click.Context, inputs, **opts) -> None:
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
    try:
        _run(ctx, inputs, opts)
    except KeyboardInterrupt:  # Ctrl-C: the whole units written so far are committed
        raise Interrupted() from None


def _run(ctx: click.Context, inputs, opts: dict) -> None:
    from gradcam_batch.engine.job.config import RunFailed, RunSetupError
    from gradcam_batch.engine.job.local import prepare
    from gradcam_batch.engine.job.session import summary_line

    ray_opts = {k: opts.pop(k) for k in _RAY_OPTIONS}
    use_ray = ray_opts.pop("use_ray")
    fail_on_error, summary_json = opts.pop("fail_on_error"), opts.pop("summary_json")
    if not inputs and not opts["model_spec"]:
        _demo_defaults(ctx, opts)
        from gradcam_batch.engine.demo import assets as demo_assets

        inputs = (str(demo_assets.SAMPLE),)
    elif not inputs:
        raise BadInvocation("no INPUT given (Parquet files, directories or globs)")
    elif not opts["model_spec"]:
        raise BadInvocation("--model is required with an INPUT (e.g. --model torchvision:resnet50)")
    if not use_ray and any(v is not None for v in ray_opts.values()):
        raise BadInvocation("--ray-address, --num-gpus-per-worker and --num-cpus-per-* need --ray")
    from gradcam_batch.cli.preprocessing import apply_model_prep

    apply_model_prep(opts, lambda name: _is_default(ctx, name))
    config = run_config(inputs, opts)
    # The pixel cap is the policy now; Pillow's warning for images near its own limit is noise.
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    warnings.formatwarning = format_run_warning
    try:
        job = _prepare_ray(config, opts["workers"], **ray_opts) if use_ray else prepare(config)
    except RunSetupError as exc:
        raise BadInvocation(str(exc)) from None
    if job.manifest is not None and job.manifest.data.get("status") == "complete":
        click.echo(f"{opts['output']} is complete already; nothing to do (--overwrite recomputes it)", err=True)
    try:
        summary = job.run()
    except RunSetupError as exc:  # the output directory is in use, or changed since the plan
        raise BadInvocation(str(exc)) from None
    except RunFailed as exc:
        raise click.ClickException(f"the run stopped: {exc}; {exc.advice}") from None
    click.echo(summary_line(summary))
    if summary_json:
        Path(summary_json).write_text(json.dumps(summary, indent=2) + "\n")
    if fail_on_error and summary["totals"]["errors"]:
        raise click.ClickException(
            f"{summary['totals']['errors']} images could not be explained (rows with status='error')"
        )


def format_run_warning(message, category, filename, lineno, line=None, _default=warnings.formatwarning) -> str:
    """A run's own warnings (``RunWarning``) as one line on stderr; other warnings as Python formats them."""
    from gradcam_batch.engine.job.config import RunWarning

    if isinstance(category, type) and issubclass(category, RunWarning):
        return f"warning: {message}\n"
    return _default(message, category, filename, lineno, line)


_RAY_OPTIONS = ("use_ray", "ray_address", "num_gpus_per_worker", "num_cpus_per_worker", "num_cpus_per_read")


def _demo_defaults(ctx: click.Context, opts: dict) -> None:
    """No INPUT and no --model: the embedded sample and checkpoint, with their preprocessing."""
    from gradcam_batch.engine.demo import assets as demo_assets

    opts["model_spec"], opts["weights"] = demo_assets.MODEL_SPEC, str(demo_assets.CHECKPOINT)
    prep = demo_assets.PREPROCESS
    defaults = {
        "resize": str(prep["resize"]),
        "crop": "{}x{}".format(*prep["crop"]),
        "mean": ",".join(str(v) for v in prep["mean"]),
        "std": ",".join(str(v) for v in prep["std"]),
    }
    for name, value in defaults.items():
        if _is_default(ctx, name):
            opts[name] = value
    if opts["label_column"] is None and opts["top_k"] is None and opts["classes_text"] is None:
        opts["label_column"] = "label"


def run_config(inputs, opts: dict):
    """The ``RunConfig`` of the parsed options: options named as fields pass as they are, the rest are parsed."""
    import dataclasses

    from gradcam_batch.engine.job.config import RunConfig

    progress = opts.pop("progress")
    parsed = {
        "model": opts.pop("model_spec"),
        "classes": parse_int_list(opts.pop("classes_text"), what="--classes"),
        "keep_columns": split_names(opts.pop("keep_columns")),
        "resize": parse_size(opts.pop("resize"), what="--resize"),
        "crop": _square(parse_size(opts.pop("crop"), what="--crop")),
        "mean": parse_floats3(opts.pop("mean"), what="--mean"),
        "std": parse_floats3(opts.pop("std"), what="--std"),
        "providers": split_names(opts.pop("providers")) or None,
        "heatmap_size": _square(parse_size(opts.pop("heatmap_size"), what="--heatmap-size", allow=("none", "input"))),
        "max_image_pixels": _pixels(opts.pop("max_image_pixels")),
        "decode_memory_mb": opts.pop("decode_memory_mb") or None,
        "metrics": tuple(split_names((metrics_text,))) if (metrics_text := opts.pop("metrics_text")) else (),
        "overwrite": not opts.pop("resume"),
        "progress": sys.stderr.isatty() if progress is None else progress,
    }
    names = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = set(opts) - names
    if unknown:  # a new option must be parsed above or named as its RunConfig field
        raise RuntimeError(f"options without a RunConfig field: {sorted(unknown)}")
    return RunConfig(inputs=list(inputs), **opts, **parsed)


def _pixels(text: str) -> int:
    try:
        n = int(float(text)) if "e" in str(text).lower() else int(str(text).replace("_", ""))
    except ValueError:
        n = 0
    if n < 1:
        raise click.BadParameter(f"{text!r}: expected a positive pixel count", param_hint="--max-image-pixels")
    return n


def _prepare_ray(config, workers, *, ray_address, num_gpus_per_worker, num_cpus_per_worker, num_cpus_per_read):
    """``--ray``: the same job on Ray Data (``engine/job/ray_runner.py``); Ray is imported only here."""
    import dataclasses

    from gradcam_batch.engine.job.ray_runner import RayOptions, prepare_ray

    options = RayOptions(
        address=ray_address,
        workers=workers,
        num_gpus_per_worker=num_gpus_per_worker,
        num_cpus_per_worker=num_cpus_per_worker,
        num_cpus_per_read=num_cpus_per_read,
    )
    # --workers counts actors under Ray; each actor's decode threads keep their default.
    config = dataclasses.replace(config, workers=None)
    return prepare_ray(config, options, log=lambda line: click.echo(line, err=True))


def _square(size):
    return (size, size) if isinstance(size, int) else size
