"""The interchangeable shifting-error coders: round trips, exact sizes, corrupted data, missing packages."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_huffman import example_counts

from lightning_dqa.codec import HuffmanCodebook, bit_count, symbol_counts
from lightning_dqa.codec.entropy import (
    CODERS,
    DEFAULT_CODER,
    ErrorCoder,
    available_coders,
    get_coder,
)

FAST = settings(max_examples=60, deadline=None)


def coder_or_skip(name: str) -> ErrorCoder:
    """The coder, or a skip when (and only when) its optional package is absent."""
    package = CODERS[name].package
    if package is not None and importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")
    return get_coder(name)


ALL = pytest.mark.parametrize("name", list(CODERS))


@ALL
@FAST
@given(
    st.integers(0, 10),
    st.lists(st.integers(0, 2**10 - 1), max_size=3000),
    st.sampled_from(["skewed", "seen", "uniform", "zeros"]),
    st.sampled_from(["int64", "int32", "uint8", "tensor"]),
)
def test_round_trip(name: str, m: int, raw: list[int], book_kind: str, kind: str) -> None:
    coder = coder_or_skip(name)
    n_sym = 2**m
    symbols = np.array(raw, dtype=np.int64) % n_sym
    counts = example_counts(book_kind, symbols, n_sym)
    if kind == "tensor":
        given_symbols: np.ndarray | torch.Tensor = torch.from_numpy(symbols)
    elif kind == "uint8" and n_sym <= 256:
        given_symbols = symbols.astype(np.uint8)
    else:
        given_symbols = symbols.astype(kind if kind != "uint8" else "int64")
    data = coder.encode(given_symbols, counts)
    assert isinstance(data, bytes)
    out = coder.decode(data, counts, symbols.shape[0])
    assert out.dtype == np.int32 and out.shape == symbols.shape
    np.testing.assert_array_equal(out, symbols)
    assert 0 <= coder.bits(data) <= 8 * len(data)


@ALL
def test_shapes_are_flattened_row_major(name: str) -> None:
    coder = coder_or_skip(name)
    symbols = torch.arange(24).reshape(2, 3, 4) % 5
    counts = np.array([4, 3, 2, 1, 1, 9, 0, 0])
    out = coder.decode(coder.encode(symbols, counts), counts, 24)
    np.testing.assert_array_equal(out, symbols.flatten().numpy())


def test_huffman_is_the_default_and_counts_the_paper_bits() -> None:
    assert DEFAULT_CODER == "huffman" and available_coders()[0] == "huffman"
    rng = np.random.default_rng(0)
    counts = np.array([700, 150, 80, 40, 20, 6, 3, 1])
    symbols = rng.choice(8, size=50_000, p=counts / counts.sum())
    coder = get_coder()
    data = coder.encode(symbols, counts)
    assert coder.bits(data) == bit_count(symbol_counts(symbols, 8), HuffmanCodebook.from_counts(counts))
    # header (12 bytes) + one uint32 offset per chunk but the first + the padded payload
    chunks = -(-symbols.shape[0] // 4096)
    assert len(data) == 12 + 4 * (chunks - 1) + (coder.bits(data) + 7) // 8


def test_ans_bits_match_constriction_and_the_cross_entropy() -> None:
    coder = coder_or_skip("ans")
    import constriction

    rng = np.random.default_rng(1)
    counts = np.array([700, 150, 80, 40, 20, 6, 3, 1])
    p = counts / counts.sum()
    symbols = rng.choice(8, size=200_000, p=p).astype(np.int32)
    data = coder.encode(symbols, counts)
    ans = constriction.stream.stack.AnsCoder()
    ans.encode_reverse(symbols[::1].copy(), constriction.stream.model.Categorical(counts.astype(float), perfect=False))
    assert coder.bits(data) == ans.num_valid_bits()
    ideal = -np.log2(p[symbols]).sum()
    assert ideal <= coder.bits(data) <= ideal * 1.001 + 64


def test_zstd_bits_are_the_frame_bytes() -> None:
    coder = coder_or_skip("zstd")
    data = coder.encode(np.zeros(10_000, dtype=np.int64), [1, 1, 1, 1])
    assert coder.bits(data) == 8 * len(data) < 10_000  # a run of zeros compresses to a few bytes


@ALL
def test_symbols_and_counts_are_checked(name: str) -> None:
    coder = coder_or_skip(name)
    with pytest.raises(ValueError, match="symbols in"):
        coder.encode(np.array([0, 4]), [1, 1, 1, 1])
    with pytest.raises(ValueError, match="symbols in"):
        coder.encode(np.array([-1]), [1, 1, 1, 1])
    with pytest.raises(TypeError, match="integer symbols"):
        coder.encode(np.array([0.5]), [1, 1])
    with pytest.raises(TypeError, match="integer counts"):
        coder.encode(np.array([0]), [0.5, 1.0])
    with pytest.raises(ValueError, match="non-negative counts"):
        coder.encode(np.array([0]), [-1, 1])
    with pytest.raises(ValueError, match="1-D array"):
        coder.encode(np.array([0]), np.ones((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="non-negative int"):
        coder.decode(coder.encode(np.array([0, 1]), [1, 1]), [1, 1], -1)


@ALL
def test_corrupted_data_raises(name: str) -> None:
    coder = coder_or_skip(name)
    counts = np.array([50, 20, 10, 5, 3, 2, 1, 1])
    symbols = np.random.default_rng(2).choice(8, size=5000, p=counts / counts.sum())
    data = coder.encode(symbols, counts)
    with pytest.raises(ValueError, match="Corrupted"):
        coder.decode(data[:-5], counts, 5000)  # truncated
    with pytest.raises(ValueError, match="Corrupted"):
        coder.decode(data, counts, 4000)  # fewer symbols than were coded


@pytest.mark.parametrize("name", ["zstd", "ans"])
def test_missing_package_names_the_extra(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    package = CODERS[name].package
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ImportError
    assert name not in available_coders()
    with pytest.raises(ImportError, match=r"lightning-dqa\[entropy\]"):
        get_coder(name)


def test_unknown_coder() -> None:
    with pytest.raises(ValueError, match="Unknown error coder"):
        get_coder("lzma")
