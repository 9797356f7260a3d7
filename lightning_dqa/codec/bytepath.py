"""The fused byte path: a float activation to its blob sections in one pass, and the sections back to values.

:func:`encode_values` quantizes, shifts, bit-packs the main codes and Huffman-codes the shifting errors in
one walk over the activation; :func:`decode_values` unpacks, decodes the errors and dequantizes in one walk,
all channels of the layer at once. Both run the C++ kernels of :mod:`.native` when they are available (float32
tensors, ``n + m <= 24``), and otherwise the reference numpy/torch path (:func:`functional.dqa_quantize`,
:func:`.bitpack.pack_codes`, :func:`.huffman.encode` and their inverses), which gives the same bytes and the
same values; ``tests/codec/test_bytepath.py`` checks that.

Tensors on an accelerator (CUDA, ...) take the kernels too: :func:`encode_values` copies the activation to the
host once (:func:`_to_host`) and codes it there; :func:`decode_values` decodes on the host and copies the values
to the requested device once (:func:`_to_device`). The bytes are the CPU tensor's.

Why C++ through ctypes won (``python examples/bench_bytepath.py`` measures the four candidates side by side on
ResNet-32's real activations): plain torch ops need one full-size pass per step (scale, round, clamp, cast,
shift, mask, gather of the important channels, bit packing by groups, Huffman table look-ups), about ten
passes over memory; ``torch.compile`` fuses the elementwise quantize-and-shift into one kernel but cannot
express the bit writer or the Huffman decoder (sequential, data-dependent positions), so those stay numpy
passes; numba compiles the same single loop as C++ but is a new dependency with a compile cost at every
process start. The C++ file needs only the compiler, keeps exactly IEEE float arithmetic (no fast-math, no
fused multiply-add) and writes each output byte once.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lightning_dqa.codec.bitpack import pack_codes, packed_size, unpack_codes
from lightning_dqa.codec.codebook import HuffmanCodebook
from lightning_dqa.codec.decode import decode
from lightning_dqa.codec.huffman import EncodedStream, encode
from lightning_dqa.codec.native import native_library
from lightning_dqa.core import functional as F

__all__ = ["ChannelTables", "CodedActivation", "channel_tables", "decode_values", "encode_values"]

_MIN_PARALLEL = 1 << 18  # values below which starting threads costs more than it saves
_MAX_NATIVE_BITS = 24  # n + m: codes stay exact in float32 and fit the kernels' 32-bit bit writer


@dataclass(frozen=True, eq=False)
class CodedActivation:
    """One activation's coded sections (what :func:`~.layout.write_parts` assembles).

    Attributes:
        main: uint8 packed ``n``-bit main codes of every value, row-major.
        error: uint8 Huffman payload of the important channels' shifting errors, or (no code book) the raw
            integer error symbols, row-major, for another entropy coder.
        offsets: int64 starting bit of every Huffman chunk (empty for raw symbols).
        error_bits: exact Huffman payload bits (0 for raw symbols).

    """

    main: np.ndarray
    error: np.ndarray
    offsets: np.ndarray
    error_bits: int


@dataclass(frozen=True, eq=False)
class ChannelTables:
    """A layer's per-channel tables as the kernels read them: ``(C,)`` contiguous CPU tensors.

    A layer with frozen scales makes them once (:func:`channel_tables`) and hands them to every
    :func:`encode_values` and :func:`decode_values` call, which otherwise derive them from ``scale_n`` and
    ``important`` at each call (a batch-1 pass codes many small tensors, so that per-call work counts).

    Attributes:
        scale: float32 ``n``-bit scales.
        scale_hi: ``scale / 2**m``, the important channels' step.
        inv_n: ``1 / scale`` (what :func:`functional.quantize` multiplies by).
        inv_hi: ``1 / scale_hi``.
        important: uint8 mask of the important channels.
        num_important: how many channels are important.

    """

    scale: Tensor
    scale_hi: Tensor
    inv_n: Tensor
    inv_hi: Tensor
    important: Tensor
    num_important: int


def channel_tables(scale_n: Tensor, important: Tensor, extra_bits: int) -> ChannelTables:
    """The :class:`ChannelTables` of ``(C,)`` ``n``-bit scales and a ``(C,)`` bool mask, on the CPU."""
    scale = scale_n.detach().cpu().contiguous()
    scale_hi = (scale / 2**extra_bits).contiguous()  # as `functional.dqa_dequantize` divides it
    imp = important.detach().cpu().to(torch.uint8).contiguous()
    return ChannelTables(
        scale, scale_hi, (1.0 / scale).contiguous(), (1.0 / scale_hi).contiguous(), imp, int(imp.sum())
    )


def _ptr(a: np.ndarray | Tensor) -> int:
    return a.data_ptr() if isinstance(a, Tensor) else a.ctypes.data


def _threads(numel: int) -> int:
    """Threads for one tensor: torch's intra-op count (the user's setting), one for small tensors."""
    return torch.get_num_threads() if numel >= _MIN_PARALLEL else 1


def _layout(shape: tuple[int, ...], channel_dim: int) -> tuple[int, int, int]:
    """``(outer, C, inner)``: the row-major tensor seen with its channel axis in the middle."""
    cd = channel_dim % len(shape)
    return math.prod(shape[:cd]), shape[cd], math.prod(shape[cd + 1 :])


def _to_host(x: Tensor) -> Tensor:
    """A device tensor's values on the CPU, contiguous, in one device-to-host copy (made contiguous on the device)."""
    return x.detach().contiguous().cpu()


def _to_device(out: Tensor, device: torch.device | str | None) -> Tensor:
    """The decoded CPU values on ``device`` (one host-to-device copy; none for the CPU or ``None``)."""
    return out if device is None else out.to(device)


def _native_ok(x: Tensor, scale_n: Tensor, bits: int, extra_bits: int) -> bool:
    """Whether the kernels can code ``x``: float32 on any device (a device tensor is copied to the host first)."""
    return (
        x.dtype == torch.float32
        and scale_n.dtype == torch.float32
        and bits + extra_bits <= _MAX_NATIVE_BITS
        and native_library() is not None
    )


@torch.no_grad()
def encode_values(
    x: Tensor,
    scale_n: Tensor,
    important: Tensor,
    bits: int,
    extra_bits: int,
    signed: bool,
    channel_dim: int,
    codebook: HuffmanCodebook | None,
    chunk_size: int,
    tables: ChannelTables | None = None,
) -> CodedActivation:
    """DQA codes of ``x`` as coded sections, in one pass: main codes packed, errors Huffman-coded (or raw).

    Args:
        x: the activation, e.g. ``(N, C, H, W)``, on any device (a device tensor is coded from one host copy).
        scale_n: ``(C,)`` ``n``-bit scales (:func:`functional.scale_from_max`).
        important: ``(C,)`` bool mask of the channels kept at ``n + m`` bits.
        bits: ``n``.
        extra_bits: ``m``.
        signed: signed or unsigned codes.
        channel_dim: the channel axis of ``x``.
        codebook: the errors' Huffman code book, or ``None`` for raw error symbols (another coder codes them).
        chunk_size: symbols per Huffman decoder chunk.
        tables: ``channel_tables(scale_n, important, extra_bits)`` made beforehand, or ``None`` to make them.

    Returns:
        The :class:`CodedActivation`, byte for byte what the numpy path gives.

    Raises:
        ValueError: for NaN values (no code represents them).

    """
    lib = native_library()
    if not _native_ok(x, scale_n, bits, extra_bits) or lib is None or (codebook is None and extra_bits > 8):
        return _encode_reference(x, scale_n, important, bits, extra_bits, signed, channel_dim, codebook, chunk_size)
    x = x.detach().contiguous() if x.device.type == "cpu" else _to_host(x)
    outer, channels, inner = _layout(tuple(x.shape), channel_dim)
    t = channel_tables(scale_n, important, extra_bits) if tables is None else tables
    n_err = outer * t.num_important * inner
    main, error, offsets = _buffers(x.numel(), bits, n_err, codebook, chunk_size)
    err_bits = ctypes.c_int64(0)
    status = lib.dqa_encode(
        _ptr(x), outer, channels, inner, _ptr(t.inv_n), _ptr(t.inv_hi), _ptr(t.important), bits, extra_bits,
        int(signed),
        *((None, None) if codebook is None else codebook._kernel_ptrs[:2]), chunk_size, _ptr(main),
        _ptr(error), _ptr(offsets), ctypes.addressof(err_bits), _threads(x.numel()),
    )  # fmt: skip
    if status != 0:
        raise ValueError(
            "Expected activations without NaN, got NaN values: no code represents them (check the inputs; "
            "DQACallback's check_finite names the layers they reach)"
        )
    if codebook is None:
        return CodedActivation(main, error, offsets, 0)
    return CodedActivation(main, error[: (err_bits.value + 7) // 8], offsets, err_bits.value)


def _buffers(
    numel: int, bits: int, n_err: int, codebook: HuffmanCodebook | None, chunk_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Output buffers of the encoder: main, error, offsets."""
    main = np.empty(packed_size(numel, bits), dtype=np.uint8)
    if codebook is None:
        return main, np.empty(n_err, np.uint8), np.zeros(0, np.int64)
    error = np.empty(-(-n_err * codebook.max_len // 8) + 8, dtype=np.uint8)  # the longest codes, and slack
    offsets = np.empty(-(-n_err // chunk_size), dtype=np.int64)
    return main, error, offsets


def _encode_reference(
    x: Tensor,
    scale_n: Tensor,
    important: Tensor,
    bits: int,
    extra_bits: int,
    signed: bool,
    channel_dim: int,
    codebook: HuffmanCodebook | None,
    chunk_size: int,
) -> CodedActivation:
    """The numpy/torch path of :func:`encode_values` (the reference the kernels are tested against)."""
    max_abs = scale_n * 2.0 ** (bits - int(signed))  # what `ActivationQuantizer.codes` passes
    main, error, _ = F.dqa_quantize(x.detach(), max_abs, bits, extra_bits, important, signed, channel_dim)
    payload, _ = pack_codes(main, bits, signed)
    if codebook is None:
        return CodedActivation(payload, error.flatten().numpy(), np.zeros(0, np.int64), 0)
    stream = encode(error, codebook, chunk_size)
    return CodedActivation(payload, stream.payload, stream.offsets, stream.bit_count)


@torch.no_grad()
def decode_values(
    coded: CodedActivation,
    shape: tuple[int, ...],
    scale_n: Tensor,
    important: Tensor,
    bits: int,
    extra_bits: int,
    signed: bool,
    channel_dim: int,
    codebook: HuffmanCodebook | None,
    chunk_size: int,
    device: torch.device | str | None = None,
    tables: ChannelTables | None = None,
) -> Tensor:
    """Values back from coded sections in one pass: ``scale_n * q`` or ``scale_n / 2**m * ((q << m) | e)``.

    Args:
        coded: the sections; ``error`` holds a Huffman payload with ``codebook``, raw symbols without.
        shape: the activation's shape, e.g. ``(N, C, H, W)``.
        scale_n: ``(C,)`` float32 ``n``-bit scales.
        important: ``(C,)`` bool mask.
        bits: ``n``.
        extra_bits: ``m``.
        signed: whether the codes are signed.
        channel_dim: the channel axis.
        codebook: the errors' code book, or ``None`` for raw symbols.
        chunk_size: symbols per Huffman chunk.
        device: where the values go (decoded on the CPU, then copied there once); ``None``: the CPU.
        tables: ``channel_tables(scale_n, important, extra_bits)`` made beforehand, or ``None`` to make them.

    Returns:
        float32 tensor of ``shape`` on ``device``, equal to :func:`functional.dqa_dequantize` of the codes.

    Raises:
        ValueError: for a corrupted Huffman stream (a chunk that does not start at its offset, a bit string
            that starts no code, codes that do not end at the payload's end, non-zero padding).

    """
    lib = native_library()
    raw_ok = codebook is not None or coded.error.dtype == np.uint8
    if lib is None or scale_n.dtype != torch.float32 or bits + extra_bits > _MAX_NATIVE_BITS or not raw_ok:
        args = (scale_n, important, bits, extra_bits, signed, channel_dim, codebook, chunk_size)
        return _to_device(_decode_reference(coded, shape, *args), device)
    if coded.main.shape[0] != packed_size(math.prod(shape), bits):
        raise ValueError(f"Payload truncated or too long: {coded.main.shape[0]} bytes of main codes for {shape}")
    _check_padding(coded.main, math.prod(shape) * bits)
    outer, channels, inner = _layout(shape, channel_dim)
    t = channel_tables(scale_n, important, extra_bits) if tables is None else tables
    out = torch.empty(shape, dtype=torch.float32)
    err = np.ascontiguousarray(coded.error)
    books: tuple[int | None, int | None, int] = (None, None, 0)
    if codebook is not None:
        _check_padding(err, coded.error_bits)
        books = (*codebook._kernel_ptrs[2:], codebook.max_len)
    status = lib.dqa_decode(
        _ptr(coded.main), coded.main.shape[0], _ptr(err), err.shape[0], coded.error_bits, _ptr(coded.offsets),
        chunk_size, *books, outer, channels, inner, _ptr(t.scale), _ptr(t.scale_hi), _ptr(t.important), bits,
        extra_bits, int(signed), _ptr(out), _threads(out.numel()),
    )  # fmt: skip
    if status:
        raise ValueError(f"Corrupted stream: {_DECODE_ERRORS[status]}")
    return _to_device(out, device)


_DECODE_ERRORS = {
    1: "a chunk of the error stream does not start at its recorded offset",
    2: "a bit string starts no code of this code book",
    3: "the codes do not end where the payload ends",
}


def _decode_reference(
    coded: CodedActivation,
    shape: tuple[int, ...],
    scale_n: Tensor,
    important: Tensor,
    bits: int,
    extra_bits: int,
    signed: bool,
    channel_dim: int,
    codebook: HuffmanCodebook | None,
    chunk_size: int,
) -> Tensor:
    """The numpy/torch path of :func:`decode_values`: unpack, decode the errors, dequantize."""
    main = unpack_codes(coded.main, bits, signed, math.prod(shape)).reshape(shape)
    error_shape = list(shape)
    error_shape[channel_dim % len(shape)] = int(important.sum())
    if codebook is None:
        error = torch.from_numpy(np.asarray(coded.error, dtype=np.int32))
    else:
        n = math.prod(error_shape)
        error = decode(EncodedStream(coded.error, coded.error_bits, n, chunk_size, coded.offsets), codebook)
    error = error.reshape(error_shape)
    return F.dqa_dequantize(main, error, scale_n.detach().cpu(), extra_bits, important.cpu(), channel_dim)


def _check_padding(payload: np.ndarray, bit_count: int) -> None:
    if payload.shape[0] and bit_count % 8 and int(payload[-1]) & ((1 << (8 - bit_count % 8)) - 1):
        raise ValueError("Corrupted stream: the payload's padding bits are not zero")
