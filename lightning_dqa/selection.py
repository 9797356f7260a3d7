"""Channel ranking criteria and the selection of important channels.

A one-pass criterion maps a layer's calibration statistics to a ``(C,)`` score, higher meaning more
important. They are registered by name in :data:`RANKINGS`; ``greedy`` (the paper's search) needs the model
and the data, so it lives in :mod:`lightning_dqa.greedy` and is only named here.

================  ====================================================================================
name              score of channel ``c``
================  ====================================================================================
``fisher``        ``sum (dL/da_c)**2``: the diagonal Fisher information of the channel's activations
``saliency``      ``sum |a_c| * |dL/da_c|``: first-order estimate of the loss change if ``a_c`` were lost
``energy``        ``sum a_c**2``
``max``           ``max |a_c|``: the channels a shared quantization grid serves worst
``random``        a seeded random permutation (the ablation baseline)
``greedy``        the paper's search: accuracy with the channel left in full precision (see ``greedy.py``)
================  ====================================================================================
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_dqa.observers import ChannelStats

__all__ = ["GRADIENT_RANKINGS", "RANKINGS", "important_mask", "rank_channels"]


def _fisher(stats: ChannelStats, generator: torch.Generator) -> Tensor:
    return stats.grad_sq.float()


def _saliency(stats: ChannelStats, generator: torch.Generator) -> Tensor:
    return stats.saliency.float()


def _energy(stats: ChannelStats, generator: torch.Generator) -> Tensor:
    return stats.energy.float()


def _max(stats: ChannelStats, generator: torch.Generator) -> Tensor:
    return stats.max_abs.float()


def _random(stats: ChannelStats, generator: torch.Generator) -> Tensor:
    return torch.rand(stats.max_abs.numel(), generator=generator)


RANKINGS: dict[str, Callable[[ChannelStats, torch.Generator], Tensor] | None] = {
    "fisher": _fisher,
    "saliency": _saliency,
    "energy": _energy,
    "max": _max,
    "random": _random,
    "greedy": None,  # needs the model and data: lightning_dqa.greedy.greedy_rank
}
GRADIENT_RANKINGS: frozenset[str] = frozenset({"fisher", "saliency"})


def rank_channels(name: str, stats: ChannelStats, generator: torch.Generator, layer: str = "") -> Tensor:
    """Score every channel of one layer with the one-pass criterion ``name``.

    Args:
        name: a key of :data:`RANKINGS` other than ``greedy``.
        stats: the layer's calibration statistics.
        generator: source of randomness (``random`` only), seeded by the caller for reproducibility.
        layer: layer name for error messages.

    Returns:
        ``(C,)`` float scores on the CPU, higher is more important.

    Raises:
        ValueError: for an unknown name, for ``greedy``, or when a gradient ranking saw no gradient.

    """
    fn = RANKINGS.get(name)
    if fn is None:
        known = sorted(k for k, v in RANKINGS.items() if v is not None)
        raise ValueError(f"Expected a one-pass ranking in {known}, got {name!r}")
    if name in GRADIENT_RANKINGS and not stats.grad_seen:
        raise ValueError(
            f"Layer {layer!r}: ranking {name!r} needs activation gradients, but none reached this layer "
            f"during calibration (is the loss connected to it?)"
        )
    return fn(stats, generator).detach().cpu()


def important_mask(scores: Tensor, ratio: float) -> Tensor:
    """Bool mask of the ``round(ratio * C)`` highest-scoring channels.

    Ties are broken by channel index (lower first), so the selection is deterministic.

    Args:
        scores: ``(C,)`` channel scores.
        ratio: fraction of channels to mark important, in ``[0, 1]``.

    Returns:
        ``(C,)`` bool tensor.

    >>> important_mask(torch.tensor([0.1, 0.9, 0.5, 0.9]), 0.5)
    tensor([False,  True, False,  True])

    """
    c = scores.numel()
    k = int(round(ratio * c))
    mask = torch.zeros(c, dtype=torch.bool)
    if k == 0:
        return mask
    order = torch.sort(scores.detach().cpu().float(), descending=True, stable=True).indices
    mask[order[:k]] = True
    return mask
