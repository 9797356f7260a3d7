"""ONNX QDQ nodes for one quantized activation tensor, built with the ``onnx`` API from a :class:`QDQSpec`.

:func:`lightning_dqa.deploy.onnx.export.export_onnx` traces the model with one placeholder node per quantizer and then
calls :func:`replace_placeholders`, which swaps each placeholder for the subgraph below (``[...]`` only where
needed)::

    x -> [Add noise] -> [ReduceMax(Abs) -> scales]      (NoisyQuant noise; dynamic scales at run time)
      -> [Max lo] -> [Min hi]                           (per-channel code ranges narrower than the carrier)
      -> QuantizeLinear(scale, axis=C) -> DequantizeLinear(scale, axis=C) -> [Sub noise] -> y

The clamps act in float before quantizing, with per-channel bounds ``qmin * scale`` and ``qmax * scale`` (ONNX
``Clip`` takes scalar bounds only); dividing a clamped value by its scale lands within float rounding of the
integer bound, so the codes are those of ``clamp(round(x / scale), qmin, qmax)``. Keeping ``QuantizeLinear``
and ``DequantizeLinear`` adjacent leaves the canonical QDQ pair that runtimes recognise.

``onnx`` is imported inside the functions, so this module imports without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["PLACEHOLDER_DOMAIN", "QDQSpec", "replace_placeholders"]

PLACEHOLDER_DOMAIN = "lightning_dqa.placeholder"

# (signed, carrier bits) -> (ONNX element type name, numpy dtype, lowest code, highest code)
_CARRIERS: dict[tuple[bool, int], tuple[str, Any, int, int]] = {
    (True, 8): ("INT8", np.int8, -128, 127),
    (False, 8): ("UINT8", np.uint8, 0, 255),
    (True, 16): ("INT16", np.int16, -32768, 32767),
    (False, 16): ("UINT16", np.uint16, 0, 65535),
}


@dataclass
class QDQSpec:
    """What one quantizer computes, in the terms an ONNX graph needs.

    Attributes:
        name: qualified name of the quantized layer (node names and error messages).
        bits: ``n``, the main code width.
        width: the widest code of any channel: ``n + m`` when the layer has important channels, else ``n``.
        signed: signed or unsigned codes.
        channel_dim: channel axis as the quantizer sees it (may be negative).
        shift: ``(C,)`` float32, ``2**m`` on important channels and 1 elsewhere.
        qmin: ``(C,)`` float32 lowest code per channel.
        qmax: ``(C,)`` float32 highest code per channel.
        scale: ``(C,)`` float32 per-channel quantization step ``scale_n / shift``; ``None`` for dynamic scales.
        noise: ``(C,)`` float32 NoisyQuant noise added before and subtracted after; ``None`` without noise.
        ndim: rank of the quantized tensor, recorded while tracing.

    """

    name: str
    bits: int
    width: int
    signed: bool
    channel_dim: int
    shift: Tensor
    qmin: Tensor
    qmax: Tensor
    scale: Tensor | None = None
    noise: Tensor | None = None
    ndim: int | None = None

    @property
    def carrier_bits(self) -> int:
        """8 when every code fits a byte, else 16."""
        return 8 if self.width <= 8 else 16

    @property
    def axis(self) -> int:
        """The channel axis as a non-negative index (needs ``ndim``)."""
        if self.ndim is None:
            raise RuntimeError(f"Layer {self.name!r}: the quantized tensor's rank was not recorded while tracing")
        return self.channel_dim % self.ndim


class _Nodes:
    """Collects the nodes and initializers of one layer's QDQ subgraph, naming everything after the layer."""

    def __init__(self, spec: QDQSpec, index: int) -> None:
        import onnx

        self.onnx = onnx
        self.spec = spec
        self.prefix = f"dqa{index}/{spec.name}"
        self.nodes: list[Any] = []
        self.inits: list[Any] = []

    def const(self, tag: str, value: np.ndarray) -> str:
        name = f"{self.prefix}/{tag}"
        self.inits.append(self.onnx.numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: list[str], tag: str, out: str | None = None, **attrs: Any) -> str:
        out = out or f"{self.prefix}/{tag}_out"
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, [out], name=f"{self.prefix}/{tag}", **attrs))
        return out

    def channel_shape(self) -> list[int]:
        """Shape that broadcasts a ``(C,)`` vector against the quantized tensor, e.g. ``[1, C, 1, 1]``."""
        shape = [1] * int(self.spec.ndim or 0)
        shape[self.spec.axis] = -1
        return shape


def _f32(t: Tensor, shape: list[int] | None = None) -> np.ndarray:
    a = t.detach().to(torch.float32).cpu().numpy()
    return a.reshape(shape) if shape is not None else a


def _dynamic_scale(b: _Nodes, x: str, opset: int) -> str:
    """Run-time per-channel step ``where(max > 0, max / 2**(n - signed), 1) / shift`` of ``x``, shape ``(C,)``."""
    spec = b.spec
    axes = [d for d in range(int(spec.ndim or 0)) if d != spec.axis]
    absx = b.op("Abs", [x], "Abs")
    if opset >= 18:
        amax = b.op("ReduceMax", [absx, b.const("axes", np.array(axes, np.int64))], "ReduceMax", keepdims=0)
    else:
        amax = b.op("ReduceMax", [absx], "ReduceMax", axes=axes, keepdims=0)
    denom = b.const("denom", np.array(2.0 ** (spec.bits - int(spec.signed)), np.float32))
    zero, one = b.const("zero", np.array(0.0, np.float32)), b.const("one", np.array(1.0, np.float32))
    positive = b.op("Greater", [amax, zero], "Positive")
    scale_n = b.op("Where", [positive, b.op("Div", [amax, denom], "ScaleN"), one], "Scale")
    return b.op("Div", [scale_n, b.const("shift", _f32(spec.shift))], "Step")


def _clamps(b: _Nodes, x: str, scale: str, lo: int, hi: int) -> str:
    """Per-channel ``Max`` / ``Min`` in float where a channel's code range is narrower than the carrier's."""
    spec, shape = b.spec, b.channel_shape()
    step_b = ""
    if spec.scale is None:  # dynamic: the bounds follow the run-time step
        step_b = b.op("Reshape", [scale, b.const("bshape", np.array(shape, np.int64))], "StepB")
    for op, tag, codes, needed in (("Max", "lo", spec.qmin, spec.qmin > lo), ("Min", "hi", spec.qmax, spec.qmax < hi)):
        if not bool(needed.any()):
            continue
        if spec.scale is not None:  # static: the bounds are constants
            bound = b.const(tag, _f32(codes * spec.scale.to(torch.float32), shape))
        else:
            bound = b.op("Mul", [step_b, b.const(f"q{tag}", _f32(codes, shape))], f"Bound_{tag}")
        x = b.op(op, [x, bound], f"Clamp_{tag}")
    return x


def qdq_subgraph(spec: QDQSpec, index: int, x: str, y: str, opset: int) -> tuple[list[Any], list[Any]]:
    """Nodes and initializers that compute the fake-quantized ``y`` from ``x`` for one layer.

    Args:
        spec: the layer's quantizer, as :func:`lightning_dqa.deploy.onnx.export.qdq_spec` describes it.
        index: the layer's position among the quantizers (keeps node names unique).
        x: name of the float input tensor.
        y: name of the float output tensor.
        opset: the ONNX opset of the model (decides how ``ReduceMax`` takes its axes).

    Returns:
        ``(nodes, initializers)``.

    """
    b = _Nodes(spec, index)
    dtype_name, dtype, lo, hi = _CARRIERS[(spec.signed, spec.carrier_bits)]
    channels = spec.shift.numel()
    if spec.noise is not None:
        x = b.op("Add", [x, b.const("noise", _f32(spec.noise, b.channel_shape()))], "AddNoise")
    scale = b.const("scale", _f32(spec.scale)) if spec.scale is not None else _dynamic_scale(b, x, opset)
    x = _clamps(b, x, scale, lo, hi)
    zero_point = b.const("zero_point", np.zeros(channels, dtype))
    q = b.op("QuantizeLinear", [x, scale, zero_point], f"QuantizeLinear_{dtype_name.lower()}", axis=spec.axis)
    out = y if spec.noise is None else None
    deq = b.op("DequantizeLinear", [q, scale, zero_point], "DequantizeLinear", out=out, axis=spec.axis)
    if spec.noise is not None:
        b.op("Sub", [deq, f"{b.prefix}/noise"], "SubNoise", out=y)
    return b.nodes, b.inits


def replace_placeholders(model: Any, specs: list[QDQSpec], opset: int) -> Any:
    """Swap every placeholder node of a traced ``onnx.ModelProto`` for its layer's QDQ subgraph, in place.

    Args:
        model: the traced model; placeholder nodes are in :data:`PLACEHOLDER_DOMAIN` with an ``index`` attribute.
        specs: one spec per quantizer, indexed by that attribute.
        opset: the default-domain opset the model is stamped with.

    Returns:
        ``model``, with the placeholder domain removed from its opset imports. A layer the forward pass calls
        twice gets two subgraphs; one it never reaches gets none, as in PyTorch.

    """
    import onnx

    graph, nodes, count = model.graph, [], 0
    for node in graph.node:
        if node.domain != PLACEHOLDER_DOMAIN:
            nodes.append(node)
            continue
        index = int(onnx.helper.get_attribute_value(node.attribute[0]))
        new, inits = qdq_subgraph(specs[index], count, node.input[0], node.output[0], opset)
        nodes.extend(new)
        graph.initializer.extend(inits)
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    imports = [i for i in model.opset_import if i.domain != PLACEHOLDER_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(imports)
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = opset
    return model
