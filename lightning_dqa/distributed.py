"""Calibration under a Lightning strategy: statistics reduced with the strategy, batches sharded by rank."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.distributed import ReduceOp

__all__ = ["rank_shard", "strategy_broadcast", "strategy_reducer"]

_OPS = {"sum": ReduceOp.SUM, "max": ReduceOp.MAX, "min": ReduceOp.MIN}


def strategy_reducer(strategy: Any, world: int) -> Callable[[Tensor, str], Tensor]:
    """``reducer(tensor, op)`` over ranks with the strategy's collectives (``op``: sum, max, min or cat).

    ``cat`` concatenates along the last dimension in rank order (``all_gather``).
    """

    def reducer(t: Tensor, op: str) -> Tensor:
        if op == "cat":
            gathered = strategy.all_gather(t)
            return gathered if world == 1 else torch.cat(list(gathered.unbind(0)), dim=-1)
        if world == 1:
            return t
        return strategy.reduce(t.clone(), reduce_op=_OPS[op])

    return reducer


def strategy_broadcast(strategy: Any, world: int) -> Callable[[Tensor], Tensor] | None:
    """Rank 0's copy of a tensor on every rank; ``None`` on a single process (nothing to copy)."""
    return (lambda t: strategy.broadcast(t, src=0)) if world > 1 else None


def rank_shard(loader: Iterable[Any], strategy: Any, world: int, rank: int) -> Iterator[Any]:
    """This rank's batches (every ``world``-th one) moved to the device."""
    for i, batch in enumerate(loader):
        if i % world == rank:
            yield strategy.batch_to_device(batch)
