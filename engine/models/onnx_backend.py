"""The ONNX Runtime backend: Grad-CAM for ``.onnx`` classifiers.

ONNX Runtime has no autograd, so the work is split the way the torch engine splits a model:

1. One ORT run of the whole graph, with the target tensor A (and any tensor the head needs from
   before it) added as extra graph outputs, gives the activations and the scores together.
2. The head (the nodes between A and the scores) is either
   - a global-average-pool -> (flatten/reshape) -> Gemm/MatMul(+Add) chain: then Grad-CAM's
     weights are read off the weight matrix, alpha_k^c = W[c, k] / (h * w), exactly, with no
     backward pass (the closed form); or
   - anything else: it is rebuilt as a small torch module (``OnnxHead``, an interpreter for the
     ops classifier heads use) and differentiated with one vectorized VJP over the classes.
     An op outside that set gives an error naming it; a later target tensor usually avoids it.

Target layer: an ONNX tensor name, or auto-detected as the last 4-D tensor with h*w > 1 in
topological order that the scores depend on and that is not produced by a pooling or
pass-through op (for ResNet the last ReLU, for VGG the ReLU before the last max-pool).

Providers: on a CUDA device TensorRT, then CUDA, then CPU, whichever this ONNX Runtime build
has; on CPU the CPU provider; ``providers=`` overrides. On CUDA the inputs and outputs are
bound to torch CUDA buffers through IO binding, so nothing goes through host memory (the outputs
reach torch through DLPack, which ONNX Runtime has by default from 1.21; without it they are
copied through host memory, and a warning says so once).

Sessions: one ORT session per set of extra outputs. The layer probe's session (every float tensor
an output, so ORT can reuse no buffer) is dropped as soon as the probe is done; the others are
kept, at most ``MAX_CACHED_SESSIONS``, the least recently used dropped first.

The external-backend protocol (what ``Explainer`` calls on a model that is not an ``nn.Module``):

- ``resolve_target_layer(target_layer: str | None, sample: Tensor) -> str``: check the given
  name, or auto-detect one with the sample batch;
- ``gradcam_weights(images, *, classes, top_k, sign, method, reshape=None)`` returns
  ``(acts (B, K, h, w), scores (B, N), classes (B, C), alpha (B, C, K), closed_form: bool)``.
  ``OnnxModel(images)`` returns the scores alone, like a torch classifier.

Why a head interpreter and not a converter package: with torch 2.14 exports of resnet18 and
mobilenet_v3_small, onnx2torch 1.5.15 failed on both exporters (TorchScript exporter, opset 17:
KeyError on a BatchNorm-folded Conv parameter such as ``onnx::Conv_197``; dynamo exporter,
opset 20: no ReduceMean-18 converter); onnxslim 0.1.98 pre-processing fixed the first case only;
onnx2pytorch 0.6.0 converted the dynamo graphs but failed on the opset-17 ones (its Conv2d
called with an extra argument). A head is a handful of ops, so they are
interpreted directly (``_OPS``), for every opset these exporters write.

One module past 500 lines: the ONNX session, the closed-form head and the head interpreter's ~45
ops are one backend; the op table is most of it.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gradcam_batch.engine.explain.layers import LayerInfo, TargetLayerError

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_POOL_OPS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool", "ReduceMean"}
_PASS_OPS = {"Identity", "Dropout", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Cast"}
# Sessions kept per model, the most recently used ones: one per set of extra outputs asked for (the
# explained target, plain inference). Each holds its own arena (GPU memory on CUDA) until it is dropped.
MAX_CACHED_SESSIONS = 2


class OnnxBackendError(ValueError):
    """The ONNX model cannot be explained as asked."""


def _require_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise OnnxBackendError(
            "ONNX models need the onnx extra: pip install 'gradcam-batch[onnx]' (onnx + onnxruntime-gpu)"
        ) from None
    return onnx, onnxruntime


def default_providers(device: torch.device, available: Sequence[str]) -> list[str]:
    """TensorRT, CUDA, CPU (whichever are available) on a CUDA device; the CPU provider otherwise."""
    if device.type == "cuda":
        return [p for p in PROVIDER_ORDER if p in available]
    return ["CPUExecutionProvider"]


@dataclass
class _Node:
    op: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict


class OnnxModel:
    """An ONNX classifier run by ONNX Runtime, explainable by ``Explainer`` (see module docstring)."""

    def __init__(
        self,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        providers: Sequence[str] | None = None,
        output: str | None = None,
        io_binding: bool | None = None,
        threads: int | None = None,
    ):
        onnx, ort = _require_onnx()
        self.path = Path(path)
        self.device = torch.device(device)
        try:
            proto = onnx.load(str(self.path))
        except Exception as exc:
            raise OnnxBackendError(f"cannot read {self.path.name} as an ONNX model: {exc}") from None
        # Types are only needed for the extra outputs; ORT infers the rest, so a failure is harmless.
        with contextlib.suppress(Exception):
            proto = onnx.shape_inference.infer_shapes(proto)
        self._proto = proto
        graph = proto.graph
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        init_names = {t.name for t in graph.initializer}
        inputs = [i for i in graph.input if i.name not in init_names]
        if len(inputs) != 1:
            raise OnnxBackendError(
                f"{self.path.name} has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                "an image classifier with one (B, 3, H, W) input is expected"
            )
        self.input_name = inputs[0].name
        dims = inputs[0].type.tensor_type.shape.dim
        self.fixed_batch = dims[0].dim_value if len(dims) and dims[0].HasField("dim_value") else None
        # (H, W) when the model was exported with a static spatial size, else None.
        hw = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in list(dims)[2:4]]
        self.input_size = (hw[0], hw[1]) if len(dims) == 4 and None not in hw else None
        outputs = [o.name for o in graph.output]
        if output is None:
            output = outputs[0]
        elif output not in outputs:
            raise OnnxBackendError(f"{self.path.name} has no output {output!r}; outputs: {', '.join(outputs)}")
        self.output_name = output
        self._initializers = {t.name: t for t in graph.initializer}
        self._types = {}
        for vi in list(graph.value_info) + list(graph.output) + list(graph.input):
            self._types[vi.name] = vi.type.tensor_type.elem_type
        self.nodes = [
            _Node(
                n.op_type,
                n.name,
                list(n.input),
                list(n.output),
                {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute},
            )
            for n in graph.node
        ]
        self._producer = {o: i for i, n in enumerate(self.nodes) for o in n.outputs if o}

        available = ort.get_available_providers()
        if providers is None:
            providers = default_providers(self.device, available)
        else:
            providers = list(providers)
            bad = [p for p in providers if p not in available]
            if bad or not providers:
                raise OnnxBackendError(
                    f"ONNX Runtime provider(s) {', '.join(bad) or '(none)'} not available; "
                    f"this build has: {', '.join(available)}"
                )
        self.providers = providers
        if "CUDAExecutionProvider" in providers and hasattr(ort, "preload_dlls"):
            # Lets ORT find the CUDA/cuDNN libraries that torch's wheels brought (onnxruntime >= 1.21);
            # the CUDA provider itself reports what is missing when that is not enough.
            with contextlib.suppress(Exception):
                ort.preload_dlls()
        # None: bind on CUDA (no host round trip); on CPU plain numpy feeds are as fast.
        self.io_binding = io_binding
        self.threads = threads  # ORT intra-op threads; None: ORT's default (one per physical core)
        self._sessions: dict[tuple[str, ...], object] = {}
        self._heads: dict[str, _HeadPlan] = {}
        self.target_layer: str | None = None

    # -- running ----------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return f"OnnxModel({self.path.name!r}, providers={self.providers})"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """The scores alone, like calling a torch classifier (for plain inference and baselines)."""
        return self.run(images)[self.output_name]

    def eval(self) -> OnnxModel:
        return self  # an exported graph has its inference semantics fixed

    def _session(self, extra: tuple[str, ...], *, keep: bool = True):
        """The session with ``extra`` as further outputs: cached when ``keep``, else made for one use."""
        sess = self._sessions.pop(extra, None)
        if sess is None:
            sess = self._new_session(extra)
        if keep:
            self._sessions[extra] = sess  # the most recently used last
            while len(self._sessions) > MAX_CACHED_SESSIONS:
                del self._sessions[next(iter(self._sessions))]
        return sess

    def _new_session(self, extra: tuple[str, ...]):
        onnx, ort = _require_onnx()
        proto = onnx.ModelProto()
        proto.CopyFrom(self._proto)
        have = {o.name for o in proto.graph.output}
        for name in extra:
            if name not in have:
                elem = self._types.get(name) or onnx.TensorProto.FLOAT
                proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
                proto.graph.output[-1].type.tensor_type.elem_type = elem
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads = self.threads
        try:
            return ort.InferenceSession(proto.SerializeToString(), sess_options=opts, providers=self.providers)
        except Exception as exc:
            raise OnnxBackendError(f"ONNX Runtime cannot load {self.path.name}: {exc}") from None

    def run(
        self, images: torch.Tensor, extra: Sequence[str] = (), *, keep_session: bool = True
    ) -> dict[str, torch.Tensor]:
        """Scores and the ``extra`` tensors for a batch, as torch tensors on ``images.device``.

        ``keep_session=False``: the session made for these outputs is dropped after this call
        (unless one was cached already), with its memory.
        """
        extra = tuple(dict.fromkeys(e for e in extra if e != self.output_name))
        names = (self.output_name, *extra)
        sess = self._session(extra, keep=keep_session or extra in self._sessions)
        b = images.shape[0]
        fb = self.fixed_batch
        if fb is not None and fb != b:
            # A graph exported with a fixed batch size: run it chunk by chunk, the last one padded.
            chunks = []
            for start in range(0, b, fb):
                part = images[start : start + fb]
                n = part.shape[0]
                if n < fb:
                    part = torch.cat([part, part.new_zeros((fb - n, *part.shape[1:]))])
                out = self._run_once(sess, part, names)
                chunks.append({k: v[:n] for k, v in out.items()})
            return {k: torch.cat([c[k] for c in chunks]) for k in names}
        return self._run_once(sess, images, names)

    def _run_once(self, sess, images: torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        x = images.detach()
        if x.dtype != torch.float32:
            x = x.float()
        on_gpu = x.device.type == "cuda" and self.providers[0] != "CPUExecutionProvider"
        if self.io_binding or (self.io_binding is None and on_gpu):
            return self._run_bound(sess, x if on_gpu else x.cpu(), names)
        feeds = {self.input_name: x.cpu().contiguous().numpy()}
        outs = sess.run(list(names), feeds)
        dev = images.device
        return {k: torch.from_numpy(np.ascontiguousarray(v)).to(dev) for k, v in zip(names, outs, strict=True)}

    def _run_bound(self, sess, x: torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """IO binding: ORT reads the torch input buffer in place and allocates the outputs on the
        same device; they come back to torch through DLPack, without a copy or a host round trip."""
        x = x.contiguous()
        dev_type = "cuda" if x.is_cuda else "cpu"
        dev_id = (x.device.index or 0) if x.is_cuda else 0
        if x.is_cuda:
            torch.cuda.current_stream(x.device).synchronize()  # ORT runs on its own stream
        binding = sess.io_binding()
        binding.bind_input(self.input_name, dev_type, dev_id, np.float32, list(x.shape), x.data_ptr())
        for name in names:
            binding.bind_output(name, dev_type, dev_id)
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()
        outs = binding.get_outputs()
        return {name: _ortvalue_to_torch(v, x.device) for name, v in zip(names, outs, strict=True)}

    # -- layers -----------------------------------------------------------------------------------
    def _float_values(self) -> list[str]:
        onnx, _ = _require_onnx()
        seen = []
        for node in self.nodes:
            for o in node.outputs:
                if o and self._types.get(o, onnx.TensorProto.FLOAT) in (onnx.TensorProto.FLOAT, 0):
                    seen.append(o)
        return seen

    def _depends(self) -> set[str]:
        """Every tensor that the scores depend on (the backward slice of the output)."""
        needed, stack = set(), [self.output_name]
        while stack:
            t = stack.pop()
            if t in needed:
                continue
            needed.add(t)
            i = self._producer.get(t)
            if i is not None:
                stack.extend(x for x in self.nodes[i].inputs if x)
        return needed

    def probe_layers(self, sample: torch.Tensor) -> list[LayerInfo]:
        """One run with every float tensor as an output: name, producing op, shape; marks candidates."""
        values = self._float_values()
        shapes: dict[str, tuple[int, ...]] = {}
        try:
            # Every tensor an output: ORT can reuse no buffer, so this session's arena is the whole
            # network's activations. It is dropped after this one run.
            outs = self.run(sample, values, keep_session=False)
        except OnnxBackendError:
            raise
        except Exception as exc:
            shape = tuple(sample.shape)
            raise OnnxBackendError(f"ONNX Runtime failed on a probe input of shape {shape}: {exc}") from None
        for k, v in outs.items():
            shapes[k] = tuple(v.shape)
        deps = self._depends()
        collapsed = self._collapsed(shapes)
        infos = []
        for name in values:
            node = self.nodes[self._producer[name]]
            shape = shapes.get(name)
            info = LayerInfo(name=name, type=node.op, shape=shape, calls=1)
            info.candidate = bool(
                shape is not None
                and len(shape) == 4
                and shape[2] * shape[3] > 1
                and name in deps
                and name not in collapsed
                and node.op not in _POOL_OPS | _PASS_OPS
            )
            infos.append(info)
        chosen = [i for i in infos if i.candidate]
        if chosen:
            chosen[-1].chosen = True
        return infos

    def _collapsed(self, shapes: dict[str, tuple[int, ...]]) -> set[str]:
        """Tensors computed only from globally pooled (B, K, 1, 1) values: the head, not the backbone.

        A (B, 1, 1, C) transpose after the pooling (ConvNeXt's LayerNorm2d) looks 4-D and spatial
        but is not; a squeeze-excite gate multiplied back into a feature map does not collapse it.
        """
        constant = set(self._initializers)
        collapsed: set[str] = set()
        for node in self.nodes:
            data = [x for x in node.inputs if x and x not in constant]
            if not data:  # Constant, or Identity/Cast of a weight: folded at load time
                constant.update(node.outputs)
                continue
            from_pooled = bool(data) and all(x in collapsed for x in data)
            for out in node.outputs:
                shape = shapes.get(out)
                pooled = shape is not None and len(shape) == 4 and shape[2] * shape[3] == 1
                if from_pooled or pooled:
                    collapsed.add(out)
        return collapsed

    def resolve_target_layer(self, target_layer: str | None, sample: torch.Tensor) -> str:
        if target_layer is None:
            infos = self.probe_layers(sample[:1])
            pick = next((i.name for i in infos if i.chosen), None)
            if pick is None:
                seen = [f"{i.name} {list(i.shape)}" for i in infos if i.shape is not None and len(i.shape) == 4]
                raise TargetLayerError(
                    "could not find a target tensor: no 4-D (B, K, h, w) tensor with h*w > 1 feeds the scores. "
                    f"4-D tensors seen: {'; '.join(seen[-10:]) or 'none'}"
                )
            target_layer = pick
        elif not isinstance(target_layer, str):
            raise TargetLayerError("the target layer of an ONNX model is a tensor name (see `gradcam-batch layers`)")
        if target_layer not in self._producer:
            close = [n for n in self._producer if target_layer in n][:5]
            hint = f"; similar: {', '.join(close)}" if close else "; list them with `gradcam-batch layers`"
            raise TargetLayerError(f"{self.path.name} has no tensor {target_layer!r}{hint}")
        if target_layer not in self._depends():
            raise TargetLayerError(f"the scores do not depend on tensor {target_layer!r}")
        self.target_layer = target_layer
        return target_layer

    # -- the head ---------------------------------------------------------------------------------
    def head_plan(self, target: str) -> _HeadPlan:
        if target not in self._heads:
            self._heads[target] = self._build_head(target)
        return self._heads[target]

    def _build_head(self, target: str) -> _HeadPlan:
        # Nodes on some path target -> output: downstream of target and upstream of the output.
        down = {target}
        head_idx = []
        for i, node in enumerate(self.nodes):
            if any(x in down for x in node.inputs if x):
                head_idx.append(i)
                down.update(o for o in node.outputs if o)
        if self.output_name not in down:
            raise TargetLayerError(f"the scores do not depend on tensor {target!r}")
        needed, stack = set(), [self.output_name]
        while stack:
            t = stack.pop()
            if t in needed or t == target:
                continue
            needed.add(t)
            i = self._producer.get(t)
            if i is not None:
                stack.extend(x for x in self.nodes[i].inputs if x)
        nodes = [self.nodes[i] for i in range(len(self.nodes)) if any(o in needed for o in self.nodes[i].outputs)]
        produced = {o for n in nodes for o in n.outputs}
        extra = []
        for n in nodes:
            for x in n.inputs:
                if x and x != target and x not in produced and x not in self._initializers and x not in extra:
                    extra.append(x)  # computed before the target (a skip connection) or the input itself
        linear = _closed_form(nodes, target, self.output_name, self._initializers) if not extra else None
        return _HeadPlan(target=target, nodes=nodes, extra=extra, linear=linear, module=None)

    def head_module(self, target: str) -> OnnxHead:
        plan = self.head_plan(target)
        if plan.module is None:
            plan.module = OnnxHead(plan.nodes, target, plan.extra, self.output_name, self._initializers, self.opset)
        return plan.module

    # -- the Explainer protocol -------------------------------------------------------------------
    def gradcam_weights(self, images, *, classes, top_k, sign, method, reshape=None):
        from gradcam_batch.engine.explain.explainer import _one_hots, _resolve_classes

        if reshape is not None:
            raise OnnxBackendError("reshape= is not supported for ONNX models; pick a 4-D target tensor")
        target = self.target_layer
        if target is None:
            target = self.resolve_target_layer(None, images)
        plan = self.head_plan(target)
        outs = self.run(images, [target, *plan.extra])
        scores_all = outs[self.output_name]
        acts = outs[target]
        if acts.dim() != 4:
            raise TargetLayerError(
                f"target tensor {target!r} has shape {tuple(acts.shape)}; Grad-CAM needs a 4-D (B, K, h, w) map"
            )
        if scores_all.dim() != 2 or scores_all.shape[0] != images.shape[0]:
            raise OnnxBackendError(
                f"output {self.output_name!r} has shape {tuple(scores_all.shape)}; (B, N) class scores are expected"
            )
        scores_all = scores_all.float()
        acts = acts.float()
        h, w = acts.shape[-2:]
        if plan.linear is not None:
            classes_t = _resolve_classes(classes, top_k, scores_all)
            weight = plan.linear.to(device=acts.device, dtype=torch.float32)
            if weight.shape[1] != acts.shape[1] or weight.shape[0] != scores_all.shape[1]:
                raise OnnxBackendError(
                    f"closed-form head weight {tuple(weight.shape)} does not fit A {tuple(acts.shape)} / "
                    f"scores {tuple(scores_all.shape)}"
                )
            alpha = weight[classes_t]
            if method == "gradcam":
                alpha = alpha / (h * w)
            return acts, scores_all, classes_t, sign * alpha, True
        if method == "cam":
            raise ValueError(
                f"method='cam' needs a global-average-pool -> linear head after {target!r}; use method='gradcam'"
            )
        head = self.head_module(target).to(acts.device)
        extras = [outs[e] for e in plan.extra]
        classes_t = _resolve_classes(classes, top_k, scores_all)

        def head_scores(a: torch.Tensor) -> torch.Tensor:
            return head(a, *extras)

        with torch.no_grad():
            head_out, vjp_fn = torch.func.vjp(head_scores, acts)
            cot = _one_hots(classes_t, head_out, sign)
            (grads,) = torch.vmap(vjp_fn)(cot)
        alpha = grads.float().mean(dim=(3, 4)).permute(1, 0, 2).contiguous()
        return acts, scores_all, classes_t, alpha, False


@dataclass
class _HeadPlan:
    target: str
    nodes: list[_Node]
    extra: list[str]
    linear: torch.Tensor | None  # (N, K) when the head is GAP -> linear
    module: OnnxHead | None


_DLPACK_FALLBACK_SAID = False  # the host round trip below is announced once per process


def _ortvalue_to_torch(ortv, device: torch.device) -> torch.Tensor:
    global _DLPACK_FALLBACK_SAID
    try:
        return torch.from_dlpack(ortv).to(device)
    except Exception as exc:  # ONNX Runtime before 1.21 has no DLPack: one copy through host memory
        if not _DLPACK_FALLBACK_SAID:
            _DLPACK_FALLBACK_SAID = True
            import onnxruntime

            warnings.warn(
                f"ONNX Runtime {onnxruntime.__version__} cannot hand its outputs to torch through DLPack "
                f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else '-'}); "
                "they are copied through host memory, which on CUDA costs a device-host round trip per batch. "
                "onnxruntime 1.21 or newer avoids it",
                RuntimeWarning,
                stacklevel=2,
            )
        return torch.from_numpy(np.array(ortv.numpy(), copy=True)).to(device)


# -- closed form ------------------------------------------------------------------------------------
def _const(name: str, inits) -> np.ndarray | None:
    if name in inits:
        from onnx import numpy_helper

        return numpy_helper.to_array(inits[name])
    return None


def _closed_form(nodes: list[_Node], target: str, output: str, inits) -> torch.Tensor | None:
    """W (N, K) when the head is GAP/ReduceMean -> (Flatten/Reshape/Squeeze) -> Gemm/MatMul (+Add)."""
    if not nodes:
        return None
    # Shape-computing nodes (Constant, Shape, ...) may sit beside the chain; only the chain counts.
    consumers: dict[str, list[_Node]] = {}
    for n in nodes:
        for x in n.inputs:
            consumers.setdefault(x, []).append(n)
    chain, cur = [], target
    while cur != output:
        users = consumers.get(cur, [])
        if len(users) != 1 or len(users[0].outputs) < 1:
            return None
        chain.append(users[0])
        cur = users[0].outputs[0]
    ops = [n.op for n in chain]
    i = 0
    while i < len(ops) and ops[i] in ("Identity", "Dropout"):
        i += 1
    if i >= len(ops):
        return None
    gap = chain[i]
    if gap.op == "ReduceMean":
        axes = gap.attrs.get("axes")
        if axes is None and len(gap.inputs) > 1 and gap.inputs[1]:
            arr = _const(gap.inputs[1], inits)
            if arr is None:
                arr = _constant_node_value(nodes, gap.inputs[1])
            axes = None if arr is None else arr.tolist()
        if axes is None or sorted(int(a) % 4 for a in axes) != [2, 3]:
            return None
    elif gap.op != "GlobalAveragePool":
        return None
    i += 1
    while i < len(ops) and ops[i] in ("Flatten", "Reshape", "Squeeze", "Identity", "Dropout"):
        i += 1
    if i >= len(ops):
        return None
    lin = chain[i]
    if lin.op == "Gemm":
        if lin.attrs.get("transA", 0) or lin.attrs.get("alpha", 1.0) != 1.0:
            return None
        w = _const(lin.inputs[1], inits)
        if w is None:
            return None
        w = w if lin.attrs.get("transB", 0) else w.T
    elif lin.op == "MatMul":
        w = _const(lin.inputs[1], inits)
        if w is None or w.ndim != 2:
            return None
        w = w.T
        if i + 1 < len(ops) and ops[i + 1] == "Add":
            i += 1
    else:
        return None
    if i != len(ops) - 1:
        return None
    return torch.from_numpy(np.array(w, dtype=np.float32, copy=True))


def _constant_node_value(nodes: list[_Node], name: str) -> np.ndarray | None:
    for n in nodes:
        if n.op == "Constant" and n.outputs and n.outputs[0] == name:
            return _constant_attr(n.attrs)
    return None


def _constant_attr(attrs: dict) -> np.ndarray:
    from onnx import numpy_helper

    if "value" in attrs:
        return numpy_helper.to_array(attrs["value"])
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in attrs:
            return np.array(list(attrs[key]), dtype=dtype)
    raise OnnxBackendError(f"unsupported Constant attribute(s): {', '.join(attrs)}")


# -- the head as a torch module -----------------------------------------------------------------------
def _ints(t) -> list[int]:
    if isinstance(t, torch.Tensor):
        return [int(v) for v in t.reshape(-1).tolist()]
    return [int(v) for v in t]


def _pads(pads: list[int] | None, nd: int) -> tuple[list[int], list[int]]:
    pads = list(pads) if pads else [0] * (2 * nd)
    return pads[:nd], pads[nd:]


def _pool_or_conv_padding(x: torch.Tensor, attrs: dict, nd: int, value: float = 0.0):
    """ONNX pads are (begin..., end...); torch takes symmetric padding, so pad explicitly when not."""
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        raise OnnxBackendError(f"auto_pad={attrs['auto_pad']!r} is not supported in the head converter")
    begin, end = _pads(attrs.get("pads"), nd)
    if begin == end:
        return x, begin
    spec = []
    for b_, e_ in zip(reversed(begin), reversed(end), strict=True):
        spec += [b_, e_]
    return F.pad(x, spec, value=value), [0] * nd


def _op_conv(x, w, b=None, *, attrs):
    nd = w.dim() - 2
    x, pad = _pool_or_conv_padding(x, attrs, nd)
    stride = attrs.get("strides", [1] * nd)
    dil = attrs.get("dilations", [1] * nd)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    return conv(x, w, b, stride=stride, padding=pad, dilation=dil, groups=attrs.get("group", 1))


def _op_pool(kind):
    def fn(x, *, attrs):
        k = list(attrs["kernel_shape"])
        nd = len(k)
        fill = -math.inf if kind == "max" else 0.0
        x, pad = _pool_or_conv_padding(x, attrs, nd, value=fill)
        stride = attrs.get("strides", [1] * nd)
        ceil = bool(attrs.get("ceil_mode", 0))
        if kind == "max":
            if attrs.get("dilations") and any(d != 1 for d in attrs["dilations"]):
                raise OnnxBackendError("MaxPool with dilations is not supported in the head converter")
            return {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd](x, k, stride, pad, ceil_mode=ceil)
        cip = bool(attrs.get("count_include_pad", 0))
        return {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd](
            x, k, stride, pad, ceil_mode=ceil, count_include_pad=cip
        )

    return fn


def _reduce_axes(x, axes_in, attrs):
    axes = attrs.get("axes")
    if axes is None and axes_in is not None:
        axes = _ints(axes_in)
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            return None
        axes = list(range(x.dim()))
    return [a % x.dim() for a in axes]


def _op_reduce(fn):
    def op(x, axes=None, *, attrs):
        dims = _reduce_axes(x, axes, attrs)
        if dims is None:
            return x
        return fn(x, dim=dims, keepdim=bool(attrs.get("keepdims", 1)))

    return op


def _op_gemm(a, b, c=None, *, attrs):
    if attrs.get("transA", 0):
        a = a.t()
    if attrs.get("transB", 0):
        b = b.t()
    y = attrs.get("alpha", 1.0) * (a @ b)
    if c is not None:
        y = y + attrs.get("beta", 1.0) * c
    return y


def _op_flatten(x, *, attrs):
    axis = attrs.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis  # axis == rank is legal: (prod(shape), 1)
    lead = math.prod(x.shape[:axis])
    return x.reshape(lead, -1)


def _op_reshape(x, shape, *, attrs):
    dims = _ints(shape)
    if not attrs.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _op_squeeze(x, axes=None, *, attrs):
    axes = attrs.get("axes", None if axes is None else _ints(axes))
    if axes is None:
        return x.squeeze()
    for a in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(a)
    return x


def _op_unsqueeze(x, axes=None, *, attrs):
    axes = attrs.get("axes", None if axes is None else _ints(axes))
    out_rank = x.dim() + len(axes)
    for a in sorted(a % out_rank for a in axes):
        x = x.unsqueeze(a)
    return x


def _op_bn(x, scale, bias, mean, var, *, attrs):
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=attrs.get("epsilon", 1e-5))


def _op_clip(x, lo=None, hi=None, *, attrs):
    lo = attrs.get("min", lo)
    hi = attrs.get("max", hi)
    if lo is not None:
        x = torch.maximum(x, torch.as_tensor(lo, dtype=x.dtype, device=x.device))
    if hi is not None:
        x = torch.minimum(x, torch.as_tensor(hi, dtype=x.dtype, device=x.device))
    return x


def _op_hardsigmoid(x, *, attrs):
    return torch.clamp(attrs.get("alpha", 0.2) * x + attrs.get("beta", 0.5), 0.0, 1.0)


def _op_gelu(x, *, attrs):
    approx = attrs.get("approximate", b"none")
    approx = approx.decode() if isinstance(approx, bytes) else approx
    return F.gelu(x, approximate=approx)


def _op_layernorm(x, scale, bias=None, *, attrs):
    axis = attrs.get("axis", -1) % x.dim()
    shape = x.shape[axis:]
    return F.layer_norm(x, shape, scale, bias, eps=attrs.get("epsilon", 1e-5))


def _op_shape(x, *, attrs):
    dims = list(x.shape)
    start = attrs.get("start", 0)
    end = attrs.get("end", len(dims))
    return torch.tensor(dims[start:end], dtype=torch.int64, device=x.device)


def _op_gather(x, idx, *, attrs):
    axis = attrs.get("axis", 0) % x.dim()
    idx = idx.long()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    if idx.dim() == 0:
        return x.select(axis, int(idx))
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :])


def _op_slice(x, starts, ends, axes=None, steps=None, *, attrs):
    starts, ends = _ints(starts), _ints(ends)
    axes = list(range(len(starts))) if axes is None else _ints(axes)
    steps = [1] * len(starts) if steps is None else _ints(steps)
    index = [slice(None)] * x.dim()
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        if st <= 0:
            raise OnnxBackendError("Slice with a non-positive step is not supported in the head converter")
        n = x.shape[a % x.dim()]
        index[a % x.dim()] = slice(max(min(s, n), -n), max(min(e, n), -n - 1) if e < 0 else min(e, n), st)
    return x[tuple(index)]


def _op_cast(x, *, attrs):
    from onnx import helper

    dtype = torch.from_numpy(np.zeros(0, dtype=helper.tensor_dtype_to_np_dtype(attrs["to"]))).dtype
    return x.to(dtype)


def _op_constant_of_shape(shape, *, attrs):
    from onnx import numpy_helper

    fill = numpy_helper.to_array(attrs["value"]) if "value" in attrs else np.zeros(1, np.float32)
    val = torch.from_numpy(fill.copy()).reshape(-1)
    return val.expand(_ints(shape)).clone().to(shape.device)


def _op_softmax(fn):
    def op(x, *, attrs):
        return fn(x, dim=attrs.get("axis", -1))

    return op


def _binary(fn):
    return lambda a, b, *, attrs: fn(a, b)


def _unary(fn):
    return lambda x, *, attrs: fn(x)


_OPS = {
    "Conv": _op_conv,
    "BatchNormalization": _op_bn,
    "Relu": _unary(F.relu),
    "LeakyRelu": lambda x, *, attrs: F.leaky_relu(x, attrs.get("alpha", 0.01)),
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "HardSigmoid": _op_hardsigmoid,
    "HardSwish": _unary(F.hardswish),
    "Gelu": _op_gelu,
    "Erf": _unary(torch.erf),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Sqrt": _unary(torch.sqrt),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Clip": _op_clip,
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(torch.div),
    "Pow": _binary(torch.pow),
    "MatMul": _binary(torch.matmul),
    "Gemm": _op_gemm,
    "GlobalAveragePool": lambda x, *, attrs: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "GlobalMaxPool": lambda x, *, attrs: x.amax(dim=tuple(range(2, x.dim())), keepdim=True),
    "MaxPool": _op_pool("max"),
    "AveragePool": _op_pool("avg"),
    "ReduceMean": _op_reduce(torch.mean),
    "ReduceSum": _op_reduce(torch.sum),
    "ReduceMax": _op_reduce(torch.amax),
    "Flatten": _op_flatten,
    "Reshape": _op_reshape,
    "Squeeze": _op_squeeze,
    "Unsqueeze": _op_unsqueeze,
    "Transpose": lambda x, *, attrs: x.permute(*attrs["perm"]) if "perm" in attrs else x.permute(*range(x.dim())[::-1]),
    "Concat": lambda *xs, attrs: torch.cat(xs, dim=attrs["axis"]),
    "Identity": _unary(lambda x: x),
    "Dropout": lambda x, *rest, attrs: x,  # inference: the identity
    "Softmax": _op_softmax(torch.softmax),
    "LogSoftmax": _op_softmax(torch.log_softmax),
    "LayerNormalization": _op_layernorm,
    "Shape": _op_shape,
    "Gather": _op_gather,
    "Slice": _op_slice,
    "Cast": _op_cast,
    "ConstantOfShape": _op_constant_of_shape,
    "Expand": lambda x, shape, *, attrs: x * torch.ones(_ints(shape), dtype=x.dtype, device=x.device),
}


class OnnxHead(nn.Module):
    """The ONNX nodes between the target tensor and the scores, run as torch ops.

    ``forward(a, *extra)`` returns the scores; it is differentiable in ``a`` (and vmap-able in
    its backward), so the engine's VJP gives dy^c/dA for all classes at once.
    """

    def __init__(self, nodes: list[_Node], target: str, extra: list[str], output: str, inits, opset: int):
        super().__init__()
        from onnx import numpy_helper

        unsupported = [n for n in nodes if n.op not in _OPS and n.op != "Constant"]
        if unsupported:
            n = unsupported[0]
            raise OnnxBackendError(
                f"ONNX op {n.op!r} (node {n.name or n.outputs[0]!r}) between the target tensor {target!r} and the "
                "scores is not supported by the ONNX->torch head converter; pick a later target tensor "
                f"(`gradcam-batch layers`) or one of the supported ops: {', '.join(sorted(_OPS))}"
            )
        self.nodes = nodes
        self.target = target
        self.extra = list(extra)
        self.output = output
        self.opset = opset
        used = {x for n in nodes for x in n.inputs if x}
        self._const_names = []
        for i, name in enumerate(sorted(used & set(inits))):
            arr = numpy_helper.to_array(inits[name])
            self.register_buffer(f"c{i}", torch.from_numpy(np.array(arr, copy=True)), persistent=False)
            self._const_names.append(name)
        for n in nodes:
            if n.op == "Constant":
                i = len(self._const_names)
                self.register_buffer(f"c{i}", torch.from_numpy(np.array(_constant_attr(n.attrs), copy=True)), False)
                self._const_names.append(n.outputs[0])

    def forward(self, a: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        env: dict[str, torch.Tensor] = {name: getattr(self, f"c{i}") for i, name in enumerate(self._const_names)}
        env[self.target] = a
        env.update(zip(self.extra, extra, strict=True))
        for node in self.nodes:
            if node.op == "Constant":
                continue
            args = [env[x] if x else None for x in node.inputs]
            while args and args[-1] is None:
                args.pop()
            out = _OPS[node.op](*args, attrs=node.attrs)
            env[node.outputs[0]] = out
        return env[self.output]


__all__ = ["OnnxBackendError", "OnnxHead", "OnnxModel", "PROVIDER_ORDER", "default_providers"]
