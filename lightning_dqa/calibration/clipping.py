"""Static per-channel clipping maxima from calibration samples: none, percentile or MSE-optimal.

The quantizer's scale follows from the maximum (``functional.scale_from_max``), so clipping is choosing a
per-channel maximum ``M_c <= max |x_c|``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_dqa.core import functional as F

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


# Elements of one chunk of the MSE search, (ratios, channels, samples): 2 MiB of float32 stays in cache.
_CHUNK_ELEMENTS = 1 << 19


def _mse_max(samples: Tensor, bits: Tensor, signed: bool, max_abs: Tensor, ratios: Tensor = CLIP_RATIOS) -> Tensor:
    """Per-channel maximum minimising ``sum (x - fq(x))**2`` over the sample, searched on ``ratios``.

    Works through cache-sized blocks of channels and ratios with in-place element-wise steps (the search is
    memory-bound: large temporaries made it 8x slower); each channel's errors, and so its choice, do not depend
    on the blocking.
    """
    if samples.shape[1] == 0:
        return max_abs
    x = samples.float().to(max_abs.device)  # (C, K)
    channels, k = x.shape
    ratios = ratios.to(max_abs.device)
    qmin, qmax = F.code_bounds(bits, signed)  # (C,) each
    rows = max(1, _CHUNK_ELEMENTS // k)  # (ratio, channel) rows per block
    c_step = min(channels, rows)
    r_step = max(1, rows // c_step)
    best = max_abs.clone()
    for c0 in range(0, channels, c_step):
        cs = slice(c0, c0 + c_step)
        xc, top = x[cs][None], max_abs[cs]  # (1, c, K), (c,)
        lo, hi = qmin[cs][None, :, None], qmax[cs][None, :, None]  # (1, c, 1)
        uniform = bool((lo == lo.flatten()[0]).all() and (hi == hi.flatten()[0]).all())
        lo_s, hi_s = float(lo.flatten()[0]), float(hi.flatten()[0])
        best_err = torch.full_like(top, float("inf"))
        for r0 in range(0, ratios.numel(), r_step):
            cand = top[None, :] * ratios[r0 : r0 + r_step, None]  # (R, c)
            scale = F.scale_from_max(cand, bits[cs][None, :], signed)[..., None]  # (R, c, 1)
            q = xc / scale
            q.round_()
            if uniform:  # one code range for the block: a scalar clamp is ~8x faster than a broadcast one
                q.clamp_(lo_s, hi_s)
            else:
                torch.maximum(q, lo, out=q)
                torch.minimum(q, hi, out=q)
            q.mul_(scale).sub_(xc)
            val, idx = q.square_().sum(dim=-1).min(dim=0)  # (c,) best error and its ratio in this block
            better = val < best_err
            best_err = torch.where(better, val, best_err)
            best[cs] = torch.where(better, cand.gather(0, idx[None]).squeeze(0), best[cs])
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
