"""Find the layers to quantize and install or remove their quantizers.

A quantizer is installed as the submodule ``dqa_quantizer`` of its layer, plus a hook on that layer (a
forward *pre*-hook for ``where="input"``, a forward hook for ``where="output"``). The layer's own
parameters keep their names, so weights load as before, and the model's ``forward`` is never replaced.
The hooks are module-level functions: models with quantizers deep-copy and pickle like any module.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_dqa.core.config import DQAConfig
from lightning_dqa.core.noisyquant import NoisyQuantizer
from lightning_dqa.core.quantizers import ActivationQuantizer
from lightning_dqa.core.shared import attach_shared, detach_shared

__all__ = [
    "QUANTIZER_ATTR",
    "QuantPoint",
    "attach_quantizers",
    "build_quantizers",
    "detach_quantizers",
    "find_quant_points",
    "layer_allocated",
    "output_hook",
    "prepare",
    "quantizer_factory",
    "quantizers_of",
    "set_quantizers_enabled",
    "tap",
]

QUANTIZER_ATTR = "dqa_quantizer"
_HANDLES_ATTR = "_dqa_hook_handle"


@dataclass(frozen=True)
class QuantPoint:
    """One activation tensor to quantize: the input or output of the layer ``name``.

    Attributes:
        name: qualified module name, e.g. ``"layer1.0.conv1"``.
        layer: the module.
        where: ``"input"`` or ``"output"``.
        num_channels: channels of the quantized tensor.
        channel_dim: axis of those channels (1 for convolutions, -1 for linear layers).

    """

    name: str
    layer: nn.Module
    where: str
    num_channels: int
    channel_dim: int


def _channels(layer: nn.Module, where: str) -> tuple[int, int]:
    """``(num_channels, channel_dim)`` of a layer's input or output."""
    if isinstance(layer, nn.Linear):
        return (layer.in_features if where == "input" else layer.out_features), -1
    if isinstance(layer, nn.modules.conv._ConvNd):
        return (layer.in_channels if where == "input" else layer.out_channels), 1
    raise TypeError(f"Unsupported layer type {type(layer).__name__}")


def find_quant_points(model: nn.Module, config: DQAConfig) -> list[QuantPoint]:
    """Target layers of ``model`` in registration order, filtered by ``config``.

    A layer is a target when its class name is in ``config.layer_types``, it matches one of
    ``config.include`` (if any) and none of ``config.exclude``.

    Raises:
        ValueError: when no layer qualifies (the message lists what was searched for).

    """
    types = tuple(getattr(nn, t) for t in config.layer_types)
    include = [re.compile(p) for p in config.include]
    exclude = [re.compile(p) for p in config.exclude]
    points = []
    for name, module in model.named_modules():
        if not isinstance(module, types) or name == "":
            continue
        if include and not any(p.search(name) for p in include):
            continue
        if any(p.search(name) for p in exclude):
            continue
        channels, dim = _channels(module, config.where)
        points.append(QuantPoint(name, module, config.where, channels, dim))
    if not points:
        raise ValueError(
            f"Expected the model to contain at least one quantizable layer of types {list(config.layer_types)} "
            f"(include={list(config.include)}, exclude={list(config.exclude)}), found none in "
            f"{type(model).__name__}"
        )
    return points


def _input_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (getattr(module, QUANTIZER_ATTR)(args[0]), *args[1:])


def output_hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
    """The forward hook that quantizes a layer's output (``where="output"``) with its installed quantizer.

    Public so that code replaying a model piecewise (:mod:`lightning_dqa.calibration.fxreplay`) can tell, by identity
    among a layer's forward hooks, that the layer's quantizer acts on its output.
    """
    return getattr(module, QUANTIZER_ATTR)(output)


QuantizerFactory = Callable[[QuantPoint, int], ActivationQuantizer]


def quantizer_factory(config: DQAConfig) -> QuantizerFactory:
    """The builder ``build(point, bits)`` of one layer's uncalibrated quantizer for ``config.method``.

    ``noisyquant`` builds a :class:`~lightning_dqa.core.noisyquant.NoisyQuantizer` (static scales: ``scale_mode``
    is ignored); every other method the default :class:`ActivationQuantizer`. The method's calibration step lives
    apart, in :mod:`lightning_dqa.calibration.methods`, so installing quantizers needs no calibration code.
    """
    noisy = config.method == "noisyquant"

    def build(point: QuantPoint, bits: int) -> ActivationQuantizer:
        signed, dim = config.code != "unsigned", point.channel_dim
        if noisy:
            return NoisyQuantizer(point.num_channels, bits, config.extra_bits, signed, dim, point.name)
        return ActivationQuantizer(
            point.num_channels, bits=bits, extra_bits=config.extra_bits, scale_mode=config.scale_mode,
            signed=signed, channel_dim=dim, name=point.name,
        )

    return build


def layer_bits(config: DQAConfig, index: int, count: int) -> int:
    """Code width of target ``index`` of ``count``: ``bits`` unless the first/last override applies.

    A full-precision method (``fp32``) gives 0 everywhere: pass-through quantizers.
    """
    if config.full_precision:
        return 0
    bits = config.bits
    if index == count - 1 and config.last_layer_bits is not None:
        bits = config.last_layer_bits
    if index == 0 and config.first_layer_bits is not None:
        bits = config.first_layer_bits
    return bits


def layer_allocated(config: DQAConfig, index: int, count: int) -> bool:
    """Whether target ``index`` of ``count`` gets its widths from the budget (``target_bits``).

    Every quantized layer does, except those whose width ``first_layer_bits`` / ``last_layer_bits`` fixes.
    """
    if config.target_bits is None or layer_bits(config, index, count) == 0:
        return False
    fixed_last = index == count - 1 and config.last_layer_bits is not None
    fixed_first = index == 0 and config.first_layer_bits is not None
    return not (fixed_first or fixed_last)


def build_quantizers(
    points: list[QuantPoint], config: DQAConfig, factory: QuantizerFactory | None = None
) -> list[ActivationQuantizer]:
    """One uninstalled quantizer per point, with its width and whether the budget allocates it."""
    build = factory if factory is not None else quantizer_factory(config)
    out = []
    for i, point in enumerate(points):
        q = build(point, layer_bits(config, i, len(points)))
        q.allocated = layer_allocated(config, i, len(points))
        out.append(q)
    return out


def attach_quantizers(
    model: nn.Module,
    config: DQAConfig,
    factory: QuantizerFactory | None = None,
) -> dict[str, ActivationQuantizer]:
    """Install a quantizer on every target layer of ``model`` (idempotent: existing ones are replaced).

    Args:
        model: any module; changed in place.
        config: what to quantize.
        factory: builds the quantizer for a point and its bit width; default: :func:`quantizer_factory`.

    Returns:
        Quantizers by layer name, in registration order.

    """
    detach_quantizers(model)
    points = find_quant_points(model, config)
    out: dict[str, ActivationQuantizer] = {}
    for point, quantizer in zip(points, build_quantizers(points, config, factory), strict=True):
        device = next(itertools.chain(point.layer.parameters(), point.layer.buffers()), None)
        if device is not None:  # a model already on the GPU gets its quantizers there too
            quantizer.to(device.device)
        point.layer.add_module(QUANTIZER_ATTR, quantizer)
        if point.where == "input":
            handle = point.layer.register_forward_pre_hook(_input_hook)
        else:
            handle = point.layer.register_forward_hook(output_hook)
        object.__setattr__(point.layer, _HANDLES_ATTR, handle)
        out[point.name] = quantizer
    if config.shared_values != "fp32":  # values read by a quantized layer and in full precision: coded once
        attach_shared(model, out, config.shared_values, config.shared_bits)
    return out


def prepare(model: nn.Module, config: DQAConfig) -> dict[str, ActivationQuantizer]:
    """Install (uncalibrated, disabled) quantizers on ``model`` as ``config`` says; returns them by name."""
    quantizers = attach_quantizers(model, config)
    set_quantizers_enabled(model, False)
    return quantizers


def set_quantizers_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every installed quantizer on (fake quantization) or off (full precision pass-through)."""
    for q in quantizers_of(model).values():
        q.enabled = enabled


def detach_quantizers(model: nn.Module) -> None:
    """Remove every quantizer and its hook from ``model`` (and the producer hooks of shared values)."""
    detach_shared(model)
    for module in model.modules():
        if hasattr(module, QUANTIZER_ATTR):
            handle = module.__dict__.pop(_HANDLES_ATTR, None)
            if handle is not None:
                handle.remove()
            else:  # a deep copy or unpickled model: find our hook by identity
                for hooks in (module._forward_pre_hooks, module._forward_hooks):
                    for key, fn in list(hooks.items()):
                        if fn in (_input_hook, output_hook):
                            del hooks[key]
            delattr(module, QUANTIZER_ATTR)


def quantizers_of(model: nn.Module) -> dict[str, ActivationQuantizer]:
    """Installed quantizers by layer name, in registration order."""
    return {
        name: getattr(module, QUANTIZER_ATTR)
        for name, module in model.named_modules()
        if isinstance(getattr(module, QUANTIZER_ATTR, None), ActivationQuantizer)
    }


def tap(layer: nn.Module, where: str, fn: Callable[[Tensor], Tensor | None]) -> RemovableHandle:
    """Call ``fn`` on a layer's input or output *before* its quantizer sees it.

    ``fn`` may return a replacement tensor (the calibration pass returns a leaf that requires grad, so
    gradients reach the first layer's input too) or ``None`` to leave it alone.
    """
    if where == "input":

        def pre(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            new = fn(args[0])
            return None if new is None else (new, *args[1:])

        return layer.register_forward_pre_hook(pre, prepend=True)

    def post(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
        return fn(output)

    return layer.register_forward_hook(post, prepend=True)
