"""Static per-channel clipping maxima from calibration samples: none, percentile or MSE-optimal.

The quantizer's scale follows from the maximum (``functional.scale_from_max``), so clipping is choosing a
per-channel maximum ``M_c <= max |x_c|``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_dqa import functional as F

__all__ = ["CLIPPINGS", "CLIP_RATIOS", "clip_max", "clip_max_coarse"]

# Candidate clip ratios (fraction of the observed maximum) for the MSE search: 1.0 down to 0.2.
CLIP_RATIOS = torch.linspace(1.0, 0.2, 81)


def _percentile_max(samples: Tensor, percentile: float, max_abs: Tensor) -> Tensor:
    if samples.shape[1] == 0 or percentile >= 100.0:
        return max_abs
    q = torch.quantile(samples.abs().float(), percentile / 100.0, dim=1).to(max_abs.device)  # (C,)
    # A sparse live channel (mostly exact zeros after ReLU) has a zero percentile: clipping it to 0 would
    # erase it, so such channels keep their maximum.
    q = torch.where(q > 0, q, max_abs)
    return torch.minimum(q, max_abs)


def _mse_max(
    samples: Tensor, bits: Tensor, signed: bool, max_abs: Tensor, chunk: int = 16, ratios: Tensor = CLIP_RATIOS
) -> Tensor:
    """Per-channel maximum minimising ``sum (x - fq(x))**2`` over the sample, searched on ``ratios``."""
    if samples.shape[1] == 0:
        return max_abs
    x = samples.float().to(max_abs.device)  # (C, K)
    ratios = ratios.to(max_abs.device)
    best_err = torch.full_like(max_abs, float("inf"))
    best = max_abs.clone()
    for start in range(0, ratios.numel(), chunk):
        r = ratios[start : start + chunk]  # (R,)
        cand = max_abs[None, :] * r[:, None]  # (R, C)
        scale = F.scale_from_max(cand, bits[None, :], signed)  # (R, C)
        qmin, qmax = F.code_bounds(bits, signed)  # (C,) each
        q = torch.clamp(torch.round(x[None] / scale[..., None]), qmin[None, :, None], qmax[None, :, None])
        err = (q * scale[..., None] - x[None]).square().sum(dim=-1)  # (R, C)
        val, idx = err.min(dim=0)
        better = val < best_err
        best_err = torch.where(better, val, best_err)
        best = torch.where(better, cand.gather(0, idx[None]).squeeze(0), best)
    return best


def _no_clip(max_abs: Tensor, samples: Tensor, bits: Tensor, signed: bool, percentile: float) -> Tensor:
    return max_abs.clone()


def _percentile_rule(max_abs: Tensor, samples: Tensor, bits: Tensor, signed: bool, percentile: float) -> Tensor:
    return _percentile_max(samples, percentile, max_abs)


def _mse_rule(max_abs: Tensor, samples: Tensor, bits: Tensor, signed: bool, percentile: float) -> Tensor:
    return _mse_max(samples, bits, signed, max_abs)


ClipRule = Callable[[Tensor, Tensor, Tensor, bool, float], Tensor]
CLIPPINGS: dict[str, ClipRule] = {"none": _no_clip, "percentile": _percentile_rule, "mse": _mse_rule}
"""Clipping rules by name: ``rule(max_abs (C,), samples (C, K), bits (C,), signed, percentile) -> (C,)``."""


def clip_max(
    method: str,
    max_abs: Tensor,
    samples: Tensor,
    bits: Tensor | int,
    signed: bool,
    percentile: float = 99.99,
) -> Tensor:
    """Per-channel clipping maxima by the rule :data:`CLIPPINGS` ``[method]``.

    Args:
        method: ``none``, ``percentile`` or ``mse``.
        max_abs: ``(C,)`` observed maxima of ``|x|``.
        samples: ``(C, K)`` sampled values of each channel.
        bits: code width per channel, an int or ``(C,)`` tensor (important channels search at ``n + m``).
        signed: signed or unsigned codes.
        percentile: used by ``percentile``.

    Returns:
        ``(C,)`` maxima, never above ``max_abs``; channels whose maximum is 0 keep 0.

    Raises:
        ValueError: for an unknown method.

    """
    rule = CLIPPINGS.get(method)
    if rule is None:
        raise ValueError(f"Expected clipping to be one of {list(CLIPPINGS)}, got {method!r}")
    bits_t = torch.as_tensor(bits, device=max_abs.device).expand_as(max_abs)
    return rule(max_abs, samples, bits_t, signed, percentile)


def clip_max_coarse(
    method: str, max_abs: Tensor, samples: Tensor, bits: Tensor, signed: bool, percentile: float, steps: int
) -> Tensor:
    """:func:`clip_max` with the MSE search on ``steps`` evenly spaced ratios of :data:`CLIP_RATIOS` (estimates)."""
    if method != "mse":
        return clip_max(method, max_abs, samples, bits, signed, percentile)
    ratios = CLIP_RATIOS[torch.linspace(0, CLIP_RATIOS.numel() - 1, steps).round().long()]
    return _mse_max(samples, bits, signed, max_abs, ratios=ratios)
