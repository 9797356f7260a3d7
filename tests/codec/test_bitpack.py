"""Fixed-width code packing: round trips, a bit-string reference, and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_dqa.codec import pack_codes, packed_size, unpack_codes


def reference_pack(codes: list[int], bits: int) -> bytes:
    """Slow reference: concatenate ``bits``-bit two's complement strings, pad with zeros to whole bytes."""
    s = "".join(format(c & (2**bits - 1), f"0{bits}b") for c in codes)
    s += "0" * (-len(s) % 8)
    return bytes(int(s[i : i + 8], 2) for i in range(0, len(s), 8))


@st.composite
def codes_and_width(draw: st.DrawFn) -> tuple[list[int], int, bool]:
    bits = draw(st.integers(2, 16))
    signed = draw(st.booleans())
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return draw(st.lists(st.integers(lo, hi), max_size=70)), bits, signed


@settings(max_examples=150, deadline=None)
@given(codes_and_width())
def test_round_trip_matches_reference(case: tuple[list[int], int, bool]) -> None:
    codes, bits, signed = case
    payload, nbits = pack_codes(np.array(codes, dtype=np.int64), bits, signed)
    assert nbits == len(codes) * bits
    assert payload.dtype == np.uint8 and len(payload) == packed_size(len(codes), bits)
    assert payload.tobytes() == reference_pack(codes, bits)
    out = unpack_codes(payload, bits, signed, len(codes))
    assert out.dtype == torch.int32 and out.tolist() == codes


def test_golden_three_bit_signed() -> None:
    # -4 3 0 -1 -> 100 011 000 111, padded with 4 zeros: 10001100 01110000.
    payload, nbits = pack_codes(torch.tensor([-4, 3, 0, -1], dtype=torch.int32), 3, signed=True)
    assert nbits == 12 and payload.tolist() == [0b10001100, 0b01110000]


def test_tensor_input_any_shape_and_bytes_payload() -> None:
    codes = torch.randint(0, 32, (2, 3, 5, 7), dtype=torch.int32)
    payload, nbits = pack_codes(codes, 5, signed=False)
    assert nbits == codes.numel() * 5
    assert torch.equal(unpack_codes(payload.tobytes(), 5, False, codes.numel()), codes.flatten())
    assert torch.equal(unpack_codes(torch.from_numpy(payload), 5, False, codes.numel()), codes.flatten())


def test_large_round_trip_all_widths() -> None:
    rng = np.random.default_rng(0)
    for bits in range(2, 17):
        for signed in (True, False):
            lo = -(2 ** (bits - 1)) if signed else 0
            codes = rng.integers(lo, lo + 2**bits, size=10_001)
            payload, _ = pack_codes(codes, bits, signed)
            assert np.array_equal(unpack_codes(payload, bits, signed, codes.size).numpy(), codes)


def test_empty() -> None:
    payload, nbits = pack_codes(np.zeros(0, dtype=np.int32), 4, True)
    assert nbits == 0 and payload.size == 0
    assert unpack_codes(payload, 4, True, 0).numel() == 0


@pytest.mark.parametrize(
    ("codes", "bits", "signed", "match"),
    [
        ([4], 3, True, r"signed 3-bit codes in \[-4, 3\]"),
        ([-5], 3, True, r"\[-4, 3\]"),
        ([8], 3, False, r"unsigned 3-bit codes in \[0, 7\]"),
        ([-1], 3, False, r"\[0, 7\]"),
        ([0], 1, False, r"bits to be an int in \[2, 16\]"),
        ([0], 17, False, r"bits to be an int in \[2, 16\]"),
    ],
)
def test_pack_rejects_out_of_range(codes: list[int], bits: int, signed: bool, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pack_codes(np.array(codes), bits, signed)


def test_pack_rejects_floats() -> None:
    with pytest.raises(TypeError, match="integer codes"):
        pack_codes(np.array([1.0]), 3, True)


def test_unpack_rejects_bad_payloads() -> None:
    payload, _ = pack_codes(np.arange(10), 5, signed=False)  # 50 bits -> 7 bytes, 6 padding bits
    with pytest.raises(ValueError, match="truncated"):
        unpack_codes(payload[:-1], 5, False, 10)
    with pytest.raises(ValueError, match="too long"):
        unpack_codes(np.r_[payload, np.uint8(0)], 5, False, 10)
    with pytest.raises(ValueError, match="truncated"):
        unpack_codes(payload, 5, False, 12)
    bad = payload.copy()
    bad[-1] |= 1
    with pytest.raises(ValueError, match="padding"):
        unpack_codes(bad, 5, False, 10)
    with pytest.raises(ValueError, match="count"):
        unpack_codes(payload, 5, False, -1)
    with pytest.raises(ValueError, match="uint8"):
        unpack_codes(payload.astype(np.int32), 5, False, 10)
