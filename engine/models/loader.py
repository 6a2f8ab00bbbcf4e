"""Load a model from a spec string: the ``--model`` of the command line.

Accepted specs (``load_model(spec, weights=..., num_classes=..., device=...)``):

- ``torchvision:NAME`` — a torchvision classifier built with random weights
  (``torchvision.models.get_model(NAME, weights=None)``, seeded: see below); ``weights=FILE`` then loads a state
  dict (``engine/models/weights.py``: safetensors, or ``torch.load(..., weights_only=True)``, so
  no pickled code runs), and ``num_classes`` sets the size of the classifier.
- ``timm:NAME`` — ``timm.create_model(NAME, pretrained=False)`` (``engine/models/timm_models.py``);
  ``weights=`` and ``num_classes`` as above.
- ``hf:DIR`` — a Hugging Face Transformers classifier saved with ``save_pretrained``, loaded offline
  (``engine/models/hf_models.py``); ``weights=`` and ``num_classes`` as above.
- ``path/to/file.py:FACTORY`` — imports the file and calls ``FACTORY()``
  (``FACTORY(num_classes=N)`` when ``num_classes`` is given); ``weights=`` as above.
- ``package.module:FACTORY`` — the same for an importable module.
- ``model.onnx`` — an ONNX file, run with ONNX Runtime (see ``gradcam_batch.engine.models.onnx_backend``).
- ``model.pt2`` — a ``torch.export`` program (``torch.export.save``), unflattened back into its
  module hierarchy (``torch.export.unflatten``), so target layers keep their names (``layer4.1``).
  It is explained through forward hooks (no FX split, hence no ``compile``/``precision``).
- any other existing file (``.pt``, ``.pth``, ``.ts``, ...) — a TorchScript archive (``torch.jit.save``).
  It loads and runs, but cannot be explained: TorchScript runs its submodules without Python
  hooks, so there is no target activation to capture; ``Explainer`` says so in one line.

Every model built here (torchvision, timm, hf and factory specs) is initialized under seed 0 on a
forked CPU RNG: a random initialization is the same in every process (a resumed run, each Ray
actor), and the caller's RNG state is as it was. ``random_weights_note`` says when a
spec without ``weights=`` has random weights (a run warns with it).

What comes back is something ``Explainer`` accepts:

- an ``nn.Module`` in eval mode on ``device`` for every torch spec;
- an ``OnnxModel`` for ``.onnx`` files. It is not an ``nn.Module``: it cuts itself at the target
  tensor (``split_at``, the ``SplitBackend`` protocol of ``engine/explain/split.py``) into an ONNX
  Runtime backbone and a torch head, which the Explainer runs like the split of a torch model.

Every bad spec, missing file, failing factory or mismatching state dict raises ``ModelSpecError``
(a ``ValueError``) with one line that says what is wrong and what is accepted.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn

from gradcam_batch.engine.errors import first_line
from gradcam_batch.engine.models.preprocess import ModelPreprocess
from gradcam_batch.engine.models.weights import load_weights

SPEC_HELP = (
    "expected torchvision:NAME, timm:NAME, hf:DIR, path/to/file.py:FACTORY, package.module:FACTORY, "
    "or a model file (.onnx, .pt2 torch.export program, TorchScript .pt)"
)


class ModelSpecError(ValueError):
    """The model spec, its weights or its factory cannot be used."""


def load_model(
    spec: str,
    *,
    weights: str | os.PathLike | None = None,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    providers: list[str] | None = None,
    weights_strict: bool = True,
):
    """Build or load the model named by ``spec`` (see the module docstring for the forms).

    Args:
        spec: the model spec.
        weights: a weights file for ``torchvision:``, ``timm:``, ``hf:`` and factory specs: safetensors,
            or a state dict or training checkpoint read with ``weights_only=True``.
        num_classes: classifier size for ``torchvision:``, ``timm:``, ``hf:`` and factory specs.
        device: where the model runs. For ONNX models it picks the default providers
            (TensorRT, CUDA, CPU on a CUDA device; CPU otherwise).
        providers: ONNX Runtime providers, in order of preference (ONNX models only).
        weights_strict: every tensor of the model and of the file must match by name (shapes always must).

    Returns:
        an ``nn.Module`` in eval mode on ``device``, or an ``OnnxModel`` for ``.onnx`` files.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"empty model spec; {SPEC_HELP}")
    spec = spec.strip()
    device = torch.device(device)
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ModelSpecError(f"num_classes must be a positive integer, got {num_classes!r}")
    if providers is not None and not spec.lower().endswith(".onnx"):
        raise ModelSpecError("providers apply to ONNX models only")

    path = Path(spec)
    suffix = path.suffix.lower()
    is_file_spec = suffix in (".onnx", ".pt2") or (path.is_file() and ":" not in path.name)
    if is_file_spec:
        if weights is not None or num_classes is not None:
            raise ModelSpecError(
                f"{path.name} is a complete model file; weights= and num_classes= apply to "
                "torchvision:, timm:, hf: and factory specs only"
            )
        if not path.is_file():
            raise ModelSpecError(f"model file not found: {spec}")
        if suffix == ".onnx":
            from gradcam_batch.engine.models.onnx_backend import OnnxModel

            return OnnxModel(path, device=device, providers=providers)
        if suffix == ".pt2":
            return _load_exported(path).to(device)
        return CompiledProgram(_load_torchscript(path), "TorchScript archive").to(device)

    if spec.startswith("torchvision:"):
        with seeded_init():
            model = _torchvision_model(spec[len("torchvision:") :], num_classes)
    elif spec.startswith("timm:"):
        from gradcam_batch.engine.models.timm_models import timm_model

        with seeded_init():
            model = timm_model(spec[len("timm:") :], num_classes)
    elif spec.startswith("hf:"):
        from gradcam_batch.engine.models.hf_models import hf_model

        with seeded_init():
            model = hf_model(spec[len("hf:") :], num_classes)
    elif ":" in spec:
        target, _, factory_name = spec.rpartition(":")
        if not target or not factory_name.isidentifier():
            raise ModelSpecError(f"cannot parse model spec {spec!r}; {SPEC_HELP}")
        module = _import_file(target) if target.endswith(".py") else _import_module(target)
        with seeded_init():
            model = _call_factory(module, factory_name, spec, num_classes)
    else:
        raise ModelSpecError(f"cannot parse model spec {spec!r} (no such file, and no ':'); {SPEC_HELP}")
    if weights is not None:
        load_weights(model, weights, strict=weights_strict)
    return _finish(model, device)


def random_weights_note(spec: str, weights, num_classes: int | None) -> str | None:
    """One line when ``load_model(spec, weights=..., num_classes=...)`` gives random weights, else None.

    ``torchvision:`` and ``timm:`` models are built untrained, and ``hf:`` with ``num_classes`` gets a
    new head; without a weights file these stay as initialized (seed 0). Factories load what they load.
    """
    if weights is not None or not isinstance(spec, str):
        return None
    spec = spec.strip()
    if spec.startswith(("torchvision:", "timm:")):
        return (
            f"{spec} has random weights (no weights file given; initialized with seed 0): "
            "its maps explain an untrained model"
        )
    if spec.startswith("hf:") and num_classes is not None:
        return (
            f"{spec}: the new {num_classes}-class head has random weights "
            "(no weights file given; initialized with seed 0)"
        )
    return None


INIT_SEED = 0


@contextlib.contextmanager
def seeded_init(seed: int = INIT_SEED) -> Iterator[None]:
    """Build a model under a fixed CPU seed, on a forked RNG: the caller's RNG state is restored after.

    Only the CPU generator is seeded and restored (``torch.manual_seed`` would reseed every CUDA
    generator too): modules are built on the CPU, and moved to the device after.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def model_preprocessing(spec: str) -> ModelPreprocess | None:
    """The preprocessing a ``timm:`` or ``hf:`` spec's model expects; None for other specs.

    Read from timm's data config or the directory's image processor; no model is built.
    """
    spec = spec.strip() if isinstance(spec, str) else spec
    if not isinstance(spec, str):
        return None
    if spec.startswith("timm:"):
        from gradcam_batch.engine.models.timm_models import timm_preprocess

        return timm_preprocess(spec[len("timm:") :])
    if spec.startswith("hf:"):
        from gradcam_batch.engine.models.hf_models import hf_preprocess

        return hf_preprocess(spec[len("hf:") :])
    return None


class CompiledProgram(nn.Module):
    """A torch.export program or a TorchScript archive, runnable as a classifier.

    Both are whole-graph programs: their submodules are never *called* (a forward hook on
    ``layer4`` never fires), so the engine cannot cut them at a target layer. They run (for
    scores), and ``Explainer`` refuses them with ``explain_unsupported``: one clear line that says
    what to pass instead.
    """

    def __init__(self, program: nn.Module, kind: str):
        super().__init__()
        self.program = program
        self.kind = kind
        self.explain_unsupported = (
            f"a {kind} cannot be cut at a target layer (its modules are not called one by one); "
            "explain the Python model (path/to/file.py:FACTORY --weights FILE), or export it with "
            "torch.export (.pt2) or to ONNX"
        )

    def train(self, mode: bool = True) -> CompiledProgram:
        # Train/eval semantics were fixed when the program was exported; exported modules refuse eval().
        self.training = mode
        return self

    def forward(self, x: torch.Tensor):
        return self.program(x)


def _finish(model: nn.Module, device: torch.device) -> nn.Module:
    model = model.to(device)
    model.eval()
    return model


def _torchvision_model(name: str, num_classes: int | None) -> nn.Module:
    try:
        import torchvision
    except ImportError:
        raise ModelSpecError("torchvision: specs need the torchvision package (pip install torchvision)") from None
    available = torchvision.models.list_models()
    if name not in available:
        close = [n for n in available if name and (name in n or n in name)][:6]
        hint = f"; did you mean {', '.join(close)}?" if close else " (see torchvision.models.list_models())"
        raise ModelSpecError(f"unknown torchvision model {name!r}{hint}")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    builder = torchvision.models.get_model_builder(name)
    if "weights_backbone" in inspect.signature(builder).parameters:
        # A segmentation or detection model's backbone defaults to ImageNet weights, which would download.
        kwargs["weights_backbone"] = None
    try:
        # weights=None: random init; nothing is downloaded.
        return torchvision.models.get_model(name, weights=None, **kwargs)
    except Exception as exc:
        raise ModelSpecError(f"torchvision model {name!r} could not be built: {exc}") from None


def _import_file(file: str):
    path = Path(file)
    if not path.is_file():
        raise ModelSpecError(f"model factory file not found: {file}")
    mod_name = f"_gradcam_batch_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ModelSpecError(f"cannot import {file} as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Registered before running so that dataclasses and pickling inside the file resolve.
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(mod_name, None)
        raise ModelSpecError(f"importing {file} failed: {type(exc).__name__}: {exc}") from None
    return module


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ModelSpecError(f"cannot import module {name!r}: {exc}") from None
    except Exception as exc:
        raise ModelSpecError(f"importing {name!r} failed: {type(exc).__name__}: {exc}") from None


def _call_factory(module, factory_name: str, spec: str, num_classes: int | None) -> nn.Module:
    factory = getattr(module, factory_name, None)
    if factory is None or not callable(factory):
        raise ModelSpecError(f"{spec}: {module.__name__} has no callable {factory_name!r}")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        model = factory(**kwargs)
    except Exception as exc:
        call = f"{factory_name}({_fmt(kwargs)})"
        raise ModelSpecError(f"{spec}: calling {call} failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec}: {factory_name}() returned {type(model).__name__}, not a torch nn.Module")
    return model


def _fmt(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _load_state_dict(model: nn.Module, weights: str | os.PathLike, strict: bool = True) -> None:
    load_weights(model, weights, strict=strict)


def _load_torchscript(path: Path) -> nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            return torch.jit.load(str(path), map_location="cpu")
    except Exception:
        raise ModelSpecError(
            f"{path.name} is not a TorchScript archive; a state dict needs an architecture: "
            f"--model torchvision:NAME --weights {path.name} (or path/to/file.py:FACTORY)"
        ) from None


def _load_exported(path: Path) -> nn.Module:
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise ModelSpecError(f"cannot load {path.name} as a torch.export program: {first_line(exc)}") from None
    try:
        # unflatten restores the module hierarchy as modules that are *called*, so forward hooks
        # fire: target-layer detection and the engine's hook path work as for the original model.
        return torch.export.unflatten(program)
    except Exception:
        return CompiledProgram(program.module(), "torch.export program")


__all__ = [
    "INIT_SEED",
    "SPEC_HELP",
    "CompiledProgram",
    "ModelSpecError",
    "load_model",
    "model_preprocessing",
    "random_weights_note",
    "seeded_init",
]
