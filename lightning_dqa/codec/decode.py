"""Decoding of Huffman-coded streams: two vectorized decoders and the checks that reject corrupted streams.

The decoder splits the stream into chunks of ``chunk_size`` symbols whose starting bit offsets the encoder
records (:class:`lightning_dqa.codec.huffman.EncodedStream`), and either advances all chunks in lock-step
(each step is one table lookup per chunk, indexed by the next ``max_len`` bits) or finds every chunk's code
starts by pointer doubling. Anything inconsistent raises ``ValueError``.

Example:
    >>> import numpy as np
    >>> from lightning_dqa.codec.huffman import encode
    >>> book = HuffmanCodebook.from_counts([90, 6, 3, 1])
    >>> decode(encode(np.array([0, 0, 1, 3, 0]), book), book).tolist()
    [0, 0, 1, 3, 0]

"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from lightning_dqa.codec.codebook import HuffmanCodebook
from lightning_dqa.codec.huffman import EncodedStream
from lightning_dqa.core._checks import is_int

__all__ = ["decode"]


def decode(
    stream: EncodedStream, codebook: HuffmanCodebook, method: Literal["auto", "lockstep", "doubling"] = "auto"
) -> Tensor:
    """Decode an :class:`EncodedStream`.

    Two vectorized decoders, same result:

    * ``lockstep``: all chunks advance together, one table lookup per chunk and step (``chunk_size`` steps).
      Fast when there are many chunks, since each step's numpy calls then cover many lanes.
    * ``doubling``: the length of the code that would start at *every* bit position is looked up at once,
      which gives ``next(p)``, the start of the following code; the code starts of each chunk are then its
      orbit under ``next``, built by pointer doubling in ``log2(chunk_size)`` vectorized steps. Fast for
      streams of few chunks, where lock-step would be a Python loop over single symbols.

    ``auto`` picks the one a rough cost model (per-call overhead of a lock-step, work per bit of a doubling
    step, measured on one CPU core) expects to be faster: lock-step for long streams, doubling for short ones.

    Args:
        stream: what :func:`encode` returned.
        codebook: the code it was encoded with.
        method: ``auto``, ``lockstep`` or ``doubling``.

    Returns:
        ``(stream.count,)`` int32 tensor of symbols.

    Raises:
        ValueError: if the stream is inconsistent: payload size, padding, chunk offsets, a bit string that
            starts no code, or a chunk whose codes do not end exactly where the next chunk starts. (A bit
            flip that keeps every code boundary in place decodes to other symbols undetected: Huffman codes
            carry no redundancy.)

    """
    if method != "auto" and method not in _DECODERS:
        raise ValueError(f"Expected method to be one of {['auto', *_DECODERS]}, got {method!r}")
    payload, offsets, n, k, total = _check_stream(stream, codebook)
    if n == 0:
        return torch.zeros(0, dtype=torch.int32)
    lanes = offsets.shape[0]
    steps = k if lanes > 1 else n
    last_steps = n - (lanes - 1) * k  # symbols of the last chunk
    if method == "auto":
        lockstep_ns = 5000 * steps + 6 * n
        doubling_ns = 2 * total * max(steps - 1, 1).bit_length() + 10 * n
        method = "lockstep" if lockstep_ns < doubling_ns else "doubling"
    symbols, ends, last_end = _DECODERS[method](payload, offsets, total, steps, last_steps, codebook)
    if lanes > 1 and not np.array_equal(ends, offsets[1:]):
        bad = int(np.flatnonzero(ends != offsets[1:])[0])
        raise ValueError(
            f"Corrupted stream: chunk {bad} ends at bit {int(ends[bad])}, the next chunk starts at "
            f"{int(offsets[bad + 1])}"
        )
    if last_end != total:
        raise ValueError(f"Corrupted stream: the codes end at bit {last_end}, the payload holds {total} bits")
    symbols = symbols[:n]
    if not codebook.complete and symbols.min() < 0:
        raise ValueError("Corrupted stream: a bit string starts no code of this code book")
    return torch.from_numpy(np.ascontiguousarray(symbols))


def _window(payload: np.ndarray, pad: int) -> np.ndarray:
    """``window[i]``: the 32 bits starting at byte ``i`` (big-endian), over the payload plus ``pad`` zero bytes."""
    buf = np.concatenate([payload, np.zeros(pad + 3, dtype=np.uint8)]).astype(np.uint32)
    return (buf[:-3] << 24) | (buf[1:-2] << 16) | (buf[2:-1] << 8) | buf[3:]


def _decode_lockstep(
    payload: np.ndarray, offsets: np.ndarray, total: int, steps: int, last_steps: int, codebook: HuffmanCodebook
) -> tuple[np.ndarray, np.ndarray, int]:
    """All chunks in lock-step; returns ``(symbols lane by lane, end bit of every chunk but the last, last end)``."""
    lanes, lmax = offsets.shape[0], codebook.max_len
    sym_table, len_table = codebook._decode_tables
    # Padding covers every lane running `steps` codes of max_len bits past its start, however corrupted the
    # stream, so no lookup leaves the array.
    window = _window(payload, (steps * lmax) // 8 + 8)
    pos = offsets.astype(np.uint32 if total + steps * lmax < 2**32 - 64 else np.uint64)
    out = np.empty((steps, lanes), dtype=np.int32)
    byte = np.empty_like(pos)
    bit = np.empty_like(pos)
    peek = np.empty(lanes, dtype=window.dtype)
    last_end = -1
    for t in range(steps):
        if t == last_steps:
            last_end = int(pos[-1])
        np.right_shift(pos, 3, out=byte)
        np.bitwise_and(pos, 7, out=bit)
        np.take(window, byte, out=peek)
        np.left_shift(peek, bit.astype(window.dtype, copy=False), out=peek)  # drop bits already consumed
        np.right_shift(peek, 32 - lmax, out=peek)
        np.take(sym_table, peek, out=out[t])
        np.add(pos, len_table[peek], out=pos)
    if last_steps == steps:
        last_end = int(pos[-1])
    return out.T.reshape(-1), pos[:-1], last_end


def _decode_doubling(
    payload: np.ndarray, offsets: np.ndarray, total: int, steps: int, last_steps: int, codebook: HuffmanCodebook
) -> tuple[np.ndarray, np.ndarray, int]:
    """Code starts by pointer doubling over all bit positions; same returns as :func:`_decode_lockstep`."""
    lmax = codebook.max_len
    sym_table, len_table = codebook._decode_tables
    nbytes = payload.shape[0]
    window = _window(payload, 8)[:nbytes]
    peek = np.empty((nbytes, 8), dtype=np.uint32)  # the next max_len bits at every bit position
    for b in range(8):
        peek[:, b] = (window << np.uint32(b)) >> np.uint32(32 - lmax)
    # Positions 0 .. total - 1 are bits of the payload; `total` is the end of the stream, and `total + 1` an
    # overflow sink for any code that runs past the end or starts at it (both map to the overflow), so a chunk
    # whose codes overrun the payload never ends on a valid offset.
    peek = np.concatenate([peek.reshape(-1)[:total], np.zeros(2, dtype=np.uint32)])  # (total + 2,)
    dtype = np.int32 if total < 2**31 - 64 else np.int64
    nxt = np.arange(total + 2, dtype=dtype) + len_table[peek]  # start of the following code
    np.minimum(nxt, total + 1, out=nxt)
    nxt[total:] = total + 1
    jump = nxt
    starts = offsets.astype(dtype)[:, None]  # (lanes, 2**j): the first 2**j code starts of each chunk
    while starts.shape[1] < steps:
        starts = np.concatenate([starts, jump[starts]], axis=1)
        if starts.shape[1] < steps:
            jump = jump[jump]  # next applied 2**(j+1) times
    starts = starts[:, :steps]
    symbols = sym_table[peek[starts]].reshape(-1)
    return symbols, nxt[starts[:-1, -1]], int(nxt[starts[-1, last_steps - 1]])


_DECODERS = {"lockstep": _decode_lockstep, "doubling": _decode_doubling}


def _check_stream(stream: EncodedStream, codebook: HuffmanCodebook) -> tuple[np.ndarray, np.ndarray, int, int, int]:
    """Validate sizes, padding and offsets of ``stream``.

    Returns:
        ``(payload, offsets, count, chunk_size, bit_count)``, the arrays as uint8 and int64.

    """
    n, k, total = stream.count, stream.chunk_size, stream.bit_count
    for name, value, lo in (("count", n, 0), ("chunk_size", k, 1), ("bit_count", total, 0)):
        if not is_int(value, numpy=True) or value < lo:
            raise ValueError(f"Corrupted stream: expected {name} to be an int >= {lo}, got {value!r}")
    n, k, total = int(n), int(k), int(total)
    payload = stream.payload
    payload = np.frombuffer(payload, dtype=np.uint8) if isinstance(payload, bytes | bytearray) else np.asarray(payload)
    if payload.dtype != np.uint8 or payload.ndim != 1:
        raise ValueError(f"Expected a 1-D uint8 payload, got dtype {payload.dtype} and shape {payload.shape}")
    if payload.shape[0] != (total + 7) // 8:
        raise ValueError(
            f"Corrupted or truncated stream: {total} bits need {(total + 7) // 8} payload bytes, got {payload.shape[0]}"
        )
    if total % 8 and int(payload[-1]) & ((1 << (8 - total % 8)) - 1):
        raise ValueError("Corrupted stream: the payload's padding bits are not zero")
    lanes = -(-n // k)
    offsets = np.asarray(stream.offsets)
    if offsets.shape != (lanes,) or offsets.dtype.kind not in "iu":
        raise ValueError(f"Corrupted stream: expected {lanes} integer chunk offsets, got shape {offsets.shape}")
    if n == 0:
        if total:
            raise ValueError(f"Corrupted stream: no symbols but {total} payload bits")
        return payload, offsets, n, k, total
    # Each chunk's span must be possible for its number of symbols; this also bounds every offset.
    spans = np.diff(np.append(offsets.astype(np.int64), total))
    sizes = np.full(lanes, k, dtype=np.int64)
    sizes[-1] = n - (lanes - 1) * k
    lmin, lmax = int(codebook.lengths.min()), codebook.max_len
    if offsets[0] != 0 or np.any(spans < sizes * lmin) or np.any(spans > sizes * lmax):
        raise ValueError(
            f"Corrupted or truncated stream: chunk offsets inconsistent with {n} symbols of "
            f"{lmin} to {lmax} bits in a {total}-bit payload"
        )
    return payload, offsets.astype(np.int64), n, k, total
