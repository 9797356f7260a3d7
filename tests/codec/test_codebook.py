"""Huffman code books: code lengths against oracles, serialization with exact sizes, and rejected corruption."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_dqa.codec import HuffmanCodebook, decode, encode
from lightning_dqa.codec import codebook as CB

FAST = settings(max_examples=60, deadline=None)


def kraft_sum(lengths: np.ndarray) -> float:
    return float(np.sum(2.0 ** -lengths.astype(np.float64)))


def cost(counts: np.ndarray, lengths: np.ndarray) -> int:
    return int(np.dot(np.maximum(np.asarray(counts, dtype=np.int64), 1), lengths))


def brute_force_cost(weights: list[int], max_len: int) -> int:
    """Cheapest prefix code with lengths <= max_len, by trying every length vector (tiny alphabets only)."""
    best = None
    for lengths in itertools.product(range(1, max_len + 1), repeat=len(weights)):
        if sum(2.0**-v for v in lengths) <= 1.0:
            c = sum(w * v for w, v in zip(weights, lengths, strict=True))
            best = c if best is None else min(best, c)
    assert best is not None
    return best


counts_st = st.lists(st.integers(0, 10**6), min_size=1, max_size=64).map(np.array)


# ------------------------------------------------------------------------------------------- code lengths
@FAST
@given(counts_st)
def test_lengths_satisfy_kraft_and_match_reference_when_unlimited(counts: np.ndarray) -> None:
    book = HuffmanCodebook.from_counts(counts)
    assert book.lengths.shape == counts.shape
    assert book.lengths.min() >= 1 and book.max_len <= CB.MAX_CODE_LENGTH
    assert kraft_sum(book.lengths) <= 1.0
    ref = CB.huffman_lengths_reference(np.maximum(counts, 1))
    if len(counts) > 1:
        assert kraft_sum(book.lengths) == 1.0  # package-merge codes are complete
    if ref.max() <= CB.MAX_CODE_LENGTH:  # the limit does not bind: optimal, like plain Huffman
        assert cost(counts, book.lengths) == cost(counts, ref)


@FAST
@given(st.lists(st.integers(0, 1000), min_size=2, max_size=5), st.integers(3, 4))
def test_length_limited_code_is_optimal_against_brute_force(weights: list[int], max_len: int) -> None:
    book = HuffmanCodebook.from_counts(weights, max_len=max_len)
    assert book.max_len <= max_len
    assert cost(np.array(weights), book.lengths) == brute_force_cost([max(w, 1) for w in weights], max_len)


def test_limit_binds_on_fibonacci_counts() -> None:
    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])
    counts = np.array(fib)
    assert CB.huffman_lengths_reference(counts).max() == 29  # unlimited Huffman is a 29-deep chain
    for max_len in (5, 8, 16):
        book = HuffmanCodebook.from_counts(counts, max_len=max_len)
        assert book.max_len == max_len and kraft_sum(book.lengths) == 1.0
        assert cost(counts, book.lengths) >= cost(counts, CB.huffman_lengths_reference(counts))


def test_unseen_symbols_still_get_codes_and_degenerate_alphabets() -> None:
    book = HuffmanCodebook.from_counts([1000, 0, 0, 0])
    assert book.lengths.tolist() == [1, 2, 3, 3]  # zero counts floored to one
    assert HuffmanCodebook.from_counts([0, 0, 0, 0]).lengths.tolist() == [2, 2, 2, 2]
    single = HuffmanCodebook.from_counts([7])
    assert single.lengths.tolist() == [1] and not single.complete
    assert HuffmanCodebook.from_counts([5, 0]).lengths.tolist() == [1, 1]


def test_max_m_alphabet() -> None:
    rng = np.random.default_rng(0)
    counts = rng.geometric(0.01, size=2**14)  # m = 14, every symbol seen a few times, skewed
    book = HuffmanCodebook.from_counts(counts)
    assert book.num_symbols == 2**14 and kraft_sum(book.lengths) == 1.0 and book.max_len <= 16
    s = rng.integers(0, 2**14, size=5000)
    assert torch.equal(decode(encode(s, book, chunk_size=64), book), torch.from_numpy(s).int())


@pytest.mark.parametrize(
    ("counts", "max_len", "match"),
    [
        ([], 16, "1-D array"),
        ([[1, 2]], 16, "1-D array"),
        ([1, -1], 16, "non-negative"),
        ([1, 2, 3], 1, "max_len"),
        ([1, 2], 17, "max_len"),
    ],
)
def test_from_counts_rejects_bad_input(counts: list, max_len: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HuffmanCodebook.from_counts(counts, max_len=max_len)


def test_from_counts_rejects_fractional_counts() -> None:
    with pytest.raises(TypeError, match="integer counts"):
        HuffmanCodebook.from_counts([1.5, 2])
    assert HuffmanCodebook.from_counts([3.0, 1.0]).lengths.tolist() == [1, 1]


def test_from_lengths_rejects_non_prefix_codes() -> None:
    with pytest.raises(ValueError, match="Kraft"):
        HuffmanCodebook.from_lengths([1, 1, 2])
    with pytest.raises(ValueError, match="code lengths in"):
        HuffmanCodebook.from_lengths([0, 1])


# ------------------------------------------------------------------------------------------- serialization
@FAST
@given(counts_st, st.integers(14, 16))
def test_codebook_bytes_round_trip_and_exact_size(counts: np.ndarray, max_len: int) -> None:
    book = HuffmanCodebook.from_counts(counts, max_len=max(max_len, (len(counts) - 1).bit_length()))
    data = book.to_bytes()
    assert len(data) == (book.size_bits + 7) // 8
    assert HuffmanCodebook.from_bytes(data) == book


def test_codebook_size_bits_golden() -> None:
    # Lengths [1, 2, 3, 3]: header 16 + 4 + 3 bits, then 4 fields of bit_length(3 - 1) = 2 bits.
    assert HuffmanCodebook.from_counts([90, 6, 3, 1]).size_bits == 23 + 4 * 2
    # A uniform code needs no per-symbol field at all, whatever its size.
    assert HuffmanCodebook.from_counts(np.ones(2**14, dtype=np.int64)).size_bits == 23


def test_codebook_from_bytes_rejects_corruption() -> None:
    data = HuffmanCodebook.from_counts([90, 6, 3, 1]).to_bytes()
    with pytest.raises(ValueError, match="truncated"):
        HuffmanCodebook.from_bytes(data[:2])
    with pytest.raises(ValueError, match="needs"):
        HuffmanCodebook.from_bytes(data[:-1])
    with pytest.raises(ValueError, match="needs"):
        HuffmanCodebook.from_bytes(data + b"\0")
    with pytest.raises(ValueError, match="padding"):
        HuffmanCodebook.from_bytes(data[:-1] + bytes([data[-1] | 1]))
    # Header says 4 symbols, shortest length 1, width 2; fields 0,0,0,0: four 1-bit codes violate Kraft.
    bad = np.packbits(np.r_[CB._int_bits(3, 16), CB._int_bits(0, 4), CB._int_bits(2, 3), np.zeros(8, np.uint8)])
    with pytest.raises(ValueError, match="Kraft"):
        HuffmanCodebook.from_bytes(bad.tobytes())


@pytest.mark.parametrize(
    ("counts", "lengths"),
    [([2**62] * 4, [2, 2, 2, 2]), ([2**63 - 1, 5, 3, 1], [1, 2, 3, 3]), ([2**62, 2**62, 1, 0], [1, 2, 3, 3])],
)
def test_counts_near_two_to_the_63_do_not_overflow(counts, lengths):
    """Sums of such counts wrapped around in int64 and gave wrong lengths (e.g. [7, 11, 11, 16] for four equal)."""
    book = HuffmanCodebook.from_counts(np.array(counts, dtype=np.int64))
    assert book.lengths.tolist() == lengths
