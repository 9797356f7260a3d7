"""Channel rankings, registered by name, and the selection of important channels.

Every ranking maps what calibration gathered (:class:`RankInputs`) to a ``(C,)`` score per layer, higher
meaning more important. One-pass criteria read only a layer's statistics; ``greedy`` (the paper's search,
:mod:`.greedy`) also runs the model on the calibration batches. Each :class:`Ranking` says what it
needs, so the engine keeps batches or runs a backward pass only when the chosen ranking asks for it.

================  ====================================================================================
name              score of channel ``c``
================  ====================================================================================
``fisher``        ``sum (dL/da_c)**2``: the diagonal Fisher information of the channel's activations
``saliency``      ``sum |a_c| * |dL/da_c|``: first-order estimate of the loss change if ``a_c`` were lost
``energy``        ``sum a_c**2``
``max``           ``max |a_c|``: the channels a shared quantization grid serves worst
``random``        a seeded random permutation (the ablation baseline)
``greedy``        the paper's search: the objective with the channel left in full precision
================  ====================================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_dqa.calibration.greedy import greedy_rank
from lightning_dqa.calibration.observers import ChannelStats

if TYPE_CHECKING:
    from lightning_dqa.core.quantizers import ActivationQuantizer

__all__ = [
    "GRADIENT_RANKINGS",
    "RANKINGS",
    "RankInputs",
    "Ranking",
    "important_mask",
    "rank_channels",
]

LayerScore = Callable[[ChannelStats, torch.Generator], Tensor]


@dataclass
class RankInputs:
    """What a ranking may read: statistics always; the model and data for search-based rankings.

    Attributes:
        stats: reduced statistics per layer.
        order: target layers in forward order.
        seed: seed of random rankings (layer ``i`` draws from ``seed * 1_000_003 + i``).
        model: the model, quantizers installed (search-based rankings only).
        quantizers: the installed quantizers by layer name.
        batches: the calibration batches (kept only when the ranking says ``needs_batches``).
        forward_fn: ``forward_fn(model, batch)`` runs the model.
        objective_fn: ``objective_fn(output, batch)``, the summed score of a batch (higher is better).
        progress: ``progress(done, total)`` in candidate channels, for long searches.
        reduce_sum: sums a tensor over distributed ranks (searches score each rank's batches), or ``None``.

    """

    stats: dict[str, ChannelStats]
    order: list[str]
    seed: int = 0
    model: nn.Module | None = None
    quantizers: dict[str, ActivationQuantizer] | None = None
    batches: Sequence[Any] = ()
    forward_fn: Callable[[nn.Module, Any], Any] | None = None
    objective_fn: Callable[[Any, Any], Any] | None = None
    progress: Callable[[int, int], None] | None = None
    reduce_sum: Callable[[Tensor], Tensor] | None = None


@dataclass(frozen=True)
class Ranking:
    """One ranking criterion: ``rank(inputs)`` gives ``{layer: (C,) scores}`` on the CPU.

    Attributes:
        rank: the criterion over all layers.
        layer_score: for one-pass criteria, the score of one layer from its statistics (``None`` for searches).
        needs_gradients: calibration must run a backward pass (activation gradients).
        needs_batches: calibration must keep its batches and pass the model (searches).

    """

    rank: Callable[[RankInputs], dict[str, Tensor]]
    layer_score: LayerScore | None = None
    needs_gradients: bool = False
    needs_batches: bool = False


def _one_pass(name: str, score: LayerScore, needs_gradients: bool = False) -> Ranking:
    """The :class:`Ranking` ``name`` that scores every layer on its own from its statistics."""

    def rank(inputs: RankInputs) -> dict[str, Tensor]:
        out = {}
        for i, layer in enumerate(inputs.order):
            gen = torch.Generator().manual_seed(inputs.seed * 1_000_003 + i)
            out[layer] = _checked_score(name, score, needs_gradients, inputs.stats[layer], gen, layer)
        return out

    return Ranking(rank=rank, layer_score=score, needs_gradients=needs_gradients)


def _checked_score(
    name: str, score: LayerScore, needs_gradients: bool, stats: ChannelStats, generator: torch.Generator, layer: str
) -> Tensor:
    if needs_gradients and not stats.grad_seen:
        raise ValueError(
            f"Layer {layer!r}: ranking {name!r} needs activation gradients, but none reached this layer during "
            f"calibration (is the loss connected to it?)"
        )
    return score(stats, generator).detach().float().cpu()


def _greedy(inputs: RankInputs) -> dict[str, Tensor]:
    if inputs.model is None or inputs.quantizers is None or inputs.forward_fn is None:
        raise ValueError("Ranking 'greedy' needs the model, its quantizers and forward_fn")
    if inputs.objective_fn is None:
        raise ValueError("Ranking 'greedy' needs objective_fn(output, batch) to score candidates")
    return greedy_rank(
        inputs.model,
        inputs.quantizers,
        inputs.order,
        list(inputs.batches),
        inputs.forward_fn,
        inputs.objective_fn,
        progress=inputs.progress,
        reduce=inputs.reduce_sum,
    )


RANKINGS: dict[str, Ranking] = {
    "fisher": _one_pass("fisher", lambda st, g: st.grad_sq, needs_gradients=True),
    "saliency": _one_pass("saliency", lambda st, g: st.saliency, needs_gradients=True),
    "energy": _one_pass("energy", lambda st, g: st.energy),
    "max": _one_pass("max", lambda st, g: st.max_abs),
    "random": _one_pass("random", lambda st, g: torch.rand(st.max_abs.numel(), generator=g)),
    "greedy": Ranking(rank=_greedy, needs_batches=True),
}
GRADIENT_RANKINGS: frozenset[str] = frozenset(name for name, r in RANKINGS.items() if r.needs_gradients)


def rank_channels(name: str, stats: ChannelStats, generator: torch.Generator, layer: str = "") -> Tensor:
    """Score every channel of one layer with the one-pass criterion ``name``.

    Args:
        name: a key of :data:`RANKINGS` whose entry is a one-pass criterion (not ``greedy``).
        stats: the layer's calibration statistics.
        generator: source of randomness (``random`` only), seeded by the caller for reproducibility.
        layer: layer name for error messages.

    Returns:
        ``(C,)`` float scores on the CPU, higher is more important.

    Raises:
        ValueError: for an unknown name, a search-based ranking, or a gradient ranking that saw no gradient.

    """
    ranking = RANKINGS.get(name)
    if ranking is None or ranking.layer_score is None:
        known = sorted(k for k, v in RANKINGS.items() if v.layer_score is not None)
        raise ValueError(f"Expected a one-pass ranking in {known}, got {name!r}")
    return _checked_score(name, ranking.layer_score, ranking.needs_gradients, stats, generator, layer)


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
