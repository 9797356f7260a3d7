"""The version-2 byte layout of an activation blob: header, sections, checksum (written out in :mod:`.blob`).

:func:`write_parts` assembles a blob from coded sections and :func:`read_parts` checks one and returns its
sections; :mod:`.blob` (codes as tensors) and :mod:`.bytepath` (the fused float path) both build on them.
"""

from __future__ import annotations

import itertools
import math
import struct
import zlib
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np
import torch
from torch import Tensor

from lightning_dqa.codec.bitpack import MAX_PACK_BITS, MIN_PACK_BITS, packed_size
from lightning_dqa.codec.codebook import MAX_SYMBOLS, HuffmanCodebook
from lightning_dqa.codec.entropy import CODERS, DEFAULT_CODER, ErrorCoder, get_coder

__all__ = [
    "CODER_IDS",
    "MAGIC",
    "VERSION",
    "BlobHeader",
    "BlobParts",
    "check_coder",
    "error_coder",
    "join_band",
    "model_crc",
    "read_parts",
    "split_band",
    "write_parts",
]

MAGIC = b"DQAC"
"""First four bytes of every blob."""
VERSION = 2
"""Layout version written, and the only one read (version 2 added the entropy coder and the error section size)."""
CODER_IDS: dict[str, int] = {"huffman": 0, "zstd": 1, "ans": 2}
"""The header's byte for each entropy coder of the shifting errors."""

_FIXED = struct.Struct("<4sBBBBBBIIQQIBQ")
_CRC = struct.Struct("<I")
_SIGNED, _HAS_SCALE = 1, 2
_MAX_EXTRA_BITS = MAX_SYMBOLS.bit_length() - 1  # 2**m error symbols must fit a code book
_U32 = 2**32
_CODER_NAMES = {v: k for k, v in CODER_IDS.items()}


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
        error_bits: exact size of the coded shifting errors.
        chunk_size: symbols per decoder chunk of a Huffman error stream.
        coder: the entropy coder of the shifting errors (a key of :data:`CODER_IDS`).

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
    coder: str = DEFAULT_CODER

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


@dataclass(frozen=True, eq=False)
class BlobParts:
    """A blob's sections as numpy views, before the payloads are decoded (:func:`read_parts`).

    Attributes:
        header: the :class:`BlobHeader`.
        main: ``(main_bytes,)`` uint8 packed main codes.
        error: uint8 error section: the Huffman payload (``ceil(error_bits / 8)`` bytes) or the coder's bytes.
        offsets: ``(chunks,)`` int64 starting bit of every Huffman chunk (``[0]`` first); empty for other coders.

    """

    header: BlobHeader
    main: np.ndarray
    error: np.ndarray
    offsets: np.ndarray


def _with_channels(shape: tuple[int, ...], channel_dim: int, channels: int) -> tuple[int, ...]:
    return (*shape[:channel_dim], channels, *shape[channel_dim + 1 :])


def model_crc(coder: str, codebook: HuffmanCodebook, counts: Tensor | np.ndarray | None) -> int:
    """CRC-32 of what the error decoder needs: the code book's bytes, or for ``ans`` the counts as int64."""
    if coder == "ans":
        c = counts.detach().cpu().numpy() if isinstance(counts, Tensor) else np.asarray(counts)
        return zlib.crc32(c.astype("<i8").tobytes())
    return _book_crc(codebook)


@lru_cache(maxsize=256)
def _book_crc(codebook: HuffmanCodebook) -> int:
    """CRC-32 of a code book's bytes, once per book (books are immutable and hashed by identity)."""
    return zlib.crc32(codebook.to_bytes())


@cache
def error_coder(name: str) -> ErrorCoder:
    """The coder of that name, built once per process (its caches of models and code books are kept).

    Raises:
        ValueError: for an unknown name.
        ImportError: for a coder whose optional package is missing (the message names the extra).

    """
    return get_coder(name)


def check_coder(coder: str, counts: Tensor | np.ndarray | None) -> None:
    """Raise ``ValueError`` for an unknown coder or ``ans`` without counts, ``ImportError`` for a missing package."""
    if coder not in CODER_IDS or coder not in CODERS:
        raise ValueError(f"Expected coder to be one of {list(CODER_IDS)}, got {coder!r}")
    if coder == "ans" and counts is None:
        raise ValueError("The 'ans' coder needs counts (the layer's error histogram) to build its model; got None")
    error_coder(coder)  # raises the ImportError naming the extra now, before any work


def write_parts(
    *,
    shape: tuple[int, ...],
    bits: int,
    extra_bits: int,
    signed: bool,
    channel_dim: int,
    important: np.ndarray,
    crc: int,
    scale: Tensor | None,
    chunk_size: int,
    coder: str,
    main: np.ndarray,
    error: np.ndarray,
    offsets: np.ndarray,
    error_bits: int,
) -> bytes:
    """Assemble a blob from already coded sections (the byte path's encoder and :func:`encode_activation`).

    Args:
        shape: the activation's shape; ``channel_dim`` its channel axis in ``[0, len(shape) - 1]``.
        bits: ``n``.
        extra_bits: ``m``.
        signed: whether the codes are signed.
        channel_dim: the channel axis.
        important: ``(k,)`` increasing important channel indices.
        crc: :func:`model_crc` of the error model.
        scale: optional ``(C,)`` scales to store.
        chunk_size: Huffman chunk size.
        coder: a key of :data:`CODER_IDS`.
        main: uint8 packed main codes.
        error: uint8 error payload (Huffman) or the coder's bytes.
        offsets: int64 Huffman chunk offsets, ``[0]`` first (empty for other coders).
        error_bits: exact error payload bits.

    Returns:
        The blob.

    Raises:
        ValueError: for a ``chunk_size`` of ``2**32`` or more or scales of the wrong shape.

    """
    if chunk_size >= _U32:
        raise ValueError(f"Expected chunk_size to be below 2**32 (a uint32 field), got {chunk_size}")
    flags = (_SIGNED if signed else 0) | (_HAS_SCALE if scale is not None else 0)
    fixed = (MAGIC, VERSION, flags, bits, extra_bits, len(shape), channel_dim, important.shape[0], crc)
    sections: list[bytes | memoryview] = [
        _FIXED.pack(*fixed, main.shape[0], error_bits, chunk_size, CODER_IDS[coder], error.shape[0]),
        np.asarray(shape, dtype="<u8").tobytes(),
        important.astype("<u4").tobytes(),
        _scale_bytes(scale, shape[channel_dim]),
        offsets[1:].astype("<u8").tobytes(),
        _bytes_view(main),  # no copy of the payloads before the one join
        _bytes_view(error),
    ]
    crc = 0
    for part in sections:
        crc = zlib.crc32(part, crc)
    return b"".join([*sections, _CRC.pack(crc)])


def _bytes_view(a: np.ndarray) -> memoryview:
    """The bytes of a numpy array without copying them (a copy only if it is not contiguous)."""
    return memoryview(np.ascontiguousarray(a).view(np.uint8).reshape(-1).data)


def _scale_bytes(scale: Tensor | None, channels: int) -> bytes:
    if scale is None:
        return b""
    if not isinstance(scale, Tensor) or not scale.is_floating_point() or tuple(scale.shape) != (channels,):
        shape = tuple(scale.shape) if isinstance(scale, Tensor) else type(scale).__name__
        raise ValueError(f"Expected scale to be a ({channels},) floating tensor or None, got {shape}")
    return scale.detach().cpu().to(torch.float32).numpy().astype("<f4").tobytes()


# ---------------------------------------------------------------------------------------------- decoding
def read_parts(
    blob: bytes | bytearray | memoryview, codebook: HuffmanCodebook, counts: Tensor | np.ndarray | None = None
) -> BlobParts:
    """Parse and check a blob (sizes, checksum, fields, error model); the payloads are not decoded yet.

    Args:
        blob: the bytes.
        codebook: the Huffman code book of the layer (its CRC-32 is checked, also for ``zstd``).
        counts: the layer's error histogram; needed for an ``ans`` blob (its CRC-32 is checked).

    Returns:
        The :class:`BlobParts`, views into a copy of ``blob``.

    Raises:
        ValueError: for a blob that is truncated, too long, corrupted (checksum, inconsistent fields) or of
            another format or version, or an error model other than the encoder's.
        TypeError: for a ``blob`` that is not bytes-like.
        ImportError: for a ``zstd`` or ``ans`` blob without that coder's package.

    """
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise TypeError(f"Expected blob to be bytes, got {type(blob).__name__}")
    buf = bytes(blob)
    fields, shape = _read_fixed(buf)
    *_, flags, bits, m, _ndim, cd, k, crc, main_bytes, error_bits, chunk_size, coder_id, error_bytes = fields
    coder = _CODER_NAMES[coder_id]
    n_chunks = -(-math.prod(_with_channels(shape, cd, k)) // chunk_size) if coder == "huffman" else 0
    sizes = [8 * len(shape), 4 * k, 4 * shape[cd] if flags & _HAS_SCALE else 0, 8 * max(n_chunks - 1, 0)]
    sizes += [main_bytes, error_bytes]
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
        shape, bits, m, bool(flags & _SIGNED), cd, tuple(important.tolist()),
        None if scale is None else torch.from_numpy(scale.astype(np.float32)), main_bytes, error_bits, chunk_size,
        coder,
    )  # fmt: skip
    _check_contents(header, important, codebook, model_crc(coder, codebook, counts) if coder != "ans" or
                    counts is not None else None, crc)  # fmt: skip
    error_coder(coder)  # a missing package raises its ImportError before any decoding
    offsets = np.concatenate([np.zeros(min(n_chunks, 1), dtype=np.int64), offsets.astype(np.int64)])
    return BlobParts(
        header,
        np.frombuffer(buf, np.uint8, main_bytes, starts[4]),
        np.frombuffer(buf, np.uint8, error_bytes, starts[5]),
        offsets,
    )  # fmt: skip


def _read_fixed(buf: bytes) -> tuple[tuple, tuple[int, ...]]:
    """Fixed header fields and shape, checked for magic, version and ranges (not yet the checksum)."""
    if len(buf) < _FIXED.size + _CRC.size:
        raise ValueError(
            f"Blob truncated: {len(buf)} bytes, the fixed header and checksum alone take {_FIXED.size + _CRC.size}"
        )
    fields = _FIXED.unpack_from(buf)
    magic, version, flags, bits, m, ndim, cd, k, _crc, main_bytes, error_bits, chunk_size, coder, error_bytes = fields
    if magic != MAGIC:
        raise ValueError(f"Not a DQA activation blob: expected magic {MAGIC!r}, got {magic!r}")
    if version != VERSION:
        raise ValueError(
            f"Unsupported blob version {version}: this reader reads version {VERSION} (re-encode the activation)"
        )
    if len(buf) < _FIXED.size + 8 * ndim + _CRC.size:
        raise ValueError(f"Blob truncated: {len(buf)} bytes cannot hold a {ndim}-dimensional shape")
    shape = tuple(int(d) for d in np.frombuffer(buf, "<u8", ndim, _FIXED.size))
    problems = (  # message templates, formatted only for the check that fails
        (flags & ~(_SIGNED | _HAS_SCALE), "unknown flags {flags:#x}"),
        (not MIN_PACK_BITS <= bits <= MAX_PACK_BITS, "bits {bits} outside [{lo}, {hi}]"),
        (m > _MAX_EXTRA_BITS, "extra_bits {m} above {max_m}"),
        (not 0 <= cd < ndim, "channel axis {cd} of a {ndim}-dimensional shape"),
        (chunk_size < 1, "chunk size 0"),
        (coder not in _CODER_NAMES, "unknown entropy coder id {coder}"),
        (coder == 0 and error_bytes != (error_bits + 7) // 8, "{error_bits} Huffman bits in {error_bytes} bytes"),
        (error_bits > 8 * error_bytes, "{error_bits} error bits in {error_bytes} bytes"),
        (any(d >= 2**63 for d in shape), "shape {shape} has a dimension of 2**63 or more"),
    )
    for bad, what in problems:
        if bad:
            names = dict(flags=flags, bits=bits, lo=MIN_PACK_BITS, hi=MAX_PACK_BITS, m=m, max_m=_MAX_EXTRA_BITS)
            names.update(cd=cd, ndim=ndim, coder=coder, error_bits=error_bits, error_bytes=error_bytes, shape=shape)
            raise ValueError("Corrupted blob: " + what.format(**names))
    if k > shape[cd]:
        raise ValueError(f"Corrupted blob: {k} important channels of {shape[cd]}")
    numel = math.prod(shape)
    if main_bytes != packed_size(numel, bits):
        raise ValueError(
            f"Corrupted blob: {numel} main codes of {bits} bits need {packed_size(numel, bits)} bytes, "
            f"the header says {main_bytes}"
        )
    return fields, shape


def _check_contents(
    header: BlobHeader, important: np.ndarray, codebook: HuffmanCodebook, want_crc: int | None, crc: int
) -> None:
    """Check the important channels (a valid checksum does not vouch for them) and the error model."""
    if important.shape[0] and (np.any(np.diff(important) <= 0) or important[-1] >= header.num_channels):
        raise ValueError(
            f"Corrupted blob: important channel indices must increase and stay below {header.num_channels}"
        )
    if codebook.num_symbols != 2**header.extra_bits:
        raise ValueError(
            f"Code book of {codebook.num_symbols} symbols cannot decode the blob's {header.extra_bits}-bit "
            f"shifting errors ({2**header.extra_bits} symbols)"
        )
    if want_crc is None:
        raise ValueError("An 'ans' blob needs counts (the layer's error histogram) to decode; got None")
    if want_crc != crc:
        what = "error histogram" if header.coder == "ans" else "code book"
        raise ValueError(f"The blob was encoded with another {what} (its CRC-32 differs from this one's)")


_BAND = struct.Struct("<IQI")  # rows along the band axis, error payload bits, error section bytes
_SHARED_FIELDS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 11, 12)  # fixed fields equal in every band of a tensor


def split_band(blob: bytes, axis: int, head: bytes | None = None) -> tuple[bytes, bytes]:
    """A blob of one band of a tensor as the head every band shares and the band's own record.

    A tensor stored band by band (:class:`lightning_dqa.deploy.banded.BandedBlob`) keeps one head (the fixed header,
    the shape, the important channels and any scales: about 90 bytes) and, per band, a record: the band's rows on
    ``axis``, its error payload bits and error section bytes (16 bytes), then the blob's chunk offsets, payloads and
    checksum as they are. :func:`join_band` gives back the blob byte for byte, so its checksum still holds.

    Args:
        blob: a blob of :func:`write_parts`.
        axis: the band axis (rows: 2 of ``(N, C, H, W)``).
        head: the head of the tensor's first band, to check that this band shares it; ``None`` for the first.

    Returns:
        ``(head, record)``.

    Raises:
        ValueError: for a blob that is not one (:func:`read_parts`'s header checks) or whose head differs from
            ``head`` in more than its rows and payload sizes (e.g. scales stored per band).

    """
    fields, shape = _read_fixed(blob)
    flags, ndim, cd, k = fields[2], fields[5], fields[6], fields[7]
    size = _FIXED.size + 8 * ndim + 4 * k + (4 * shape[cd] if flags & _HAS_SCALE else 0)
    own = blob[:size]
    if head is not None:
        first, first_shape = _read_fixed(head + bytes(_CRC.size))
        same = [fields[i] == first[i] for i in _SHARED_FIELDS]
        same += [len(head) == size, own[_FIXED.size + 8 * ndim :] == head[_FIXED.size + 8 * ndim :]]
        same.append(shape[:axis] + shape[axis + 1 :] == first_shape[:axis] + first_shape[axis + 1 :])
        if not all(same):
            raise ValueError("A band's blob differs from the tensor's first band in more than its rows and payloads")
    return own if head is None else head, _BAND.pack(shape[axis], fields[10], fields[13]) + blob[size:]


def join_band(head: bytes, record: bytes, axis: int) -> bytes:
    """The blob of one band from the tensor's head and the band's record (:func:`split_band`), byte for byte."""
    fields, shape = _read_fixed(head + bytes(_CRC.size))
    rows, error_bits, error_bytes = _BAND.unpack_from(record)
    band = list(shape)
    band[axis] = rows
    fixed = list(fields)
    fixed[9], fixed[10], fixed[13] = packed_size(math.prod(band), fields[3]), error_bits, error_bytes
    ndim = fields[5]
    return b"".join(
        [_FIXED.pack(*fixed), np.asarray(band, dtype="<u8").tobytes(), head[_FIXED.size + 8 * ndim :],
         record[_BAND.size :]]
    )  # fmt: skip
