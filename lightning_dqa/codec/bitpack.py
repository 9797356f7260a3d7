"""Dense packing of fixed-width integer codes: the ``n``-bit main codes every DQA channel stores.

Codes are written back to back, most significant bit first, into bytes filled from their most significant
bit, the last byte zero padded: ``count`` codes of ``bits`` bits take exactly ``ceil(count * bits / 8)`` bytes.
Signed codes are stored in ``bits``-bit two's complement.

Vectorized by groups of eight codes: eight ``bits``-bit codes fill exactly ``bits`` bytes, which fit in two
64-bit words for ``bits <= 16``, so each of the eight code positions is a fixed shift into those words.

Example:
    >>> import torch
    >>> payload, nbits = pack_codes(torch.tensor([-4, 3, 0, -1]), bits=3, signed=True)
    >>> nbits, payload.tolist()  # 100 011 000 111 + 4 padding bits = 1000 1100 | 0111 0000
    (12, [140, 112])
    >>> unpack_codes(payload, bits=3, signed=True, count=4).tolist()
    [-4, 3, 0, -1]

"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lightning_dqa.core._checks import is_int
from lightning_dqa.core.widths import MAX_TOTAL_BITS, MIN_BITS

__all__ = ["MAX_PACK_BITS", "MIN_PACK_BITS", "pack_codes", "packed_size", "unpack_codes"]

MIN_PACK_BITS, MAX_PACK_BITS = MIN_BITS, MAX_TOTAL_BITS  # any main code n, any n + m
_GROUP = 8  # codes per group: 8 codes of `bits` bits are `bits` whole bytes


def _check_bits(bits: int) -> None:
    if not is_int(bits) or not MIN_PACK_BITS <= bits <= MAX_PACK_BITS:
        raise ValueError(f"Expected bits to be an int in [{MIN_PACK_BITS}, {MAX_PACK_BITS}], got {bits!r}")


def packed_size(count: int, bits: int) -> int:
    """Bytes taken by ``count`` packed ``bits``-bit codes: ``ceil(count * bits / 8)``."""
    return (count * bits + 7) // 8


def _field_shifts(bits: int) -> list[tuple[int, int, int]]:
    """For each of the 8 codes of a group: its index ``j`` and bit span ``[start, end)`` in the 128-bit group."""
    return [(j, j * bits, (j + 1) * bits) for j in range(_GROUP)]


def pack_codes(codes: Tensor | np.ndarray, bits: int, signed: bool) -> tuple[np.ndarray, int]:
    """Pack integer codes into ``bits``-bit fields.

    Args:
        codes: integer codes, any shape (packed in flattened, row-major order); in ``[-2**(bits-1),
            2**(bits-1) - 1]`` when ``signed``, else in ``[0, 2**bits - 1]``.
        bits: field width ``n``, in ``[2, 16]``.
        signed: whether codes are signed (stored as two's complement).

    Returns:
        ``(payload, bit_count)``: ``(ceil(count * bits / 8),)`` uint8 payload and the exact number of bits
        used, ``count * bits``.

    Raises:
        ValueError: for a ``bits`` out of range or a code outside the range of its width.
        TypeError: for non-integer codes.

    """
    _check_bits(bits)
    c = codes.detach().cpu().numpy() if isinstance(codes, Tensor) else np.asarray(codes)
    c = c.ravel()
    if c.size and c.dtype.kind not in "iu":
        raise TypeError(f"Expected integer codes, got dtype {c.dtype}")
    n = int(c.shape[0])
    if n == 0:
        return np.zeros(0, dtype=np.uint8), 0
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    cmin, cmax = int(c.min()), int(c.max())
    if cmin < lo or cmax > hi:
        kind = "signed" if signed else "unsigned"
        raise ValueError(f"Expected {kind} {bits}-bit codes in [{lo}, {hi}], got range [{cmin}, {cmax}]")
    groups = -(-n // _GROUP)
    flat = np.zeros(groups * _GROUP, dtype=np.int64)
    flat[:n] = c
    fields = (flat.reshape(groups, _GROUP).T & (2**bits - 1)).astype(np.uint64)  # (8, G) two's complement
    hi = np.zeros(groups, dtype=np.uint64)  # the 128-bit group's most significant word
    lo = np.zeros(groups, dtype=np.uint64)
    for j, start, end in _field_shifts(bits):
        f = fields[j]
        if end <= 64:
            hi |= f << np.uint64(64 - end)
        elif start >= 64:
            lo |= f << np.uint64(128 - end)
        else:  # the code straddles the two words
            hi |= f >> np.uint64(end - 64)
            lo |= f << np.uint64(128 - end)  # its high bits fall off the 64-bit word
    words = np.stack([hi, lo], axis=1)  # (G, 2)
    payload = words.astype(">u8").view(np.uint8).reshape(groups, 16)[:, :bits].ravel()
    return np.ascontiguousarray(payload[: packed_size(n, bits)]), n * bits


def unpack_codes(payload: np.ndarray | bytes | Tensor, bits: int, signed: bool, count: int) -> Tensor:
    """Inverse of :func:`pack_codes`.

    Args:
        payload: the packed bytes, exactly ``ceil(count * bits / 8)`` of them.
        bits: field width ``n``, in ``[2, 16]``.
        signed: whether codes are signed.
        count: number of codes.

    Returns:
        ``(count,)`` int32 tensor of codes.

    Raises:
        ValueError: for a ``bits`` or ``count`` out of range, a payload of the wrong size (e.g. truncated) or
            with non-zero padding bits.

    """
    _check_bits(bits)
    if not is_int(count) or count < 0:
        raise ValueError(f"Expected count to be a non-negative int, got {count!r}")
    if isinstance(payload, Tensor):
        buf = payload.detach().cpu().numpy()
    elif isinstance(payload, bytes | bytearray | memoryview):
        buf = np.frombuffer(payload, dtype=np.uint8)
    else:
        buf = np.asarray(payload)
    if buf.dtype != np.uint8 or buf.ndim != 1:
        raise ValueError(f"Expected a 1-D uint8 payload, got dtype {buf.dtype} and shape {buf.shape}")
    need = packed_size(count, bits)
    if buf.shape[0] != need:
        what = "truncated" if buf.shape[0] < need else "too long"
        raise ValueError(f"Payload {what}: {count} codes of {bits} bits need {need} bytes, got {buf.shape[0]}")
    used = (count * bits) % 8
    if used and int(buf[-1]) & ((1 << (8 - used)) - 1):
        raise ValueError("Corrupted payload: padding bits are not zero")
    if count == 0:
        return torch.zeros(0, dtype=torch.int32)
    groups = -(-count // _GROUP)
    flat = np.zeros(groups * bits, dtype=np.uint8)  # whole groups: 8 codes are `bits` bytes
    flat[:need] = buf
    padded = np.zeros((groups, 16), dtype=np.uint8)
    padded[:, :bits] = flat.reshape(groups, bits)
    words = padded.view(">u8").astype(np.uint64)  # (G, 2), most significant word first
    hi, lo = np.ascontiguousarray(words[:, 0]), np.ascontiguousarray(words[:, 1])
    mask = np.uint64(2**bits - 1)
    fields = np.empty((_GROUP, groups), dtype=np.int64)
    for j, start, end in _field_shifts(bits):
        if end <= 64:
            f = hi >> np.uint64(64 - end)
        elif start >= 64:
            f = lo >> np.uint64(128 - end)
        else:
            f = (hi << np.uint64(end - 64)) | (lo >> np.uint64(128 - end))
        np.bitwise_and(f, mask, out=f)
        fields[j] = f
    out = fields.T.reshape(-1)[:count]
    if signed:
        out = out - ((out >> (bits - 1)) << bits)  # sign-extend the two's complement field
    return torch.from_numpy(out.astype(np.int32))
