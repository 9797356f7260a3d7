"""Content-keyed sampling of activation values: the same sample on one process and on any number of ranks.

Percentile and MSE clipping, and the code book's histogram, read a sample of each channel's values. Drawing it
with a random generator makes it depend on which process read which batch, so a DDP run would calibrate on a
different sample than one process on the same data. Here every value position gets a 64-bit key computed from
*what* it is, not from when it was read: a hash of its input sample's contents (every tensor of the batch row:
image, label, ...) and of its position in the activation tensor. The sample is the ``K`` positions with the
smallest keys over the whole calibration set (a bottom-k sketch). Bottom-k is mergeable: the bottom ``K`` of the
union of every rank's bottom ``K`` is the bottom ``K`` of all positions, so the ranks' union equals one process
reading every batch, whatever the shard sizes or the batch boundaries, and the sample is a uniform one without
replacement. A sample read twice (a sampler padding a shard by repetition) has equal keys and is kept once.

All arithmetic is on ``int64`` tensors, wrapping modulo ``2**64``, on the data's own device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["bottom_k", "mix64", "position_keys", "sample_keys"]

# splitmix64 constants as signed 64-bit integers (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
_GOLDEN = -7046029254386353131
_M1 = -4658895280553007687
_M2 = -7723592293110705685


def _shr(x: Tensor, k: int) -> Tensor:
    """Logical right shift of ``int64`` bits (torch's ``>>`` is arithmetic on signed integers)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def mix64(x: Tensor) -> Tensor:
    """splitmix64's finaliser on ``int64`` tensors: a bijective mix whose outputs look uniformly random.

    >>> mix64(torch.tensor([0, 1])).tolist() == mix64(torch.tensor([0, 1])).tolist()
    True
    """
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def _rows(batch: Any, size: int) -> list[Tensor]:
    """Every tensor in ``batch`` (nested dicts, lists, tuples) whose first axis has the ``size`` samples."""
    if isinstance(batch, Tensor):
        return [batch] if batch.ndim >= 1 and batch.shape[0] == size else []
    if isinstance(batch, Mapping):
        return [t for v in batch.values() for t in _rows(v, size)]
    if isinstance(batch, (list, tuple)):
        return [t for v in batch for t in _rows(v, size)]
    return []


def _row_hash(t: Tensor) -> Tensor:
    """``(B,)`` hash of each row's bytes: the bytes as ``int64`` words, times per-word odd multipliers, summed.

    Integer sums wrap and are associative, so the result does not depend on reduction order or batch size.
    """
    rows = t.detach().reshape(t.shape[0], -1)
    if rows.dtype == torch.bool:
        rows = rows.to(torch.uint8)
    raw = rows.contiguous().view(torch.uint8)  # (B, bytes)
    pad = (-raw.shape[1]) % 8
    if pad:
        raw = torch.nn.functional.pad(raw, (0, pad))
    words = raw.view(torch.int64)  # (B, W)
    mult = mix64(torch.arange(words.shape[1], device=words.device, dtype=torch.int64)) | 1
    return (words * mult).sum(dim=1)


def sample_keys(batch: Any, size: int, salt: int = 0) -> Tensor | None:
    """``(size,)`` int64 key of each sample of a batch, from the contents of its rows; ``None`` if none are found.

    Args:
        batch: a tensor or a (nested) dict / list / tuple of them, as a loader yields it.
        size: the number of samples in the batch.
        salt: mixed into every key (the calibration seed).

    """
    rows = _rows(batch, size)
    if not rows:
        return None
    key = torch.full((size,), salt, dtype=torch.int64, device=rows[0].device)
    for i, t in enumerate(rows):
        key = mix64(key + _row_hash(t).to(key.device) + i)
    return key


def position_keys(keys: Tensor, positions: int, salt: int) -> Tensor:
    """``(B, P)`` key of every position ``p < positions`` of every sample, from the samples' ``(B,)`` keys."""
    pos = torch.arange(positions, device=keys.device, dtype=torch.int64) * _GOLDEN + salt
    return mix64(keys[:, None] ^ mix64(pos)[None, :])


def bottom_k(keys: Tensor, values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` smallest distinct keys in increasing order and their value columns.

    Args:
        keys: ``(N,)`` int64.
        values: ``(C, N)``, column ``j`` belonging to ``keys[j]``.
        k: how many to keep.

    Returns:
        ``(min(k, distinct),)`` keys and ``(C, min(k, distinct))`` values; a key seen twice is kept once.

    """
    order = torch.sort(keys, stable=True).indices
    keys = keys[order]
    first = torch.ones_like(keys, dtype=torch.bool)
    first[1:] = keys[1:] != keys[:-1]
    keep = order[first][:k]
    return keys[first][:k], values[:, keep]
