"""Quantization methods by name: how each one's quantizer is built, what calibration it needs, its own step.

The engine never asks which method it runs; it reads the :class:`Method` entry of :data:`METHODS`:

=============  ===============================================================================================
name           what it does
=============  ===============================================================================================
``dqa``        n-bit codes; the ranked fraction ``ratio`` of each layer's channels at ``n + m`` bits, shifted
``direct``     n-bit codes for every channel (DQA with no important channels)
``noisyquant`` NoisyQuant: ``Q(x + N) - N`` with a per-layer searched noise and clip (static scales)
``fp32``       quantizers installed but pass-through (full-precision baselines and memory accounting)
=============  ===============================================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_dqa.config import DQAConfig
from lightning_dqa.quantizers import ActivationQuantizer

if TYPE_CHECKING:  # attach builds quantizers through this registry, so it is imported lazily here
    from lightning_dqa.attach import QuantPoint

__all__ = ["METHODS", "Method", "MethodContext", "default_factory", "get_method"]

QuantizerFactory = Callable[["QuantPoint", int], ActivationQuantizer]


@dataclass
class MethodContext:
    """What a method's own calibration step may use.

    Attributes:
        model: the model, quantizers installed, in eval mode with quantizers off.
        config: the settings.
        quantizers: installed quantizers by layer name; scales, signedness and selection already frozen.
        inputs: per layer, the first raw calibration inputs of its quantized tensor (``Method.keep_inputs``
            samples, e.g. ``(S, C, H, W)``); empty when the method keeps none.

    """

    model: torch.nn.Module
    config: DQAConfig
    quantizers: dict[str, ActivationQuantizer]
    inputs: dict[str, Tensor]


@dataclass(frozen=True)
class Method:
    """One quantization method.

    Attributes:
        factory: ``factory(config)`` returns the builder of one layer's quantizer, ``build(point, bits)``.
        selects_channels: whether the method ranks channels and keeps a fraction at ``n + m`` bits.
        full_precision: every quantizer passes its tensor through (``bits == 0``).
        keep_inputs: raw calibration samples per layer that :attr:`step` needs.
        step: the method's own calibration step, run after scales and selection are frozen.

    """

    factory: Callable[[DQAConfig], QuantizerFactory]
    selects_channels: bool = False
    full_precision: bool = False
    keep_inputs: int = 0
    step: Callable[[MethodContext], None] | None = None


def default_factory(config: DQAConfig) -> QuantizerFactory:
    """Builder of the default :class:`ActivationQuantizer` (DQA, direct and FP32)."""

    def build(point: QuantPoint, bits: int) -> ActivationQuantizer:
        return ActivationQuantizer(
            point.num_channels,
            bits=bits,
            extra_bits=config.extra_bits,
            scale_mode=config.scale_mode,
            signed=config.code != "unsigned",
            channel_dim=point.channel_dim,
            name=point.name,
        )

    return build


def _noisyquant_factory(config: DQAConfig) -> QuantizerFactory:
    from lightning_dqa.noisyquant import noisyquant_factory

    return noisyquant_factory(config)


def _noisyquant_step(ctx: MethodContext) -> None:
    """Search each layer's clip, noise range and shift on its kept calibration inputs."""
    from lightning_dqa.attach import find_quant_points
    from lightning_dqa.noisyquant_search import search_noisyquant

    points = {p.name: p for p in find_quant_points(ctx.model, ctx.config)}
    for name, q in ctx.quantizers.items():
        inputs = ctx.inputs.get(name)
        if inputs is not None and inputs.numel() and not q.passthrough:
            search_noisyquant(points[name], q, inputs, ctx.config)


METHODS: dict[str, Method] = {
    "dqa": Method(factory=default_factory, selects_channels=True),
    "direct": Method(factory=default_factory),
    "noisyquant": Method(factory=_noisyquant_factory, keep_inputs=256, step=_noisyquant_step),
    "fp32": Method(factory=default_factory, full_precision=True),
}


def get_method(name: str) -> Method:
    """The :class:`Method` registered as ``name``.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).

    """
    if name not in METHODS:
        raise ValueError(f"Expected method to be one of {list(METHODS)}, got {name!r}")
    return METHODS[name]
