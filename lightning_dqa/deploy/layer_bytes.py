"""A quantizer layer's activation as bytes and back to its fake-quantized values.

:func:`quantizer_to_bytes` stores the DQA codes ``q.codes(x)`` of an
:class:`~lightning_dqa.core.quantizers.ActivationQuantizer` as a blob (the layout of :mod:`~lightning_dqa.codec.blob`);
:func:`bytes_to_values` reads it back, giving exactly the values ``q(x)`` computes without autograd (the
inference path). Both run the fused byte path of :mod:`~lightning_dqa.codec.bytepath`.

Example:
    >>> import torch
    >>> from lightning_dqa.core.quantizers import ActivationQuantizer
    >>> q = ActivationQuantizer(4, bits=3, extra_bits=2, scale_mode="dynamic")
    >>> q.important[1] = True
    >>> x = torch.randn(2, 4, 5, 5)  # (N, C, H, W)
    >>> with torch.no_grad():
    ...     torch.equal(bytes_to_values(q, quantizer_to_bytes(q, x)), q(x))
    True

"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from lightning_dqa.codec.blob import decode_errors
from lightning_dqa.codec.bytepath import ChannelTables, CodedActivation, channel_tables, decode_values, encode_values
from lightning_dqa.codec.entropy import DEFAULT_CODER, _huffman_book
from lightning_dqa.codec.huffman import DEFAULT_CHUNK_SIZE
from lightning_dqa.codec.layout import check_coder, error_coder, model_crc, read_parts, write_parts
from lightning_dqa.core import functional as F
from lightning_dqa.core._checks import is_int

if TYPE_CHECKING:
    from lightning_dqa.codec.codebook import HuffmanCodebook
    from lightning_dqa.core.quantizers import ActivationQuantizer

__all__ = ["bytes_to_values", "quantizer_to_bytes"]


def quantizer_to_bytes(
    q: ActivationQuantizer, x: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE, coder: str = DEFAULT_CODER
) -> bytes:
    """Store the DQA codes ``q.codes(x)`` of one activation as a blob (layout in :mod:`.blob`).

    The codes are made, packed and coded in one pass (:func:`.bytepath.encode_values`); the shifting errors
    are coded with the layer's model, built from its calibration histogram ``q.error_counts``; dynamic scales
    (computed from ``x``) are stored in the blob, frozen ones are not (they are constants of the model).

    Args:
        q: a quantizing layer (``bits > 0``) without an ``fp_mask``.
        x: the activation, e.g. ``(N, C, H, W)``, ``C = q.num_channels`` on ``q.channel_dim``.
        chunk_size: symbols per decoder chunk of a Huffman error stream.
        coder: entropy coder of the shifting errors: ``huffman`` (the paper's, default), ``zstd`` or ``ans``.

    Returns:
        The blob; :func:`bytes_to_values` turns it into ``q(x)``.

    Raises:
        ValueError: for a pass-through quantizer, one with an ``fp_mask`` (its output is
            not a function of DQA codes), an ``x`` with the wrong number of channels or NaN values, or an
            unknown ``coder``.
        ImportError: for ``zstd`` or ``ans`` without their package (``pip install 'lightning-dqa[entropy]'``).

    """
    _check_quantizer(q)
    if x.ndim == 0 or not -x.ndim <= q.channel_dim < x.ndim or x.shape[q.channel_dim] != q.num_channels:
        raise ValueError(
            f"Layer {q.name!r}: expected {q.num_channels} channels on dim {q.channel_dim}, "
            f"got a tensor of shape {tuple(x.shape)}"
        )
    layer = _layer_state(q)
    if coder != DEFAULT_CODER:
        check_coder(coder, layer.counts)
    if not is_int(chunk_size) or chunk_size < 1:
        raise ValueError(f"Expected chunk_size to be a positive int, got {chunk_size!r}")
    x = q.code_input(x.detach())
    scale_n = _scale_n(q, x) if layer.tables is None else layer.tables.scale
    coded = encode_values(
        x, scale_n, q.important, q.n, q.m, q._signed, q.channel_dim, layer.book if coder == "huffman" else None,
        chunk_size, layer.tables,
    )  # fmt: skip
    error, error_bits = coded.error, coded.error_bits
    if coder != "huffman":
        data = error_coder(coder).encode(coded.error, layer.counts)
        error, error_bits = np.frombuffer(data, np.uint8), error_coder(coder).bits(data)
    return write_parts(
        shape=tuple(x.shape), bits=q.n, extra_bits=q.m, signed=q._signed, channel_dim=q.channel_dim % x.ndim,
        important=layer.important, crc=model_crc(coder, layer.book, layer.counts),
        scale=scale_n if layer.tables is None else None, chunk_size=chunk_size, coder=coder, main=coded.main,
        error=error, offsets=coded.offsets, error_bits=error_bits,
    )  # fmt: skip


def bytes_to_values(q: ActivationQuantizer, blob: bytes | bytearray | memoryview) -> Tensor:
    """Values back from a blob of :func:`quantizer_to_bytes`: exactly ``q(x)`` without autograd (zeros unsigned).

    Unpacking, error decoding and dequantization run in one pass over all channels
    (:func:`.bytepath.decode_values`), whichever coder the blob's header names.

    Args:
        q: the quantizer that wrote the blob, in the same state (scales, important channels, histogram).
        blob: the bytes.

    Returns:
        float32 tensor of shape ``header.shape``, e.g. ``(N, C, H, W)``, on the device of ``q``.

    Raises:
        ValueError: for a corrupted blob (:func:`~.layout.read_parts`), a blob written for another layer
            configuration, or a dynamic-scale layer and a blob without scales.
        ImportError: for a ``zstd`` or ``ans`` blob without that coder's package.

    """
    _check_quantizer(q)
    layer = _layer_state(q)
    book = layer.book
    parts = read_parts(blob, book, layer.counts)
    header = parts.header
    got = (header.bits, header.extra_bits, header.signed, header.num_channels, header.important)
    want = (q.n, q.m, q._signed, q.num_channels, layer.important_tuple)
    if got != want or header.channel_dim != q.channel_dim % len(header.shape):
        raise ValueError(
            f"Layer {q.name!r}: the blob holds (bits, extra_bits, signed, channels, important) = {got} on dim "
            f"{header.channel_dim}, the layer has {want} on dim {q.channel_dim}"
        )
    tables = None
    if header.scale is not None:
        scale = header.scale
    elif layer.tables is None:
        raise ValueError(f"Layer {q.name!r} has dynamic scales, but the blob stores none")
    else:
        scale, tables = layer.tables.scale, layer.tables
    coded = CodedActivation(parts.main, parts.error, parts.offsets, header.error_bits)
    if header.coder != "huffman":
        errors = decode_errors(parts, book, layer.counts).numpy()
        coded = CodedActivation(parts.main, errors.astype(np.uint8) if q.m <= 8 else errors, parts.offsets, 0)
    out = decode_values(
        coded, header.shape, scale, q.important, q.n, q.m, header.signed, header.channel_dim,
        book if header.coder == "huffman" else None, header.chunk_size, q.important.device, tables,
    )  # fmt: skip
    return out


def _scale_n(q: ActivationQuantizer, x: Tensor | None) -> Tensor:
    """The ``(C,)`` float32 ``n``-bit scales the codes use, on the CPU, computed as ``q.codes`` computes them.

    A frozen scale ignores ``x``; a dynamic one needs it.
    """
    current = q.current_scale(x if x is not None else q.scale).detach()
    max_abs = current * 2.0 ** (q.n - int(q._signed))
    return F.scale_from_max(max_abs, q.n, q._signed).cpu()


def _check_quantizer(q: ActivationQuantizer) -> None:
    if q.passthrough:
        raise ValueError(f"Layer {q.name!r} is pass-through (bits=0): it stores float32 values, not DQA codes")
    if q.fp_mask is not None:
        raise ValueError(f"Layer {q.name!r} has an fp_mask: its output is not a function of its DQA codes")


@dataclass(frozen=True, eq=False)
class _LayerState:
    """What every blob of a layer shares, made once per state of the layer (not once per tensor).

    A batch-1 pass codes many small tensors, where deriving these at every call cost more than the kernels.
    """

    key: tuple[object, ...]
    counts: Tensor  # (2**m,) int64 error histogram, on the CPU
    book: HuffmanCodebook  # its code book, as the memory meter builds it
    important: np.ndarray  # (k,) int64 important channel indices, increasing
    important_tuple: tuple[int, ...]
    tables: ChannelTables | None  # the frozen scales' kernel tables; None for dynamic scales


_LAYER_STATES: weakref.WeakKeyDictionary[ActivationQuantizer, _LayerState] = weakref.WeakKeyDictionary()


def _version(t: Tensor) -> tuple[int, int, int] | None:
    """What changes when a buffer is replaced or written in place: identity, storage and version counter.

    ``None`` for an inference tensor (made or written under ``torch.inference_mode``, as in ``Trainer.validate``):
    it has no version counter, so an in-place write could not be told.
    """
    if t.is_inference():
        return None
    return id(t), t.data_ptr(), t._version


def _layer_state(q: ActivationQuantizer) -> _LayerState:
    """The layer's :class:`_LayerState`, remade when its widths, signedness, scales, channels or histogram change.

    Kept between calls only while every buffer it derives from has a version counter (else made at each call).
    """
    versions = (_version(q.scale), _version(q.important), _version(q.error_counts))
    key = (q.n, q.m, q._signed, q.scale_mode, q.channel_dim, q.num_channels, *versions)
    state = _LAYER_STATES.get(q)
    if state is not None and state.key == key and None not in versions:
        return state
    counts = q.error_counts.detach().cpu()
    important = torch.nonzero(q.important.detach().cpu()).flatten().numpy()
    tables = None if q.scale_mode == "dynamic" else channel_tables(_scale_n(q, None), q.important, q.m)
    book = _huffman_book(counts.numpy().astype(np.int64).tobytes())  # one book per histogram
    state = _LayerState(key, counts, book, important, tuple(important.tolist()), tables)
    if None not in versions:
        _LAYER_STATES[q] = state
    else:
        _LAYER_STATES.pop(q, None)
    return state

