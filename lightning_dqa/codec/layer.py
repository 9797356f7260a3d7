"""A quantizer layer's activation as bytes and back to its fake-quantized values.

:func:`quantizer_to_bytes` stores the DQA codes ``q.codes(x)`` of an
:class:`~lightning_dqa.quantizers.ActivationQuantizer` as a blob (:func:`~lightning_dqa.codec.blob.encode_activation`);
:func:`bytes_to_values` reads it back and dequantizes with :func:`lightning_dqa.functional.dqa_dequantize`, which
gives exactly the values ``q(x)`` computes without autograd (the inference path).

Example:
    >>> import torch
    >>> from lightning_dqa.quantizers import ActivationQuantizer
    >>> q = ActivationQuantizer(4, bits=3, extra_bits=2, scale_mode="dynamic")
    >>> q.important[1] = True
    >>> x = torch.randn(2, 4, 5, 5)  # (N, C, H, W)
    >>> with torch.no_grad():
    ...     torch.equal(bytes_to_values(q, quantizer_to_bytes(q, x)), q(x))
    True

"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_dqa import functional as F
from lightning_dqa.codec.blob import decode_activation, encode_activation
from lightning_dqa.codec.codebook import HuffmanCodebook
from lightning_dqa.codec.huffman import DEFAULT_CHUNK_SIZE

if TYPE_CHECKING:
    from lightning_dqa.quantizers import ActivationQuantizer

__all__ = ["bytes_to_values", "quantizer_to_bytes"]


def quantizer_to_bytes(q: ActivationQuantizer, x: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> bytes:
    """Store the DQA codes ``q.codes(x)`` of one activation as a blob (:func:`encode_activation`).

    The shifting errors are coded with the layer's code book, built from its calibration histogram
    ``q.error_counts``; dynamic scales (computed from ``x``) are stored in the blob, frozen ones are not
    (they are constants of the model).

    Args:
        q: a quantizing layer (``bits > 0``) without ``pre_transform`` or ``fp_mask``.
        x: the activation, e.g. ``(N, C, H, W)``, ``C = q.num_channels`` on ``q.channel_dim``.
        chunk_size: symbols per decoder chunk of the error stream.

    Returns:
        The blob; :func:`bytes_to_values` turns it into ``q(x)``.

    Raises:
        ValueError: for a pass-through quantizer, one with a ``pre_transform`` or ``fp_mask`` (its output is
            not a function of DQA codes), or an ``x`` with the wrong number of channels.

    """
    _check_quantizer(q)
    if x.ndim == 0 or not -x.ndim <= q.channel_dim < x.ndim or x.shape[q.channel_dim] != q.num_channels:
        raise ValueError(
            f"Layer {q.name!r}: expected {q.num_channels} channels on dim {q.channel_dim}, "
            f"got a tensor of shape {tuple(x.shape)}"
        )
    main, error, scale_n = q.codes(x)
    return encode_activation(
        main,
        error,
        bits=q.n,
        extra_bits=q.m,
        signed=bool(q.signed),
        important=q.important,
        codebook=_codebook_of(q),
        channel_dim=q.channel_dim,
        scale=scale_n if q.scale_mode == "dynamic" else None,
        chunk_size=chunk_size,
    )


def bytes_to_values(q: ActivationQuantizer, blob: bytes | bytearray | memoryview) -> Tensor:
    """Values back from a blob of :func:`quantizer_to_bytes`: exactly ``q(x)`` without autograd (zeros unsigned).

    Args:
        q: the quantizer that wrote the blob, in the same state (scales, important channels, histogram).
        blob: the bytes.

    Returns:
        float32 tensor of shape ``header.shape``, e.g. ``(N, C, H, W)``, on the device of ``q``.

    Raises:
        ValueError: for a corrupted blob (:func:`decode_activation`), a blob written for another layer
            configuration, or a dynamic-scale layer and a blob without scales.

    """
    _check_quantizer(q)
    main, error, header = decode_activation(blob, _codebook_of(q))
    got = (header.bits, header.extra_bits, header.signed, header.num_channels, header.important)
    want = (q.n, q.m, bool(q.signed), q.num_channels, tuple(torch.nonzero(q.important).flatten().tolist()))
    if got != want or header.channel_dim != q.channel_dim % len(header.shape):
        raise ValueError(
            f"Layer {q.name!r}: the blob holds (bits, extra_bits, signed, channels, important) = {got} on dim "
            f"{header.channel_dim}, the layer has {want} on dim {q.channel_dim}"
        )
    device = q.important.device
    if header.scale is not None:
        scale = header.scale.to(device)
    elif q.scale_mode == "dynamic":
        raise ValueError(f"Layer {q.name!r} has dynamic scales, but the blob stores none")
    else:
        scale = q.current_scale(main).detach()  # a frozen scale: `current_scale` reads its input only when dynamic
    return F.dqa_dequantize(main.to(device), error.to(device), scale, q.m, q.important, header.channel_dim)


def _check_quantizer(q: ActivationQuantizer) -> None:
    if q.passthrough:
        raise ValueError(f"Layer {q.name!r} is pass-through (bits=0): it stores float32 values, not DQA codes")
    if q.pre_transform is not None or q.fp_mask is not None:
        raise ValueError(
            f"Layer {q.name!r} has a pre_transform or fp_mask: its output is not a function of its DQA codes"
        )


def _codebook_of(q: ActivationQuantizer) -> HuffmanCodebook:
    """The layer's shifting-error code book, from its calibration histogram (as the memory meter builds it)."""
    return HuffmanCodebook.from_counts(q.error_counts.detach().cpu())
