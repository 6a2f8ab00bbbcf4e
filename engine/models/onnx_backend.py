"""The ONNX Runtime backend: an ``.onnx`` classifier as a split model, explained like a torch one.

ONNX Runtime has no autograd, so the model is cut at the target tensor A the way the engine cuts a
torch model (``engine/explain/split.py``), and ``OnnxModel.split_at`` returns a ``SplitModel``:

- the backbone is an ORT session of the graph up to A (and any tensor the head needs from before
  it, such as a skip connection), nothing after it; ``backbone(x) -> (A, *extra)``;
- the head is the rest of the graph rebuilt in torch (``OnnxHead``, through the op table of
  ``onnx_ops.py``), which the Explainer differentiates like any head. When it is a global-average-pool
  -> (flatten/reshape) -> Gemm/MatMul(+Add) chain, the split carries the weight matrix, and every
  gradient method takes the closed form alpha = W[c] / (h * w).

So every method of the Explainer (and Score-CAM's masked forwards, through the backbone session), the
metrics and the run work on ONNX models with no backend branch; one ORT run of the backbone serves all
methods of a batch. Guided Grad-CAM needs a backward through the backbone, and ``reshape='tokens'`` a
token output; the Explainer refuses both.

Target layer: an ONNX tensor name, or auto-detected as the last 4-D tensor with h*w > 1 in
topological order that the scores depend on and that is not produced by a pooling or
pass-through op (for ResNet the last ReLU, for VGG the ReLU before the last max-pool).

Providers: on a CUDA device TensorRT, then CUDA, then CPU, whichever this ONNX Runtime build
has; on CPU the CPU provider; ``providers=`` overrides. On CUDA the inputs and outputs are
bound to torch CUDA buffers through IO binding, so nothing goes through host memory (the outputs
reach torch through DLPack, which ONNX Runtime has by default from 1.21; without it they are
copied through host memory, and a warning says so once).

Sessions: one ORT session per set of outputs, of the graph pruned to what they need: the backbone's
(A and the head's inputs from before it) and plain inference's (the scores, ``OnnxModel(images)``). The
layer probe's session (every float tensor an output, so ORT can reuse no buffer) is dropped as soon as
the probe is done; the others are kept, at most ``MAX_CACHED_SESSIONS``, the least recently used
dropped first.

Why one module past 500 lines: the session cache, the layer probe and the cut all read the same parsed
graph (nodes, producers, initializers, types) that ``OnnxModel`` holds; the op table, which reads none of
it, is in ``onnx_ops.py``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from gradcam_batch.engine.explain.layers import LayerInfo, TargetLayerError
from gradcam_batch.engine.explain.split import LinearHead, SplitModel
from gradcam_batch.engine.models.onnx_ops import OnnxBackendError, OnnxHead, OnnxNode, constant_value

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_POOL_OPS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool", "ReduceMean"}
_PASS_OPS = {"Identity", "Dropout", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Cast"}
# Sessions kept per model, the most recently used ones: one per set of outputs asked for (the backbone
# of the explained target, plain inference). Each holds its own arena (GPU memory on CUDA) until it is dropped.
MAX_CACHED_SESSIONS = 2


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


class OnnxModel:
    """An ONNX classifier run by ONNX Runtime; ``split_at`` makes it a split model for ``Explainer``
    (see the module docstring)."""

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
            OnnxNode(
                n.op_type,
                n.name,
                list(n.input),
                list(n.output),
                {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute},
            )
            for n in graph.node
        ]
        self._producer = {o: i for i, n in enumerate(self.nodes) for o in n.outputs if o}
        # A node with a subgraph (If, Loop) reads outer tensors that its inputs do not list, so such a graph
        # is not pruned per session.
        self._prunable = not any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute
        )

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
        self._splits: dict[str, SplitModel] = {}
        self._auto_targets: dict[tuple[int, ...], str] = {}  # the auto-detected tensor per input size

    # -- running ----------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return f"OnnxModel({self.path.name!r}, providers={self.providers})"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """The scores alone, like calling a torch classifier (for plain inference and baselines)."""
        return self.run(images, (self.output_name,))[self.output_name]

    def eval(self) -> OnnxModel:
        return self  # an exported graph has its inference semantics fixed

    def _session(self, outputs: tuple[str, ...], *, keep: bool = True):
        """The session that computes ``outputs``: cached when ``keep``, else made for one use."""
        sess = self._sessions.pop(outputs, None)
        if sess is None:
            sess = self._new_session(outputs)
        if keep:
            self._sessions[outputs] = sess  # the most recently used last
            while len(self._sessions) > MAX_CACHED_SESSIONS:
                del self._sessions[next(iter(self._sessions))]
        return sess

    def _new_session(self, outputs: tuple[str, ...]):
        """A session of the graph with ``outputs`` as its outputs, pruned to the nodes they need."""
        onnx, ort = _require_onnx()
        proto = onnx.ModelProto()
        proto.CopyFrom(self._proto)
        graph = proto.graph
        if self._prunable:
            needed = self._upstream(outputs)
            graph.ClearField("node")
            graph.node.extend(n for n in self._proto.graph.node if any(o in needed for o in n.output))
            graph.ClearField("initializer")
            graph.initializer.extend(t for t in self._proto.graph.initializer if t.name in needed)
        declared = {o.name: o for o in self._proto.graph.output}
        graph.ClearField("output")
        for name in outputs:
            if name in declared:
                graph.output.append(declared[name])
            else:
                graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
                graph.output[-1].type.tensor_type.elem_type = self._types.get(name) or onnx.TensorProto.FLOAT
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads = self.threads
        try:
            return ort.InferenceSession(proto.SerializeToString(), sess_options=opts, providers=self.providers)
        except Exception as exc:
            raise OnnxBackendError(f"ONNX Runtime cannot load {self.path.name}: {exc}") from None

    def run(
        self, images: torch.Tensor, outputs: Sequence[str], *, keep_session: bool = True
    ) -> dict[str, torch.Tensor]:
        """The ``outputs`` tensors for a batch, as torch tensors on ``images.device``; ORT runs only the
        nodes they need.

        ``keep_session=False``: the session made for these outputs is dropped after this call
        (unless one was cached already), with its memory.
        """
        names = tuple(dict.fromkeys(outputs))
        sess = self._session(names, keep=keep_session or names in self._sessions)
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

    def _upstream(self, names: Sequence[str], stop: str | None = None) -> set[str]:
        """Every tensor that ``names`` depend on, themselves included (their backward slice); the
        slice does not go past ``stop``."""
        needed, stack = set(), list(names)
        while stack:
            t = stack.pop()
            if t in needed:
                continue
            needed.add(t)
            i = self._producer.get(t)
            if i is not None and t != stop:
                stack.extend(x for x in self.nodes[i].inputs if x)
        return needed

    def _depends(self) -> set[str]:
        """Every tensor that the scores depend on."""
        return self._upstream([self.output_name])

    def probe_layers(self, sample: torch.Tensor) -> list[LayerInfo]:
        """One run with every float tensor as an output: name, producing op, shape; marks candidates."""
        values = self._float_values()
        shapes: dict[str, tuple[int, ...]] = {}
        try:
            # Every tensor an output: ORT can reuse no buffer, so this session's arena is the whole
            # network's activations. It is dropped after this one run.
            outs = self.run(sample, [*values, self.output_name], keep_session=False)
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
        """Check the given tensor name, or auto-detect one with the sample batch (once per input size)."""
        if target_layer is None and tuple(sample.shape[1:]) in self._auto_targets:
            return self._auto_targets[tuple(sample.shape[1:])]
        if target_layer is None:
            infos = self.probe_layers(sample[:1])
            pick = next((i.name for i in infos if i.chosen), None)
            if pick is None:
                seen = [f"{i.name} {list(i.shape)}" for i in infos if i.shape is not None and len(i.shape) == 4]
                raise TargetLayerError(
                    "could not find a target tensor: no 4-D (B, K, h, w) tensor with h*w > 1 feeds the scores. "
                    f"4-D tensors seen: {'; '.join(seen[-10:]) or 'none'}"
                )
            target_layer = self._auto_targets[tuple(sample.shape[1:])] = pick
        elif not isinstance(target_layer, str):
            raise TargetLayerError("the target layer of an ONNX model is a tensor name (see `gradcam-batch layers`)")
        if target_layer not in self._producer:
            close = [n for n in self._producer if target_layer in n][:5]
            hint = f"; similar: {', '.join(close)}" if close else "; list them with `gradcam-batch layers`"
            raise TargetLayerError(f"{self.path.name} has no tensor {target_layer!r}{hint}")
        if target_layer not in self._depends():
            raise TargetLayerError(f"the scores do not depend on tensor {target_layer!r}")
        return target_layer

    # -- the split ----------------------------------------------------------------------------------
    def split_at(self, target: str) -> SplitModel:
        """The model cut at tensor ``target``: an ORT backbone up to it and the torch head after it."""
        if target not in self._splits:
            self._splits[target] = self._split(target)
        return self._splits[target]

    def _split(self, target: str) -> SplitModel:
        if target not in self._producer:
            raise TargetLayerError(f"{self.path.name} has no tensor {target!r}")
        # The head: the nodes the scores need that are downstream of the target, or computed from weights
        # alone (Constant, a reshape's shape). What the head reads from before the target comes from the
        # backbone session, which ends there: nothing upstream is computed twice.
        needed = self._upstream([self.output_name], stop=target)
        constant, down = set(self._initializers), {target}
        nodes = []
        for node in self.nodes:
            inputs = [x for x in node.inputs if x]
            if all(x in constant for x in inputs):
                constant.update(o for o in node.outputs if o)
            elif any(x in down for x in inputs):
                down.update(o for o in node.outputs if o)
            else:
                continue
            if any(o in needed for o in node.outputs if o):
                nodes.append(node)
        if self.output_name not in down:
            raise TargetLayerError(f"the scores do not depend on tensor {target!r}")
        produced = {o for n in nodes for o in n.outputs}
        extra: list[str] = []
        for n in nodes:
            for x in n.inputs:
                if x and x != target and x not in produced and x not in self._initializers and x not in extra:
                    extra.append(x)  # computed before the target (a skip connection) or the input itself
        head = OnnxHead(nodes, target, extra, self.output_name, self._initializers, self.opset).to(self.device)
        linear = None
        if not extra:
            weight = _linear_weight(nodes, target, self.output_name, self._initializers)
            if weight is not None:
                layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
                layer.weight = nn.Parameter(weight.to(self.device), requires_grad=False)
                linear = LinearHead(layer)
        return SplitModel(backbone=OnnxBackbone(self, target, extra), head=head, n_extra=len(extra), linear=linear)


class OnnxBackbone:
    """A split's backbone: the ORT session of the graph up to the target tensor.

    ``backbone(x) -> (A, *extra)`` as torch tensors on ``x``'s device, ``extra`` being the tensors from
    before the target that the head reads. Runs no node after the target.
    """

    def __init__(self, model: OnnxModel, target: str, extra: list[str]):
        self.model, self.target, self.extra = model, target, list(extra)
        # The input itself, when the head reads it, is not fetched from ORT: it is the images.
        self._fetch = tuple(dict.fromkeys(n for n in (target, *extra) if n != model.input_name))

    def __repr__(self) -> str:
        return f"OnnxBackbone({self.model.path.name!r}, target={self.target!r})"

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = self.model.run(x, self._fetch)
        acts = outs[self.target]
        if acts.is_floating_point():
            acts = acts.float()
        extra = (x.float() if name == self.model.input_name else outs[name] for name in self.extra)
        return (acts, *extra)


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


def _linear_weight(nodes: list[OnnxNode], target: str, output: str, inits) -> torch.Tensor | None:
    """W (N, K) when the head is GAP/ReduceMean -> (Flatten/Reshape/Squeeze) -> Gemm/MatMul (+Add)."""
    if not nodes:
        return None
    # Shape-computing nodes (Constant, Shape, ...) may sit beside the chain; only the chain counts.
    consumers: dict[str, list[OnnxNode]] = {}
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


def _constant_node_value(nodes: list[OnnxNode], name: str) -> np.ndarray | None:
    for n in nodes:
        if n.op == "Constant" and n.outputs and n.outputs[0] == name:
            return constant_value(n.attrs)
    return None


__all__ = [
    "MAX_CACHED_SESSIONS",
    "PROVIDER_ORDER",
    "OnnxBackbone",
    "OnnxBackendError",
    "OnnxHead",
    "OnnxModel",
    "default_providers",
]
