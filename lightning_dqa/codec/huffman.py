"""Huffman coding of symbol streams with exact bit counts: :func:`encode`, :func:`bit_count`, :func:`symbol_counts`.

:func:`encode` turns a symbol stream into an :class:`EncodedStream` (payload bytes, the exact payload bit
count, and a small chunk index that lets the decoder, :func:`lightning_dqa.codec.decode.decode`, work on many
chunks at once); :func:`bit_count` gives the exact payload size from a histogram, without encoding.

Bit order: codes are written most significant bit first, into bytes filled from their most significant
bit; the last byte is padded with zero bits.

Everything is vectorized with numpy. The encoder writes every code into 64-bit words at once (codes never
overlap, so the words are the bitwise OR of the shifted codes, one ``reduceat`` per stream); for small
alphabets it first merges groups of symbols into one longer code through a product table, so there are
fewer codes to place.

Example:
    >>> import numpy as np
    >>> book = HuffmanCodebook.from_counts([90, 6, 3, 1])
    >>> stream = encode(np.array([0, 0, 1, 3, 0]), book)
    >>> stream.bit_count  # 1 + 1 + 2 + 3 + 1
    8
    >>> stream.payload.tolist()  # 0|0|10|111|0
    [46]
    >>> bit_count(symbol_counts(np.array([0, 0, 1, 3, 0]), 4), book)
    8

"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor

from lightning_dqa.codec.codebook import HuffmanCodebook
from lightning_dqa.core._checks import is_int

__all__ = ["DEFAULT_CHUNK_SIZE", "EncodedStream", "bit_count", "encode", "symbol_counts"]

DEFAULT_CHUNK_SIZE = 4096
"""Symbols per decoder chunk: one index entry per chunk, and one lock-step decoding step per symbol of a chunk."""


@dataclass(frozen=True, eq=False)
class EncodedStream:
    """A Huffman-coded symbol stream and the chunk index its decoder needs.

    Attributes:
        payload: ``(ceil(bit_count / 8),)`` uint8 array, codes packed most significant bit first, zero padded.
        bit_count: exact number of payload bits.
        count: number of symbols coded.
        chunk_size: symbols per decoder chunk (the last chunk may be shorter).
        offsets: ``(ceil(count / chunk_size),)`` int64 starting bit of each chunk; ``offsets[0] == 0``.

    """

    payload: np.ndarray
    bit_count: int
    count: int
    chunk_size: int
    offsets: np.ndarray

    @property
    def num_chunks(self) -> int:
        """Number of decoder chunks, ``ceil(count / chunk_size)``."""
        return -(-self.count // self.chunk_size)

    @property
    def index_bits(self) -> int:
        """Exact size of the chunk index in bits.

        Every offset but the first (always 0) is stored in ``bit_count.bit_length()`` bits, enough for any
        offset into the payload.
        """
        return max(self.num_chunks - 1, 0) * self.bit_count.bit_length()

    @property
    def total_bits(self) -> int:
        """Payload plus chunk index, in bits.

        The symbol count and chunk size are not included: a decoder knows them from the tensor shape and the
        configuration, as it knows the code book (counted separately by :attr:`HuffmanCodebook.size_bits`).
        """
        return self.bit_count + self.index_bits


def symbol_counts(symbols: np.ndarray | Tensor, num_symbols: int) -> np.ndarray:
    """Histogram ``(num_symbols,)`` int64 of a symbol stream, for :meth:`HuffmanCodebook.from_counts`.

    Raises:
        ValueError: if a symbol lies outside ``[0, num_symbols - 1]``.

    """
    s = _as_symbols(symbols, num_symbols)
    return np.bincount(s, minlength=num_symbols).astype(np.int64)


def bit_count(histogram: np.ndarray | Tensor | list[int], codebook: HuffmanCodebook) -> int:
    """Exact payload bits of coding a stream with this histogram: ``sum(count[s] * length[s])``.

    Args:
        histogram: ``(N',)`` non-negative symbol counts, ``N' <= codebook.num_symbols``.
        codebook: the code.

    Returns:
        The payload size in bits, as :func:`encode` would produce it (``EncodedStream.bit_count``).

    Raises:
        ValueError: if the histogram is longer than the alphabet or has negative counts.

    """
    h = histogram.detach().cpu().numpy() if isinstance(histogram, Tensor) else np.asarray(histogram)
    h = h.astype(np.int64).ravel()
    if h.shape[0] > codebook.num_symbols:
        raise ValueError(f"Expected a histogram of at most {codebook.num_symbols} symbols, got {h.shape[0]}")
    if h.shape[0] and h.min() < 0:
        raise ValueError(f"Expected non-negative counts, got a minimum of {h.min()}")
    return int(np.dot(h, codebook.lengths[: h.shape[0]]))


def _as_symbols(symbols: np.ndarray | Tensor, num_symbols: int) -> np.ndarray:
    """Flat integer numpy view of ``symbols``, checked to lie in ``[0, num_symbols - 1]``."""
    s = symbols.detach().cpu().numpy() if isinstance(symbols, Tensor) else np.asarray(symbols)
    s = s.ravel()
    if s.dtype.kind not in "iu":
        if s.size == 0:
            return s.astype(np.int64)
        raise TypeError(f"Expected integer symbols, got dtype {s.dtype}")
    if s.size:
        # One pass: negative values reinterpreted as unsigned are huge, so the unsigned max catches both ends.
        top = int(s.view(s.dtype.str.replace("i", "u")).max()) if s.dtype.kind == "i" else int(s.max())
        if top >= num_symbols:
            raise ValueError(f"Expected symbols in [0, {num_symbols - 1}], got range [{int(s.min())}, {int(s.max())}]")
    return s


def _place(codes: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """Concatenate right-aligned codes of at most 56 bits into a byte stream, most significant bit first.

    Args:
        codes: ``(E,)`` uint64 codes, ``E >= 1``.
        lengths: ``(E,)`` uint8 code lengths.

    Returns:
        ``(payload, bit_count, starts)``: uint8 payload of ``ceil(bit_count / 8)`` bytes and ``(E,)`` int64
        starting bit of each code.

    """
    ends = np.cumsum(lengths, dtype=np.int64)
    total = int(ends[-1])
    starts = ends - lengths
    word = starts >> 6  # (E,) 64-bit word holding each code's first bit
    shift = 64 - (starts & 63) - lengths  # left shift that puts the code in place; < 0: it spills over
    hi = (codes << np.maximum(shift, 0).astype(np.uint64)) >> np.maximum(-shift, 0).astype(np.uint64)
    words = np.zeros((total + 63) >> 6, dtype=np.uint64)
    last = int(word[-1])
    # Codes never overlap, so a word is the OR of its codes; they are contiguous runs, one per word, and
    # every word up to `last` holds the start of a code (a code is shorter than a word).
    first = np.searchsorted(starts, np.arange(last + 1, dtype=np.int64) << 6)
    words[: last + 1] = np.bitwise_or.reduceat(hi, first)
    spill = np.flatnonzero(shift < 0)  # at most one per word boundary: the target indices are unique
    words[word[spill] + 1] |= codes[spill] << (64 + shift[spill]).astype(np.uint64)
    payload = words.astype(">u8").view(np.uint8)[: (total + 7) >> 3]
    return payload, total, starts


def encode(
    symbols: np.ndarray | Tensor, codebook: HuffmanCodebook, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> EncodedStream:
    """Huffman-code a stream of symbols.

    Args:
        symbols: integer symbols in ``[0, codebook.num_symbols - 1]``, any shape (coded in flattened,
            row-major order).
        codebook: the code.
        chunk_size: symbols per decoder chunk; smaller chunks decode faster (more lanes in parallel) and cost
            more index bits (one offset per chunk).

    Returns:
        The :class:`EncodedStream`.

    Raises:
        ValueError: for a symbol outside the alphabet or a ``chunk_size`` below 1.
        TypeError: for symbols that are not integers.

    """
    if not is_int(chunk_size) or chunk_size < 1:
        raise ValueError(f"Expected chunk_size to be a positive int, got {chunk_size!r}")
    s = _as_symbols(symbols, codebook.num_symbols)
    n = int(s.shape[0])
    if n == 0:
        return EncodedStream(np.zeros(0, dtype=np.uint8), 0, 0, chunk_size, np.zeros(0, dtype=np.int64))
    g, group_codes, group_lengths = codebook._grouped(chunk_size)
    full = n - n % g
    if g > 1:
        # Group index: the g symbols read as a base-N number, first symbol most significant.
        idx = s[0:full:g].astype(np.int64)
        for j in range(1, g):
            idx *= codebook.num_symbols
            idx += s[j:full:g]
        tail = s[full:]
        codes = np.concatenate([group_codes[idx], codebook.codes[tail]])
        lengths = np.concatenate([group_lengths[idx], codebook.lengths[tail].astype(np.uint8)])
    else:
        codes, lengths = codebook.codes[s], codebook._lengths_u8[s]
    payload, total, starts = _place(codes, lengths)
    # Chunk k starts at symbol k * chunk_size, a group boundary (g divides chunk_size): element k * chunk_size / g.
    offsets = starts[np.arange(-(-n // chunk_size), dtype=np.int64) * (chunk_size // g)]
    return EncodedStream(payload, total, n, chunk_size, offsets)
