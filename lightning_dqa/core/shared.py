"""Shared values: tensors a quantized layer reads *and* something else reads in full precision.

A ResNet block's input feeds its first convolution and the residual shortcut; an inverted residual's input
feeds its expansion and the residual add. With ``DQAConfig(shared_values="fp32")`` (the default) such a value
stays in float32 and only the convolution reads it quantized. With ``shared_values="codes"`` the value is
quantized once, where it is produced, with the reading layer's own quantizer: a forward hook on the module
whose call returns the value (the model's ``forward`` is never replaced) replaces the returned tensor by its
fake-quantized values, so the convolution, the residual add and the concatenation all read the same values.
:func:`lightning_dqa.deploy.compressed.run_compressed` then stores the value as that layer's blob only and
decodes it for every reader. With ``shared_values="int8"`` (a separate width for the residual stream) the hook
gives 8-bit codes instead, on the reading layer's calibrated clip range (:func:`wide_quantize`: its scale times
``2**(n - 8)``, no important channels); the residual add reads those and the layer re-quantizes them to its own
``n``/``n + m``-bit codes. ``shared_values="uniform"`` does the same at ``DQAConfig.shared_bits`` bits (a grid of
``2**w`` steps over the same range; below ``n + m`` bits the layer rounds the values once more). All are derived
from the reading layer's quantizer (the width is a setting), so nothing new is saved in a checkpoint or an
artifact.

Finding the values needs a :mod:`torch.fx` trace (quantized layers kept whole, :class:`CallTracer`). A value
qualifies when a quantized layer (``where="input"``) reads it as its input and another node reads it too. Its
*producer* is the innermost module, called once per forward, whose call returns exactly that value; a value
with no such module (the model input, a tensor computed in a ``forward`` and not returned by a module call, a
module called more than once) stays in float32 and is listed with the reason (:attr:`SharedValue.reason`).

Re-quantizing is exact: with a static (or learnable) scale, ``q(q(x)) == q(x)`` bit for bit (the code of
``k * s`` is ``k``), so the reading layer's own pre-hook leaves the values alone. Dynamic scales are refused by
:class:`~lightning_dqa.core.config.DQAConfig` (a maximum taken from ``q(x)`` is not that of ``x``).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_dqa.core.attach import prepare
    >>> from lightning_dqa.core.config import DQAConfig
    >>> class Block(nn.Module):
    ...     def __init__(self) -> None:
    ...         super().__init__()
    ...         self.stem, self.relu, self.conv = nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1)
    ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
    ...         h = self.relu(self.stem(x))
    ...         return self.conv(h) + h
    >>> net = Block()
    >>> _ = prepare(net, DQAConfig(bits=3, shared_values="codes", first_layer_bits=None))
    >>> [(v.value, v.layer, v.producer) for v in shared_values_of(net)]
    [('relu', 'conv', 'relu')]

"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from lightning_dqa.core import functional as F
from lightning_dqa.core.fxgraph import LeafTracer
from lightning_dqa.core.quantizers import ActivationQuantizer

__all__ = [
    "SHARED_ATTR",
    "SHARED_BITS",
    "CallTracer",
    "SharedValue",
    "attach_shared",
    "channel_quantizer",
    "detach_shared",
    "find_shared",
    "is_leading",
    "leading_quantize",
    "leading_quantizer",
    "shared_bits",
    "shared_hook",
    "shared_mode",
    "shared_values_of",
    "suspend_shared",
    "trace_root",
    "wide_quantize",
    "wide_quantizer",
]

SHARED_ATTR = "_dqa_shared_quantizer"
"""Attribute of a producer module holding the quantizer its output is coded with (a reference, no submodule:
the quantizer's state stays under its layer's name in the ``state_dict``)."""
_VALUES_ATTR = "_dqa_shared_values"
_MODE_ATTR = "_dqa_shared_mode"
_LEADING_ATTR = "_dqa_shared_leading"
_BITS_ATTR = "_dqa_shared_bits"
SHARED_BITS = 8
"""Code width of a shared value with ``shared_values="int8"`` (and the default ``shared_bits`` of ``"uniform"``)."""


@dataclass(frozen=True)
class SharedValue:
    """A value read by a quantized layer and, in full precision, by at least one other node.

    Attributes:
        value: the fx node's name (the step name :func:`~lightning_dqa.deploy.compressed.run_compressed` reports).
        layer: the quantized layer whose quantizer codes it (the first such reader in execution order).
        readers: every node reading it, in execution order.
        producer: qualified name of the module whose call returns it (its forward hook codes it), or ``None``.
        reason: why it is left in full precision when ``producer`` is ``None``; ``""`` otherwise.
        leading: ``True`` when ``layer`` reads it through a concatenation along the channels, as its leading
            channels (a U-Net skip: ``conv(torch.cat([skip, up], 1))``): it is coded with the first
            ``C`` channels of ``layer``'s quantizer (:func:`leading_quantize`), which is what ``layer``
            does to those channels of the concatenation anyway.

    """

    value: str
    layer: str
    readers: tuple[str, ...]
    producer: str | None
    reason: str = ""
    leading: bool = False


class CallTracer(LeafTracer):
    """A :class:`LeafTracer` that also records, for every module call, the node it returns and its call count.

    Attributes:
        returned: node -> qualified names of the modules whose call returned it, innermost first.
        calls: qualified module name -> calls in the trace.

    """

    def __init__(self, leaves: set[int]) -> None:
        super().__init__(leaves)
        self.returned: dict[fx.Node, list[str]] = {}
        self.calls: dict[str, int] = {}

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Trace the call as :class:`torch.fx.Tracer` does and note which node it returned."""
        out = super().call_module(m, forward, args, kwargs)
        try:
            path = self.path_of_module(m)
        except NameError:  # a module that is no submodule of the root (built inside forward): no hook can be put
            return out
        self.calls[path] = self.calls.get(path, 0) + 1
        if isinstance(out, fx.Proxy):
            self.returned.setdefault(out.node, []).append(path)
        return out


def trace_root(model: nn.Module) -> nn.Module:
    """The module to trace: ``model``, or the only child of the plain containers ``prefixed`` views wrap it in."""
    while type(model).forward is nn.Module.forward and len(model._modules) == 1:
        model = next(iter(model._modules.values()))  # type: ignore[assignment]
    return model


def find_shared(
    model: nn.Module, layers: Mapping[str, nn.Module], leaves: Iterable[nn.Module] = ()
) -> tuple[fx.GraphModule, list[SharedValue], dict[fx.Node, str]]:
    """Trace ``model`` and find its shared values and their producers.

    Args:
        model: the model (quantizers installed); its names are the names used in ``layers``.
        layers: the layers whose quantizer acts on their input (``where="input"``), by qualified name: the
            readers.
        leaves: other modules to keep whole in the trace (layers whose quantizer acts on their output).

    Returns:
        ``(graph module, shared values in execution order, reader node -> layer name)``.

    Raises:
        Exception: whatever :mod:`torch.fx` raises for a model it cannot trace.

    """
    ids = {id(m): name for name, m in layers.items()}
    tracer = CallTracer(set(ids) | {id(m) for m in leaves})
    gm = fx.GraphModule(model, tracer.trace(model))
    readers = {
        node: ids[id(gm.get_submodule(str(node.target)))]
        for node in gm.graph.nodes
        if node.op == "call_module" and id(gm.get_submodule(str(node.target))) in ids
    }
    out = []
    for node in gm.graph.nodes:
        quantized = [u for u in node.users if u in readers and u.args and u.args[0] is node]
        others = [u for u in node.users if u not in quantized or node in u.args[1:] or node in u.kwargs.values()]
        leading = False
        if not quantized:  # read through a concatenation, as the leading channels of a quantized layer's input
            quantized = [r for u in node.users for r in _cat_readers(u, node, readers)]
            others = [u for u in node.users if not _cat_readers(u, node, readers)]
            leading = bool(quantized)
        if not quantized or not others or node.op == "output":
            continue
        producer, reason = _producer(node, tracer)
        layer = readers[min(quantized, key=_position(gm))]
        names = tuple(u.name for u in sorted(node.users, key=_position(gm)))
        out.append(SharedValue(node.name, layer, names, producer, reason, leading))
    return gm, out, readers


def _cat_readers(cat: fx.Node, node: fx.Node, readers: Mapping[fx.Node, str]) -> list[fx.Node]:
    """The quantized layers reading ``torch.cat([node, ...], dim=1)`` as their input, when ``cat`` is that.

    ``node`` must be the first tensor of the list (its channels lead, so no shape is needed to slice the
    layer's quantizer) and appear once; every reader of the concatenation must be a quantized layer.
    """
    if cat.op != "call_function" or cat.target is not torch.cat or not cat.args:
        return []
    tensors = cat.args[0]
    dim = cat.kwargs.get("dim", cat.args[1] if len(cat.args) > 1 else 0)
    if not isinstance(tensors, list | tuple) or not tensors or tensors[0] is not node or dim not in (1, -3):
        return []
    if sum(t is node for t in tensors) != 1:
        return []
    users = list(cat.users)
    if not users or not all(u in readers and u.args and u.args[0] is cat and cat not in u.args[1:] for u in users):
        return []
    return users


def _position(gm: fx.GraphModule) -> Any:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return lambda n: order[n]


def _producer(node: fx.Node, tracer: CallTracer) -> tuple[str | None, str]:
    """The module whose forward hook can code ``node``'s value, or ``(None, why not)``."""
    if node.op == "placeholder":
        return None, "a model input (no module returns it)"
    paths = tracer.returned.get(node, [])
    once = [p for p in paths if tracer.calls.get(p, 0) == 1 and p]
    if once:
        return once[0], ""
    if paths:
        return None, f"returned only by modules called more than once ({', '.join(sorted(set(paths)))})"
    scope = next(reversed(node.meta.get("nn_module_stack", {"": None})), "") or "the model"
    return None, f"computed by {node.op} {node.target} inside {scope}'s forward, returned by no module call"


def shared_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    """The forward hook on a producer: its returned tensor, fake-quantized by the reading layer's quantizer.

    A no-op while :mod:`torch.fx` traces (the output is a proxy) and inside :func:`suspend_shared`.
    """
    q = module.__dict__.get(SHARED_ATTR)
    if q is None or not isinstance(output, Tensor) or isinstance(output, fx.Proxy):
        return None
    wide = module.__dict__.get(_MODE_ATTR, "codes") != "codes"
    if module.__dict__.get(_LEADING_ATTR, False):
        return leading_quantize(q, output, wide)
    return wide_quantize(q, output) if wide else q(output)


def is_leading(producer: nn.Module) -> bool:
    """Whether ``producer``'s value is coded with the leading channels of its layer's quantizer."""
    return bool(producer.__dict__.get(_LEADING_ATTR, False))


def leading_quantize(q: ActivationQuantizer, x: Tensor, wide: bool = False) -> Tensor:
    """``x`` fake-quantized as the first ``C`` channels of ``q``'s input, ``C = x.shape[q.channel_dim]``.

    The quantizer acts on each channel alone, so this is ``q`` applied to ``x`` padded with zero channels to
    ``q.num_channels``, then cut back: exact, differentiable, and it follows ``q``'s scales as they change
    (calibration, learnable scales). ``wide``: the uniform codes of :func:`wide_quantize` instead.
    """
    dim = q.channel_dim % x.ndim
    extra = q.num_channels - x.shape[dim]
    if extra < 0:
        raise ValueError(f"Layer {q.name!r}: a leading slice of {x.shape[dim]} channels exceeds its {q.num_channels}")
    pad = list(x.shape)
    pad[dim] = extra
    full = torch.cat([x, x.new_zeros(pad)], dim) if extra else x
    out = wide_quantize(q, full) if wide else q(full)
    return out.narrow(dim, 0, x.shape[dim])


def leading_quantizer(q: ActivationQuantizer, channels: int) -> ActivationQuantizer:
    """A transient quantizer of the first ``channels`` channels of ``q`` (its scales, important mask, histogram).

    The compressed runtimes write a leading shared value's blob with it; nothing of it is saved.

    Raises:
        ValueError: for a quantizer that adds noise (NoisyQuant) or has no static scale.
    """
    return channel_quantizer(q, 0, channels)


def channel_quantizer(q: ActivationQuantizer, start: int, stop: int) -> ActivationQuantizer:
    """A transient quantizer of channels ``start`` to ``stop`` of ``q`` (its scales, important mask, histogram).

    Its codes and values are ``q``'s on those channels, bit for bit (a quantizer acts on each channel alone). The
    banded runtime holds a depthwise convolution's line buffer with one per channel chunk.

    Raises:
        ValueError: for a quantizer that adds noise (NoisyQuant) or has no static scale.
    """
    if q.input_noise() is not None or q.scale_mode == "dynamic":
        raise ValueError(f"Layer {q.name!r}: a channel slice needs a noise-free quantizer with frozen scales")
    part = ActivationQuantizer(
        stop - start, bits=q.n, extra_bits=q.m, scale_mode="static", signed=q.is_signed, channel_dim=q.channel_dim,
        name=f"{q.name} (channels {start}-{stop - 1})",
    )  # fmt: skip
    part.set_static_scale(q.current_scale(torch.empty(0)).detach()[start:stop])
    part.important.copy_(q.important[start:stop])
    part.error_counts.copy_(q.error_counts)
    part.calibrated.fill_(True)
    if _BITS_ATTR in q.__dict__:
        object.__setattr__(part, _BITS_ATTR, q.__dict__[_BITS_ATTR])
    return part.to(q.scale.device)


def shared_bits(q: ActivationQuantizer) -> int:
    """The width ``w`` of the uniform codes of the shared values ``q`` reads (8 unless ``shared_bits`` set it)."""
    return int(q.__dict__.get(_BITS_ATTR, SHARED_BITS))


def wide_scale(q: ActivationQuantizer, x: Tensor) -> Tensor:
    """The ``(C,)`` scales of the ``w``-bit codes of a value ``q`` reads: ``q``'s clip range on a ``2**w`` grid.

    ``q``'s ``n``-bit scale times ``2**(n - w)`` (exact: a power of two), so its range is ``q``'s calibrated one
    and, for ``w >= n + m`` (8 bits: always), ``q``'s own ``n``-bit and ``(n + m)``-bit grids are subsets of it:
    the layer re-quantizes the values exactly as it would ``x``. A narrower ``w`` rounds them once more.
    """
    return q.current_scale(x) * 2.0 ** (q.n - shared_bits(q))


def wide_quantize(q: ActivationQuantizer, x: Tensor) -> Tensor:
    """``x`` fake-quantized to the uniform codes of ``shared_values="int8"|"uniform"`` (same shape).

    ``x`` itself when ``q`` is off.
    """
    if not q.enabled or q.passthrough:
        return x
    lo, hi = F.quant_range(shared_bits(q), q.is_signed)
    scale = wide_scale(q, x)
    qmin, qmax = torch.full_like(scale, float(lo)), torch.full_like(scale, float(hi))
    return F.mixed_fake_quantize(x, scale, qmin, qmax, q.channel_dim, q.fp_mask)


def wide_quantizer(q: ActivationQuantizer, x: Tensor) -> ActivationQuantizer:
    """A transient ``w``-bit quantizer (no important channels) that codes ``x`` as :func:`wide_quantize` does.

    The compressed runtime writes a shared value's blob with it; nothing of it is saved.
    """
    bits = shared_bits(q)
    wide = ActivationQuantizer(
        q.num_channels, bits=bits, extra_bits=1, scale_mode="static", signed=q.is_signed,
        channel_dim=q.channel_dim, name=f"{q.name} ({bits}-bit shared)",
    )  # fmt: skip
    wide.set_static_scale(wide_scale(q, x))
    wide.calibrated.fill_(True)
    return wide.to(x.device)


def attach_shared(
    model: nn.Module, quantizers: Mapping[str, ActivationQuantizer], mode: str = "codes", bits: int = SHARED_BITS
) -> list[SharedValue]:
    """Code every shared value of ``model`` at its producer; see the module docstring.

    Args:
        model: the model, quantizers just installed (as ``dqa_quantizer`` submodules, by layer name).
        quantizers: the installed quantizers by layer name.
        mode: ``codes`` (the reading layer's codes), ``int8`` (8-bit codes on its clip range,
            :func:`wide_quantize`; the reading layer re-quantizes them) or ``uniform`` (``bits``-bit ones).
        bits: the width of ``uniform`` codes (8 for ``int8``).

    Returns:
        The shared values found, coded ones and those left in full precision (``producer is None``); a
        warning names the latter.

    Raises:
        ValueError: when :mod:`torch.fx` cannot trace the model (finding shared values needs the graph).

    """
    detach_shared(model)
    root = trace_root(model)
    prefix = _prefix(model, root)
    names = [name[len(prefix) :] for name in quantizers if name.startswith(prefix)]  # as the traced root names them
    layers = {name: root.get_submodule(name) for name in names}
    try:
        _, values, _ = find_shared(root, layers)
    except Exception as err:
        raise ValueError(
            f"Expected a model torch.fx can trace with shared_values={mode!r} (shared values are found on its "
            f"graph), got {type(root).__name__}: {type(err).__name__}: {err}. Hint: use shared_values='fp32'"
        ) from err
    for v in values:
        if v.producer is None:
            continue
        producer = root.get_submodule(v.producer)
        object.__setattr__(producer, SHARED_ATTR, quantizers[prefix + v.layer])
        object.__setattr__(producer, _MODE_ATTR, mode)
        object.__setattr__(quantizers[prefix + v.layer], _BITS_ATTR, SHARED_BITS if mode == "int8" else bits)
        object.__setattr__(producer, _LEADING_ATTR, v.leading)
        producer.register_forward_hook(shared_hook)
    values = [SharedValue(v.value, prefix + v.layer, v.readers, v.producer and prefix + v.producer, v.reason,
                          v.leading) for v in values]  # fmt: skip
    object.__setattr__(model, _VALUES_ATTR, values)
    left = [f"{v.value} (read by {v.layer}: {v.reason})" for v in values if v.producer is None]
    if left:
        warnings.warn(
            f"shared_values={mode!r} leaves {len(left)} shared value(s) in full precision: " + "; ".join(left),
            stacklevel=3,
        )
    return values


def _prefix(model: nn.Module, root: nn.Module) -> str:
    if root is model:
        return ""
    name = next(n for n, m in model.named_modules() if m is root)
    return name + "."


def shared_mode(producer: nn.Module) -> str:
    """``codes``, ``int8`` or ``uniform``: how :func:`attach_shared` codes the value ``producer`` returns."""
    return str(producer.__dict__.get(_MODE_ATTR, "codes"))


def shared_values_of(model: nn.Module) -> list[SharedValue]:
    """The shared values :func:`attach_shared` found on ``model`` (``[]`` when it did not run)."""
    return list(model.__dict__.get(_VALUES_ATTR, []))


def detach_shared(model: nn.Module) -> None:
    """Remove every producer hook and reference :func:`attach_shared` installed."""
    model.__dict__.pop(_VALUES_ATTR, None)
    for module in model.modules():
        module.__dict__.pop(_MODE_ATTR, None)
        if module.__dict__.pop(SHARED_ATTR, None) is not None:
            for key, fn in list(module._forward_hooks.items()):
                if fn is shared_hook:
                    del module._forward_hooks[key]


@contextmanager
def suspend_shared(
    model: nn.Module, modules: Iterable[nn.Module] | None = None
) -> Iterator[dict[nn.Module, ActivationQuantizer]]:
    """Turn the producer hooks into no-ops for the block; yields producer module -> quantizer.

    The compressed runtime codes shared values itself (as bytes) and must not see them fake-quantized first.
    ``modules``: the modules to look at (a runner's producers, found once); ``None``: all of ``model``'s.
    """
    candidates = model.modules() if modules is None else modules
    held = {m: m.__dict__.pop(SHARED_ATTR) for m in candidates if SHARED_ATTR in m.__dict__}
    try:
        yield held
    finally:
        for m, q in held.items():
            object.__setattr__(m, SHARED_ATTR, q)
