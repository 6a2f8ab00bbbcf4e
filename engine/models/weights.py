"""Weights files (``--weights``): read as data, unwrapped, matched to the model by name and shape, loaded.

1. Formats: ``.safetensors`` through the ``safetensors`` package; any other file through
   ``torch.load(..., weights_only=True)``. Neither runs code from the file.
2. Layouts: a state dict, or a training checkpoint that holds one under the first of
   ``CHECKPOINT_KEYS`` it has (other entries, such as the epoch or the optimizer, are ignored).
3. Prefixes: ``module.`` (DDP, DataParallel) and ``_orig_mod.`` (``torch.compile``) are removed,
   in any nesting, when every key of the file has them and the model's keys do not.
4. Matching: strict by default. A mismatch raises ``ModelSpecError`` with one line that names the
   first missing key, the first unexpected key and the tensors whose shapes differ. With
   ``strict=False`` missing and unexpected keys are allowed (one warning says how many); differing
   shapes never are, and a file that shares no key with the model is refused.

See the README's "Models and backends" and "Trust" sections.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from gradcam_batch.engine.errors import first_line as _first_line

CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict", "ema")
PREFIXES = ("module.", "_orig_mod.")


def _error(message: str) -> Exception:
    from gradcam_batch.engine.models.loader import ModelSpecError

    return ModelSpecError(message)


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The file's state dict (names -> tensors, on the CPU), unwrapped from a checkpoint, prefixes kept."""
    path = Path(path)
    if not path.is_file():
        raise _error(f"weights file not found: {path}")
    if path.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise _error(f"reading {path.name} needs the safetensors package (pip install safetensors)") from None
        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as exc:
            raise _error(f"cannot read {path.name} as safetensors: {_first_line(exc)}") from None
    try:
        # weights_only: a checkpoint is data, never code to run.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = _first_line(exc)
        raise _error(f"cannot read weights {path.name} as a state dict (weights_only=True): {first}") from None
    return _unwrap(state, path.name)


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(state: object, name: str) -> dict[str, torch.Tensor]:
    if _is_state_dict(state):
        return dict(state)  # type: ignore[arg-type]
    if isinstance(state, Mapping):
        for key in CHECKPOINT_KEYS:
            if _is_state_dict(state.get(key)):
                return dict(state[key])
        keys = ", ".join(str(k) for k in list(state)[:8])
        raise _error(
            f"{name} is not a state dict (a mapping of names to tensors), and holds none under "
            f"{', '.join(CHECKPOINT_KEYS)}; its keys are: {keys}"
        )
    raise _error(f"{name} is not a state dict (a mapping of names to tensors): it holds a {type(state).__name__}")


def strip_prefixes(state: Mapping[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Remove ``module.`` / ``_orig_mod.`` while every key of ``state`` has one the model's keys lack."""
    state = dict(state)
    changed = True
    while changed and state:
        changed = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in state) and not all(k.startswith(prefix) for k in model_keys):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def match_report(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], *, strict: bool) -> str | None:
    """None when ``state`` can be loaded into a model whose state dict is ``own``; else the reason, one line."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    differ = [k for k in state if k in own and _shape(state[k]) != _shape(own[k])]
    parts = []
    if not strict and len(unexpected) == len(state):
        return f"no tensor of the file matches a model tensor by name (first in the file: {unexpected[0]})"
    if strict and missing:
        parts.append(f"{len(missing)} missing keys (first: {missing[0]})")
    if strict and unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
    for k in differ[:3]:
        parts.append(f"{k} has shape {_shape(state[k])}, the model expects {_shape(own[k])}")
    if len(differ) > 3:
        parts.append(f"{len(differ) - 3} more shapes differ")
    if not parts:
        return None
    hint = " (set num_classes?)" if differ else ""
    return "; ".join(parts) + hint


def load_weights(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> None:
    """Load the weights file ``path`` into ``model`` in place (see the module docstring)."""
    name = Path(path).name
    own = model.state_dict()
    state = strip_prefixes(read_weights(path), set(own))
    problem = match_report(state, own, strict=strict)
    if problem is not None:
        raise _error(f"weights {name} do not match the model: {problem}")
    if not strict:
        missing = sum(k not in state for k in own)
        unexpected = sum(k not in own for k in state)
        if missing or unexpected:
            warnings.warn(
                f"weights {name}: loaded non-strictly, {missing} model tensors keep their initial values "
                f"and {unexpected} tensors of the file are unused",
                stacklevel=3,
            )
        state = {k: v for k, v in state.items() if k in own}
    model.load_state_dict(state, strict=strict)


def state_digest(model: nn.Module) -> str:
    """sha256 of the model's state dict: each tensor's name, dtype, shape and bytes, in the state dict's order.

    What identifies the weights a run explains, whatever their source (a weights file, a factory's own
    loading, a seeded random initialization). The bytes are read in the standard contiguous layout, so a
    model on another device or in channels_last gives the same digest.
    """
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.is_quantized:
            t = t.int_repr()
        if t.layout != torch.strided:
            t = t.to_dense()
        flat = t.cpu().contiguous().reshape(-1)
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()


__all__ = [
    "CHECKPOINT_KEYS",
    "PREFIXES",
    "load_weights",
    "match_report",
    "read_weights",
    "state_digest",
    "strip_prefixes",
]
