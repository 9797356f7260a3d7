"""The fused byte path: the C++ kernels give the reference path's bytes and values; every coder round-trips."""

from __future__ import annotations

import builtins
import importlib.util

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_dqa.codec import HuffmanCodebook
from lightning_dqa.codec.blob import decode_activation
from lightning_dqa.codec.bytepath import _decode_reference, _encode_reference, decode_values, encode_values
from lightning_dqa.codec.layout import error_coder
from lightning_dqa.core import functional as F
from lightning_dqa.core.quantizers import ActivationQuantizer
from lightning_dqa.deploy.layer_bytes import bytes_to_values, quantizer_to_bytes

# Skips without the kernel, fails without it in CI (conftest.native_kernel): the kernel's tests never vanish there.
needs_native = pytest.mark.usefixtures("native_kernel")


@st.composite
def layouts(draw: st.DrawFn) -> dict:
    """A random activation layout, widths, scales and code book."""
    shape = draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))
    cd = draw(st.integers(0, len(shape) - 1))
    bits, m, signed = draw(st.integers(2, 12)), draw(st.integers(0, 10)), draw(st.booleans())
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    channels = shape[cd]
    x = torch.randn(shape, generator=gen) * draw(st.sampled_from([0.1, 1.0, 10.0]))
    if draw(st.booleans()):
        x[0] = float("inf")  # clamped like any large value
    important = torch.rand(channels, generator=gen) < 0.5
    max_abs = torch.rand(channels, generator=gen) * 3 + 0.01
    scale_n = F.scale_from_max(max_abs, bits, signed)
    counts = torch.randint(0, 50, (2**m,), generator=gen)
    return {
        "x": x, "scale_n": scale_n, "important": important, "bits": bits, "extra_bits": m, "signed": signed,
        "channel_dim": cd, "codebook": HuffmanCodebook.from_counts(counts), "chunk_size": draw(st.integers(1, 40)),
    }  # fmt: skip


@needs_native
@settings(max_examples=150, deadline=None)
@given(layouts(), st.booleans())
def test_kernels_write_the_reference_bytes_and_values(case: dict, raw: bool) -> None:
    if raw:
        case = {**case, "codebook": None}
    fast, ref = encode_values(**case), _encode_reference(**case)
    assert np.array_equal(fast.main, ref.main)
    assert np.array_equal(fast.error.astype(np.int64), ref.error.astype(np.int64))
    assert np.array_equal(fast.offsets, ref.offsets) and fast.error_bits == ref.error_bits
    args = {k: v for k, v in case.items() if k != "x"}
    shape = tuple(case["x"].shape)
    out, want = decode_values(fast, shape, **args), _decode_reference(ref, shape, **args)
    assert torch.equal(out.view(torch.int32), want.view(torch.int32))


@needs_native
def test_kernels_reject_nan_and_corrupted_streams() -> None:
    x = torch.rand(2, 3, 8, 8)
    case = {
        "scale_n": torch.full((3,), 0.1), "important": torch.tensor([True, False, True]), "bits": 3,
        "extra_bits": 3, "signed": False, "channel_dim": 1, "chunk_size": 16,
        "codebook": HuffmanCodebook.from_counts([9, 5, 3, 2, 1, 1, 1, 1]),
    }  # fmt: skip
    bad = x.clone()
    bad[1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        encode_values(bad, **case)
    coded = encode_values(x, **case)
    shifted = type(coded)(
        coded.main, coded.error, coded.offsets + np.r_[0, np.ones(len(coded.offsets) - 1, int)], coded.error_bits
    )
    with pytest.raises(ValueError, match="offset"):
        decode_values(shifted, tuple(x.shape), **case)
    short = type(coded)(coded.main, coded.error, coded.offsets, coded.error_bits + 1)
    with pytest.raises(ValueError, match="Corrupted"):
        decode_values(short, tuple(x.shape), **case)


def _layer(m: int = 3, dynamic: bool = False) -> tuple[ActivationQuantizer, torch.Tensor]:
    q = ActivationQuantizer(6, bits=3, extra_bits=m, scale_mode="dynamic" if dynamic else "static", name="conv")
    x = torch.randn(4, 6, 5, 5).relu()
    if not dynamic:
        q.set_static_scale(F.scale_from_max(F.channel_absmax(x), 3, True))
    q.important[[1, 4]] = True
    q.error_counts.copy_(torch.arange(2**m, 0, -1))
    return q, x


def _skip_without(coder: str) -> None:
    package = {"zstd": "zstandard", "ans": "constriction"}.get(coder)
    if package and importlib.util.find_spec(package) is None:
        pytest.skip(f"the {coder!r} coder needs {package!r} (pip install 'lightning-dqa[entropy]'), not installed")


@pytest.mark.parametrize("coder", ["huffman", "zstd", "ans"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_every_coder_round_trips_to_the_fake_quantized_values(coder: str, dynamic: bool) -> None:
    _skip_without(coder)
    q, x = _layer(dynamic=dynamic)
    blob = quantizer_to_bytes(q, x, coder=coder)
    book = HuffmanCodebook.from_counts(q.error_counts)
    assert decode_activation(blob, book, q.error_counts)[2].coder == coder
    with torch.no_grad():
        assert torch.equal(bytes_to_values(q, blob), q(x) + 0.0)
    q.error_counts.copy_(q.error_counts.flip(0).clone())  # another model: refused, whichever the coder
    with pytest.raises(ValueError, match="another"):
        bytes_to_values(q, blob)


@pytest.mark.parametrize("coder", ["zstd", "ans"])
def test_a_corrupted_coder_section_raises(coder: str) -> None:
    _skip_without(coder)
    q, x = _layer()
    blob = bytearray(quantizer_to_bytes(q, x, coder=coder))
    blob[-6] ^= 0x10  # inside the error section, before the checksum
    with pytest.raises(ValueError, match="checksum"):
        bytes_to_values(q, bytes(blob))


def test_a_missing_optional_coder_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_zstd(name: str, *args: object, **kwargs: object) -> object:
        if name == "zstandard":
            raise ImportError("No module named 'zstandard'")
        return real_import(name, *args, **kwargs)

    error_coder.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_zstd)
    q, x = _layer()
    try:
        with pytest.raises(ImportError, match=r"lightning-dqa\[entropy\]"):
            quantizer_to_bytes(q, x, coder="zstd")
    finally:
        error_coder.cache_clear()
    with pytest.raises(ValueError, match="coder to be one of"):
        quantizer_to_bytes(q, x, coder="lzma")


@pytest.mark.parametrize("coder", ["huffman", "zstd"])
def test_the_fallback_path_writes_the_same_blob(coder: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _skip_without(coder)
    q, x = _layer()
    blob = quantizer_to_bytes(q, x, coder=coder)
    monkeypatch.setattr("lightning_dqa.codec.bytepath.native_library", lambda: None)
    assert quantizer_to_bytes(q, x, coder=coder) == blob
    with torch.no_grad():
        assert torch.equal(bytes_to_values(q, blob), q(x) + 0.0)


@needs_native
@pytest.mark.parametrize("seed", range(6))
def test_split_walks_join_to_the_reference_bytes(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several threads, each on a range of the outer axis, with chunk boundaries falling inside their ranges."""
    monkeypatch.setattr("lightning_dqa.codec.bytepath._MIN_PARALLEL", 1)
    monkeypatch.setattr("lightning_dqa.codec.bytepath.torch.get_num_threads", lambda: 2 + seed % 3)
    gen = torch.Generator().manual_seed(seed)
    signed = bool(seed % 2)
    x = torch.randn(7, 5, 9, 8, generator=gen)
    m = 1 + seed % 4
    case = {
        "scale_n": F.scale_from_max(torch.rand(5, generator=gen) + 0.1, 3 + seed % 2, signed),
        "important": torch.rand(5, generator=gen) < 0.6, "bits": 3 + seed % 2, "extra_bits": m, "signed": signed,
        "channel_dim": 1, "codebook": HuffmanCodebook.from_counts(torch.randint(0, 40, (2**m,), generator=gen)),
        "chunk_size": 5 + 7 * seed,
    }  # fmt: skip
    for book in (case["codebook"], None):
        c = {**case, "codebook": book}
        fast, ref = encode_values(x, **c), _encode_reference(x, **c)
        assert np.array_equal(fast.main, ref.main) and fast.error_bits == ref.error_bits
        assert np.array_equal(fast.error.astype(np.int64), ref.error.astype(np.int64))
        assert np.array_equal(fast.offsets, ref.offsets)
        out = decode_values(fast, tuple(x.shape), **c)
        assert torch.equal(out.view(torch.int32), _decode_reference(ref, tuple(x.shape), **c).view(torch.int32))
    fast = encode_values(x, **case)
    assert len(fast.offsets) > 2
    for i in range(1, len(fast.offsets)):  # a wrong offset is caught, in whichever thread's range it falls
        bad = type(fast)(fast.main, fast.error, fast.offsets + (np.arange(len(fast.offsets)) == i), fast.error_bits)
        with pytest.raises(ValueError, match="Corrupted"):
            decode_values(bad, tuple(x.shape), **case)
