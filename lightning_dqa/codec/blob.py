"""One activation tensor's DQA codes as self-describing bytes, and back.

:func:`encode_activation` stores what :func:`lightning_dqa.core.functional.dqa_quantize` produces (``n``-bit main
codes for every channel, ``m``-bit shifting errors for the important ones) and :func:`decode_activation`
returns it (:mod:`lightning_dqa.deploy.layer_bytes` does the same for a quantizer layer and a tensor).

Layout (version 2), little-endian, in this order:

=================  ===========================================================================================
fixed header       ``<4sBBBBBBIIQQIBQ``: magic ``DQAC``, version, flags (1: signed codes, 2: scales stored),
                   ``n``, ``m``, ``ndim``, channel axis, ``k`` important channels, CRC-32 of the error model
                   (the code book's bytes; for ``ans`` the counts as int64), main payload bytes, error payload
                   bits (exact, :attr:`~lightning_dqa.codec.entropy.ErrorCoder.bits`), decoder chunk size,
                   entropy coder (0 huffman, 1 zstd, 2 ans), error section bytes
shape              ``ndim`` x uint64
important          ``k`` x uint32, the important channels' indices, strictly increasing
scales             ``C`` x float32, only with flag 2 (dynamic scales belong to the stored tensor)
chunk offsets      huffman only: ``chunks - 1`` x uint64, starting bit of every decoder chunk but the first
main codes         ``n``-bit packed codes, row-major (:func:`~.bitpack.pack_codes`)
shifting errors    the errors of the important channels, row-major, coded by the header's coder: Huffman
                   (:func:`~.huffman.encode`, the paper's and the default), or the bytes of
                   :class:`~.entropy.ZstdCoder` / :class:`~.entropy.AnsCoder`
checksum           uint32 CRC-32 of everything above
=================  ===========================================================================================

Version 1 (no coder, no error-section size) is no longer read: its blobs fail with a message naming the versions.
The code book is not stored (it is shared by every tensor of a layer); its CRC-32 is, so decoding with
another book fails instead of returning wrong values. Memory figures come from the exact bit counts of
:mod:`lightning_dqa.deploy.accounting`, not from the size of these blobs.

Example:
    >>> import torch
    >>> book = HuffmanCodebook.from_counts([5, 1])
    >>> main = torch.tensor([[[-2, 1], [0, 3]]], dtype=torch.int32)  # (N, C, W) = (1, 2, 2)
    >>> error = torch.tensor([[[1, 0]]], dtype=torch.int32)  # (1, 1, 2): channel 1 only
    >>> important = torch.tensor([False, True])
    >>> blob = encode_activation(main, error, bits=3, extra_bits=1, signed=True, important=important, codebook=book)
    >>> main2, error2, header = decode_activation(blob, book)
    >>> torch.equal(main2, main), torch.equal(error2, error), header.important
    (True, True, (1,))

"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from lightning_dqa.codec.bitpack import pack_codes, unpack_codes
from lightning_dqa.codec.codebook import HuffmanCodebook
from lightning_dqa.codec.decode import decode
from lightning_dqa.codec.entropy import DEFAULT_CODER
from lightning_dqa.codec.huffman import DEFAULT_CHUNK_SIZE, EncodedStream, encode
from lightning_dqa.codec.layout import (
    _MAX_EXTRA_BITS,
    _U32,
    CODER_IDS,
    MAGIC,
    VERSION,
    BlobHeader,
    BlobParts,
    _with_channels,
    check_coder,
    error_coder,
    model_crc,
    read_parts,
    write_parts,
)
from lightning_dqa.core._checks import is_int

__all__ = [
    "CODER_IDS",
    "MAGIC",
    "VERSION",
    "BlobHeader",
    "decode_activation",
    "encode_activation",
]


# ---------------------------------------------------------------------------------------------- encoding
def encode_activation(
    main: Tensor,
    error: Tensor,
    *,
    bits: int,
    extra_bits: int,
    signed: bool,
    important: Tensor,
    codebook: HuffmanCodebook,
    channel_dim: int = 1,
    scale: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    coder: str = DEFAULT_CODER,
    counts: Tensor | np.ndarray | None = None,
) -> bytes:
    """Store one activation's DQA codes as a self-describing blob (layout in the module docstring).

    Args:
        main: integer ``n``-bit main codes, e.g. ``(N, C, H, W)``, channels on ``channel_dim``.
        error: integer shifting errors in ``[0, 2**m - 1]``, shaped like ``main`` with the channel axis cut to
            the ``k`` important channels (as :func:`lightning_dqa.core.functional.dqa_quantize` returns them).
        bits: ``n``, in ``[2, 16]``.
        extra_bits: ``m``, in ``[0, 16]``.
        signed: whether the main codes are signed.
        important: ``(C,)`` bool mask of the important channels.
        codebook: the Huffman code of the shifting errors, over ``2**m`` symbols.
        channel_dim: the channel axis of ``main`` and ``error``.
        scale: optional ``(C,)`` floating ``n``-bit scales to store with the codes (as float32).
        chunk_size: symbols per decoder chunk of a Huffman error stream.
        coder: entropy coder of the errors: ``huffman`` (the paper's, default), ``zstd`` or ``ans``.
        counts: ``(2**m,)`` error histogram the ``ans`` model is built from (``codebook`` is built from it too).

    Returns:
        The blob.

    Raises:
        ValueError: for inconsistent shapes, widths, code book, codes out of range, a bad ``chunk_size`` or
            ``coder``.
        TypeError: for non-integer codes.
        ImportError: for ``zstd`` or ``ans`` without their package (``pip install 'lightning-dqa[entropy]'``).

    """
    cd = _check_layout(main, error, important, channel_dim)
    _check_extra_bits(extra_bits, codebook)
    check_coder(coder, counts)
    main_payload, _ = pack_codes(main, bits, signed)
    if coder == "huffman":
        stream = encode(error, codebook, chunk_size)  # checks that chunk_size is a positive int
        payload, offsets, error_bits = stream.payload, stream.offsets, stream.bit_count
    else:
        encode(error[:0], codebook, chunk_size)  # the same argument checks as the Huffman path
        data = error_coder(coder).encode(error, _counts(counts, codebook))
        payload, offsets = np.frombuffer(data, np.uint8), np.zeros(0, np.int64)
        error_bits = error_coder(coder).bits(data)
    return write_parts(
        shape=tuple(main.shape), bits=bits, extra_bits=extra_bits, signed=signed, channel_dim=cd,
        important=torch.nonzero(important.detach().cpu()).flatten().numpy(), crc=model_crc(coder, codebook, counts),
        scale=scale, chunk_size=chunk_size, coder=coder, main=main_payload, error=payload, offsets=offsets,
        error_bits=error_bits,
    )  # fmt: skip


def _check_layout(main: Tensor, error: Tensor, important: Tensor, channel_dim: int) -> int:
    """Validate the shapes of ``encode_activation``'s tensors; return the channel axis in ``[0, ndim - 1]``."""
    if not isinstance(main, Tensor) or not isinstance(error, Tensor) or not isinstance(important, Tensor):
        raise TypeError(
            f"Expected main, error and important to be tensors, got {type(main).__name__}, "
            f"{type(error).__name__} and {type(important).__name__}"
        )
    if not 1 <= main.ndim <= 255:
        raise ValueError(f"Expected main to have 1 to 255 dimensions, got shape {tuple(main.shape)}")
    if not is_int(channel_dim) or not -main.ndim <= channel_dim < main.ndim:
        raise ValueError(f"Expected channel_dim to be an int in [{-main.ndim}, {main.ndim - 1}], got {channel_dim!r}")
    cd = channel_dim % main.ndim
    channels = main.shape[cd]
    if important.dtype != torch.bool or tuple(important.shape) != (channels,) or channels >= _U32:
        raise ValueError(
            f"Expected important to be a ({channels},) bool mask (C < 2**32), got dtype {important.dtype} "
            f"and shape {tuple(important.shape)}"
        )
    want = _with_channels(tuple(main.shape), cd, int(important.sum()))
    if tuple(error.shape) != want:
        raise ValueError(
            f"Expected error of shape {want} (main's shape with the important channels only), got {tuple(error.shape)}"
        )
    return cd


def _check_extra_bits(extra_bits: int, codebook: HuffmanCodebook) -> None:
    """``bits`` is checked by :func:`pack_codes`; ``m`` here, against the code book's alphabet."""
    if not is_int(extra_bits) or not 0 <= extra_bits <= _MAX_EXTRA_BITS:
        raise ValueError(f"Expected extra_bits to be an int in [0, {_MAX_EXTRA_BITS}], got {extra_bits!r}")
    if codebook.num_symbols != 2**extra_bits:
        raise ValueError(
            f"Expected a code book of 2**extra_bits = {2**extra_bits} symbols, got {codebook.num_symbols}; "
            "build it from the layer's error histogram of that size"
        )


# ---------------------------------------------------------------------------------------------- decoding
def decode_activation(
    blob: bytes | bytearray | memoryview, codebook: HuffmanCodebook, counts: Tensor | np.ndarray | None = None
) -> tuple[Tensor, Tensor, BlobHeader]:
    """Read a blob written by :func:`encode_activation`.

    Args:
        blob: the bytes.
        codebook: the code book the shifting errors were coded with (its CRC-32 is checked for every coder).
        counts: the error histogram; needed for an ``ans`` blob, whose model it is.

    Returns:
        ``(main, error, header)``: int32 main codes of shape ``header.shape``, e.g. ``(N, C, H, W)``; int32
        shifting errors of shape ``header.error_shape``, e.g. ``(N, k, H, W)``; the :class:`BlobHeader`.

    Raises:
        ValueError: for a blob that is truncated, too long, corrupted (checksum, inconsistent fields, a payload
            that does not decode) or of another format or version, or a code book other than the encoder's.
        TypeError: for a ``blob`` that is not bytes-like.
        ImportError: for a ``zstd`` or ``ans`` blob without that coder's package.

    """
    parts = read_parts(blob, codebook, counts)
    h = parts.header
    main = unpack_codes(parts.main, h.bits, h.signed, math.prod(h.shape))
    return main.reshape(h.shape), decode_errors(parts, codebook, counts).reshape(h.error_shape), h


def decode_errors(parts: BlobParts, codebook: HuffmanCodebook, counts: Tensor | np.ndarray | None) -> Tensor:
    """The flat int32 shifting errors of a checked blob's error section, whichever coder wrote it."""
    h = parts.header
    n = math.prod(h.error_shape)
    if h.coder == "huffman":
        return decode(EncodedStream(parts.error, h.error_bits, n, h.chunk_size, parts.offsets), codebook)
    coder = error_coder(h.coder)
    data = parts.error.tobytes()
    if coder.bits(data) != h.error_bits:
        raise ValueError(
            f"Corrupted blob: the {h.coder} data holds {coder.bits(data)} bits, the header says {h.error_bits}"
        )
    return torch.from_numpy(np.ascontiguousarray(coder.decode(data, _counts(counts, codebook), n)))


def _counts(counts: Tensor | np.ndarray | None, codebook: HuffmanCodebook) -> np.ndarray:
    """The histogram a coder models (only its length matters to ``zstd``, which models the stream itself)."""
    if counts is None:
        return np.ones(codebook.num_symbols, dtype=np.int64)
    return counts.detach().cpu().numpy() if isinstance(counts, Tensor) else np.asarray(counts)
