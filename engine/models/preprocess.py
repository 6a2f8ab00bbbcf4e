"""A model's own preprocessing (``ModelPreprocess``), in the terms of ``run``'s options.

timm models carry a data config and Hugging Face models an image processor; both are translated
here into resize, crop, mean, std and interpolation. ``gradcam-batch run`` uses them where the
command line gives no explicit option, and ``gradcam-batch layers`` prints them. See the README's
"Models and backends" section.
"""

from __future__ import annotations

from dataclasses import dataclass

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")


@dataclass(frozen=True)
class ModelPreprocess:
    """Resize (shorter side N, or exact (H, W)), center crop (H, W) or None, mean, std, interpolation."""

    resize: int | tuple[int, int] | None
    crop: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    source: str  # where it was read, e.g. "timm data config of resnet18"

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}")

    def describe(self) -> str:
        """One line, as ``gradcam-batch layers`` prints it."""
        if self.resize is None:
            resize = "no resize"
        elif isinstance(self.resize, int):
            resize = f"resize shorter side to {self.resize}"
        else:
            resize = f"resize to {self.resize[0]}x{self.resize[1]}"
        crop = "no crop" if self.crop is None else f"center crop {self.crop[0]}x{self.crop[1]}"
        mean = ",".join(f"{v:g}" for v in self.mean)
        std = ",".join(f"{v:g}" for v in self.std)
        return f"{resize}, {crop}, {self.interpolation}, mean {mean}, std {std} ({self.source})"

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of the preprocessed image."""
        if self.crop is not None:
            return self.crop
        if isinstance(self.resize, tuple):
            return self.resize
        raise ValueError("the preprocessing fixes no input size")


__all__ = ["INTERPOLATIONS", "ModelPreprocess"]
