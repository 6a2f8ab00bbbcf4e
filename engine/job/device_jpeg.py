"""JPEG decode on the compute device (``--device-jpeg``: nvJPEG on CUDA), with Pillow as the fallback it says.

``decode_jpegs_on_device`` decodes, resizes and crops there, with the same geometry as
``Preprocess``; what the device cannot decode goes to ``decode_image`` on the host, and each kind
of fallback is reported once through ``warn``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from gradcam_batch.engine.errors import first_line
from gradcam_batch.engine.job.decode import DEFAULT_MAX_IMAGE_PIXELS, decode_image
from gradcam_batch.engine.job.errors import DecodeError
from gradcam_batch.engine.job.preprocess import Preprocess


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says that the device ran out of memory (torch's error, or nvJPEG's allocator's)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "allocator_failure" in text


def decode_jpegs_on_device(
    jpegs: Sequence[bytes],
    prep: Preprocess,
    device: torch.device,
    *,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    warn: Callable[[str, str], object] | None = None,
) -> tuple[list[torch.Tensor | None], list[str | None]]:
    """Decode JPEGs with torchvision on ``device`` (nvJPEG on CUDA), then resize and crop there.

    Returns per image an (H, W, 3) uint8 tensor on ``device`` or None with the reason. What does
    not decode on the device falls back to Pillow on the host, which decides whether the image is
    bad (an error row) or only beyond the device decoder (CMYK, unusual sampling). Each fallback
    is reported through ``warn(kind, message)``, which the batch step says once per run per kind:

    - ``"jpeg-oom"``: the device ran out of memory. That says nothing about the images, so none is
      retried on the device (one by one would fail the same way) and the batch decodes on the host:
      the output is right, only slower. Failing the batch instead would stop the run, and a rerun
      would meet the same batch at the same memory.
    - ``"jpeg-batch"``: the batched call refused the batch; the images are retried one at a time.
    - ``"jpeg-image"``: an image failed on the device; Pillow decodes it, or makes it an error row.
    """
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg

    def say(kind: str, message: str) -> None:
        if warn is not None:
            warn(kind, message)

    def out_of_memory(exc: BaseException) -> None:
        say(
            "jpeg-oom",
            f"device JPEG decode ran out of memory on {device} ({first_line(exc)}); those batches were "
            "decoded by Pillow on the host instead (slower, same output; a smaller --batch-size keeps "
            "them on the device)",
        )

    datas = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in jpegs]
    decoded: list[torch.Tensor | None]
    try:
        decoded = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    except Exception as exc:
        decoded = [None] * len(datas)
        if is_out_of_memory(exc):
            out_of_memory(exc)
        else:
            say(
                "jpeg-batch",
                f"device JPEG decode refused a batch ({first_line(exc)}); its images were decoded one at a time",
            )
            for i, d in enumerate(datas):
                try:
                    decoded[i] = decode_jpeg(d, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
                except Exception as one:
                    if is_out_of_memory(one):
                        out_of_memory(one)
                        break  # the rest of the batch goes to the host
                    say(
                        "jpeg-image",
                        f"device JPEG decode failed on some images (first: {first_line(one)}); Pillow decoded "
                        "them on the host, or made them error rows",
                    )
    out: list[torch.Tensor | None] = []
    errors: list[str | None] = []
    for raw, img in zip(jpegs, decoded, strict=True):
        if img is None:
            try:
                out.append(torch.from_numpy(decode_image(raw, prep, max_image_pixels=max_image_pixels)).to(device))
                errors.append(None)
            except DecodeError as exc:
                out.append(None)
                errors.append(str(exc))
            continue
        _, h, w = img.shape
        # torch has no Lanczos filter: bicubic is the closest it has.
        mode = "bicubic" if prep.interpolation == "lanczos" else prep.interpolation
        corners = None if mode == "nearest" else False
        x = img.unsqueeze(0).float()
        target = prep.resize_target(w, h)
        if target is not None and (w, h) != target:
            size = (target[1], target[0])
            x = F.interpolate(x, size=size, mode=mode, antialias=mode != "nearest", align_corners=corners)
        if prep.crop is not None:
            ch, cw = prep.crop
            h2, w2 = x.shape[-2:]
            if h2 < ch or w2 < cw:
                s = max(cw / w2, ch / h2)
                size = (max(ch, round(h2 * s)), max(cw, round(w2 * s)))
                x = F.interpolate(x, size=size, mode=mode, align_corners=corners)
                h2, w2 = size
            top, left = (h2 - ch) // 2, (w2 - cw) // 2
            x = x[..., top : top + ch, left : left + cw]
        out.append(x[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0))
        errors.append(None)
    return out, errors


__all__ = ["decode_jpegs_on_device", "is_out_of_memory"]
