"""``K`` candidates in one pass: a batch stacked ``K`` times, each replica quantized with its own mask.

Replica ``k`` of a ``(K * N, ...)`` tensor leaves the channels ``fp_rows[k]`` of a ``(K, C)`` mask in full
precision. Each replica goes through :meth:`ActivationQuantizer.quantize_values` on its own, so a dynamic
scale is the maximum over that replica's ``N`` rows: the values a single-candidate pass computes. The
piecewise replay of :mod:`lightning_dqa.calibration.fxreplay` runs the greedy search's candidates this way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dqa.core.quantizers import ActivationQuantizer

__all__ = ["quantize_replicas", "repeat_rows", "replica_mode", "split_rows"]


def quantize_replicas(q: ActivationQuantizer, x: Tensor, fp_rows: Tensor) -> Tensor:
    """Quantize ``K`` stacked replicas of a tensor, replica ``k`` with full-precision mask ``fp_rows[k]``.

    Args:
        q: the quantizer (its own ``fp_mask`` is restored afterwards).
        x: ``(K * N, ...)`` replicas stacked along dimension 0.
        fp_rows: ``(K, C)`` bool, channels each replica leaves in full precision.

    Returns:
        Tensor like ``x``.

    Raises:
        RuntimeError: when ``x``'s first dimension is not a multiple of ``K``.

    Example:
        >>> q = ActivationQuantizer(2, bits=2, scale_mode="dynamic")
        >>> x = torch.tensor([[0.3, 0.9], [0.7, 0.2]])  # (N, C) = (2, 2)
        >>> fp_rows = torch.tensor([[True, False], [False, True]])  # (K, C) = (2, 2)
        >>> y = quantize_replicas(q, x.repeat(2, 1), fp_rows)  # (K * N, C)
        >>> torch.equal(y[:2, 0], x[:, 0]), torch.equal(y[2:, 1], x[:, 1])  # the full-precision channels
        (True, True)

    """
    k = fp_rows.shape[0]
    if x.shape[0] % k:
        raise RuntimeError(f"Layer {q.name!r}: expected {k} replicas along dimension 0, got shape {tuple(x.shape)}")
    saved = q.fp_mask
    try:
        parts = []
        for chunk, fp in zip(x.split(x.shape[0] // k), fp_rows.unbind(0), strict=True):  # (N, ...) each
            q.fp_mask = fp
            parts.append(q.quantize_values(chunk))
    finally:
        q.fp_mask = saved
    return torch.cat(parts)


@contextmanager
def replica_mode(pairs: list[tuple[ActivationQuantizer, Tensor]]) -> Iterator[None]:
    """Make each quantizer quantize replica by replica (``(quantizer, (K, C) fp rows)`` pairs) for a while.

    The quantizer is disabled, so its own forward passes the tensor through (after its ``pre_transform``),
    and a forward hook quantizes that result per replica instead. Flags and hooks are restored on exit.

    Args:
        pairs: each quantizer with the ``(K, C)`` bool mask of its replicas' full-precision channels.

    """
    handles = []
    enabled = [q.enabled for q, _ in pairs]
    try:
        for q, rows in pairs:
            q.enabled = False
            handles.append(q.register_forward_hook(_replica_hook(rows)))
        yield
    finally:
        for h in handles:
            h.remove()
        for (q, _), e in zip(pairs, enabled, strict=True):
            q.enabled = e


def _replica_hook(rows: Tensor) -> Callable[[nn.Module, tuple[Any, ...], Tensor], Tensor]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        assert isinstance(module, ActivationQuantizer)  # registered on quantizers only, by replica_mode
        return quantize_replicas(module, output, rows)

    return hook


def repeat_rows(value: Any, k: int, rows: int) -> Any:
    """``k`` stacked copies of a batch tensor of ``rows`` rows; any other value as it is.

    Always a fresh tensor: the ops that read it may work in place.

    Example:
        >>> repeat_rows(torch.arange(2), 3, rows=2).tolist(), repeat_rows(7, 3, rows=2)
        ([0, 1, 0, 1, 0, 1], 7)

    """
    if isinstance(value, Tensor) and value.ndim and value.shape[0] == rows:
        return value.repeat(k, *([1] * (value.ndim - 1)))  # (K * N, ...)
    return value


def split_rows(output: Any, k: int) -> list[Any]:
    """Split a ``K * N``-row output (a tensor, or tuples, lists and dicts of them) into ``K`` outputs.

    Raises:
        ValueError: for a tensor whose first dimension is not a multiple of ``k``, or another kind of value.

    Example:
        >>> halves = split_rows({"logits": torch.arange(4)}, 2)  # K = 2 replicas of N = 2 rows
        >>> [h["logits"].tolist() for h in halves]
        [[0, 1], [2, 3]]

    """
    if isinstance(output, Tensor):
        if not output.ndim or output.shape[0] % k:
            raise ValueError(f"cannot split an output of shape {tuple(output.shape)} into {k} replicas")
        return list(output.split(output.shape[0] // k))
    if isinstance(output, dict):
        split = {key: split_rows(v, k) for key, v in output.items()}
        return [{key: v[i] for key, v in split.items()} for i in range(k)]
    if isinstance(output, list | tuple):
        columns = [split_rows(v, k) for v in output]
        return [type(output)(col[i] for col in columns) for i in range(k)]
    raise ValueError(f"cannot split an output of type {type(output).__name__} into replicas")
