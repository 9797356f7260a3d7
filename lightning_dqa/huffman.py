"""Lossless coding of DQA shifting errors: canonical, length-limited Huffman codes with exact bit counts.

DQA stores, for each value of an important channel, an ``m``-bit shifting error ``e`` in ``[0, 2**m - 1]``
(``DQA_METHOD.md`` section 4) and compresses those symbols with a Huffman code. This module keeps the code
book apart from the coding (``STYLE.md`` habit 8):

* :class:`HuffmanCodebook` is built from symbol counts (:meth:`HuffmanCodebook.from_counts`). Code lengths
  come from the package-merge algorithm, so they are optimal under a maximum length (16 bits at most, which
  keeps the decoder's table at ``2**16`` entries or fewer). Codes are canonical, so the code lengths alone
  describe the book: that is what :meth:`HuffmanCodebook.to_bytes` stores and :attr:`HuffmanCodebook.size_bits`
  counts, bit for bit.
* :func:`encode` turns a symbol stream into an :class:`EncodedStream` (payload bytes, the exact payload bit
  count, and a small chunk index that lets the decoder work on many chunks at once); :func:`decode` inverts
  it and raises ``ValueError`` on anything inconsistent; :func:`bit_count` gives the exact payload size from a
  histogram, without encoding.

Bit order: codes are written most significant bit first, into bytes filled from their most significant
bit; the last byte is padded with zero bits.

Everything is vectorized with numpy. The encoder writes every code into 64-bit words at once (codes never
overlap, so the words are the bitwise OR of the shifted codes, one ``reduceat`` per stream); for small
alphabets it first merges groups of symbols into one longer code through a product table, so there are
fewer codes to place. The decoder splits the stream into chunks of ``chunk_size`` symbols whose starting bit
offsets the encoder records, and advances all chunks in lock-step: each step is one table lookup per chunk,
indexed by the next ``max_len`` bits.

Example:
    >>> import numpy as np
    >>> book = HuffmanCodebook.from_counts([90, 6, 3, 1])
    >>> book.lengths.tolist()
    [1, 2, 3, 3]
    >>> stream = encode(np.array([0, 0, 1, 3, 0]), book)
    >>> stream.bit_count  # 1 + 1 + 2 + 3 + 1
    8
    >>> decode(stream, book).tolist()
    [0, 0, 1, 3, 0]

"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAX_CODE_LENGTH",
    "MAX_SYMBOLS",
    "EncodedStream",
    "HuffmanCodebook",
    "bit_count",
    "decode",
    "encode",
    "huffman_lengths_reference",
    "symbol_counts",
]

MAX_CODE_LENGTH = 16
"""Longest code allowed: the decoder's lookup table has ``2**max_len`` entries."""
MAX_SYMBOLS = 2**16
"""Largest alphabet the serialized code book can describe (``m = 16``; DQA uses ``m <= 14``)."""
DEFAULT_CHUNK_SIZE = 4096
"""Symbols per decoder chunk: one index entry per chunk, and one lock-step decoding step per symbol of a chunk."""

# Serialized code book header: alphabet size - 1, shortest length - 1, width of each stored length difference.
_HDR_SYMBOLS_BITS, _HDR_MIN_LEN_BITS, _HDR_WIDTH_BITS = 16, 4, 3
# Largest group code the encoder places: a 56-bit code starting at any bit of a 64-bit word spans at most
# two words, and every shift below stays in [0, 63].
_MAX_GROUP_BITS = 56
_MAX_GROUP_TABLE = 2**16


# ---------------------------------------------------------------------------------------------- code lengths
def _package_merge(weights: np.ndarray, max_len: int) -> np.ndarray:
    """Optimal code lengths of at most ``max_len`` bits for positive ``weights`` (Larmore and Hirschberg, 1990).

    The coin-collector view: each symbol is a coin at every depth ``1..max_len``; the cheapest ``2 * (N - 1)``
    items of the final merged list are selected, and a symbol's code length is the number of depths at which
    its coin is selected. Lists stay sorted, so the selected items of each list form a prefix: walking back
    from the last list only needs, per list, how many leaves the selected prefix holds.

    Args:
        weights: ``(N,)`` positive integer weights, ``N >= 2``, ``N <= 2**max_len``.
        max_len: the length limit.

    Returns:
        ``(N,)`` int64 code lengths, each in ``[1, max_len]``; they satisfy Kraft's inequality with equality.

    """
    n = weights.shape[0]
    # Ascending weight; among equal weights the higher symbol first, so it gets the longer code.
    order = np.lexsort((-np.arange(n), weights))
    leaves = weights[order].astype(np.int64)
    items = leaves
    leaf_flags: list[np.ndarray] = []  # per merged list (depth max_len - 1 .. 1): is item j a leaf?
    for _ in range(max_len - 1):
        packages = items[0 : items.shape[0] // 2 * 2 : 2] + items[1 : items.shape[0] // 2 * 2 : 2]
        merged = np.concatenate([leaves, packages])
        # Stable: on ties leaves come first and keep their sorted order, so selected leaves form a prefix.
        perm = np.argsort(merged, kind="stable")
        items = merged[perm]
        leaf_flags.append(perm < n)
    lengths_sorted = np.zeros(n, dtype=np.int64)
    take = 2 * (n - 1)
    for flags in reversed(leaf_flags):
        n_leaves = int(np.count_nonzero(flags[:take]))
        lengths_sorted[:n_leaves] += 1
        take = 2 * (take - n_leaves)  # each selected package holds two items of the previous list
    lengths_sorted[:take] += 1  # the deepest list holds leaves only
    lengths = np.empty(n, dtype=np.int64)
    lengths[order] = lengths_sorted
    return lengths


def huffman_lengths_reference(weights: np.ndarray | list[int]) -> np.ndarray:
    """Unlimited Huffman code lengths by the textbook heap construction: a slow, obviously correct oracle.

    Args:
        weights: ``(N,)`` non-negative weights.

    Returns:
        ``(N,)`` int64 code lengths (a single symbol gets length 1).

    """
    w = [int(v) for v in np.asarray(weights).ravel()]
    if len(w) == 1:
        return np.ones(1, dtype=np.int64)
    heap: list[tuple[int, int, list[int]]] = [(v, i, [i]) for i, v in enumerate(w)]
    heapq.heapify(heap)
    lengths = [0] * len(w)
    tie = len(w)
    while len(heap) > 1:
        wa, _, sa = heapq.heappop(heap)
        wb, _, sb = heapq.heappop(heap)
        for s in sa + sb:
            lengths[s] += 1
        heapq.heappush(heap, (wa + wb, tie, sa + sb))
        tie += 1
    return np.asarray(lengths, dtype=np.int64)


def _check_lengths(lengths: np.ndarray) -> None:
    """Raise ``ValueError`` unless ``lengths`` describe a prefix code (Kraft sum at most 1) of at most 16 bits."""
    if lengths.ndim != 1 or lengths.shape[0] < 1 or lengths.shape[0] > MAX_SYMBOLS:
        raise ValueError(f"Expected 1 to {MAX_SYMBOLS} code lengths, got an array of shape {lengths.shape}")
    if lengths.min() < 1 or lengths.max() > MAX_CODE_LENGTH:
        raise ValueError(
            f"Expected code lengths in [1, {MAX_CODE_LENGTH}], got [{int(lengths.min())}, {int(lengths.max())}]"
        )
    kraft = int(np.sum(np.left_shift(1, MAX_CODE_LENGTH - lengths)))
    if kraft > 2**MAX_CODE_LENGTH:
        raise ValueError(f"Code lengths violate Kraft's inequality: sum 2**-len = {kraft / 2**MAX_CODE_LENGTH} > 1")


# ---------------------------------------------------------------------------------------------- code book
@dataclass(frozen=True, eq=False)
class HuffmanCodebook:
    """A canonical prefix code over the symbols ``0 .. num_symbols - 1``, described by its code lengths.

    Build it with :meth:`from_counts` (or :meth:`from_lengths`, :meth:`from_bytes`). Canonical means codes
    are assigned in order of (length, symbol), each one the previous code plus one, shifted left when the
    length grows; so the lengths alone determine every code.

    Attributes:
        lengths: ``(N,)`` int64 code length of each symbol, in ``[1, 16]``.
        codes: ``(N,)`` uint64 code of each symbol, right-aligned (its ``lengths[s]`` low bits).
        max_len: the longest code length; the decoder's table has ``2**max_len`` entries.
        complete: whether Kraft's sum is exactly 1, i.e. every bit string starts with a valid code (false only
            for a one-symbol book, or an incomplete book read from bytes).

    """

    lengths: np.ndarray
    codes: np.ndarray = field(init=False, repr=False)
    max_len: int = field(init=False)
    complete: bool = field(init=False)
    _order: np.ndarray = field(init=False, repr=False)  # symbols sorted by (length, symbol)
    _left: np.ndarray = field(init=False, repr=False)  # canonical codes left-aligned to max_len bits, in _order

    def __post_init__(self) -> None:
        lengths = np.asarray(self.lengths, dtype=np.int64).copy()
        _check_lengths(lengths)
        lengths.setflags(write=False)
        max_len = int(lengths.max())
        order = np.lexsort((np.arange(lengths.shape[0]), lengths))
        span = np.left_shift(np.int64(1), max_len - lengths[order])  # table entries each code covers
        left = np.cumsum(span) - span
        codes = np.empty(lengths.shape[0], dtype=np.uint64)
        codes[order] = (left >> (max_len - lengths[order])).astype(np.uint64)
        codes.setflags(write=False)
        object.__setattr__(self, "lengths", lengths)
        object.__setattr__(self, "codes", codes)
        object.__setattr__(self, "max_len", max_len)
        object.__setattr__(self, "complete", int(span.sum()) == 2**max_len)
        object.__setattr__(self, "_order", order)
        object.__setattr__(self, "_left", left)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_counts(cls, counts: np.ndarray | Tensor | list[int], max_len: int = MAX_CODE_LENGTH) -> HuffmanCodebook:
        """Optimal length-limited code for the observed symbol counts.

        Every symbol ``0 .. len(counts) - 1`` gets a code, seen or not: counts are floored at 1 before the
        code is built (a zero count is treated as a count of one). That changes nothing when every symbol
        was seen, and it lets a code book built on calibration data code any later tensor. The lengths are
        optimal for the floored counts under the limit ``max_len`` (package-merge), hence equal in total
        cost to an unlimited Huffman code whenever the limit does not bind.

        Args:
            counts: ``(N,)`` non-negative symbol counts, ``1 <= N <= 2**16`` (``N = 2**m`` for DQA errors).
            max_len: longest allowed code, in ``[ceil(log2 N), 16]``.

        Returns:
            The code book. A one-symbol alphabet gets the 1-bit code ``0``.

        Raises:
            ValueError: for a bad shape, negative counts, or a ``max_len`` out of range.
            TypeError: for counts that are not integers.

        """
        c = counts.detach().cpu().numpy() if isinstance(counts, Tensor) else np.asarray(counts)
        if c.ndim != 1 or not 1 <= c.shape[0] <= MAX_SYMBOLS:
            raise ValueError(f"Expected counts to be a 1-D array of 1 to {MAX_SYMBOLS} entries, got shape {c.shape}")
        if c.dtype.kind not in "iub" and not (c.dtype.kind == "f" and np.all(c == np.floor(c))):
            raise TypeError(f"Expected integer counts, got dtype {c.dtype}")
        if c.shape[0] and c.min() < 0:
            raise ValueError(f"Expected non-negative counts, got a minimum of {c.min()}")
        n = c.shape[0]
        min_len = max(1, (n - 1).bit_length())
        if isinstance(max_len, bool) or not isinstance(max_len, int) or not min_len <= max_len <= MAX_CODE_LENGTH:
            raise ValueError(
                f"Expected max_len to be an int in [{min_len}, {MAX_CODE_LENGTH}] for {n} symbols, got {max_len!r}"
            )
        if n == 1:
            return cls(np.ones(1, dtype=np.int64))
        weights = np.maximum(c.astype(np.int64), 1)
        return cls(_package_merge(weights, max_len))

    @classmethod
    def from_lengths(cls, lengths: np.ndarray | list[int]) -> HuffmanCodebook:
        """Code book from code lengths (validated: in ``[1, 16]``, Kraft sum at most 1)."""
        return cls(np.asarray(lengths, dtype=np.int64))

    # ------------------------------------------------------------------ properties
    @property
    def num_symbols(self) -> int:
        """``N``, the alphabet size."""
        return int(self.lengths.shape[0])

    @property
    def size_bits(self) -> int:
        """Exact size of :meth:`to_bytes` in bits, before padding to whole bytes.

        A 23-bit header (16 bits ``N - 1``, 4 bits shortest length - 1, 3 bits field width ``w``) and one
        ``w``-bit field per symbol holding ``length - shortest length``: a uniform book costs 23 bits whatever
        ``N``; a skewed ``m = 3`` book typically ``23 + 8 * 3 = 47`` bits.
        """
        return _HDR_SYMBOLS_BITS + _HDR_MIN_LEN_BITS + _HDR_WIDTH_BITS + self.num_symbols * self._field_width()

    def _field_width(self) -> int:
        return int(self.lengths.max() - self.lengths.min()).bit_length()

    def expected_length(self, probabilities: np.ndarray) -> float:
        """Mean code length in bits per symbol under the given ``(N,)`` probabilities."""
        return float(np.dot(np.asarray(probabilities, dtype=np.float64), self.lengths))

    # ------------------------------------------------------------------ serialization
    def to_bytes(self) -> bytes:
        """Serialize the code lengths (the canonical code follows from them); :attr:`size_bits` bits, zero padded."""
        lo = int(self.lengths.min())
        width = self._field_width()
        header = [(self.num_symbols - 1, _HDR_SYMBOLS_BITS), (lo - 1, _HDR_MIN_LEN_BITS), (width, _HDR_WIDTH_BITS)]
        bits = [_int_bits(v, w) for v, w in header]
        if width:
            bits.append(_uint_matrix_bits(self.lengths - lo, width))
        return np.packbits(np.concatenate(bits)).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | np.ndarray) -> HuffmanCodebook:
        """Inverse of :meth:`to_bytes`.

        Raises:
            ValueError: if ``data`` is truncated, too long, has non-zero padding, or describes lengths that do
                not form a prefix code.

        """
        buf = np.frombuffer(bytes(data), dtype=np.uint8)
        header_bits = _HDR_SYMBOLS_BITS + _HDR_MIN_LEN_BITS + _HDR_WIDTH_BITS
        if buf.shape[0] * 8 < header_bits:
            raise ValueError(f"Code book truncated: {buf.shape[0]} bytes, the header alone needs {header_bits} bits")
        bits = np.unpackbits(buf)
        n = _bits_int(bits[:_HDR_SYMBOLS_BITS]) + 1
        lo = _bits_int(bits[_HDR_SYMBOLS_BITS : _HDR_SYMBOLS_BITS + _HDR_MIN_LEN_BITS]) + 1
        width = _bits_int(bits[_HDR_SYMBOLS_BITS + _HDR_MIN_LEN_BITS : header_bits])
        size = header_bits + n * width
        if buf.shape[0] != (size + 7) // 8:
            raise ValueError(
                f"Code book of {n} symbols and field width {width} needs {(size + 7) // 8} bytes, got {buf.shape[0]}"
            )
        if bits[size:].any():
            raise ValueError("Code book padding bits are not zero: corrupted data")
        if width:
            fields = bits[header_bits:size].reshape(n, width).astype(np.int64)
            lengths = lo + fields @ (1 << np.arange(width - 1, -1, -1, dtype=np.int64))
        else:
            lengths = np.full(n, lo, dtype=np.int64)
        return cls(lengths)

    # ------------------------------------------------------------------ decoder table
    def decode_table(self) -> tuple[np.ndarray, np.ndarray]:
        """Lookup tables indexed by the next ``max_len`` bits of a stream.

        Returns:
            ``(symbol, length)``: ``(2**max_len,)`` int32 symbol and uint8 code length of the code that
            prefixes each ``max_len``-bit string; length 0 and symbol -1 where no code does (incomplete books).

        """
        symbol, length = self._decode_tables
        return symbol.copy(), length.copy()

    @cached_property
    def _decode_tables(self) -> tuple[np.ndarray, np.ndarray]:
        size = 2**self.max_len
        span = np.left_shift(np.int64(1), self.max_len - self.lengths[self._order])
        used = int(span.sum())
        symbol = np.full(size, -1, dtype=np.int32)
        length = np.zeros(size, dtype=np.uint8)
        symbol[:used] = np.repeat(self._order.astype(np.int32), span)
        length[:used] = np.repeat(self.lengths[self._order].astype(np.uint8), span)
        return symbol, length

    @cached_property
    def _lengths_u8(self) -> np.ndarray:
        return self.lengths.astype(np.uint8)

    def _grouped(self, chunk_size: int) -> tuple[int, np.ndarray, np.ndarray]:
        """Group tables of :func:`_group_tables`, cached per group size on this instance."""
        key = _group_size(self, chunk_size)
        cache = self.__dict__.setdefault("_group_cache", {})
        if key not in cache:
            cache[key] = _group_tables(self, key)
        return key, *cache[key]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HuffmanCodebook) and np.array_equal(self.lengths, other.lengths)

    def __hash__(self) -> int:
        return hash(self.lengths.tobytes())


def _int_bits(value: int, width: int) -> np.ndarray:
    """``width`` bits of ``value``, most significant first, as a uint8 0/1 array."""
    return ((value >> np.arange(width - 1, -1, -1)) & 1).astype(np.uint8)


def _uint_matrix_bits(values: np.ndarray, width: int) -> np.ndarray:
    """Concatenated ``width``-bit fields of ``values``, most significant bit first, as a 0/1 array."""
    return ((values[:, None] >> np.arange(width - 1, -1, -1)) & 1).astype(np.uint8).ravel()


def _bits_int(bits: np.ndarray) -> int:
    return int(np.dot(bits.astype(np.int64), 1 << np.arange(bits.shape[0] - 1, -1, -1, dtype=np.int64)))


# ---------------------------------------------------------------------------------------------- streams
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


def _group_size(codebook: HuffmanCodebook, chunk_size: int) -> int:
    """Symbols per encoder group.

    The largest power of two ``g`` dividing ``chunk_size`` (so chunk starts fall on group boundaries) with
    ``N**g <= 2**16`` table entries and group codes of at most 56 bits.
    """
    n, lmax = codebook.num_symbols, codebook.max_len
    g = 1
    while chunk_size % (2 * g) == 0 and n ** (2 * g) <= _MAX_GROUP_TABLE and 2 * g * lmax <= _MAX_GROUP_BITS:
        g *= 2
    return g


def _group_tables(codebook: HuffmanCodebook, g: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes of groups of ``g`` consecutive symbols, so the encoder places ``g`` times fewer codes.

    Returns:
        ``(codes, lengths)``: ``(N**g,)`` uint64 group codes and uint8 lengths, indexed by the group's symbols
        read as a base-``N`` number, first symbol most significant.

    """
    codes, lengths = codebook.codes, codebook.lengths.astype(np.uint64)
    for _ in range(g.bit_length() - 1):  # square the group: (a, b) -> a's code followed by b's
        codes = ((codes[:, None] << lengths[None, :]) | codes[None, :]).ravel()
        lengths = (lengths[:, None] + lengths[None, :]).ravel()
    return codes, lengths.astype(np.uint8)


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
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
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
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < lo:
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
