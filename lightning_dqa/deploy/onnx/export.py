"""Export a calibrated model to ONNX as a QDQ graph: ``QuantizeLinear`` -> ``DequantizeLinear`` per quantized tensor.

Each quantized activation becomes a per-channel ``QuantizeLinear`` (``axis`` = the channel axis) into an
integer carrier wide enough for its widest code, then ``DequantizeLinear`` with the same scales
(:mod:`lightning_dqa.deploy.onnx.qdq` builds the nodes). Important channels use the step ``scale_n / 2**m`` and an
``(n+m)``-bit code range, the others ``scale_n`` and ``n`` bits, exactly as
:meth:`lightning_dqa.core.quantizers.ActivationQuantizer.quantize_values`. The carrier is ``int8`` / ``uint8``
where every code fits, else ``int16`` / ``uint16`` (ONNX opset 21); channels whose code range is narrower than
the carrier's are clamped per channel. Static and learnable scales are constants; dynamic scales (the paper's
run-time maxima) are computed in the graph with ``Abs`` -> ``ReduceMax``. NoisyQuant's noise is an ``Add``
before and a ``Sub`` after. Pass-through layers (``bits == 0``) stay float.

**Export route.** The TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) traces the model with
each quantizer swapped, for the duration of the export, for a ``torch.autograd.Function`` whose ``symbolic``
emits one opaque placeholder node; the ``onnx`` API then replaces every placeholder with its QDQ subgraph.
Why: the dynamo exporter needs ``onnxscript`` and ``torch.export`` on top; emitting the QDQ nodes straight from
``symbolic`` fails in torch 2.14, whose ONNX type inference rejects ``uint16`` (and the TorchScript exporter
stops at opset 20, below the opset 21 that ``int16`` codes need); and matching Conv/Gemm nodes of a float export
would break on folded BatchNorm (``where="output"``) and on layers without a node of their own. The placeholder
sits exactly where the quantizer's hook ran, so folding and constant propagation cannot move it. The trace is
made at ``min(opset, 20)`` and the model stamped with ``opset``: the operators the exporter emits did not
change meaning between opsets 20 and 21 (only their type lists grew).

Rounding: PyTorch computes ``round(x * (1 / scale))``, ``QuantizeLinear`` (onnxruntime) ``round(x / scale)``; the
two differ in the last bit for a few values, which moves a code by one step where that crosses a rounding tie:
0 of 4.2 million codes on the tiny test model, 3 to 13 of 60.4 million on ResNet-32, each layer fed the
same tensor. Float differences between PyTorch's and onnxruntime's convolutions move more codes than that.

Example::

    path = export_onnx(model, torch.randn(1, 3, 32, 32), "model.onnx")
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dqa.core._checks import is_int
from lightning_dqa.core.attach import QUANTIZER_ATTR
from lightning_dqa.core.noisyquant import NoisyQuantizer
from lightning_dqa.core.quantizers import ActivationQuantizer
from lightning_dqa.deploy.onnx.qdq import PLACEHOLDER_DOMAIN, QDQSpec, replace_placeholders

__all__ = ["MIN_OPSET", "export_onnx", "output_leaves", "qdq_spec", "require_onnx"]

MIN_OPSET = 13  # per-channel QuantizeLinear / DequantizeLinear
INT16_OPSET = 21  # int16 / uint16 QuantizeLinear
TRACE_MAX_OPSET = 20  # the TorchScript exporter's highest

# Quantizer classes whose forward the QDQ graph reproduces (a plain QDQ, after the quantizer's input_noise()).
_EXPORTABLE: tuple[type[ActivationQuantizer], ...] = (ActivationQuantizer, NoisyQuantizer)


def require_onnx() -> Any:
    """The ``onnx`` module, or an ``ImportError`` that says how to install it.

    Returns:
        The imported ``onnx`` package.

    Raises:
        ImportError: when ``onnx`` is not installed.

    """
    try:
        import onnx
    except ImportError as err:
        raise ImportError(
            "ONNX export needs the onnx package (and onnxruntime to run the result): "
            "pip install 'lightning-dqa[onnx]' or pip install onnx onnxruntime"
        ) from err
    return onnx


def qdq_spec(q: ActivationQuantizer) -> QDQSpec:
    """What one calibrated quantizer computes, as :func:`lightning_dqa.deploy.onnx.qdq.qdq_subgraph` needs it.

    Args:
        q: a calibrated, enabled, quantizing (``bits > 0``) quantizer.

    Returns:
        A :class:`~lightning_dqa.deploy.onnx.qdq.QDQSpec` (its ``ndim`` is filled in while tracing).

    Raises:
        ValueError: naming the layer, when it is not calibrated, switched off, of a quantizer class the export
            does not know, or in the middle of a search (``fp_mask`` set).

    """
    if type(q) not in _EXPORTABLE:
        known = [c.__name__ for c in _EXPORTABLE]
        raise ValueError(f"Layer {q.name!r}: expected a quantizer of class {known}, got {type(q).__name__}")
    if not bool(q.calibrated):
        raise ValueError(
            f"Layer {q.name!r}: expected a calibrated quantizer, got calibrated=False; run lightning_dqa.calibrate "
            "(or DQACallback) on the model before exporting it"
        )
    if not q.enabled:
        raise ValueError(
            f"Layer {q.name!r}: expected the quantizer to be switched on, got enabled=False; call "
            "lightning_dqa.core.attach.set_quantizers_enabled(model, True) before exporting"
        )
    if q.fp_mask is not None and bool(q.fp_mask.any()):
        raise ValueError(
            f"Layer {q.name!r}: expected no fp_mask (set only during a channel search), "
            "got one; export after calibration has finished"
        )
    with torch.no_grad():
        shift, qmin, qmax = (t.detach().float().cpu() for t in q.code_ranges())
        scale = None
        if q.scale_mode != "dynamic":
            scale = (q.current_scale(torch.empty(0)).detach().float().cpu() / shift).contiguous()
        noise = q.input_noise()
    return QDQSpec(
        name=q.name,
        bits=q.n,
        width=q.n + q.m if bool(q.important.any()) else q.n,
        signed=bool(q.signed),
        channel_dim=q.channel_dim,
        shift=shift,
        qmin=qmin,
        qmax=qmax,
        scale=scale,
        noise=None if noise is None else noise.detach().float().cpu(),
    )


def _choose_opset(specs: list[QDQSpec], opset: int | None, latest: int) -> int:
    """The opset to stamp: ``opset`` if given and wide enough, else the lowest that holds every code."""
    wide = [s for s in specs if s.carrier_bits == 16]
    if opset is None:
        return INT16_OPSET if wide else MIN_OPSET
    if not is_int(opset) or not MIN_OPSET <= opset <= latest:
        raise ValueError(
            f"Expected opset to be an int in [{MIN_OPSET}, {latest}] (per-channel QuantizeLinear needs "
            f"{MIN_OPSET}; {latest} is the installed onnx's newest), got {opset!r}"
        )
    if wide and opset < INT16_OPSET:
        s = wide[0]
        raise ValueError(
            f"Layer {s.name!r}: its {s.width}-bit codes need an int16 carrier, which QuantizeLinear supports from "
            f"opset {INT16_OPSET}, got opset={opset}; pass opset={INT16_OPSET} or None (or lower first_layer_bits)"
        )
    return opset


class _Placeholder(torch.autograd.Function):
    """Returns the fake-quantized ``y`` while tracing; exports as one opaque node on ``x`` carrying ``index``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, index: int) -> Tensor:
        return y.clone()

    @staticmethod
    def symbolic(g: Any, x: Any, y: Any, index: int) -> Any:
        out = g.op(f"{PLACEHOLDER_DOMAIN}::QDQ", x, index_i=index)
        out.setType(x.type())
        return out


class _TracedQuantizer(nn.Module):
    """Stands in for a quantizer during the trace: records the tensor's rank, marks its place in the graph."""

    def __init__(self, quantizer: ActivationQuantizer, spec: QDQSpec, index: int) -> None:
        super().__init__()
        self.quantizer = quantizer
        self.spec = spec
        self.index = index

    def forward(self, x: Tensor) -> Tensor:
        self.spec.ndim = x.ndim
        return _Placeholder.apply(x, self.quantizer(x), self.index)


def _quantized_layers(model: nn.Module) -> list[tuple[nn.Module, ActivationQuantizer]]:
    """``(layer, quantizer)`` for every installed quantizer that quantizes (pass-through ones stay float)."""
    found = [
        (module, q)
        for module in model.modules()
        if isinstance(q := getattr(module, QUANTIZER_ATTR, None), ActivationQuantizer)
    ]
    if not found:
        raise ValueError(
            f"Expected {type(model).__name__} to carry quantizers installed by lightning_dqa.prepare (or "
            "DQACallback) and calibrated, found none"
        )
    return [(layer, q) for layer, q in found if not q.passthrough]


@contextmanager
def _swapped(pairs: list[tuple[nn.Module, nn.Module]]) -> Iterator[None]:
    """Put each ``(layer, stand_in)``'s stand-in in the quantizer's place; the originals are back afterwards."""
    originals = [layer._modules[QUANTIZER_ATTR] for layer, _ in pairs]
    try:
        for layer, stand_in in pairs:
            layer._modules[QUANTIZER_ATTR] = stand_in
        yield
    finally:
        for (layer, _), original in zip(pairs, originals, strict=True):
            layer._modules[QUANTIZER_ATTR] = original


def output_leaves(out: Any) -> list[Tensor]:
    """The tensors of a forward pass's output in the order the ONNX graph lists them.

    Tuples and lists in order, dicts by their values in insertion order (a torchvision segmentation model's
    ``{"out": ..., "aux": ...}``), nested as deep as they go; anything that is not a tensor is left out.
    """
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in output_leaves(item)]
    return []


def _trace(model: nn.Module, args: tuple[Tensor, ...], opset: int) -> bytes:
    """The TorchScript export of ``model`` (stand-ins in place) as ONNX bytes, batch axis dynamic.

    Inputs are named ``input`` (``input_0``, ``input_1``, ... for several), outputs ``output`` (``output_0``,
    ``output_1``, ... in :func:`output_leaves` order when the forward pass returns several tensors).
    """
    names = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
    with torch.no_grad():
        count = len(output_leaves(model(*args)))
    outputs = ["output"] if count <= 1 else [f"output_{i}" for i in range(count)]
    dynamic = {name: {0: "batch"} for name in [*names, *outputs]}
    buffer = io.BytesIO()
    # Under no_grad, nn.MultiheadAttention (torchvision's ViT) and nn.TransformerEncoderLayer in eval take their
    # fused fast path, an op ONNX has no translation for; with gradients enabled they run the exportable
    # composite ops. Nothing is differentiated: the trace is the same graph either way.
    fast_path = any(isinstance(m, nn.MultiheadAttention | nn.TransformerEncoderLayer) for m in model.modules())
    grad_mode = torch.enable_grad() if fast_path else torch.no_grad()
    with grad_mode, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is chosen on purpose
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")  # placeholder has no shape fn
        torch.onnx.export(
            model,
            args,
            buffer,  # type: ignore[arg-type]  # the TorchScript exporter writes to file objects too
            dynamo=False,
            opset_version=opset,
            input_names=names,
            output_names=outputs,
            dynamic_axes=dynamic,
            custom_opsets={PLACEHOLDER_DOMAIN: 1},
            autograd_inlining=False,
        )
    return buffer.getvalue()


def export_onnx(
    model: nn.Module,
    example_input: Tensor | tuple[Tensor, ...],
    path: str | Path,
    *,
    opset: int | None = None,
) -> Path:
    """Write a calibrated model as an ONNX QDQ graph that computes what its fake-quantized forward pass does.

    The model runs in eval mode during the export (its mode is restored afterwards) and is left unchanged.
    The batch axis of the inputs and of the output is dynamic.

    Args:
        model: a model whose quantizers were installed by :func:`lightning_dqa.prepare` and calibrated by
            :func:`lightning_dqa.calibrate` (or by :class:`lightning_dqa.DQACallback`).
        example_input: one input batch (or a tuple of the forward's positional tensors) to trace with.
        path: the ``.onnx`` file to write; its folder is created.
        opset: ONNX opset, at least 13; ``None`` picks 13 when every code fits 8 bits and 21 (``int16``
            carriers) when some ``n + m`` exceeds 8, e.g. an 8-bit first layer with ``m = 3``.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ImportError: when ``onnx`` is not installed.
        ValueError: when the model has no quantizers, a layer's quantizer is not calibrated or switched off
            (naming the layer), or ``opset`` is out of range or too low for a layer's codes.

    """
    onnx = require_onnx()
    layers = _quantized_layers(model)
    specs = [qdq_spec(q) for _, q in layers]
    opset = _choose_opset(specs, opset, onnx.defs.onnx_opset_version())
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    stand_ins = [(layer, _TracedQuantizer(q, specs[i], i)) for i, (layer, q) in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        with _swapped(stand_ins):  # type: ignore[arg-type]
            traced = _trace(model, args, min(opset, TRACE_MAX_OPSET))
    finally:
        model.train(was_training)
    proto = replace_placeholders(onnx.load_from_string(traced), specs, opset)
    record = {s.name: {"bits": s.bits, "width": s.width, "signed": s.signed} for s in specs}
    onnx.helper.set_model_props(proto, {"lightning_dqa.quantized_layers": json.dumps(record)})
    onnx.checker.check_model(proto, full_check=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return path
