"""Huffman coding and decoding: round trips against a sequential reference, golden bits, corrupted streams."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_dqa.codec import EncodedStream, HuffmanCodebook, bit_count, decode, encode, symbol_counts

FAST = settings(max_examples=60, deadline=None)


def sequential_encode(symbols: np.ndarray, book: HuffmanCodebook) -> tuple[bytes, int]:
    """Slow reference encoder: concatenate code strings symbol by symbol."""
    bits = "".join(format(int(book.codes[s]), f"0{int(book.lengths[s])}b") for s in symbols)
    n = len(bits)
    bits += "0" * (-n % 8)
    return bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)), n


# ------------------------------------------------------------------------------------------- coding
def test_golden_bit_count_and_payload() -> None:
    # Counts 90, 6, 3, 1 -> Huffman merges 1+3, then 4+6, then 10+90: lengths 1, 2, 3, 3, and the canonical
    # codes are 0, 10, 110, 111. The stream 0 0 1 3 0 is 0|0|10|111|0 = 00101110 = 0x2E: 8 bits, one byte.
    book = HuffmanCodebook.from_counts([90, 6, 3, 1])
    assert book.codes.tolist() == [0b0, 0b10, 0b110, 0b111]
    stream = encode(np.array([0, 0, 1, 3, 0]), book)
    assert stream.bit_count == 8 and stream.payload.tolist() == [0x2E]
    assert stream.index_bits == 0 and stream.total_bits == 8  # one chunk: no index
    assert bit_count([3, 1, 0, 1], book) == 8
    # 9 symbols in chunks of 4: 3 chunks, 2 stored offsets of bit_length(bit_count) bits each.
    stream = encode(np.array([3, 3, 3, 3, 0, 0, 0, 0, 2]), book, chunk_size=4)
    assert stream.bit_count == 4 * 3 + 4 * 1 + 3
    assert stream.offsets.tolist() == [0, 12, 16]
    assert stream.index_bits == 2 * (19).bit_length()


@FAST

def example_counts(kind: str, symbols: np.ndarray, n_sym: int) -> np.ndarray:
    """Code-book counts of one kind: ``seen`` (the stream's own histogram), ``skewed`` (halving),
    ``zeros`` (only symbol 0 seen: most of the stream unseen) or ``uniform``."""
    if kind == "seen":
        return symbol_counts(symbols, n_sym)
    if kind == "skewed":
        return (1000 >> np.minimum(np.arange(n_sym), 60)).astype(np.int64)
    counts = np.ones(n_sym, dtype=np.int64)
    if kind == "zeros":
        counts[:] = 0
        counts[0] = 5
    return counts

@given(
    st.integers(1, 14),
    st.lists(st.integers(0, 2**14 - 1), max_size=300),
    st.integers(1, 40),
    st.sampled_from(["skewed", "seen", "uniform"]),
    st.sampled_from(["auto", "lockstep", "doubling"]),
)
def test_round_trip(m: int, raw: list[int], chunk_size: int, book_kind: str, method: str) -> None:
    n_sym = 2**m
    symbols = np.array(raw, dtype=np.int64) % n_sym
    counts = example_counts(book_kind, symbols, n_sym)
    book = HuffmanCodebook.from_counts(counts)
    stream = encode(symbols, book, chunk_size=chunk_size)
    ref_payload, ref_bits = sequential_encode(symbols, book)
    assert stream.bit_count == ref_bits == bit_count(symbol_counts(symbols, n_sym), book)
    assert stream.payload.tobytes() == ref_payload
    assert stream.count == len(symbols) and stream.num_chunks == -(-len(symbols) // chunk_size)
    out = decode(stream, book, method)
    assert out.dtype == torch.int32 and out.tolist() == symbols.tolist()


@pytest.mark.parametrize("n", [0, 1, 5, 4096, 4097, 20000])
@pytest.mark.parametrize("alphabet", [1, 2, 8])
@pytest.mark.parametrize("method", ["lockstep", "doubling"])
def test_round_trip_edge_sizes(n: int, alphabet: int, method: str) -> None:
    rng = np.random.default_rng(n)
    symbols = torch.from_numpy(rng.integers(0, alphabet, size=n).astype(np.int32))
    book = HuffmanCodebook.from_counts(symbol_counts(symbols, alphabet))
    stream = encode(symbols, book, chunk_size=4096 if method == "doubling" else 128)
    assert torch.equal(decode(stream, book, method), symbols)
    same = torch.full((n,), alphabet - 1, dtype=torch.int32)  # all-same stream
    assert torch.equal(decode(encode(same, book, chunk_size=512), book, method), same)


def test_decoders_agree_on_a_long_stream() -> None:
    rng = np.random.default_rng(3)
    symbols = rng.choice(8, size=300_000, p=[0.53, 0.07, 0.07, 0.07, 0.07, 0.07, 0.06, 0.06])
    book = HuffmanCodebook.from_counts(symbol_counts(symbols, 8))
    stream = encode(symbols, book)
    assert np.array_equal(decode(stream, book, "lockstep").numpy(), symbols)
    assert np.array_equal(decode(stream, book, "doubling").numpy(), symbols)
    with pytest.raises(ValueError, match="method"):
        decode(stream, book, "sequential")  # type: ignore[arg-type]


def test_empty_stream() -> None:
    book = HuffmanCodebook.from_counts([1, 1])
    stream = encode(np.zeros(0, dtype=np.int64), book)
    assert stream.bit_count == stream.total_bits == 0 and stream.payload.size == 0
    assert decode(stream, book).numel() == 0


def test_single_symbol_alphabet_uses_one_bit() -> None:
    book = HuffmanCodebook.from_counts([3])
    stream = encode(np.zeros(20, dtype=np.int64), book)
    assert stream.bit_count == 20 and stream.payload.tolist() == [0, 0, 0]
    assert decode(stream, book).tolist() == [0] * 20


def test_encode_rejects_bad_symbols() -> None:
    book = HuffmanCodebook.from_counts([1, 1, 1, 1])
    with pytest.raises(ValueError, match=r"symbols in \[0, 3\]"):
        encode(np.array([0, 4]), book)
    with pytest.raises(ValueError, match=r"symbols in \[0, 3\]"):
        encode(torch.tensor([0, -1], dtype=torch.int32), book)
    with pytest.raises(TypeError, match="integer symbols"):
        encode(np.array([0.5]), book)
    with pytest.raises(ValueError, match="chunk_size"):
        encode(np.array([0]), book, chunk_size=0)


# ------------------------------------------------------------------------------------------- corruption
@pytest.fixture
def coded() -> tuple[EncodedStream, HuffmanCodebook, np.ndarray]:
    rng = np.random.default_rng(1)
    symbols = rng.choice(8, size=3000, p=[0.6, 0.15, 0.1, 0.05, 0.04, 0.03, 0.02, 0.01])
    book = HuffmanCodebook.from_counts(symbol_counts(symbols, 8))
    return encode(symbols, book, chunk_size=256), book, symbols


METHODS = pytest.mark.parametrize("method", ["lockstep", "doubling"])


def test_truncated_or_padded_payload_raises(coded: tuple[EncodedStream, HuffmanCodebook, np.ndarray]) -> None:
    stream, book, _ = coded
    with pytest.raises(ValueError, match="truncated"):
        decode(dataclasses.replace(stream, payload=stream.payload[:-1]), book)
    with pytest.raises(ValueError, match="truncated"):
        decode(dataclasses.replace(stream, payload=stream.payload[: len(stream.payload) // 2]), book)
    with pytest.raises(ValueError, match="payload bytes"):
        decode(dataclasses.replace(stream, payload=np.r_[stream.payload, np.uint8(0)]), book)


@METHODS
def test_inconsistent_counts_and_offsets_raise(
    coded: tuple[EncodedStream, HuffmanCodebook, np.ndarray], method: str
) -> None:
    stream, book, _ = coded
    for change in (
        {"bit_count": stream.bit_count - 1},
        {"bit_count": stream.bit_count + 8},
        {"count": stream.count + 1},
        {"count": stream.count - 1},
        {"count": -1},
        {"chunk_size": 128},
        {"offsets": stream.offsets + 1},
        {"offsets": stream.offsets[:-1]},
        {"offsets": np.r_[stream.offsets[:3], stream.offsets[4] - 1, stream.offsets[4:]]},
    ):
        with pytest.raises(ValueError):
            decode(dataclasses.replace(stream, **change), book, method)


@METHODS
def test_off_by_one_metadata_raises(method: str) -> None:
    # The golden stream 0|0|10|111|0 ends in a 0 bit, so dropping the last bit leaves valid zero padding, and
    # one more symbol still fits the size checks: only decoding can tell.
    book = HuffmanCodebook.from_counts([90, 6, 3, 1])
    stream = encode(np.array([0, 0, 1, 3, 0]), book)
    for change in ({"bit_count": 7}, {"count": 6}, {"count": 4}):
        with pytest.raises(ValueError, match="Corrupted"):
            decode(dataclasses.replace(stream, **change), book, method)


@METHODS
def test_wrong_codebook_raises(coded: tuple[EncodedStream, HuffmanCodebook, np.ndarray], method: str) -> None:
    stream, _, _ = coded
    with pytest.raises(ValueError):
        decode(stream, HuffmanCodebook.from_counts(np.ones(8, dtype=np.int64)), method)


@METHODS
def test_invalid_prefix_raises(method: str) -> None:
    book = HuffmanCodebook.from_counts([5])  # only the code "0" exists
    stream = encode(np.zeros(16, dtype=np.int64), book)
    bad = stream.payload.copy()
    bad[1] = 0x01  # the last bit becomes "1": no code starts with it
    with pytest.raises(ValueError, match="Corrupted"):
        decode(dataclasses.replace(stream, payload=bad), book, method)
    incomplete = HuffmanCodebook.from_lengths([1, 2])  # codes 0 and 10; "11" is no code
    stream = encode(np.array([1, 0, 1, 0]), incomplete)  # 10 0 10 0 -> 10010000
    bad = np.array([0b11010000], dtype=np.uint8)  # "11" in place of "10": the same bit count
    with pytest.raises(ValueError, match="Corrupted"):
        decode(dataclasses.replace(stream, payload=bad), incomplete, method)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_bit_flips_raise_or_decode_in_range(data: st.DataObject) -> None:
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    symbols = rng.choice(8, size=2000, p=[0.6, 0.15, 0.1, 0.05, 0.04, 0.03, 0.02, 0.01])
    book = HuffmanCodebook.from_counts(symbol_counts(symbols, 8))
    stream = encode(symbols, book, chunk_size=data.draw(st.sampled_from([64, 500, 4096])))
    method = data.draw(st.sampled_from(["lockstep", "doubling"]))
    bad = stream.payload.copy()
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, stream.bit_count - 1))
        bad[pos // 8] ^= np.uint8(0x80 >> (pos % 8))
    try:
        out = decode(dataclasses.replace(stream, payload=bad), book, method)
    except ValueError:
        pass
    else:  # undetectable corruption (code boundaries unchanged): still well formed
        assert out.shape == (len(symbols),) and int(out.min()) >= 0 and int(out.max()) < 8


def test_bit_count_rejects_bad_histograms() -> None:
    book = HuffmanCodebook.from_counts([1, 1])
    with pytest.raises(ValueError, match="at most 2"):
        bit_count([1, 2, 3], book)
    with pytest.raises(ValueError, match="non-negative"):
        bit_count([-1], book)
    assert bit_count(torch.tensor([4]), book) == 4
