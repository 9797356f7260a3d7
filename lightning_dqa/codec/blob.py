"""One activation tensor's DQA codes as self-describing bytes, and back.

:func:`encode_activation` stores what :func:`lightning_dqa.functional.dqa_quantize` produces (``n``-bit main
codes for every channel, ``m``-bit shifting errors for the important ones) and :func:`decode_activation`
returns it (:mod:`lightning_dqa.codec.layer` does the same for a quantizer layer and a tensor).

Layout, little-endian, in this order:

=================  ===========================================================================================
fixed header       ``<4sBBBBBBIIQQI``: magic ``DQAC``, version, flags (1: signed codes, 2: scales stored),
                   ``n``, ``m``, ``ndim``, channel axis, ``k`` important channels, CRC-32 of the code book's
                   bytes, main payload bytes, error payload bits, decoder chunk size
shape              ``ndim`` x uint64
important          ``k`` x uint32, the important channels' indices, strictly increasing
scales             ``C`` x float32, only with flag 2 (dynamic scales belong to the stored tensor)
chunk offsets      ``chunks - 1`` x uint64, starting bit of every decoder chunk of the error stream but the first
main codes         ``n``-bit packed codes, row-major (:func:`~.bitpack.pack_codes`)
shifting errors    Huffman-coded errors of the important channels, row-major (:func:`~.huffman.encode`)
checksum           uint32 CRC-32 of everything above
=================  ===========================================================================================

The code book is not stored (it is shared by every tensor of a layer); its CRC-32 is, so decoding with
another book fails instead of returning wrong values. Memory figures come from the exact bit counts of
:mod:`lightning_dqa.accounting`, not from the size of these blobs.

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

import itertools
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lightning_dqa.codec.bitpack import MAX_PACK_BITS, MIN_PACK_BITS, pack_codes, packed_size, unpack_codes
from lightning_dqa.codec.codebook import MAX_SYMBOLS, HuffmanCodebook
from lightning_dqa.codec.decode import decode
from lightning_dqa.codec.huffman import DEFAULT_CHUNK_SIZE, EncodedStream, encode

__all__ = [
    "MAGIC",
    "VERSION",
    "BlobHeader",
    "decode_activation",
    "encode_activation",
]

MAGIC = b"DQAC"
"""First four bytes of every blob."""
VERSION = 1
"""Layout version written, and the only one read."""

_FIXED = struct.Struct("<4sBBBBBBIIQQI")
_CRC = struct.Struct("<I")
_SIGNED, _HAS_SCALE = 1, 2
_MAX_EXTRA_BITS = MAX_SYMBOLS.bit_length() - 1  # 2**m error symbols must fit a code book
_U32 = 2**32


@dataclass(frozen=True, eq=False)
class BlobHeader:
    """What a blob says about the tensor it holds.

    Attributes:
        shape: the activation's shape, e.g. ``(N, C, H, W)``.
        bits: ``n``, width of the main codes.
        extra_bits: ``m``, width of the shifting errors.
        signed: whether the codes are signed.
        channel_dim: the channel axis, in ``[0, len(shape) - 1]``.
        important: indices of the important channels, increasing.
        scale: ``(C,)`` float32 ``n``-bit scales when the blob stores them, else ``None``.
        main_bytes: size of the packed main codes.
        error_bits: exact size of the Huffman-coded shifting errors.
        chunk_size: symbols per decoder chunk of the error stream.

    """

    shape: tuple[int, ...]
    bits: int
    extra_bits: int
    signed: bool
    channel_dim: int
    important: tuple[int, ...]
    scale: Tensor | None
    main_bytes: int
    error_bits: int
    chunk_size: int

    @property
    def num_channels(self) -> int:
        """``C``, the size of the channel axis."""
        return self.shape[self.channel_dim]

    @property
    def error_shape(self) -> tuple[int, ...]:
        """Shape of the shifting errors: :attr:`shape` with the channel axis cut to ``len(important)``."""
        return _with_channels(self.shape, self.channel_dim, len(self.important))

    def important_mask(self) -> Tensor:
        """``(C,)`` bool mask of the important channels."""
        mask = torch.zeros(self.num_channels, dtype=torch.bool)
        mask[list(self.important)] = True
        return mask


def _with_channels(shape: tuple[int, ...], channel_dim: int, channels: int) -> tuple[int, ...]:
    return (*shape[:channel_dim], channels, *shape[channel_dim + 1 :])


def _book_crc(codebook: HuffmanCodebook) -> int:
    return zlib.crc32(codebook.to_bytes())


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
) -> bytes:
    """Store one activation's DQA codes as a self-describing blob (layout in the module docstring).

    Args:
        main: integer ``n``-bit main codes, e.g. ``(N, C, H, W)``, channels on ``channel_dim``.
        error: integer shifting errors in ``[0, 2**m - 1]``, shaped like ``main`` with the channel axis cut to
            the ``k`` important channels (as :func:`lightning_dqa.functional.dqa_quantize` returns them).
        bits: ``n``, in ``[2, 16]``.
        extra_bits: ``m``, in ``[0, 16]``.
        signed: whether the main codes are signed.
        important: ``(C,)`` bool mask of the important channels.
        codebook: the code of the shifting errors, over ``2**m`` symbols.
        channel_dim: the channel axis of ``main`` and ``error``.
        scale: optional ``(C,)`` floating ``n``-bit scales to store with the codes (as float32).
        chunk_size: symbols per decoder chunk of the error stream.

    Returns:
        The blob.

    Raises:
        ValueError: for inconsistent shapes, widths, code book, codes out of range or a bad ``chunk_size``.
        TypeError: for non-integer codes.

    """
    cd = _check_layout(main, error, important, channel_dim)
    _check_extra_bits(extra_bits, codebook)
    main_payload, _ = pack_codes(main, bits, signed)
    stream = encode(error, codebook, chunk_size)  # checks that chunk_size is a positive int
    if chunk_size >= _U32:
        raise ValueError(f"Expected chunk_size to be below 2**32 (a uint32 field), got {chunk_size}")
    idx = torch.nonzero(important.detach().cpu()).flatten().numpy()  # (k,)
    flags = (_SIGNED if signed else 0) | (_HAS_SCALE if scale is not None else 0)
    fixed = (MAGIC, VERSION, flags, bits, extra_bits, main.ndim, cd, idx.shape[0], _book_crc(codebook))
    body = b"".join(
        [
            _FIXED.pack(*fixed, main_payload.shape[0], stream.bit_count, chunk_size),
            np.asarray(main.shape, dtype="<u8").tobytes(),
            idx.astype("<u4").tobytes(),
            _scale_bytes(scale, main.shape[cd]),
            stream.offsets[1:].astype("<u8").tobytes(),
            main_payload.tobytes(),
            stream.payload.tobytes(),
        ]
    )
    return body + _CRC.pack(zlib.crc32(body))


def _check_layout(main: Tensor, error: Tensor, important: Tensor, channel_dim: int) -> int:
    """Validate the shapes of ``encode_activation``'s tensors; return the channel axis in ``[0, ndim - 1]``."""
    if not isinstance(main, Tensor) or not isinstance(error, Tensor) or not isinstance(important, Tensor):
        raise TypeError(
            f"Expected main, error and important to be tensors, got {type(main).__name__}, "
            f"{type(error).__name__} and {type(important).__name__}"
        )
    if not 1 <= main.ndim <= 255:
        raise ValueError(f"Expected main to have 1 to 255 dimensions, got shape {tuple(main.shape)}")
    if isinstance(channel_dim, bool) or not isinstance(channel_dim, int) or not -main.ndim <= channel_dim < main.ndim:
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
    if isinstance(extra_bits, bool) or not isinstance(extra_bits, int) or not 0 <= extra_bits <= _MAX_EXTRA_BITS:
        raise ValueError(f"Expected extra_bits to be an int in [0, {_MAX_EXTRA_BITS}], got {extra_bits!r}")
    if codebook.num_symbols != 2**extra_bits:
        raise ValueError(
            f"Expected a code book of 2**extra_bits = {2**extra_bits} symbols, got {codebook.num_symbols}; "
            "build it from the layer's error histogram of that size"
        )


def _scale_bytes(scale: Tensor | None, channels: int) -> bytes:
    if scale is None:
        return b""
    if not isinstance(scale, Tensor) or not scale.is_floating_point() or tuple(scale.shape) != (channels,):
        shape = tuple(scale.shape) if isinstance(scale, Tensor) else type(scale).__name__
        raise ValueError(f"Expected scale to be a ({channels},) floating tensor or None, got {shape}")
    return scale.detach().cpu().to(torch.float32).numpy().astype("<f4").tobytes()


# ---------------------------------------------------------------------------------------------- decoding
def decode_activation(
    blob: bytes | bytearray | memoryview, codebook: HuffmanCodebook
) -> tuple[Tensor, Tensor, BlobHeader]:
    """Read a blob written by :func:`encode_activation`.

    Args:
        blob: the bytes.
        codebook: the code book the shifting errors were coded with.

    Returns:
        ``(main, error, header)``: int32 main codes of shape ``header.shape``, e.g. ``(N, C, H, W)``; int32
        shifting errors of shape ``header.error_shape``, e.g. ``(N, k, H, W)``; the :class:`BlobHeader`.

    Raises:
        ValueError: for a blob that is truncated, too long, corrupted (checksum, inconsistent fields, a payload
            that does not decode) or of another format or version, or a code book other than the encoder's.
        TypeError: for a ``blob`` that is not bytes-like.

    """
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise TypeError(f"Expected blob to be bytes, got {type(blob).__name__}")
    buf = bytes(blob)
    fields, shape = _read_fixed(buf)
    *_, flags, bits, m, _ndim, cd, k, book_crc, main_bytes, error_bits, chunk_size = fields
    error_shape = _with_channels(shape, cd, k)
    n_chunks = -(-math.prod(error_shape) // chunk_size)
    sizes = [8 * len(shape), 4 * k, 4 * shape[cd] if flags & _HAS_SCALE else 0, 8 * max(n_chunks - 1, 0)]
    sizes += [main_bytes, (error_bits + 7) // 8]
    starts = list(itertools.accumulate(sizes, initial=_FIXED.size))  # start of each section, then the checksum's
    if len(buf) != starts[-1] + _CRC.size:
        what = "truncated" if len(buf) < starts[-1] + _CRC.size else "too long"
        raise ValueError(f"Blob {what}: its header describes {starts[-1] + _CRC.size} bytes, got {len(buf)}")
    if _CRC.unpack_from(buf, starts[-1])[0] != zlib.crc32(memoryview(buf)[: starts[-1]]):
        raise ValueError("Corrupted blob: checksum mismatch")
    important = np.frombuffer(buf, "<u4", k, starts[1]).astype(np.int64)
    scale = np.frombuffer(buf, "<f4", shape[cd], starts[2]) if flags & _HAS_SCALE else None
    offsets = np.frombuffer(buf, "<u8", max(n_chunks - 1, 0), starts[3])
    header = BlobHeader(
        shape=shape,
        bits=bits,
        extra_bits=m,
        signed=bool(flags & _SIGNED),
        channel_dim=cd,
        important=tuple(important.tolist()),
        scale=None if scale is None else torch.from_numpy(scale.astype(np.float32)),
        main_bytes=main_bytes,
        error_bits=error_bits,
        chunk_size=chunk_size,
    )
    _check_contents(header, important, codebook, book_crc)
    main = unpack_codes(np.frombuffer(buf, np.uint8, main_bytes, starts[4]), bits, header.signed, math.prod(shape))
    offsets = np.concatenate([np.zeros(min(n_chunks, 1), dtype=np.int64), offsets.astype(np.int64)])
    stream = EncodedStream(
        np.frombuffer(buf, np.uint8, sizes[5], starts[5]), error_bits, math.prod(error_shape), chunk_size, offsets
    )
    return main.reshape(shape), decode(stream, codebook).reshape(error_shape), header


def _read_fixed(buf: bytes) -> tuple[tuple, tuple[int, ...]]:
    """Fixed header fields and shape, checked for magic, version and ranges (not yet the checksum)."""
    if len(buf) < _FIXED.size + _CRC.size:
        raise ValueError(
            f"Blob truncated: {len(buf)} bytes, the fixed header and checksum alone take {_FIXED.size + _CRC.size}"
        )
    fields = _FIXED.unpack_from(buf)
    magic, version, flags, bits, m, ndim, cd, k, _crc, main_bytes, _error_bits, chunk_size = fields
    if magic != MAGIC:
        raise ValueError(f"Not a DQA activation blob: expected magic {MAGIC!r}, got {magic!r}")
    if version != VERSION:
        raise ValueError(f"Unsupported blob version {version}: this reader reads version {VERSION}")
    if len(buf) < _FIXED.size + 8 * ndim + _CRC.size:
        raise ValueError(f"Blob truncated: {len(buf)} bytes cannot hold a {ndim}-dimensional shape")
    shape = tuple(int(d) for d in np.frombuffer(buf, "<u8", ndim, _FIXED.size))
    problems = [
        (flags & ~(_SIGNED | _HAS_SCALE), f"unknown flags {flags:#x}"),
        (not MIN_PACK_BITS <= bits <= MAX_PACK_BITS, f"bits {bits} outside [{MIN_PACK_BITS}, {MAX_PACK_BITS}]"),
        (m > _MAX_EXTRA_BITS, f"extra_bits {m} above {_MAX_EXTRA_BITS}"),
        (not 0 <= cd < ndim, f"channel axis {cd} of a {ndim}-dimensional shape"),
        (chunk_size < 1, "chunk size 0"),
        (any(d >= 2**63 for d in shape), f"shape {shape} has a dimension of 2**63 or more"),
    ]
    for bad, what in problems:
        if bad:
            raise ValueError(f"Corrupted blob: {what}")
    if k > shape[cd]:
        raise ValueError(f"Corrupted blob: {k} important channels of {shape[cd]}")
    numel = math.prod(shape)
    if main_bytes != packed_size(numel, bits):
        raise ValueError(
            f"Corrupted blob: {numel} main codes of {bits} bits need {packed_size(numel, bits)} bytes, "
            f"the header says {main_bytes}"
        )
    return fields, shape


def _check_contents(header: BlobHeader, important: np.ndarray, codebook: HuffmanCodebook, book_crc: int) -> None:
    """Check the important channels (a valid checksum does not vouch for them) and the code book."""
    if important.shape[0] and (np.any(np.diff(important) <= 0) or important[-1] >= header.num_channels):
        raise ValueError(
            f"Corrupted blob: important channel indices must increase and stay below {header.num_channels}"
        )
    if codebook.num_symbols != 2**header.extra_bits:
        raise ValueError(
            f"Code book of {codebook.num_symbols} symbols cannot decode the blob's {header.extra_bits}-bit "
            f"shifting errors ({2**header.extra_bits} symbols)"
        )
    if _book_crc(codebook) != book_crc:
        raise ValueError("The blob was encoded with another code book (its CRC-32 differs from this one's)")
