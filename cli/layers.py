"""``gradcam-batch layers``: list the candidate target layers of a model and mark the auto-detected one."""

from __future__ import annotations

import click

from gradcam_batch.cli.options import BadInvocation, model_source_options, parse_size


@click.command()
@model_source_options
@click.option(
    "--input-size",
    help="Probe input size: N or HxW. [default: the model's own preprocessing, an ONNX model's static input "
    "size, else 224]",
)
@click.option(
    "--reshape",
    type=click.Choice(["tokens"]),
    default=None,
    help="tokens: list transformer token outputs. [default: tokens for timm and Transformers ViT-family models]",
)
@click.option("--all", "show_all", is_flag=True, help="List every module (tensor for ONNX), not only candidates.")
def layers(
    model_spec: str | None,
    weights: str | None,
    weights_strict: bool,
    num_classes: int | None,
    input_size: str | None,
    reshape: str | None,
    show_all: bool,
) -> None:
    """List candidate target layers (name, type, output shape); '*' marks the auto-detected one.

    A candidate is a feature map whose positions the scores depend on: a 4-D (B, K, h, w) map with
    h*w > 1, or (B, N, D) tokens (on their patch tokens). The marked one is the trunk's last feature
    map. For ONNX models the names are tensor names, to pass as --target-layer. The first line is the
    preprocessing `run` uses for this model when no --resize, --crop, --mean, --std or --interpolation
    is given.
    """
    import torch

    from gradcam_batch.engine.errors import first_line
    from gradcam_batch.engine.explain.explainer import default_score_fn, eval_mode
    from gradcam_batch.engine.explain.layers import probe_layers
    from gradcam_batch.engine.models.loader import load_model, model_preprocessing

    if not model_spec:
        raise BadInvocation("--model is required (e.g. --model torchvision:resnet50)")
    size = parse_size(input_size, what="--input-size", allow=()) if input_size is not None else None
    if isinstance(size, int):
        size = (size, size)
    try:
        prep = model_preprocessing(model_spec)
        model = load_model(model_spec, weights=weights, num_classes=num_classes, weights_strict=weights_strict)
    except ValueError as exc:  # ModelSpecError: a bad invocation, exit 2 as in `run`
        raise BadInvocation(str(exc)) from None
    if prep is None:
        click.echo(
            "preprocessing: run's defaults: resize shorter side to 256, center crop 224x224, bilinear, "
            "ImageNet mean and std"
        )
    else:
        click.echo(f"preprocessing: {prep.describe()}")
        size = size or prep.input_size
    static = getattr(model, "input_size", None)  # an ONNX model exported at a fixed size
    if size is not None and static is not None and tuple(size) != tuple(static):
        raise BadInvocation(
            f"the model takes {static[0]}x{static[1]} inputs only; drop --input-size or pass {static[0]}x{static[1]}"
        )
    h, w = size or static or (224, 224)
    sample = torch.zeros(1, 3, h, w)
    try:
        if isinstance(model, torch.nn.Module):
            with eval_mode(model):
                infos = probe_layers(model, sample, default_score_fn, reshape=reshape)
        else:
            infos = model.probe_layers(sample)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise BadInvocation(f"probe forward at input size {h}x{w} failed: {first_line(exc)}") from None

    rows = [i for i in infos if show_all or i.candidate or i.chosen]
    if not rows:
        click.echo(f"no candidate target layer at input size {h}x{w} (try --all or another --input-size)")
        return
    name_w = max(len("name"), *(len(i.name) for i in rows))
    type_w = max(len("type"), *(len(i.type) for i in rows))
    click.echo(f"  {'name':<{name_w}}  {'type':<{type_w}}  output shape")
    for info in rows:
        mark = "*" if info.chosen else " "
        shape = "-" if info.shape is None else "x".join(str(d) for d in info.shape)
        click.echo(f"{mark} {info.name:<{name_w}}  {info.type:<{type_w}}  {shape}")
    chosen = next((i.name for i in infos if i.chosen), None)
    if chosen is None:
        click.echo("auto-detection found no layer: pass --target-layer")
    else:
        tokens = next(i.layout for i in infos if i.chosen) in ("tokens", "grid")
        click.echo(f"auto-detected: {chosen}" + (" (reshape: tokens)" if tokens else ""))


__all__ = ["layers"]
