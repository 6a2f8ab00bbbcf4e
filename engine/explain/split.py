"""Split a model at its target layer into a no-grad backbone and a differentiable head.

Grad-CAM needs dy/dA only, so nothing before the target layer has to be differentiated.
``split_at`` traces the model with ``torch.fx`` (the target module kept as one leaf call)
and cuts the graph in two:

- ``backbone(x) -> (A, *extra)``: everything the head needs that does not depend on A;
- ``head(A, *extra) -> output``: every node downstream of the target call.

Both are ``GraphModule``s whose submodules *are* the caller's top-level submodules, so every
parameter and buffer the graph reads is looked up through its owning module when the graph runs:
``.to()``, ``.double()``, ``.half()`` or a buffer assigned anew (``bn.running_mean = t``) need
nothing. (A plain ``GraphModule(model, graph)`` would hold the buffer objects of cut time.) The
model's own root-level tensors are re-read by ``SplitModel.sync`` before each use. Nothing is
copied and nothing of the caller's model changes. A model that FX cannot trace or cut raises
``SplitError`` with the cause, and the engine falls back to a forward hook (see ``explainer.py``).

``analyze_head`` recognizes a global-average-pool -> (flatten) -> linear head, for which
Grad-CAM's weights have the closed form alpha = W[c] / (h * w) (the CAM equivalence).

A model that is not a torch module cuts itself (``SplitBackend``): the ONNX Runtime backend
(``engine/models/onnx_backend.py``) returns a ``SplitModel`` whose backbone is a session that ends at
the target tensor and whose head is rebuilt in torch, with the linear layer of its closed form when it
has one. The Explainer runs either split the same way.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F


class _LeafTracer(fx.Tracer):
    """The default tracer, with the target module kept as a single call."""

    def __init__(self, leaf: nn.Module):
        super().__init__()
        self._leaf = leaf

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is self._leaf or super().is_leaf_module(m, module_qualified_name)


class SplitError(Exception):
    """The model cannot be cut at the target layer by torch.fx; the message says why, in one line."""


@dataclass
class SplitModel:
    backbone: Callable[[torch.Tensor], tuple]  # x -> (A, *extra), run with no graph: an FX graph or a session
    head: nn.Module  # (A, *extra) -> output, differentiated: an FX graph, or a head rebuilt in torch
    n_extra: int  # inputs of the head besides A
    root_tensors: tuple[str, ...] = ()  # the model's own (root-level) parameters and buffers the graphs read
    # The GAP -> linear layer, when the backend that cut a head which is not an FX graph recognized one
    # (an FX head is read by analyze_head).
    linear: LinearHead | None = None

    def sync(self, model: nn.Module) -> None:
        """Point the graphs at the model's current root-level tensors (a buffer assigned anew, ``.to()``).

        Tensors of submodules need nothing: the graphs reach them through the model's own submodules."""
        for name in self.root_tensors:
            value = getattr(model, name)
            for gm in (self.backbone, self.head):
                if name in gm._parameters or name in gm._buffers:
                    held = gm._parameters.get(name, gm._buffers.get(name))
                    if held is not value:
                        _set_tensor(gm, name, value)


def _set_tensor(gm: nn.Module, name: str, value: torch.Tensor) -> None:
    gm._parameters.pop(name, None)
    gm._buffers.pop(name, None)
    if isinstance(value, nn.Parameter):
        gm._parameters[name] = value
    else:
        gm._buffers[name] = value


def _graph_module(model: nn.Module, graph: fx.Graph, class_name: str) -> fx.GraphModule:
    """A GraphModule that reads the model's submodules, parameters and buffers at call time.

    ``fx.GraphModule(model, graph)`` installs fresh empty modules along each qualified name and copies
    the buffer objects into them, a snapshot that ``.to()`` or ``bn.running_mean = t`` leaves stale.
    Replacing each top-level child by the model's own object makes every path resolve live."""
    gm = fx.GraphModule(model, graph, class_name=class_name)
    for name in list(gm._modules):
        gm._modules[name] = model._modules[name]
    return gm


def _describe(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0][:100]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def split_at(model: nn.Module, layer_name: str) -> SplitModel:
    """Cut ``model`` at ``layer_name``; ``SplitError`` (with the cause) when it cannot be traced or cut there."""
    leaf = model.get_submodule(layer_name)
    try:
        tracer = _LeafTracer(leaf)
        graph = tracer.trace(model)
    except Exception as exc:  # any tracing failure means: use the hook path instead
        raise SplitError(f"torch.fx cannot trace {type(model).__name__} ({_describe(exc)})") from exc
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == layer_name]
    if len(calls) != 1:
        # a module called several times (or not at all) is ambiguous to cut
        raise SplitError(f"the traced graph calls {layer_name!r} {len(calls)} times, not once")
    target = calls[0]

    downstream: set[fx.Node] = set()
    stack = [target]
    while stack:
        node = stack.pop()
        for user in node.users:
            if user not in downstream:
                downstream.add(user)
                stack.append(user)
    output = next(n for n in graph.nodes if n.op == "output")
    if output not in downstream:
        raise SplitError(f"the traced graph's output does not depend on {layer_name!r}")
    head_nodes = [n for n in graph.nodes if n in downstream and n.op != "output"]

    # Values computed upstream that the head needs (skip connections around the cut, the
    # input itself, ...). get_attr nodes are cheap and re-created inside the head.
    extra: list[fx.Node] = []
    for node in head_nodes + [output]:
        for inp in node.all_input_nodes:
            if inp is target or inp in downstream or inp.op == "get_attr" or inp in extra:
                continue
            extra.append(inp)

    backbone_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node in downstream or node.op == "output":
            continue
        env[node] = backbone_graph.node_copy(node, lambda n: env[n])
    backbone_graph.output((env[target], *[env[n] for n in extra]))

    head_graph = fx.Graph()
    henv: dict[fx.Node, fx.Node] = {target: head_graph.placeholder("target_activation")}
    for i, node in enumerate(extra):
        henv[node] = head_graph.placeholder(f"upstream_{i}")

    def lookup(n: fx.Node) -> fx.Node:
        if n not in henv and n.op == "get_attr":
            henv[n] = head_graph.node_copy(n, lookup)
        return henv[n]

    for node in head_nodes:
        henv[node] = head_graph.node_copy(node, lookup)
    head_graph.output(fx.node.map_arg(output.args[0], lookup))

    try:
        backbone = _graph_module(model, backbone_graph, "Backbone")
        head = _graph_module(model, head_graph, "Head")
        backbone.graph.eliminate_dead_code()
        add_in_place(backbone)
        backbone.recompile()
    except Exception as exc:
        raise SplitError(f"the cut graph cannot be built ({_describe(exc)})") from exc
    own = {n for n, _ in model.named_parameters(recurse=False)} | {n for n, _ in model.named_buffers(recurse=False)}
    root_tensors = tuple(sorted(n for gm in (backbone, head) for n in (*gm._parameters, *gm._buffers) if n in own))
    return SplitModel(backbone=backbone, head=head, n_extra=len(extra), root_tensors=root_tensors)


# Modules whose output is a tensor of their own (never a view of their input, nor their input itself).
_FRESH_OUTPUT = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.Linear, nn.LayerNorm, nn.GroupNorm)


def add_into(a, b):
    """``a + b``, written into ``a`` when that gives the same tensor: ``a`` has the result's shape and dtype
    and is outside autograd (the backbone runs in inference mode). Otherwise ``a + b``."""
    if (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and not a.requires_grad
        and a.shape == torch.broadcast_shapes(a.shape, b.shape)
        and a.dtype == torch.result_type(a, b)
    ):
        return a.add_(b)
    return a + b


def add_in_place(gm: fx.GraphModule) -> int:
    """Residual additions of the no-grad backbone written into their first operand, as eager code does.

    FX records ``out += identity`` (a Bottleneck's) as ``out + identity``: an out-of-place add that
    allocates a new activation-sized tensor per block; on a CPU that is most of the backbone's time
    above the model's own inference. An add is rewritten to ``add_into`` only where one operand is the
    fresh output of a convolution, norm or linear module that nothing else reads (no other user, not a
    graph output), so no one sees the write; that operand goes first. Returns how many adds were
    rewritten."""
    modules = dict(gm.named_modules())
    n = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (operator.add, operator.iadd, torch.add) or node.kwargs:
            continue
        if len(node.args) != 2:
            continue

        def fresh(arg) -> bool:
            return (
                isinstance(arg, fx.Node)
                and arg.op == "call_module"
                and isinstance(modules.get(arg.target), _FRESH_OUTPUT)
                and len(arg.users) == 1
            )

        a, b = node.args
        if fresh(a):
            node.target = add_into
            n += 1
        elif fresh(b):  # x + block(x) (an inverted residual): into the block's output; IEEE addition commutes
            node.target = add_into
            node.args = (b, a)
            n += 1
    return n


@dataclass
class LinearHead:
    """A GAP -> linear head: scores = mean_hw(A) @ weight.T + bias. The weights are read from the
    module at each use, so a new parameter object (``load_state_dict(assign=True)``) is seen."""

    linear: nn.Linear

    @property
    def weight(self) -> torch.Tensor:  # (N, K)
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:  # (N,)
        return self.linear.bias


_GAP_MODULES = (nn.AdaptiveAvgPool2d,)
_PASS_MODULES = (nn.Flatten, nn.Identity, nn.Dropout)


def _is_gap(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, _GAP_MODULES):
            size = m.output_size
            return size in (1, (1, 1), [1, 1])
        return False
    if node.op == "call_function" and node.target in (F.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool2d):
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return size in (1, (1, 1), [1, 1])
    if node.op in ("call_function", "call_method") and node.target in (torch.mean, "mean"):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None:
            return False
        dims = tuple(dims) if isinstance(dims, (list, tuple)) else (dims,)
        return sorted(d % 4 for d in dims) == [2, 3]
    return False


def _is_flatten(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.Flatten):
            return m.start_dim == 1 and m.end_dim == -1
        # Dropout in eval mode and Identity pass values through unchanged.
        return isinstance(m, (nn.Identity, nn.Dropout))
    if node.op == "call_function" and node.target is torch.flatten:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    if node.op == "call_method" and node.target == "flatten":
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    if node.op == "call_method" and node.target in ("view", "reshape"):
        shape = node.args[1:]
        if len(shape) == 1 and isinstance(shape[0], (list, tuple)):
            shape = tuple(shape[0])
        return len(shape) == 2 and shape[1] == -1
    return False


def _is_batch_size(node: fx.Node) -> bool:
    """``x.size(0)`` or ``x.shape[0]``: how ``x.view(x.size(0), -1)`` spells a flatten."""
    if node.op == "call_method" and node.target == "size":
        return node.args[1:] == (0,) or node.kwargs.get("dim") == 0
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        src = node.args[0]
        return (
            isinstance(src, fx.Node) and src.op == "call_function" and src.target is getattr and src.args[1] == "shape"
        )
    return False


def _is_shape_query(node: fx.Node) -> bool:
    if _is_batch_size(node):
        return True
    # x.shape, when every use of it is a batch-size query
    return (
        node.op == "call_function"
        and node.target is getattr
        and node.args[1] == "shape"
        and all(_is_batch_size(u) for u in node.users)
    )


class SplitBackend(Protocol):
    """A model that is not a torch module and cuts itself at its target layer (the ONNX Runtime backend)."""

    def resolve_target_layer(self, target_layer: str | None, sample: torch.Tensor) -> str:
        """The given layer name, checked, or the auto-detected one (None) for inputs like ``sample``."""
        ...

    def split_at(self, target_layer: str) -> SplitModel:
        """The model cut at ``target_layer``: a no-grad backbone and a differentiable torch head."""
        ...


def analyze_head(split: SplitModel) -> LinearHead | None:
    """Return the linear layer of a GAP -> (flatten) -> linear head, or None."""
    if not isinstance(split.head, fx.GraphModule):
        return split.linear
    if split.n_extra:
        return None
    modules = dict(split.head.named_modules())
    nodes = [n for n in split.head.graph.nodes if n.op not in ("placeholder", "output") and not _is_shape_query(n)]
    out = next(n for n in split.head.graph.nodes if n.op == "output")
    placeholder = next(n for n in split.head.graph.nodes if n.op == "placeholder")
    if not nodes or not isinstance(out.args[0], fx.Node):
        return None
    # Walk the single chain from the activation to the output.
    chain: list[fx.Node] = []
    cur = placeholder
    while True:
        users = [u for u in cur.users if not _is_shape_query(u)]
        if len(users) != 1:
            return None
        nxt = users[0]
        if nxt is out:
            break
        if [n for n in nxt.all_input_nodes if not _is_shape_query(n)] != [cur]:
            return None
        chain.append(nxt)
        cur = nxt
    if len(chain) != len(nodes):
        return None
    i = 0
    while i < len(chain) and _is_flatten(chain[i], modules) and chain[i].op == "call_module":
        i += 1  # identity/dropout before the pooling
    if i >= len(chain) or not _is_gap(chain[i], modules):
        return None
    i += 1
    while i < len(chain) and _is_flatten(chain[i], modules):
        i += 1
    if i != len(chain) - 1:
        return None
    last = chain[i]
    if last.op == "call_module" and isinstance(modules[last.target], nn.Linear):
        return LinearHead(modules[last.target])
    return None


__all__ = ["LinearHead", "SplitBackend", "SplitError", "SplitModel", "analyze_head", "split_at"]
