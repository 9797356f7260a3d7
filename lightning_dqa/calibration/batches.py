"""Batch helpers shared by calibration and the callback: counting, truncating and un-freezing samples.

A batch is whatever a DataLoader yields: a tensor, or tuples, lists and dicts nesting tensors. Every helper
walks that structure; the first dimension of each tensor is the sample axis.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["clone_inference", "default_batch_size", "truncate"]

Batch = Any


def default_batch_size(batch: Batch) -> int:
    """Samples in a batch: the first dimension of its first tensor (tuples, lists and dicts are searched).

    >>> import torch
    >>> default_batch_size({"image": torch.zeros(5, 3), "label": torch.zeros(5)})
    5

    Raises:
        TypeError: when the batch holds no tensor.

    """
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, list | tuple) else ()
    for item in items:
        try:
            return default_batch_size(item)
        except TypeError:
            continue
    raise TypeError(f"Cannot find a tensor in a batch of type {type(batch).__name__} to count its samples")


def truncate(batch: Batch, n: int) -> Batch:
    """The first ``n`` samples of a batch (tensors, tuples, lists and dicts of them)."""
    if isinstance(batch, Tensor):
        return batch[:n]
    if isinstance(batch, dict):
        return {k: truncate(v, n) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(truncate(v, n) for v in batch)
    return batch


def clone_inference(batch: Batch) -> Batch:
    """The batch with every inference-mode tensor replaced by an ordinary copy (so it can join autograd)."""
    if isinstance(batch, Tensor):
        return batch.clone() if batch.is_inference() else batch
    if isinstance(batch, dict):
        return {k: clone_inference(v) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(clone_inference(v) for v in batch)
    return batch
