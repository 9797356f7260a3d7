"""Check an exported ONNX model against the PyTorch model it came from, one quantized layer at a time.

End to end, a 3-4-bit network run by two float32 runtimes disagrees on a top-1 class now and then: their
convolutions round differently in the last bit, a value near a rounding boundary lands on the other code, and
the difference travels on. That says nothing about the export. :func:`verify_onnx` asks the question that
does: fed the very tensor that onnxruntime fed it, does each layer's QDQ subgraph produce the codes PyTorch's
quantizer produces? It runs the graph with every quantized layer's input and output made graph outputs (in
memory; the file is not touched), runs each quantizer on the input onnxruntime saw, and counts the values that
differ, by how many quantization steps, and how many of them were not at a rounding tie (``off_tie``, from
``QuantizeLinear``'s own input and step). A faithful export differs only at ties, where ``QuantizeLinear``
divides by the step and PyTorch multiplies by its reciprocal: by one step, in 3 to 13 of 60.4 million values on
ResNet-32 (200 CIFAR-10 images, ``examples/export_onnx.py``). A wrong scale or clamp shows as ``off_tie > 0``.

Example::

    path = export_onnx(model, x[:1], "model.onnx")
    check = verify_onnx(model, path, x)
    assert check.off_tie == 0 and check.max_steps <= 1.0  # differences only at rounding ties, one step

Needs ``onnx`` and ``onnxruntime`` (``pip install 'lightning-dqa[onnx]'``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_dqa.core.functional import channel_view
from lightning_dqa.deploy.onnx.export import _quantized_layers, output_leaves, require_onnx

__all__ = ["LayerCheck", "OnnxCheck", "verify_onnx"]


@dataclass(frozen=True)
class LayerCheck:
    """One QDQ subgraph against its PyTorch quantizer, fed the same tensor.

    Attributes:
        name: qualified name of the quantized layer.
        values: values compared (all calls of the layer in the forward pass together).
        mismatched: values whose output differs.
        off_tie: mismatched values whose code was not a rounding tie (``QuantizeLinear``'s input over its step,
            in float64, more than ``1e-6 * max(1, |v|)`` from ``k + 0.5``): 0 in a faithful export.
        max_steps: the largest difference, in quantization steps of its channel (0.0 when none differ).

    """

    name: str
    values: int
    mismatched: int
    off_tie: int
    max_steps: float


@dataclass(frozen=True)
class OnnxCheck:
    """What :func:`verify_onnx` found.

    Attributes:
        layers: one :class:`LayerCheck` per quantized layer, in execution order.
        output_max_abs_diff: largest absolute difference between the two models' outputs, over every output
            tensor (the end-to-end difference, float rounding included).

    """

    layers: list[LayerCheck]
    output_max_abs_diff: float

    @property
    def values(self) -> int:
        """Values compared over all layers."""
        return sum(c.values for c in self.layers)

    @property
    def mismatched(self) -> int:
        """Values that differ over all layers."""
        return sum(c.mismatched for c in self.layers)

    @property
    def off_tie(self) -> int:
        """Differing values that were not at a rounding tie, over all layers (0 in a faithful export)."""
        return sum(c.off_tie for c in self.layers)

    @property
    def max_steps(self) -> float:
        """The largest difference of any layer, in quantization steps."""
        return max((c.max_steps for c in self.layers), default=0.0)


@dataclass(frozen=True)
class _Span:
    """Tensor names of one QDQ subgraph: its float input and output, and ``QuantizeLinear``'s input and step."""

    name: str
    x: str
    y: str
    q_in: str
    q_scale: str
    axis: int


def _subgraphs(graph: Any) -> list[_Span]:
    """Every QDQ subgraph, in graph order.

    The nodes of one subgraph are consecutive and named ``dqa{index}/{layer}/{tag}``
    (:mod:`lightning_dqa.deploy.onnx.qdq`); a layer called twice has two runs of nodes.
    """
    runs: list[list[Any]] = []
    last = None
    for node in graph.node:
        prefix = node.name.rsplit("/", 1)[0] if node.name.startswith("dqa") else None
        if prefix is not None and prefix == last:
            runs[-1].append(node)
        elif prefix is not None:
            runs.append([node])
        last = prefix
    spans = []
    for nodes in runs:
        quant = next(n for n in nodes if n.op_type == "QuantizeLinear")
        axis = next((a.i for a in quant.attribute if a.name == "axis"), 1)
        name = nodes[0].name.split("/", 1)[1].rsplit("/", 1)[0]
        spans.append(_Span(name, nodes[0].input[0], nodes[-1].output[0], quant.input[0], quant.input[1], axis))
    return spans


def _off_tie(q_in: np.ndarray, scale: np.ndarray, axis: int, where: np.ndarray) -> int:
    """How many of the positions ``where`` holds are not a rounding tie of ``q_in / scale`` (float64)."""
    shape = [1] * q_in.ndim
    shape[axis] = -1
    v = (q_in.astype(np.float64) / scale.astype(np.float64).reshape(shape))[where]
    return int((np.abs(np.abs(v - np.floor(v)) - 0.5) > 1e-6 * np.maximum(1.0, np.abs(v))).sum())


def verify_onnx(
    model: nn.Module,
    path: str | Path,
    inputs: Tensor | tuple[Tensor, ...],
    *,
    threads: int = 1,
) -> OnnxCheck:
    """Compare every quantized layer of the ONNX file at ``path`` with ``model``'s quantizer, fed the same tensor.

    Args:
        model: the calibrated model ``path`` was exported from (it runs in eval mode here; its mode is restored).
        path: the ``.onnx`` file :func:`lightning_dqa.deploy.onnx.export.export_onnx` wrote.
        inputs: a batch (or a tuple of the forward's positional tensors), as in ``export_onnx``'s example input.
        threads: onnxruntime intra-op threads.

    Returns:
        An :class:`OnnxCheck`: per layer, the values compared, how many differ, how many of those were not at a
        rounding tie, and by how many steps at most.

    Raises:
        ImportError: when ``onnx`` or ``onnxruntime`` is missing.
        ValueError: when the file's quantized layers are not the model's (a different model or export), or the
            number of input tensors is not the file's.

    """
    onnx = require_onnx()
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ImportError("verify_onnx needs onnxruntime: pip install 'lightning-dqa[onnx]'") from err
    proto = onnx.load(str(path))
    spans = _subgraphs(proto.graph)
    quantizers = {q.name: q for _, q in _quantized_layers(model)}
    unknown = sorted({s.name for s in spans} - quantizers.keys())
    if unknown or not spans:
        raise ValueError(
            f"Expected the QDQ layers of {str(path)!r} to be quantized layers of {type(model).__name__}, got "
            f"{unknown or 'no QDQ layers'}; verify the model the file was exported from"
        )
    feeds = inputs if isinstance(inputs, tuple) else (inputs,)
    names = [i.name for i in proto.graph.input]
    if len(names) != len(feeds):
        raise ValueError(
            f"Expected inputs to hold one tensor per input of {str(path)!r} ({names}), got {len(feeds)} tensor(s)"
        )
    feed = {n: t.detach().cpu().numpy() for n, t in zip(names, feeds, strict=True)}
    graph_outputs = [o.name for o in proto.graph.output]
    present = set(graph_outputs) | set(feed) | {i.name for i in proto.graph.initializer}
    for tensor in dict.fromkeys(t for s in spans for t in (s.x, s.y, s.q_in, s.q_scale)):
        if tensor not in present:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed), strict=True)) | feed
    outs |= {
        i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer if i.name in {s.q_scale for s in spans}
    }
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            totals: dict[str, list[float]] = {}
            for span in spans:
                q = quantizers[span.name]
                seen = torch.from_numpy(outs[span.x]).to(q.important.device)
                ref, got = q(seen), torch.from_numpy(outs[span.y]).to(seen.device)
                differ = got != ref
                row = totals.setdefault(span.name, [0, 0, 0, 0.0])
                row[0] += ref.numel()
                row[1] += int(differ.sum())
                if bool(differ.any()):  # the steps apart, and whether at ties, only where values differ
                    shift = q.code_ranges()[0].to(seen.dtype)
                    step = channel_view(q.current_scale(seen).to(seen.dtype) / shift, seen.ndim, q.channel_dim)
                    row[2] += _off_tie(outs[span.q_in], outs[span.q_scale], span.axis, differ.cpu().numpy())
                    row[3] = max(row[3], float(((got - ref).abs() / step)[differ].max()))
            device = next(iter(quantizers.values())).important.device
            reference = model(*(t.to(device) for t in feeds))
    finally:
        model.train(was_training)
    expected = output_leaves(reference)
    if len(expected) != len(graph_outputs):
        raise ValueError(
            f"Expected the model's forward pass to return one tensor per output of {str(path)!r} ({graph_outputs}), "
            f"got {len(expected)}; verify the model the file was exported from"
        )
    diff = max(
        float(np.abs(outs[name] - t.detach().cpu().numpy()).max(initial=0.0))
        for name, t in zip(graph_outputs, expected, strict=True)
    )
    layers = [LayerCheck(name, int(v), int(m), int(o), float(s)) for name, (v, m, o, s) in totals.items()]
    return OnnxCheck(layers=layers, output_max_abs_diff=diff)
