"""Option bundles and value parsers shared by the commands (written once, used as decorators)."""

from __future__ import annotations

from collections.abc import Callable

import click


def parse_size(text: str, *, what: str, allow: tuple[str, ...] = ("none",)) -> int | tuple[int, int] | str | None:
    """'N' -> N, 'HxW' -> (H, W), 'none' -> None, other allowed words as themselves."""
    t = str(text).strip().lower()
    if t in allow:
        return None if t == "none" else t
    try:
        if "x" in t:
            h, w = (int(v) for v in t.split("x"))
            if h < 1 or w < 1:
                raise ValueError
            return (h, w)
        n = int(t)
        if n < 1:
            raise ValueError
        return n
    except ValueError:
        words = "".join(f", {a}" for a in allow)
        raise click.BadParameter(f"{text!r} is not a size: expected N, HxW{words}", param_hint=what) from None


def parse_floats3(text: str, *, what: str) -> tuple[float, float, float]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != 3:
        raise click.BadParameter(f"{text!r}: expected three comma-separated numbers (R,G,B)", param_hint=what)
    return vals  # type: ignore[return-value]


def parse_int_list(text: str | None, *, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        vals = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: expected comma-separated class indices, e.g. 3,17,42", param_hint=what
        ) from None
    if not vals:
        raise click.BadParameter("no class index given", param_hint=what)
    return vals


def split_names(values: tuple[str, ...]) -> list[str]:
    """Repeated options and comma-separated lists, flattened: ('a,b', 'c') -> ['a', 'b', 'c']."""
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


def compute_options(*, batch_size: int = 64) -> Callable[[Callable], Callable]:
    """--batch-size (its default per command), --device, --precision, --compile/--no-compile."""

    def bundle(f: Callable) -> Callable:
        for deco in reversed(
            [
                click.option(
                    "--batch-size",
                    default=batch_size,
                    show_default=True,
                    type=click.IntRange(min=1),
                    help="Images per batch.",
                ),
                click.option(
                    "--device",
                    default="auto",
                    show_default=True,
                    help="auto (CUDA when available), cpu, cuda or cuda:N.",
                ),
                click.option(
                    "--precision",
                    type=click.Choice(["fp32", "bf16", "fp16"]),
                    default="fp32",
                    show_default=True,
                    help="Autocast dtype of the backbone (the head and the maps stay fp32).",
                ),
                click.option(
                    "--compile/--no-compile",
                    default=False,
                    show_default=True,
                    help="torch.compile the backbone (falls back to eager with a warning when it fails).",
                ),
            ]
        ):
            f = deco(f)
        return f

    return bundle


def model_source_options(f: Callable) -> Callable:
    """--model, --weights, --weights-strict, --num-classes: which model, as ``run``, ``layers`` and ``bench`` take it.

    Each value is checked in one place: its click type here, or the model loader (a spec that does not
    parse, a weights file that is missing or does not fit), whose ``ModelSpecError`` each command prints
    as one ``Error:`` line with exit 2 (``BadInvocation``).
    """
    for deco in reversed(
        [
            click.option(
                "--model",
                "model_spec",
                metavar="SPEC",
                help="torchvision:NAME, timm:NAME, hf:DIR (save_pretrained), path/to/file.py:FACTORY, "
                "package.module:FACTORY, or a TorchScript, .pt2 or .onnx file.",
            ),
            click.option(
                "--weights",
                type=click.Path(),
                help="Weights for torchvision:/timm:/hf:/factory specs: .safetensors, or a state dict or training "
                "checkpoint (weights_only=True; module./_orig_mod. prefixes removed).",
            ),
            click.option(
                "--weights-strict",
                type=click.BOOL,
                default=True,
                show_default=True,
                help="Every tensor of the model and of --weights must match by name; false allows missing and "
                "unexpected ones (shapes must always match).",
            ),
            click.option("--num-classes", type=click.IntRange(min=1), help="Classifier size, when not the default."),
        ]
    ):
        f = deco(f)
    return f


def explain_options(f: Callable) -> Callable:
    """--providers, --reshape, --token-grid, --target-layer, --method, --guided, --scorecam-batch,
    --counterfactual: how ``run`` explains."""
    for deco in reversed(
        [
            click.option(
                "--providers",
                multiple=True,
                help="ONNX Runtime execution providers, in order (repeat or comma-separate); default: TensorRT, "
                "CUDA, CPU, whichever are available.",
            ),
            click.option(
                "--reshape",
                type=click.Choice(["tokens"]),
                default=None,
                help="tokens: the target layer outputs (B, N, D) transformer tokens; reshape them to the patch grid.",
            ),
            click.option(
                "--token-grid", metavar="HxW", help="Patch grid for --reshape tokens (default: inferred from N)."
            ),
            click.option(
                "--target-layer", metavar="NAME", help="Module name (see `gradcam-batch layers`); auto-detected."
            ),
            click.option(
                "--method",
                default="gradcam",
                show_default=True,
                metavar="NAME[,NAME...]",
                callback=_check_methods,
                help="CAM method(s), comma-separated; several add a `method` column, one row per (image, class, "
                "method), all from one forward and one backward: gradcam, cam (global-average-pool -> linear heads "
                "only), gradcam++, xgradcam, layercam, hirescam, gradcam-elementwise, eigencam, eigengradcam, "
                "scorecam (K forwards per image).",
            ),
            click.option(
                "--guided",
                is_flag=True,
                help="Also Guided Grad-CAM: a `guided` column (3 x H x W uint8), guided backprop x each map; one "
                "backward through the whole model per batch.",
            ),
            click.option(
                "--scorecam-batch",
                default=64,
                show_default=True,
                type=click.IntRange(min=1),
                help="Score-CAM: masked images per forward.",
            ),
            click.option(
                "--counterfactual", is_flag=True, help="Negate the gradients: regions whose removal raises the score."
            ),
        ]
    ):
        f = deco(f)
    return f


def model_options(f: Callable) -> Callable:
    """``run``'s model bundle: ``model_source_options`` and ``explain_options``."""
    return model_source_options(explain_options(f))


def preprocessing_options(f: Callable) -> Callable:
    """--resize, --crop, --mean, --std, --interpolation: the preprocessing of ``run`` (and what ``layers`` shows).

    The defaults are ImageNet's; timm: and hf: models bring their own (``cli/preprocessing.py``), and an
    option given on the command line wins over the model's value.
    """
    for deco in reversed(
        [
            click.option("--resize", default="256", show_default=True, help="Shorter side N, exact HxW, or none."),
            click.option("--crop", default="224", show_default=True, help="Center crop N or HxW, or none."),
            click.option("--mean", default="0.485,0.456,0.406", show_default=True, help="Normalization mean (R,G,B)."),
            click.option("--std", default="0.229,0.224,0.225", show_default=True, help="Normalization std (R,G,B)."),
            click.option(
                "--interpolation",
                type=click.Choice(["nearest", "bilinear", "bicubic", "lanczos"]),
                default="bilinear",
                show_default=True,
                help="Resize filter. timm: and hf: models bring their own resize, crop, mean, std and "
                "interpolation; these options override them.",
            ),
        ]
    ):
        f = deco(f)
    return f


def _check_methods(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """The --method list, checked and normalized ("GradCAM, layercam" -> "gradcam,layercam")."""
    from gradcam_batch.engine.explain.methods import parse_methods

    try:
        return ",".join(parse_methods(value))
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


class BadInvocation(click.ClickException):
    """A user error detected before anything ran: one line, exit code 2, nothing written."""

    exit_code = 2


class Interrupted(click.ClickException):
    """Ctrl-C (SIGINT): one line instead of click's "Aborted!", and 130, the shell's code for it."""

    exit_code = 130

    def __init__(self) -> None:
        super().__init__("interrupted; rerun the same command to resume")


__all__ = [
    "BadInvocation",
    "Interrupted",
    "compute_options",
    "explain_options",
    "model_options",
    "model_source_options",
    "parse_floats3",
    "parse_int_list",
    "parse_size",
    "preprocessing_options",
    "split_names",
]
