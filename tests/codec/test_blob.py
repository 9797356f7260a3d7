"""Activation blobs: round trips (property-based and through calibrated quantizers) and rejected corruption."""

from __future__ import annotations

import ast
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import TinyNet, make_data

from lightning_dqa import DQAConfig, calibrate, prepare
from lightning_dqa.codec import HuffmanCodebook, decode_activation, encode_activation
from lightning_dqa.codec.blob import MAGIC, VERSION
from lightning_dqa.codec.layout import join_band, split_band
from lightning_dqa.core import functional as F
from lightning_dqa.core.quantizers import ActivationQuantizer
from lightning_dqa.deploy.layer_bytes import bytes_to_values, quantizer_to_bytes

FIXED = struct.Struct("<4sBBBBBBIIQQIBQ")  # the documented fixed header, written out again here on purpose
CODEC_DIR = Path(__file__).resolve().parents[2] / "lightning_dqa" / "codec"


@st.composite
def activations(draw: st.DrawFn) -> dict:
    """Random DQA codes of a random layout, with the keyword arguments of ``encode_activation``."""
    shape = draw(st.lists(st.integers(0, 5), min_size=1, max_size=4))
    channel_dim = draw(st.integers(-len(shape), len(shape) - 1))
    bits, m, signed = draw(st.integers(2, 16)), draw(st.integers(0, 5)), draw(st.booleans())
    channels = shape[channel_dim]
    important = torch.tensor(draw(st.lists(st.booleans(), min_size=channels, max_size=channels)), dtype=torch.bool)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    lo, hi = F.quant_range(bits, signed)
    main = torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int32)
    error_shape = list(shape)
    error_shape[channel_dim] = int(important.sum())
    skew = draw(st.integers(0, 2**m - 1))  # some symbol made frequent, so codes differ in length
    error = torch.randint(0, 2**m, error_shape, generator=gen, dtype=torch.int32)
    error[torch.rand(error_shape, generator=gen) < 0.5] = skew
    counts = torch.bincount(error.flatten().long(), minlength=2**m)
    scale = torch.rand(channels, generator=gen) if draw(st.booleans()) else None
    return {
        "main": main,
        "error": error,
        "bits": bits,
        "extra_bits": m,
        "signed": signed,
        "important": important,
        "codebook": HuffmanCodebook.from_counts(counts),
        "channel_dim": channel_dim,
        "scale": scale,
        "chunk_size": draw(st.integers(1, 40)),
    }


@settings(max_examples=150, deadline=None)
@given(activations())
def test_blob_round_trip(case: dict) -> None:
    blob = encode_activation(**case)
    main, error, header = decode_activation(blob, case["codebook"])
    assert main.dtype == error.dtype == torch.int32
    assert torch.equal(main, case["main"]) and torch.equal(error, case["error"])
    assert header.shape == tuple(case["main"].shape) and header.error_shape == tuple(case["error"].shape)
    assert header.channel_dim == case["channel_dim"] % case["main"].ndim
    assert (header.bits, header.extra_bits, header.signed) == (case["bits"], case["extra_bits"], case["signed"])
    assert torch.equal(header.important_mask(), case["important"])
    if case["scale"] is None:
        assert header.scale is None
    else:
        assert torch.equal(header.scale, case["scale"])
    assert encode_activation(**case) == blob  # deterministic


@settings(max_examples=150, deadline=None)
@given(activations(), st.data())
def test_a_blob_splits_into_a_shared_head_and_a_band_record_and_joins_back(case: dict, data: st.DataObject) -> None:
    """``join_band(*split_band(blob))`` is the blob byte for byte, along any axis, and a second band of the same
    tensor (same layout, other codes along the axis) shares the first one's head."""
    blob = encode_activation(**case)
    axis = data.draw(st.integers(0, case["main"].ndim - 1))
    head, record = split_band(blob, axis)
    assert join_band(head, record, axis) == blob
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    other = dict(case, main=case["main"][torch.randperm(case["main"].shape[axis], generator=gen)] if axis == 0 else
                 case["main"].flip(axis))  # fmt: skip
    second = encode_activation(**other)
    shared, rec = split_band(second, axis, head)
    assert shared == head and join_band(head, rec, axis) == second


def test_a_band_of_another_layout_does_not_share_the_head(small: dict) -> None:
    blob = encode_activation(**small)
    head, _ = split_band(blob, 0)
    flipped = dict(small, signed=not small["signed"], main=small["main"].clamp(min=0))
    with pytest.raises(ValueError, match="differs from the tensor's first band"):
        split_band(encode_activation(**flipped), 0, head)


@settings(max_examples=60, deadline=None)
@given(activations(), st.data())
def test_blob_bit_flips_and_truncations_raise(case: dict, data: st.DataObject) -> None:
    blob = encode_activation(**case)
    bad = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 3))):  # CRC-32 catches every error of up to 3 bits
        pos = data.draw(st.integers(0, 8 * len(blob) - 1))
        bad[pos // 8] ^= 0x80 >> (pos % 8)
    if bytes(bad) != blob:  # two flips of one bit cancel
        with pytest.raises(ValueError):
            decode_activation(bytes(bad), case["codebook"])
    cut = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(ValueError):
        decode_activation(blob[:cut], case["codebook"])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120), st.booleans())
def test_random_bytes_raise_value_error_only(data: bytes, with_magic: bool) -> None:
    book = HuffmanCodebook.from_counts([3, 1])
    blob = MAGIC + bytes([VERSION]) + data if with_magic else data
    with pytest.raises(ValueError):
        decode_activation(blob, book)
    if len(blob) > 4:  # with a valid checksum only the field checks stand between the bytes and the decoders
        with pytest.raises(ValueError):
            decode_activation(blob[:-4] + struct.pack("<I", zlib.crc32(blob[:-4])), book)


@pytest.fixture
def small() -> dict:
    """A (2, 3, 4, 5) activation, 3 bits, m = 2, channels 0 and 2 important, dynamic scales stored."""
    gen = torch.Generator().manual_seed(0)
    main = torch.randint(-4, 4, (2, 3, 4, 5), generator=gen, dtype=torch.int32)
    error = torch.randint(0, 4, (2, 2, 4, 5), generator=gen, dtype=torch.int32)
    error[error == 3] = 0  # skewed: a code book unlike the uniform one
    book = HuffmanCodebook.from_counts(torch.bincount(error.flatten().long(), minlength=4))
    important = torch.tensor([True, False, True])
    scale = torch.tensor([0.5, 1.0, 0.25])
    return {
        "main": main,
        "error": error,
        "bits": 3,
        "extra_bits": 2,
        "signed": True,
        "important": important,
        "codebook": book,
        "channel_dim": 1,
        "scale": scale,
        "chunk_size": 16,
    }


def test_golden_layout(small: dict) -> None:
    blob = encode_activation(**small)
    fields = FIXED.unpack_from(blob)
    main_bytes = (120 * 3 + 7) // 8
    assert fields[:9] == (MAGIC, VERSION, 1 | 2, 3, 2, 4, 1, 2, zlib.crc32(small["codebook"].to_bytes()))
    assert fields[9] == main_bytes and fields[11] == 16
    error_bits = int(small["codebook"].lengths[small["error"].flatten().numpy()].sum())
    assert fields[10] == error_bits
    assert fields[12:] == (0, (error_bits + 7) // 8)  # the Huffman coder, and the error section's bytes
    # shape, important indices, scales, 80 errors in chunks of 16 -> 4 stored offsets, payloads, checksum
    size = FIXED.size + 4 * 8 + 2 * 4 + 3 * 4 + 4 * 8 + main_bytes + (error_bits + 7) // 8 + 4
    assert len(blob) == size
    assert struct.unpack_from("<4Q", blob, FIXED.size) == (2, 3, 4, 5)
    assert struct.unpack_from("<I", blob, size - 4)[0] == zlib.crc32(blob[:-4])


def test_every_single_bit_flip_and_truncation_raises(small: dict) -> None:
    blob = encode_activation(**small)
    for pos in range(8 * len(blob)):
        bad = bytearray(blob)
        bad[pos // 8] ^= 0x80 >> (pos % 8)
        with pytest.raises(ValueError):
            decode_activation(bytes(bad), small["codebook"])
    for cut in range(len(blob)):
        with pytest.raises(ValueError, match="truncated"):
            decode_activation(blob[:cut], small["codebook"])
    with pytest.raises(ValueError, match="too long"):
        decode_activation(blob + b"\0", small["codebook"])


def resign(blob: bytes, offset: int, fmt: str, value: int) -> bytes:
    """Overwrite one field and recompute the checksum: a corruption only the field checks can catch."""
    out = bytearray(blob[:-4])
    struct.pack_into(fmt, out, offset, value)
    return bytes(out) + struct.pack("<I", zlib.crc32(out))


IMPORTANT_AT = FIXED.size + 4 * 8  # the first important index, after a 4-dimensional shape


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "match"),
    [
        (0, "<B", ord("X"), "Not a DQA activation blob"),
        (4, "<B", VERSION + 1, "Unsupported blob version"),
        (5, "<B", 4 | 1, "unknown flags"),
        (6, "<B", 1, "bits 1 outside"),
        (7, "<B", 17, "extra_bits 17"),
        (9, "<B", 4, "channel axis 4"),
        (10, "<I", 4, "4 important channels of 3"),
        (12, "<I", 0, "another code book"),
        (16, "<Q", 46, "need 45 bytes"),
        (24, "<Q", 0, "0 Huffman bits in"),
        (32, "<I", 0, "chunk size 0"),
        (38, "<B", 3, "unknown entropy coder id 3"),
        (39, "<Q", 1, "Huffman bits in 1 bytes"),
        (IMPORTANT_AT, "<I", 2, "must increase"),
        (IMPORTANT_AT + 4, "<I", 3, "below 3"),
    ],
)
def test_resigned_inconsistent_fields_raise(small: dict, offset: int, fmt: str, value: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        decode_activation(resign(encode_activation(**small), offset, fmt, value), small["codebook"])


def test_resigned_chunk_offset_raises(small: dict) -> None:
    blob = encode_activation(**small)
    at = IMPORTANT_AT + 2 * 4 + 3 * 4  # the second chunk's offset, after 2 indices and 3 scales
    with pytest.raises(ValueError, match=r"Corrupted.* stream"):
        decode_activation(resign(blob, at, "<Q", struct.unpack_from("<Q", blob, at)[0] + 1), small["codebook"])


def test_wrong_codebook_and_bad_input_raise(small: dict) -> None:
    blob = encode_activation(**small)
    with pytest.raises(ValueError, match="another code book"):
        decode_activation(blob, HuffmanCodebook.from_counts([1, 1, 1, 1]))
    with pytest.raises(ValueError, match="cannot decode"):
        decode_activation(blob, HuffmanCodebook.from_counts([1] * 8))
    with pytest.raises(TypeError, match="bytes"):
        decode_activation(np.frombuffer(blob, np.uint8), small["codebook"])  # type: ignore[arg-type]
    assert decode_activation(bytearray(blob), small["codebook"])[2].important == (0, 2)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"error": torch.zeros(2, 3, 4, 5, dtype=torch.int32)}, ValueError, r"error of shape \(2, 2, 4, 5\)"),
        ({"important": torch.tensor([1, 0, 1])}, ValueError, r"\(3,\) bool mask"),
        ({"important": torch.tensor([True, False])}, ValueError, r"\(3,\) bool mask"),
        ({"channel_dim": 4}, ValueError, r"channel_dim to be an int in \[-4, 3\]"),
        ({"bits": 1}, ValueError, r"bits to be an int in \[2, 16\]"),
        ({"extra_bits": 3}, ValueError, "code book of 2\\*\\*extra_bits = 8 symbols"),
        ({"extra_bits": 17}, ValueError, r"extra_bits to be an int in \[0, 16\]"),
        ({"bits": 2}, ValueError, r"signed 2-bit codes in \[-2, 1\]"),
        ({"error": torch.full((2, 2, 4, 5), 4, dtype=torch.int32)}, ValueError, r"symbols in \[0, 3\]"),
        ({"main": torch.zeros(2, 3, 4, 5)}, TypeError, "integer codes"),
        ({"main": np.zeros((2, 3, 4, 5), np.int32)}, TypeError, "tensors"),
        ({"scale": torch.ones(2)}, ValueError, r"scale to be a \(3,\) floating tensor"),
        ({"scale": torch.ones(3, dtype=torch.int32)}, ValueError, "floating"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
    ],
)
def test_encode_rejects_bad_input(small: dict, change: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        encode_activation(**{**small, **change})


# ------------------------------------------------------------------------------------------- quantizers
def calibrated_layers(cfg: DQAConfig) -> list[tuple[ActivationQuantizer, torch.Tensor]]:
    """The calibrated quantizers of a tiny network and their inputs on a fresh batch."""
    torch.manual_seed(0)
    model = TinyNet().eval()
    quantizers = prepare(model, cfg)
    x = make_data(32).tensors[0]
    calibrate(model, cfg, [(x, torch.zeros(32, dtype=torch.long))], forward_fn=lambda m, b: m(b[0]))
    inputs: dict[str, torch.Tensor] = {}
    hooks = [q.register_forward_hook(lambda _m, a, _o, n=n: inputs.__setitem__(n, a[0])) for n, q in quantizers.items()]
    model(make_data(16, seed=1).tensors[0])
    for h in hooks:
        h.remove()
    return [(q, inputs[n]) for n, q in quantizers.items() if not q.passthrough]


@pytest.mark.parametrize(
    "cfg",
    [
        DQAConfig(bits=3, ranking="energy"),
        DQAConfig(bits=4, extra_bits=4, ranking="energy", code="signed", clipping="percentile"),
        DQAConfig(bits=3, scale_mode="dynamic", clipping="none", ranking="energy"),
        DQAConfig(bits=5, scale_mode="learnable", ranking="energy"),
    ],
    ids=["static", "static-signed-clipped", "dynamic", "learnable"],
)
def test_quantizer_round_trip_is_exactly_the_fake_quantized_values(cfg: DQAConfig) -> None:
    layers = calibrated_layers(cfg)
    assert layers and any(bool(q.important.any()) for q, _ in layers)
    with torch.no_grad():
        for q, x in layers:
            assert bool(q.calibrated)
            blob = quantizer_to_bytes(q, x)
            out, expected = bytes_to_values(q, blob), q(x)
            assert out.dtype == expected.dtype and out.shape == expected.shape
            # Bit for bit, but for the sign of zeros: codes are integers, so -0.0 comes back as +0.0.
            assert torch.equal(out.view(torch.int32), (expected + 0.0).view(torch.int32))
            stored_scale = decode_activation(blob, HuffmanCodebook.from_counts(q.error_counts))[2].scale
            assert (stored_scale is not None) == (cfg.scale_mode == "dynamic")


def test_quantizer_round_trip_on_a_linear_layer() -> None:
    q = ActivationQuantizer(6, bits=3, extra_bits=2, scale_mode="static", channel_dim=-1, name="fc")
    x = torch.randn(10, 6)
    q.set_static_scale(F.scale_from_max(F.channel_absmax(x, -1), 3, True))
    q.important[[1, 4]] = True
    q.error_counts.copy_(torch.tensor([9, 3, 2, 1]))
    with torch.no_grad():
        assert torch.equal(bytes_to_values(q, quantizer_to_bytes(q, x)), q(x) + 0.0)


def test_quantizer_helpers_reject_mismatches() -> None:
    q = ActivationQuantizer(4, bits=3, extra_bits=2, scale_mode="static", name="conv")
    q.important[0] = True
    x = torch.randn(2, 4, 3, 3)
    blob = quantizer_to_bytes(q, x)
    with pytest.raises(ValueError, match="expected 4 channels"):
        quantizer_to_bytes(q, torch.randn(2, 5, 3, 3))
    other = ActivationQuantizer(4, bits=3, extra_bits=2, scale_mode="static", name="conv")
    other.important[1] = True
    with pytest.raises(ValueError, match="the blob holds"):
        bytes_to_values(other, blob)
    dynamic = ActivationQuantizer(4, bits=3, extra_bits=2, scale_mode="dynamic", name="conv")
    dynamic.important[0] = True
    with pytest.raises(ValueError, match="dynamic scales"):
        bytes_to_values(dynamic, blob)
    q.error_counts[0] = 10  # another histogram: another code book
    with pytest.raises(ValueError, match="another code book"):
        bytes_to_values(q, blob)
    with pytest.raises(ValueError, match="pass-through"):
        quantizer_to_bytes(ActivationQuantizer(4, bits=0), x)
    q.fp_mask = torch.zeros(4, dtype=torch.bool)
    with pytest.raises(ValueError, match="fp_mask"):
        quantizer_to_bytes(q, x)


STDLIB = ("__future__", "dataclasses", "functools", "heapq", "itertools", "math", "struct", "typing", "zlib")
NATIVE_LOADER = (  # native.py and _build.py
    "collections", "contextlib", "ctypes", "fcntl", "hashlib", "os", "pathlib", "platform", "shutil", "subprocess",
    "tempfile", "warnings",
)  # fmt: skip


def test_codec_imports_only_itself_core_numpy_and_torch() -> None:
    allowed = ("lightning_dqa.codec", "lightning_dqa.core", "numpy", "torch", *STDLIB, *NATIVE_LOADER)
    for path in CODEC_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                node.body = []  # typing-only imports never run
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "lightning_dqa":
                names = [f"lightning_dqa.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                assert any(name == a or name.startswith(f"{a}.") for a in allowed), f"{path.name} imports {name}"
