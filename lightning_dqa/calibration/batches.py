"""Batch helpers shared by calibration and the callback: counting, truncating and un-freezing samples.

A batch is whatever a DataLoader yields: a tensor, or tuples, lists and dicts nesting tensors. Every helper
walks that structure; the first dimension of each tensor is the sample axis.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["clone_inference", "default_batch_size", "truncate"]

Batch = Any


def _sample_list(value: Any) -> bool:
    """Whether a field is a list of per-sample items (torchvision detection: images and target dicts)."""
    return (
        isinstance(value, list | tuple)
        and len(value) > 0
        and (all(isinstance(v, dict) for v in value) or all(isinstance(v, Tensor) for v in value))
    )


def _fields(batch: Batch) -> list[Any]:
    return list(batch.values()) if isinstance(batch, dict) else list(batch) if isinstance(batch, list | tuple) else []


def _lists_hold_samples(batch: Batch) -> bool:
    """A batch whose fields are no tensors but lists of per-sample items, as detection loaders yield them."""
    fields = _fields(batch)
    return not any(isinstance(f, Tensor) for f in fields) and any(_sample_list(f) for f in fields)


def default_batch_size(batch: Batch) -> int:
    """Samples in a batch: the first dimension of its first tensor field, else the length of a list of samples.

    Fields are searched in order (tuples, lists and dicts nest). A batch whose fields are lists of per-sample
    tensors or dicts instead of batched tensors (torchvision detection: ``(images, targets)`` with one image
    tensor and one target dict per sample) has as many samples as those lists have items.

    >>> import torch
    >>> default_batch_size({"image": torch.zeros(5, 3), "label": torch.zeros(5)})
    5
    >>> default_batch_size(([torch.zeros(3, 8, 8), torch.zeros(3, 6, 6)], [{"boxes": torch.zeros(1, 4)}] * 2))
    2

    Raises:
        TypeError: when the batch holds no tensor.

    """
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if _lists_hold_samples(batch):
        return len(next(f for f in _fields(batch) if _sample_list(f)))
    for item in _fields(batch):
        try:
            return default_batch_size(item)
        except TypeError:
            continue
    raise TypeError(f"Cannot find a tensor in a batch of type {type(batch).__name__} to count its samples")


def truncate(batch: Batch, n: int) -> Batch:
    """The first ``n`` samples of a batch (tensors, tuples, lists and dicts of them, or lists of samples)."""
    if isinstance(batch, Tensor):
        return batch[:n]
    if _lists_hold_samples(batch):
        if isinstance(batch, dict):
            return {k: (v[:n] if _sample_list(v) else v) for k, v in batch.items()}
        return type(batch)(v[:n] if _sample_list(v) else v for v in batch)
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
