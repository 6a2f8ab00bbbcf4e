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
    preprocessing_options,
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
@click.option(
    "--task",
    type=click.Choice(["auto", "softmax", "multilabel", "segmentation"]),
    default="auto",
    show_default=True,
    help="What the model is: a softmax classifier, a multi-label classifier (sigmoid per class), or a semantic "
    "segmentation model ((B, C, H, W) logits). auto: what the model declares (a Transformers config), else softmax.",
)
@click.option(
    "--threshold",
    type=click.FloatRange(0, 1),
    help="Multi-label: also explain every class whose sigmoid probability is at least P.",
)
@click.option(
    "--max-classes", type=click.IntRange(min=1), help="Multi-label: at most N classes per image by --threshold."
)
@click.option(
    "--label-format",
    type=click.Choice(["auto", "indices", "multihot"]),
    default="auto",
    show_default=True,
    help="Multi-label: a list label holds class indices or one 0/1 per class; auto reads a 0/1 list of the "
    "model's class count as multi-hot.",
)
@click.option(
    "--mask-column",
    metavar="COL",
    help="Segmentation: true masks (PNG of class indices, or paths), each its image's size; explains the classes "
    "present and adds mask_energy, mask_iou and positive.",
)
@click.option(
    "--mask-ignore-index",
    type=click.IntRange(min=0),
    help="Segmentation: the mask value of unlabelled pixels (255 in Pascal VOC).",
)
@click.option("--image-column", metavar="COL", help="Column with the images (bytes, HF struct, or paths). Auto.")
@click.option("--id-column", metavar="COL", help="Column to use as id. [default: <input file>:<row>]")
@click.option("--keep-columns", multiple=True, metavar="A,B", help="Input columns passed through to the output.")
@preprocessing_options
@compute_options()
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
    "--metrics-sample",
    type=click.FloatRange(0, 1, min_open=True),
    metavar="F",
    help="Compute the faithfulness metrics on a seeded random share F of the images (chosen by id: the same "
    "on a resume); the other rows hold nulls, and the means and intervals come from the share.",
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

    use_ray = opts["use_ray"]
    ray_opts = {k: opts[k] for k in _RAY_OPTIONS}
    fail_on_error, summary_json = opts["fail_on_error"], opts["summary_json"]
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


_RAY_OPTIONS = ("ray_address", "num_gpus_per_worker", "num_cpus_per_worker", "num_cpus_per_read")
# Options that say how the CLI runs the job, not what the job is: no RunConfig field.
CLI_ONLY_OPTIONS = ("use_ray", *_RAY_OPTIONS, "fail_on_error", "summary_json")


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


# click destination -> RunConfig field, for every option that is part of the job. A new option gets a line
# here (and, when its text needs reading, one in _PARSE); test_run_cli checks that none is left out.
RUN_CONFIG_OPTIONS = {
    "output": "output",
    "model_spec": "model",
    "weights": "weights",
    "weights_strict": "weights_strict",
    "num_classes": "num_classes",
    "providers": "providers",
    "reshape": "reshape",
    "token_grid": "token_grid",
    "target_layer": "target_layer",
    "method": "method",
    "guided": "guided",
    "scorecam_batch": "scorecam_batch",
    "counterfactual": "counterfactual",
    "top_k": "top_k",
    "classes_text": "classes",
    "label_column": "label_column",
    "task": "task",
    "threshold": "threshold",
    "max_classes": "max_classes",
    "label_format": "label_format",
    "mask_column": "mask_column",
    "mask_ignore_index": "mask_ignore_index",
    "image_column": "image_column",
    "id_column": "id_column",
    "keep_columns": "keep_columns",
    "resize": "resize",
    "crop": "crop",
    "mean": "mean",
    "std": "std",
    "interpolation": "interpolation",
    "batch_size": "batch_size",
    "device": "device",
    "precision": "precision",
    "compile": "compile",
    "workers": "workers",
    "device_jpeg": "device_jpeg",
    "heatmap_size": "heatmap_size",
    "heatmap_dtype": "heatmap_dtype",
    "cam_dtype": "cam_dtype",
    "rows_per_file": "rows_per_file",
    "resume": "overwrite",
    "limit": "limit",
    "progress": "progress",
    "max_image_pixels": "max_image_pixels",
    "decode_memory_mb": "decode_memory_mb",
    "metrics_text": "metrics",
    "metrics_steps": "metrics_steps",
    "metrics_batch": "metrics_batch",
    "metrics_sample": "metrics_sample",
    "box_column": "box_column",
    "box_format": "box_format",
    "pointing_tolerance": "pointing_tolerance",
    "box_threshold": "box_threshold",
}

# click destination -> the option's value as its field's; options not named here pass as they are.
_PARSE = {
    "classes_text": lambda v: parse_int_list(v, what="--classes"),
    "keep_columns": split_names,
    "resize": lambda v: parse_size(v, what="--resize"),
    "crop": lambda v: _square(parse_size(v, what="--crop")),
    "mean": lambda v: parse_floats3(v, what="--mean"),
    "std": lambda v: parse_floats3(v, what="--std"),
    "providers": lambda v: split_names(v) or None,
    "heatmap_size": lambda v: _square(parse_size(v, what="--heatmap-size", allow=("none", "input"))),
    "max_image_pixels": lambda v: _pixels(v),
    "decode_memory_mb": lambda v: v or None,
    "metrics_text": lambda v: tuple(split_names((v,))) if v else (),
    "resume": lambda v: not v,
    "progress": lambda v: sys.stderr.isatty() if v is None else v,
}


def run_config(inputs, opts: dict):
    """The ``RunConfig`` of the parsed options, through ``RUN_CONFIG_OPTIONS``; ``opts`` is left as it is."""
    from gradcam_batch.engine.job.config import RunConfig

    values = {field: _PARSE.get(name, _as_is)(opts[name]) for name, field in RUN_CONFIG_OPTIONS.items()}
    return RunConfig(inputs=list(inputs), **values)


def _as_is(value):
    return value


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
