"""The ONNX ops a head is rebuilt from in torch: the op table and the module that interprets it.

ONNX Runtime has no autograd, so the ONNX backend (``onnx_backend.py``) runs the graph up to the target
tensor in a session and rebuilds the rest, the head, in torch: ``OnnxHead`` runs the head's nodes
through ``OPS``, one small function per ONNX op, so the engine differentiates it like any torch head.
The table covers the ops that classifier heads use, for every opset the torch exporters write; an op
outside it is named in the error, and a later target tensor usually avoids it.

Why an interpreter and not a converter package: with torch 2.14 exports of resnet18 and
mobilenet_v3_small, onnx2torch 1.5.15 failed on both exporters (TorchScript exporter, opset 17:
KeyError on a BatchNorm-folded Conv parameter such as ``onnx::Conv_197``; dynamo exporter, opset 20:
no ReduceMean-18 converter); onnxslim 0.1.98 pre-processing fixed the first case only; onnx2pytorch
0.6.0 converted the dynamo graphs but failed on the opset-17 ones (its Conv2d called with an extra
argument). A head is a handful of ops, so they are interpreted directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class OnnxBackendError(ValueError):
    """The ONNX model cannot be explained as asked (raised by the backend and by its head's ops)."""


@dataclass
class OnnxNode:
    """One node of the graph, with its attributes decoded (``onnx.helper.get_attribute_value``)."""

    op: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict


def constant_value(attrs: dict) -> np.ndarray:
    """The value of a ``Constant`` node, from its attributes."""
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


# -- the op table ----------------------------------------------------------------------------------
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


OPS = {
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

    def __init__(self, nodes: list[OnnxNode], target: str, extra: list[str], output: str, inits, opset: int):
        super().__init__()
        from onnx import numpy_helper

        unsupported = [n for n in nodes if n.op not in OPS and n.op != "Constant"]
        if unsupported:
            n = unsupported[0]
            raise OnnxBackendError(
                f"ONNX op {n.op!r} (node {n.name or n.outputs[0]!r}) between the target tensor {target!r} and the "
                "scores is not supported by the ONNX->torch head converter; pick a later target tensor "
                f"(`gradcam-batch layers`) or one of the supported ops: {', '.join(sorted(OPS))}"
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
                self.register_buffer(f"c{i}", torch.from_numpy(np.array(constant_value(n.attrs), copy=True)), False)
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
            out = OPS[node.op](*args, attrs=node.attrs)
            env[node.outputs[0]] = out
        return env[self.output]


__all__ = ["OPS", "OnnxBackendError", "OnnxHead", "OnnxNode", "constant_value"]
