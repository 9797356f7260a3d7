"""Canonical, length-limited Huffman code books for DQA shifting errors, built from symbol counts.

DQA stores, for each value of an important channel, an ``m``-bit shifting error ``e`` in ``[0, 2**m - 1]``
(``DQA_METHOD.md`` section 4) and compresses those symbols with a Huffman code. This module holds the code
book only, apart from the coding (``STYLE.md`` habit 8; the coding is :mod:`lightning_dqa.codec.huffman` and
:mod:`lightning_dqa.codec.decode`):

* :class:`HuffmanCodebook` is built from symbol counts (:meth:`HuffmanCodebook.from_counts`). Code lengths
  come from the package-merge algorithm, so they are optimal under a maximum length (16 bits at most, which
  keeps the decoder's table at ``2**16`` entries or fewer). Codes are canonical, so the code lengths alone
  describe the book: that is what :meth:`HuffmanCodebook.to_bytes` stores and :attr:`HuffmanCodebook.size_bits`
  counts, bit for bit.
* The book also derives, once and cached on the instance, the tables the coders use: the decoder's lookup
  table indexed by the next ``max_len`` bits, and the encoder's product table of groups of symbols.

Example:
    >>> book = HuffmanCodebook.from_counts([90, 6, 3, 1])
    >>> book.lengths.tolist(), book.codes.tolist()
    ([1, 2, 3, 3], [0, 2, 6, 7])
    >>> HuffmanCodebook.from_bytes(book.to_bytes()) == book
    True

"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from torch import Tensor

from lightning_dqa.core._checks import is_int

__all__ = ["MAX_CODE_LENGTH", "MAX_SYMBOLS", "HuffmanCodebook", "huffman_lengths_reference"]

MAX_CODE_LENGTH = 16
"""Longest code allowed: the decoder's lookup table has ``2**max_len`` entries."""
MAX_SYMBOLS = 2**16
"""Largest alphabet the serialized code book can describe (``m = 16``; DQA uses ``m <= 14``)."""

# Serialized code book header: alphabet size - 1, shortest length - 1, width of each stored length difference.
_HDR_SYMBOLS_BITS, _HDR_MIN_LEN_BITS, _HDR_WIDTH_BITS = 16, 4, 3
# Largest group code the encoder places (groups: `_group_tables`): a 56-bit code starting at any bit of a
# 64-bit word spans at most two words, and every shift below stays in [0, 63].
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


_WEIGHT_LIMIT = 2**40
"""Largest weight total package-merge sums exactly in int64 (it adds up to ``N * max_len`` of them)."""


def _without_overflow(weights: np.ndarray) -> np.ndarray:
    """Weights scaled down by a power of two (each kept at least 1) when their total could overflow int64.

    Counts near ``2**63`` (e.g. histograms accumulated over a long run) would otherwise wrap around in the sums
    of package-merge and give wrong lengths; the scaled weights give the optimal code for the same
    proportions up to a relative error of ``2**-40``.
    """
    total = int(weights.astype(object).sum())
    if total <= _WEIGHT_LIMIT:
        return weights
    shift = (total // _WEIGHT_LIMIT).bit_length()
    return np.maximum(weights >> shift, 1)


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
        if not is_int(max_len) or not min_len <= max_len <= MAX_CODE_LENGTH:
            raise ValueError(
                f"Expected max_len to be an int in [{min_len}, {MAX_CODE_LENGTH}] for {n} symbols, got {max_len!r}"
            )
        if n == 1:
            return cls(np.ones(1, dtype=np.int64))
        weights = np.maximum(c.astype(np.int64), 1)
        return cls(_package_merge(_without_overflow(weights), max_len))

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

    @cached_property
    def _codes_u32(self) -> np.ndarray:
        return self.codes.astype(np.uint32)

    @cached_property
    def _kernel_ptrs(self) -> tuple[int, int, int, int]:
        """Addresses of the encoder's (codes, lengths) and the decoder's (symbol, length) tables, found once."""
        return (
            self._codes_u32.ctypes.data, self._lengths_u8.ctypes.data,
            self._decode_tables[0].ctypes.data, self._decode_tables[1].ctypes.data,
        )  # fmt: skip

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
