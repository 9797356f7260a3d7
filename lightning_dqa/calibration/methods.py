"""Quantization methods by name: what calibration each one needs and its own calibration step.

How each method's quantizer is *built* is not here: :func:`lightning_dqa.core.attach.quantizer_factory` builds it,
so installing quantizers (and loading a deployment) needs no calibration code. The engine never asks which
method it runs; it reads the :class:`Method` entry of :data:`METHODS`:

=============  ===============================================================================================
name           what it does
=============  ===============================================================================================
``dqa``        n-bit codes; the ranked fraction ``ratio`` of each layer's channels at ``n + m`` bits, shifted
``direct``     n-bit codes for every channel (DQA with no important channels)
``noisyquant`` NoisyQuant: ``Q(x + N) - N`` with a per-layer searched noise and clip (static scales)
``fp32``       quantizers installed but pass-through (full-precision baselines and memory accounting)
=============  ===============================================================================================

The names are those of :data:`lightning_dqa.core.config.METHODS`; which ones select channels or pass through is
a property of the settings (``DQAConfig.selects_channels``, ``DQAConfig.full_precision``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_dqa.calibration.noisyquant_search import search_noisyquant
from lightning_dqa.core.attach import find_quant_points
from lightning_dqa.core.config import DQAConfig
from lightning_dqa.core.quantizers import ActivationQuantizer

__all__ = ["METHODS", "Method", "MethodContext", "get_method"]


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
    """One quantization method's calibration.

    Attributes:
        keep_inputs: raw calibration samples per layer that :attr:`step` needs.
        step: the method's own calibration step, run after scales and selection are frozen.

    """

    keep_inputs: int = 0
    step: Callable[[MethodContext], None] | None = None


def _noisyquant_step(ctx: MethodContext) -> None:
    """Search each layer's clip, noise range and shift on its kept calibration inputs."""
    points = {p.name: p for p in find_quant_points(ctx.model, ctx.config)}
    for name, q in ctx.quantizers.items():
        inputs = ctx.inputs.get(name)
        if inputs is not None and inputs.numel() and not q.passthrough:
            search_noisyquant(points[name], q, inputs, ctx.config)


METHODS: dict[str, Method] = {
    "dqa": Method(),
    "direct": Method(),
    "noisyquant": Method(keep_inputs=256, step=_noisyquant_step),
    "fp32": Method(),
}


def get_method(name: str) -> Method:
    """The :class:`Method` registered as ``name``.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).

    """
    if name not in METHODS:
        raise ValueError(f"Expected method to be one of {list(METHODS)}, got {name!r}")
    return METHODS[name]
