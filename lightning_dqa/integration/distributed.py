"""Calibration under a Lightning strategy: statistics reduced with the strategy, batches sharded by rank."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.distributed import ReduceOp
from torch.utils.data import DistributedSampler

__all__ = ["check_strategy", "rank_shard", "strategy_broadcast", "strategy_reducer"]

_UNSUPPORTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAStrategy")


def check_strategy(strategy: Any) -> None:
    """Refuse strategies that shard the layers the callback quantizes.

    Raises:
        ValueError: for FSDP, DeepSpeed, model-parallel and XLA strategies (the message says what to use).

    """
    name = type(strategy).__name__
    if any(name.startswith(s) for s in _UNSUPPORTED_STRATEGIES):
        raise ValueError(
            f"DQACallback supports single-device and DDP strategies, got {name}: FSDP, DeepSpeed and model "
            f"parallel shard the layers it quantizes; use strategy='ddp'"
        )

_OPS = {"sum": ReduceOp.SUM, "max": ReduceOp.MAX, "min": ReduceOp.MIN}


def strategy_reducer(strategy: Any, world: int) -> Callable[[Tensor, str], Tensor]:
    """``reducer(tensor, op)`` over ranks with the strategy's collectives (``op``: sum, max, min or cat).

    ``cat`` concatenates along the last dimension in rank order; the ranks may hold different lengths (uneven
    shards), so each is padded to the longest for ``all_gather`` and cut back after it.
    """

    def reducer(t: Tensor, op: str) -> Tensor:
        if world == 1:
            return t
        home = t.device  # collectives run on the strategy's device (NCCL takes no CPU tensors)
        t = t.to(strategy.root_device)
        out = _gather_cat(strategy, t) if op == "cat" else strategy.reduce(t.clone(), reduce_op=_OPS[op])
        return out.to(home)

    return reducer


def _gather_cat(strategy: Any, t: Tensor) -> Tensor:
    """Concatenate every rank's ``t`` ``(..., K_rank)`` along the last axis, in rank order."""
    length = torch.tensor([t.shape[-1]], device=t.device)
    lengths = strategy.all_gather(length).flatten().tolist()  # (world,)
    padded = torch.nn.functional.pad(t, (0, max(lengths) - t.shape[-1]))
    gathered = strategy.all_gather(padded)  # (world, ..., K_max)
    return torch.cat([g[..., :n] for g, n in zip(gathered.unbind(0), lengths, strict=True)], dim=-1)


def strategy_broadcast(strategy: Any, world: int) -> Callable[[Tensor], Tensor] | None:
    """Rank 0's copy of a tensor on every rank; ``None`` on a single process (nothing to copy)."""
    return (lambda t: strategy.broadcast(t, src=0)) if world > 1 else None


def rank_shard(loader: Iterable[Any], strategy: Any, world: int, rank: int) -> Iterator[Any]:
    """This rank's batches moved to the device: every ``world``-th one, unless the loader is already sharded.

    A loader with a ``DistributedSampler`` (Lightning injects one into the loaders it runs under DDP) already
    gives each rank its own samples; skipping batches there would read a ``1 / world`` share of the shard.
    """
    sharded = _distributed_sampler(loader)
    for i, batch in enumerate(loader):
        if sharded or i % world == rank:
            yield strategy.batch_to_device(batch)


def _distributed_sampler(loader: Any) -> bool:
    samplers = (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None))
    return any(isinstance(s, DistributedSampler) for s in samplers)
