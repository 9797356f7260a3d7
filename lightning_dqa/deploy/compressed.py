"""Compressed inference: every quantized activation stored as a DQA blob, decoded when its layer reads it.

:func:`run_compressed` runs a calibrated model (:func:`lightning_dqa.prepare` + :func:`lightning_dqa.calibrate`)
through its :mod:`torch.fx` trace, step by step, under ``torch.no_grad()``:

* a value read only by quantized layers (``where="input"``, the default: e.g. a ReLU output feeding a
  convolution) is encoded with :func:`~.layer_bytes.quantizer_to_bytes` as soon as it is produced, once
  per reading layer; its full-precision tensor is dropped, and the layer decodes its blob when it runs
  (:func:`~.layer_bytes.bytes_to_values`);
* a value that something else still reads in full precision (a residual shortcut, a concatenated skip, the
  model input) is kept, and the quantized layer encodes and decodes it when it runs;
* with ``where="output"`` a layer's output is encoded and decoded by the layer itself (BatchNorm and ReLU
  read it next, in full precision);
* NoisyQuant layers store the codes of ``x + N`` and subtract ``N`` after decoding; pass-through (``bits=0``)
  and disabled quantizers leave their tensor in full precision.

The output equals the fake-quantized forward bit for bit except for the sign of zeros (decoded zero codes are
``+0.0``, fake quantization may give ``-0.0``): ``torch.equal(out + 0.0, model(x) + 0.0)``.

The :class:`CompressedReport` gives each blob's bytes and the peak activation memory of the pass under the
liveness rule of :mod:`lightning_dqa.deploy.liveness`, for three ways of storing the quantized activations: the blobs,
uniform 8-bit codes (one byte per value) and full precision (the FP32 network). Each peak is the size of one
arena in which every live buffer has a planned offset (greedy by size, as TFLite Micro; :mod:`.arena`); the
most bytes live at one step, the arena's lower bound, is kept beside it (``report.stored.live_bytes``).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_dqa import DQAConfig, calibrate, prepare
    >>> net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
    >>> net = net.eval()
    >>> cfg = DQAConfig(bits=3, ranking="energy", first_layer_bits=None)
    >>> _ = prepare(net, cfg)
    >>> x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    >>> _ = calibrate(net, cfg, [x], forward_fn=lambda m, b: m(b))
    >>> out, report = run_compressed(net, x)
    >>> with torch.no_grad():
    ...     torch.equal(out + 0.0, net(x) + 0.0)
    True
    >>> report.fp32.nbytes > report.int8.nbytes > report.stored.nbytes
    True

"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as TF
from torch import Tensor, fx, nn
from torch.utils._pytree import tree_leaves, tree_map

from lightning_dqa.codec.entropy import DEFAULT_CODER
from lightning_dqa.codec.layout import check_coder
from lightning_dqa.core import functional as F
from lightning_dqa.core.attach import QUANTIZER_ATTR, output_hook, quantizers_of
from lightning_dqa.core.quantizers import ActivationQuantizer
from lightning_dqa.core.shared import (
    SHARED_ATTR,
    SharedValue,
    find_shared,
    is_leading,
    leading_quantizer,
    shared_mode,
    suspend_shared,
    wide_quantizer,
)
from lightning_dqa.deploy.layer_bytes import bytes_to_values, quantizer_to_bytes
from lightning_dqa.deploy.liveness import Peak, QRead, Step, peak_memory

__all__ = ["BlobRecord", "CompressedReport", "CompressedRunner", "run_compressed"]

ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.Hardswish,
    nn.Hardsigmoid, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.Mish, nn.ELU, nn.PReLU, nn.Dropout, nn.Dropout2d,
    nn.Identity,
)  # fmt: skip
"""Module types that may run in place on their input (BatchNorm in eval mode is a per-channel affine map); the
banded runtime (:mod:`.banded`) runs them on row bands."""
ELEMENTWISE_FUNCTIONS: frozenset[Any] = frozenset(
    {operator.add, operator.iadd, operator.mul, operator.imul, operator.sub, operator.truediv, torch.add, torch.mul,
     torch.sub, torch.relu, torch.sigmoid, torch.tanh, TF.relu, TF.relu6, TF.hardtanh, TF.silu, TF.gelu,
     TF.hardswish, TF.hardsigmoid, TF.leaky_relu, TF.dropout, "add", "add_", "mul", "mul_", "sub", "relu", "relu_",
     "sigmoid", "tanh", "clamp", "contiguous"}
)  # fmt: skip
"""Functions (and method names) that may run in place on an operand of the output's size, or on row bands."""


@dataclass(frozen=True)
class BlobRecord:
    """One stored activation blob.

    Attributes:
        layer: the quantized layer whose quantizer wrote it.
        step: the fx node (step) that read it.
        value: the fx node whose value it holds.
        nbytes: the blob's length.
        numel: activation values in it.
        stored: ``True`` when it was made as the value was produced and its full-precision tensor dropped;
            ``False`` when made by the reading layer from a value kept in full precision anyway.

    """

    layer: str
    step: str
    value: str
    nbytes: int
    numel: int
    stored: bool


@dataclass
class CompressedReport:
    """Outcome of :func:`run_compressed`: the blobs and the peak activation memory of the pass.

    Attributes:
        batch: images in the pass (the first dimension of the first input).
        blobs: every blob written, in execution order.
        steps: the recorded steps of the liveness analysis (:mod:`lightning_dqa.deploy.liveness`).
        coded: the shared values (:mod:`lightning_dqa.core.shared`) stored as one blob of their reading layer and
            decoded for every reader (``shared_values="codes"``), by step name.
        fp_shared: the shared values kept in full precision, each with its reading layer and the reason (the
            setting, or why no producer module can code it).

    The three peaks (:attr:`stored`, :attr:`int8`, :attr:`fp32`) are planned from ``steps`` when first read, as a
    device plans its arena ahead of time; the pass itself only records the steps.

    Each :class:`~.liveness.Peak`'s ``nbytes`` is its arena's size (every buffer at a planned offset, greedy
    by size); ``live_bytes`` is the most bytes live at one step, the lower bound of any arena. Greedy planning
    is not monotone in the buffers' sizes, so smaller codes lower ``live_bytes`` but may, rarely, leave an arena
    no smaller.

    """

    batch: int
    blobs: list[BlobRecord]
    steps: list[Step]
    coded: list[str] = field(default_factory=list)
    fp_shared: list[str] = field(default_factory=list)

    @cached_property
    def stored(self) -> Peak:
        """Peak with each quantized activation at its blob bytes."""
        return peak_memory(self.steps, lambda r: r.nbytes)

    @cached_property
    def int8(self) -> Peak:
        """Peak with each quantized activation at 8 bits per value.

        No header is counted; static scales are model constants and not counted either.
        """
        return peak_memory(self.steps, lambda r: r.numel)

    @cached_property
    def fp32(self) -> Peak:
        """Peak of the same pass in full precision."""
        return peak_memory(self.steps)

    @property
    def layer_bytes(self) -> dict[str, int]:
        """Blob bytes per quantized layer (summed over its calls), in execution order."""
        out: dict[str, int] = {}
        for b in self.blobs:
            out[b.layer] = out.get(b.layer, 0) + b.nbytes
        return out

    @property
    def bits_per_value(self) -> float:
        """Measured storage of the quantized activations: ``8 * sum(blob bytes) / sum(values)`` over all blobs.

        Unlike ``dqa/bits_per_value`` of the memory meter (exact bit counts, code books counted once per
        layer), this is what the bytes produced take, headers, chunk index and padding included.
        """
        return 8 * sum(b.nbytes for b in self.blobs) / max(sum(b.numel for b in self.blobs), 1)

    def per_image(self, live: bool = False) -> dict[str, float]:
        """Peak bytes per image, ``{"fp32", "int8", "stored"}``: each arena's size over ``batch``.

        Blob headers are shared by the batch, so a batch of one gives the exact figure.

        Args:
            live: give the live-sum lower bounds (``live_bytes``) instead of the arenas' sizes.

        """
        key = "live_bytes" if live else "nbytes"
        return {k: getattr(getattr(self, k), key) / max(self.batch, 1) for k in ("fp32", "int8", "stored")}

    def table(self) -> str:
        """The per-layer blob bytes and the three peaks (arena and live-sum bound) as an aligned text table."""
        rows = [f"{'layer':<32}{'values':>10}{'blob B':>10}{'bits/val':>10}"]
        for b in self.blobs:
            rows.append(f"{b.layer[-32:]:<32}{b.numel:>10}{b.nbytes:>10}{8 * b.nbytes / max(b.numel, 1):>10.3f}")
        bounds = self.per_image(live=True)
        for k, v in self.per_image().items():
            rows.append(
                f"peak {k:<8}{v / 1024:>10.2f} KiB/image arena, {bounds[k] / 1024:.2f} live at {getattr(self, k).step}"
            )
        return "\n".join(rows)


@dataclass
class _Stored:
    """A value held only as blobs, one per reading node."""

    blobs: dict[fx.Node, bytes]
    like: Tensor  # a zero-stride stand-in of the value's shape, dtype and device


class _Codec:
    """Stands in for every active quantizer while a pass runs: writes the blob (or takes a stored one), decodes it.

    The stand-ins take the quantizers' places on their layers (as the ONNX export's do), so a layer's pre-hook
    or output hook calls the codec instead of fake-quantizing values the blob then replaces.
    """

    def __init__(self, places: list[tuple[nn.Module, ActivationQuantizer, str]], coder: str = DEFAULT_CODER) -> None:
        self.coder = coder
        self.places = [(layer, _CodecCall(self, q, name)) for layer, q, name in places]
        self.reset()

    def reset(self) -> None:
        """Start a pass: no stored blob waiting, no record."""
        self.preset: dict[int, bytes] = {}
        self.step, self.value = "", ""
        self.records: list[BlobRecord] = []

    def __enter__(self) -> _Codec:
        for layer, call in self.places:
            layer._modules[QUANTIZER_ATTR] = call
        return self

    def __exit__(self, *exc: object) -> None:
        for layer, call in self.places:
            layer._modules[QUANTIZER_ATTR] = call.q

    def code(self, q: ActivationQuantizer, name: str, x: Tensor) -> Tensor:
        blob = self.preset.pop(id(q), None)
        stored = blob is not None
        if blob is None:
            blob = quantizer_to_bytes(q, x, coder=self.coder)
        self.records.append(BlobRecord(name, self.step, self.value, len(blob), x.numel(), stored))
        return decode(q, blob)


class _CodecCall(nn.Module):
    """One quantizer's stand-in: ``forward(x)`` is ``q(x)`` through the blob."""

    def __init__(self, codec: _Codec, q: ActivationQuantizer, name: str) -> None:
        super().__init__()
        self.__dict__.update(codec=codec, q=q, layer=name)  # not submodules: the stand-in owns nothing

    def forward(self, x: Tensor) -> Tensor:
        return self.codec.code(self.q, self.layer, x)


def decode(q: ActivationQuantizer, blob: bytes) -> Tensor:
    """``q(x)`` from the blob of :func:`~.layer_bytes.quantizer_to_bytes` (NoisyQuant: minus its noise).

    Args:
        q: the quantizer that wrote the blob.
        blob: its bytes.

    Returns:
        The values, e.g. ``(N, C, H, W)``, zeros unsigned.

    """
    values = bytes_to_values(q, blob)
    noise = q.input_noise()
    if noise is not None:  # the blob holds the codes of x + N
        values = values - F.channel_view(noise.to(values.dtype), values.ndim, q.channel_dim)
    return values


def run_compressed(
    model: nn.Module, inputs: Tensor | tuple[Any, ...], coder: str = DEFAULT_CODER
) -> tuple[Any, CompressedReport]:
    """Run a calibrated model with its quantized activations stored as blobs; see the module docstring.

    Traces the model at each call; :class:`CompressedRunner` traces once for many passes.

    Args:
        model: a model with calibrated quantizers (:func:`lightning_dqa.prepare` + :func:`lightning_dqa.calibrate`),
            usually in eval mode; it must trace with :mod:`torch.fx` (quantized layers are kept as leaves).
        inputs: the model's input, e.g. images ``(N, C, H, W)``, or a tuple of positional inputs.
        coder: entropy coder of the shifting errors in every blob: ``huffman`` (the paper's, default), ``zstd``
            or ``ans`` (:func:`~.layer_bytes.quantizer_to_bytes`).

    Returns:
        ``(output, report)``: the model's output (as the fake-quantized forward gives it, up to the sign of
        zeros) and the :class:`CompressedReport`.

    Raises:
        ValueError: when the model has no quantizer, a quantizing layer is not calibrated, has a
            an ``fp_mask`` (its output is no function of stored codes), or the model does
            not trace with :mod:`torch.fx`, or for an unknown ``coder``.
        ImportError: for ``zstd`` or ``ans`` without their package (``pip install 'lightning-dqa[entropy]'``).

    """
    return CompressedRunner(model, coder)(inputs)


class CompressedRunner:
    """:func:`run_compressed` prepared once for many passes: the trace and the shared values' plan.

    A device runtime plans its schedule ahead of time and then only runs it; so does this runner. Each call reads
    the quantizers' current state (scales, widths, important channels), so recalibrating needs no new runner;
    changing which layers quantize (``prepare``, enabling or disabling a quantizer) or the model's structure does.

    Args:
        model: as :func:`run_compressed` takes it.
        coder: as :func:`run_compressed` takes it.

    Raises:
        ValueError: as :func:`run_compressed` raises it.
        ImportError: as :func:`run_compressed` raises it.

    Example:
        >>> from lightning_dqa.demos.models import build_model
        >>> from lightning_dqa import DQAConfig, calibrate, prepare
        >>> net = build_model("resnet20").eval()
        >>> cfg = DQAConfig(bits=3, ranking="energy")
        >>> _ = prepare(net, cfg)
        >>> _ = calibrate(net, cfg, [torch.randn(8, 3, 32, 32)], forward_fn=lambda m, b: m(b))
        >>> runner = CompressedRunner(net)
        >>> out, report = runner(torch.randn(1, 3, 32, 32))
        >>> out.shape, report.stored.nbytes < report.fp32.nbytes
        (torch.Size([1, 10]), True)

    """

    def __init__(self, model: nn.Module, coder: str = DEFAULT_CODER) -> None:
        self.model, self.coder = model, coder
        self.quantizers = _active_quantizers(model)
        check_coder(coder, torch.ones(1))
        gm, readers, self.coded, self.kept = _trace(model, self.quantizers, "run_compressed")
        places = [(model.get_submodule(name), q, name) for name, q in self.quantizers.items()]
        self.codec = _Codec(places, coder)
        self.runner = _Runner(gm, readers, self.quantizers, self.coded, self.codec)
        self.producers = [m for m in model.modules() if SHARED_ATTR in m.__dict__]

    @torch.no_grad()
    def __call__(self, inputs: Tensor | tuple[Any, ...]) -> tuple[Any, CompressedReport]:
        """One pass, as :func:`run_compressed` returns it.

        Raises:
            ValueError: when a quantizer of the plan no longer codes (disabled, pass-through or with an
                ``fp_mask``): make a new runner.
        """
        for name, q in self.quantizers.items():
            if not q.enabled or q.passthrough or q.fp_mask is not None:  # no device read: checked in Python
                raise ValueError(
                    f"Layer {name!r} no longer writes codes (enabled={q.enabled}, bits={q.n}, fp_mask set: "
                    f"{q.fp_mask is not None}) since this CompressedRunner was made; make a new one"
                )
        args = tree_map(_own_storage, inputs if isinstance(inputs, tuple) else (inputs,))
        codec = self.codec
        codec.reset()
        with codec, suspend_shared(self.model, self.producers):  # the runner codes shared values itself, as bytes
            output, steps = self.runner.run(args)
        first = next((t for t in tree_leaves(args) if isinstance(t, Tensor) and t.ndim), None)
        report = CompressedReport(
            batch=1 if first is None else int(first.shape[0]),
            blobs=codec.records,
            steps=steps,
            coded=[n.name for n in self.coded],
            fp_shared=list(self.kept),
        )
        return output, report


def _trace(
    model: nn.Module, quantizers: dict[str, ActivationQuantizer], runner: str
) -> tuple[fx.GraphModule, dict[fx.Node, str], dict[fx.Node, tuple[str, str, bool]], list[str]]:
    """The model's :mod:`torch.fx` trace with its quantized layers kept whole, and its shared values' plan.

    Returns:
        ``(graph module, quantized reader node -> layer name, coded shared values, those kept in float32)``
        (:func:`_shared_plan`).

    Raises:
        ValueError: when :mod:`torch.fx` cannot trace the model (``runner`` names the caller).
    """
    layers = {id(q): model.get_submodule(name) for name, q in quantizers.items()}
    inputs_read = {  # the layers whose quantizer reads their input
        name: layers[id(q)]
        for name, q in quantizers.items()
        if output_hook not in layers[id(q)]._forward_hooks.values()
    }
    try:
        gm, shared, readers = find_shared(model, inputs_read, layers.values())
    except Exception as err:
        raise ValueError(
            f"{runner} needs a model that torch.fx can trace, and {type(model).__name__} fails: "
            f"{type(err).__name__}: {err}. Hint: make the data-dependent control flow a leaf module or a "
            "torch.fx.wrap'ed function"
        ) from err
    return (gm, readers, *_shared_plan(model, shared, quantizers, gm))


def _shared_plan(
    model: nn.Module, shared: list[SharedValue], quantizers: dict[str, ActivationQuantizer], gm: fx.GraphModule
) -> tuple[dict[fx.Node, tuple[str, str, bool]], list[str]]:
    """The shared values coded at their producer and, described, those kept in full precision.

    Returns:
        ``(node -> (reading layer, "codes", "int8" or "uniform", leading channels only), descriptions of the values kept
        in float32)``.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    coded: dict[fx.Node, tuple[str, str, bool]] = {}
    kept: list[str] = []
    for v in shared:
        q = quantizers.get(v.layer)
        producer = model.get_submodule(v.producer) if v.producer is not None else None
        if producer is not None and q is not None and producer.__dict__.get(SHARED_ATTR) is q:
            coded[nodes[v.value]] = (v.layer, shared_mode(producer), is_leading(producer))
        else:
            why = v.reason or "shared_values is 'fp32'"
            kept.append(f"{v.value} (read by {v.layer} and {len(v.readers) - 1} other(s); {why})")
    return coded, kept


def _own_storage(t: Any) -> Any:
    """``t``, copied when it views a larger storage (``batch[:1]``): the liveness counts an input's storage."""
    if isinstance(t, Tensor) and t.untyped_storage().nbytes() > t.numel() * t.element_size():
        return t.clone()
    return t


def _active_quantizers(model: nn.Module) -> dict[str, ActivationQuantizer]:
    """The quantizers that write codes (enabled, not pass-through), checked; by layer name."""
    installed = quantizers_of(model)
    if not installed:
        raise ValueError(
            f"Expected a model with quantizers (lightning_dqa.prepare), found none in {type(model).__name__}"
        )
    active = {n: q for n, q in installed.items() if q.enabled and not q.passthrough}
    for name, q in active.items():
        if not bool(q.calibrated):
            raise ValueError(f"Layer {name!r} is not calibrated: run lightning_dqa.calibrate(model, ...) first")
        if q.fp_mask is not None:
            raise ValueError(
                f"Layer {name!r} has an fp_mask, so its output is no function of stored codes; "
                "remove them (the greedy search sets fp_mask only while it runs)"
            )
    return active


@dataclass
class _Coded:
    """A shared value stored as one blob; every reader reads the decoded values.

    With ``shared_values="codes"`` the blob is its reading layer's (``own``: that layer takes it as is); with
    ``int8`` it holds 8-bit codes and the layer re-quantizes the decoded values to its own codes.
    """

    value: str  # the producing node's name
    layer: str
    blob: bytes
    decoded: Tensor  # held for the whole pass, so its storage address names it in every later step
    own: bool

    def qread(self) -> QRead:
        """The read of its codes (one span in the liveness, however many steps read them).

        8-bit codes name no layer: narrowing the reading layer would not shrink them (the peak limit's step-down).
        """
        return QRead(self.value, len(self.blob), self.decoded.numel(), self.layer if self.own else "", blob=self.value)


class _Runner:
    """Runs the graph node by node, stores what only quantized layers read, and records the liveness steps."""

    def __init__(
        self, gm: fx.GraphModule, readers: Mapping[fx.Node, str], quantizers: dict[str, ActivationQuantizer],
        coded: Mapping[fx.Node, tuple[str, str, bool]], codec: _Codec,
    ) -> None:  # fmt: skip
        self.gm, self.readers, self.quantizers, self.codec = gm, readers, quantizers, codec
        self.coded = coded
        interp = fx.Interpreter(gm)
        self.nodes = list(gm.graph.nodes)
        self.modules = {n: gm.get_submodule(str(n.target)) for n in self.nodes if n.op == "call_module"}
        self.calls = {n: getattr(interp, n.op) for n in self.nodes if n.op in ("call_method", "get_attr")}
        self.elementwise = {n for n in self.nodes if _elementwise(gm, n)}
        last = {n: i for i, n in enumerate(self.nodes)}
        for i, node in enumerate(self.nodes):
            for arg in node.all_input_nodes:
                last[arg] = i
        self.dead: dict[int, list[fx.Node]] = {}  # step -> the values no later step reads
        for n, i in last.items():
            self.dead.setdefault(i, []).append(n)
        self.env: dict[fx.Node, Any] = {}
        self.decoded: dict[int, _Coded] = {}  # storage address of a decoded shared value -> its record

    def run(self, args: tuple[Any, ...]) -> tuple[Any, list[Step]]:
        """Returns ``(output, steps)``; the codec (entered, reset) codes the pass's blobs and records them."""
        self.env, self.decoded = {}, {}
        dead = self.dead
        steps, placeholders, output = [], iter(args), None
        for i, node in enumerate(self.nodes):
            qreads: tuple[QRead, ...] = ()
            if node.op == "placeholder":
                value = next(placeholders)
            elif node.op == "output":
                value = output = fx.node.map_arg(node.args[0], lambda n: self.env[n])
            else:
                value, qreads = self._call(node)
            steps.append(self._step(node, value, qreads))
            if node in self.coded and isinstance(value, Tensor):
                value = self._code(node, value)
            self.env[node] = self._store(node, value) if self._storable(node) else value
            for n in dead.get(i, []):
                self.env.pop(n, None)
        return output, steps

    def _code(self, node: fx.Node, value: Tensor) -> Tensor:
        """Encode a shared value (its reading layer's codes, or 8-bit ones); the decoded values replace it."""
        layer, mode, leading = self.coded[node]
        q = self.quantizers[layer]
        own = mode == "codes" and not leading
        if leading:  # the leading channels of the layer's input (a concatenated skip)
            q = leading_quantizer(q, value.shape[q.channel_dim])
        if mode != "codes":  # the uniform blob is no layer's: recorded here (the layer's re-quantization is too)
            q = wide_quantizer(q, value)
        blob = quantizer_to_bytes(q, value, coder=self.codec.coder)
        decoded = decode(q, blob)
        self.decoded[decoded.untyped_storage().data_ptr()] = _Coded(node.name, layer, blob, decoded, own)
        if not own:  # recorded here: the layer reads and records another blob (or a concatenation)
            self.codec.records.append(BlobRecord(q.name, node.name, node.name, len(blob), value.numel(), True))
        return decoded

    def _coded_of(self, value: Any) -> _Coded | None:
        """The shared value whose decoded storage ``value`` is (or views), else ``None``."""
        if isinstance(value, Tensor) and value.numel():
            return self.decoded.get(value.untyped_storage().data_ptr())
        return None

    def _call(self, node: fx.Node) -> tuple[Any, tuple[QRead, ...]]:
        """Run one node; a quantized reader of a stored value gets a stand-in and decodes its own blob."""
        layer = self.readers.get(node)
        source = node.args[0] if layer is not None and node.args else None
        held = self.env.get(source) if isinstance(source, fx.Node) else None
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: self._read(n))
        if isinstance(held, _Stored):
            self.codec.preset[id(self.quantizers[layer])] = held.blobs[node]  # type: ignore[index]
            args = (held.like, *args[1:])
        shared = self._coded_of(held)
        if shared is not None and held is shared.decoded and shared.own and shared.layer == layer:
            self.codec.preset[id(self.quantizers[layer])] = shared.blob  # its own codes: no re-encoding
        self.codec.step = node.name
        self.codec.value = source.name if isinstance(source, fx.Node) else node.name
        before = len(self.codec.records)
        value = _run_node(node, self.modules, self.calls, args, kwargs)
        if shared is not None:  # reads the shared codes (decoding, and any re-quantization, fused into the layer)
            return value, (shared.qread(),)
        qreads = tuple(
            QRead(str(self.codec.value), r.nbytes, r.numel, r.layer)
            for r in self.codec.records[before:]
            if layer is not None
        )
        return value, qreads

    def _read(self, node: fx.Node) -> Any:
        value = self.env[node]
        return value.like if isinstance(value, _Stored) else value

    def _storable(self, node: fx.Node) -> bool:
        """Whether only quantized layers read the value (as their quantized input): then only blobs are kept."""
        return (
            node.op not in ("placeholder", "output")
            and bool(node.users)
            and all(u in self.readers and u.args[0] is node and node not in u.args[1:] for u in node.users)
            and isinstance(self.env.get(node, None), Tensor | type(None))
            and self._coded_of(self.env.get(node, None)) is None
        )

    def _store(self, node: fx.Node, value: Any) -> Any:
        if not isinstance(value, Tensor):
            return value
        blobs = {u: quantizer_to_bytes(self.quantizers[self.readers[u]], value) for u in node.users}
        like = torch.zeros((), dtype=value.dtype, device=value.device).expand(value.shape)
        return _Stored(blobs, like)

    def _step(self, node: fx.Node, value: Any, qreads: tuple[QRead, ...]) -> Step:
        """The liveness record of a node: its new bytes, the storage it shares, what it reads.

        A read of a decoded shared value (or a view of one) is a read of its codes; a view of one is no buffer.
        """
        outs = _tensors(value)
        inputs: dict[int, str] = {}
        shared: dict[str, QRead] = {r.value: r for r in qreads if r.blob}
        via_codes: set[str] = set()
        for arg in node.all_input_nodes:
            held = self.env.get(arg)
            for t in _tensors(held) if not isinstance(held, _Stored) else []:
                coded = self._coded_of(t)
                if coded is not None:
                    shared.setdefault(coded.value, coded.qread())
                    via_codes.add(arg.name)
                elif isinstance(t, Tensor) and t.numel():
                    inputs.setdefault(t.untyped_storage().data_ptr(), arg.name)
        alias, new = None, {}
        for t in outs:
            ptr = t.untyped_storage().data_ptr()
            if not t.numel() or self._coded_of(t) is not None:  # a view of decoded codes holds no new buffer
                continue
            if ptr in inputs:
                alias = alias or inputs[ptr]
            else:
                new[ptr] = t.untyped_storage().nbytes()
        quantized = {r.value for r in qreads}
        has_data = bool(outs) or node.op == "output"
        reads = tuple(
            a.name for a in node.all_input_nodes if has_data and a.name not in quantized and a.name not in via_codes
        )
        qreads = (*(r for r in qreads if not r.blob), *shared.values()) if has_data else qreads
        return Step(
            node.name, reads, qreads, sum(new.values()), alias, node in self.elementwise, node.op == "placeholder"
        )


def _tensors(value: Any) -> list[Tensor]:
    """The tensors in ``value`` (a tensor, or a container of them and other things)."""
    if isinstance(value, Tensor):  # the common case, without flattening
        return [value]
    return [t for t in tree_leaves(value) if isinstance(t, Tensor)]


def _run_node(
    node: fx.Node, modules: Mapping[fx.Node, nn.Module], calls: Mapping[fx.Node, Any], args: Any, kwargs: Any
) -> Any:
    """What :class:`torch.fx.Interpreter` computes for one node, with its module found once (not per pass)."""
    if node.op == "call_module":
        return modules[node](*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)  # type: ignore[operator]
    return calls[node](node.target, args, kwargs)


def _elementwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), ELEMENTWISE_MODULES)
    if node.op in ("call_function", "call_method"):
        return node.target in ELEMENTWISE_FUNCTIONS
    return False
