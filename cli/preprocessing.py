"""The model's own preprocessing as ``run``'s option values: what ``run`` uses and ``layers`` prints.

timm: and hf: specs bring resize, crop, mean, std and interpolation (``engine/models/preprocess.py``);
an option given on the command line wins over the model's value.
"""

from __future__ import annotations

from collections.abc import Callable

from gradcam_batch.cli.options import BadInvocation

PREP_OPTIONS = ("resize", "crop", "mean", "std", "interpolation")


def model_prep_values(spec: str | None) -> tuple[dict[str, str], str] | None:
    """({option: value as typed on the command line}, where it comes from), or None for other specs."""
    from gradcam_batch.engine.models.loader import model_preprocessing

    if not spec:
        return None
    try:
        prep = model_preprocessing(spec)
    except ValueError as exc:  # ModelSpecError: unknown timm name, not a directory, ...
        raise BadInvocation(str(exc)) from None  # one line, exit 2 (a UsageError would add the usage lines)
    if prep is None:
        return None
    resize = prep.resize
    values = {
        "resize": "none" if resize is None else str(resize) if isinstance(resize, int) else "{}x{}".format(*resize),
        "crop": "none" if prep.crop is None else "{}x{}".format(*prep.crop),
        "mean": ",".join(f"{v:g}" for v in prep.mean),
        "std": ",".join(f"{v:g}" for v in prep.std),
        "interpolation": prep.interpolation,
    }
    return values, prep.source


def apply_model_prep(opts: dict, is_default: Callable[[str], bool]) -> str | None:
    """Fill the preprocessing options the user did not give from the model's; returns the source or None."""
    found = model_prep_values(opts.get("model_spec"))
    if found is None:
        return None
    values, source = found
    for name in PREP_OPTIONS:
        if is_default(name):
            opts[name] = values[name]
    return source


__all__ = ["PREP_OPTIONS", "apply_model_prep", "model_prep_values"]
