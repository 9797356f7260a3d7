"""Interchangeable coders for the shifting-error stream, with exact sizes: Huffman (the default), zstd and ANS.

Every coder turns a stream of symbols in ``[0, len(counts) - 1]`` into bytes and back, given the calibration
histogram ``counts`` (a quantizer's ``error_counts``) that both sides know:

* ``huffman``: the paper's code and the package's default: the canonical Huffman code book built from the
  counts (:meth:`~lightning_dqa.codec.codebook.HuffmanCodebook.from_counts`), coded by
  :func:`~lightning_dqa.codec.huffman.encode` and :func:`~lightning_dqa.codec.decode.decode`. The bytes
  are a 12-byte header (payload bits, chunk size), the decoder's chunk offsets and the payload.
* ``zstd``: Zstandard level 1 on the symbols as bytes (uint8; uint16 for alphabets over 256 symbols). It
  ignores the counts: it models the stream itself, repeats included. Needs ``zstandard``.
* ``ans``: constriction's range-variant asymmetric numeral systems coder (``AnsCoder``) with a categorical
  model of the counts, each floored at 1 as the Huffman book does. Needs ``constriction``.

Install the optional two with ``pip install 'lightning-dqa[entropy]'``. :func:`get_coder` returns a coder
by name; :func:`available_coders` lists the ones importable here. Coders cache what they build from a
histogram (code book, model), so coding many tensors of one layer builds it once.

:attr:`ErrorCoder.bits` is the exact payload size: the Huffman bit count (what the memory meter counts),
ANS's valid bits (its last 32-bit word without leading zeros and the final state's marker bit), and the
zstd frame's bytes times 8. ``8 * len(data)`` adds what each container needs on top (Huffman: header,
chunk index and padding; ANS: padding to whole words).

Example:
    >>> import numpy as np
    >>> coder = get_coder("huffman")
    >>> counts = np.array([90, 6, 3, 1])
    >>> data = coder.encode(np.array([0, 0, 1, 3, 0]), counts)
    >>> coder.bits(data)  # 1 + 1 + 2 + 3 + 1
    8
    >>> coder.decode(data, counts, 5).tolist()
    [0, 0, 1, 3, 0]

"""

from __future__ import annotations

import struct
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
from torch import Tensor

from lightning_dqa.codec.codebook import MAX_SYMBOLS, HuffmanCodebook
from lightning_dqa.codec.decode import decode as huffman_decode
from lightning_dqa.codec.huffman import DEFAULT_CHUNK_SIZE, EncodedStream, _as_symbols
from lightning_dqa.codec.huffman import encode as huffman_encode
from lightning_dqa.core._checks import is_int

__all__ = [
    "CODERS",
    "DEFAULT_CODER",
    "AnsCoder",
    "ErrorCoder",
    "HuffmanCoder",
    "ZstdCoder",
    "available_coders",
    "get_coder",
]

DEFAULT_CODER = "huffman"
"""The paper's code, and the one the rest of the package uses."""
EXTRA = "entropy"
"""The optional-dependency group that installs the coders beyond Huffman."""

_HUFFMAN_HEADER = struct.Struct("<QI")  # payload bits, chunk size
_ZSTD_LEVEL = 1
_CACHE = 256  # histograms whose code book or model a coder keeps (ResNet-32 has 31 quantized layers)


def _as_counts(counts: np.ndarray | Tensor | list[int]) -> np.ndarray:
    """``counts`` as a checked 1-D int64 array of 1 to ``2**16`` non-negative entries."""
    c = counts.detach().cpu().numpy() if isinstance(counts, Tensor) else np.asarray(counts)
    if c.ndim != 1 or not 1 <= c.shape[0] <= MAX_SYMBOLS:
        raise ValueError(f"Expected counts to be a 1-D array of 1 to {MAX_SYMBOLS} entries, got shape {c.shape}")
    if c.dtype.kind not in "iu":
        raise TypeError(f"Expected integer counts, got dtype {c.dtype}")
    if c.min() < 0:
        raise ValueError(f"Expected non-negative counts, got a minimum of {c.min()}")
    return c.astype(np.int64)


def _check_count(n: int) -> None:
    if not is_int(n, numpy=True) or n < 0:
        raise ValueError(f"Expected the symbol count n to be a non-negative int, got {n!r}")


def _check_decoded(out: np.ndarray, num_symbols: int, n: int, name: str) -> np.ndarray:
    """``out`` as int32 after checking it holds ``n`` symbols of the alphabet (else the data was corrupted)."""
    if out.shape[0] != n:
        raise ValueError(f"Corrupted {name} data: it holds {out.shape[0]} symbols, expected {n}")
    if n and int(out.max()) >= num_symbols:
        raise ValueError(f"Corrupted {name} data: symbol {int(out.max())} outside [0, {num_symbols - 1}]")
    return out.astype(np.int32, copy=False)


class ErrorCoder:
    """A lossless coder of shifting-error symbols, given the calibration histogram of the stream (a base class).

    Attributes:
        name: the name :func:`get_coder` knows it by.
        package: the pip package it needs beyond the package's own dependencies, or ``None``.

    """

    name: ClassVar[str]
    package: ClassVar[str | None] = None

    def encode(self, symbols: np.ndarray | Tensor, counts: np.ndarray | Tensor | list[int]) -> bytes:
        """Code a stream of symbols.

        Args:
            symbols: integer symbols in ``[0, len(counts) - 1]``, any shape (coded in flattened, row-major order).
            counts: ``(N,)`` non-negative integer histogram the model is built from, ``1 <= N <= 2**16``.

        Returns:
            The coded bytes.

        Raises:
            ValueError: for bad counts or a symbol outside the alphabet.
            TypeError: for symbols or counts that are not integers.

        """
        raise NotImplementedError

    def decode(self, data: bytes, counts: np.ndarray | Tensor | list[int], n: int) -> np.ndarray:
        """Symbols back from :meth:`encode`'s bytes.

        Args:
            data: the bytes.
            counts: the histogram given to :meth:`encode`.
            n: the number of symbols coded (a decoder knows it from the tensor's shape).

        Returns:
            ``(n,)`` int32 array of symbols.

        Raises:
            ValueError: for bad counts or ``n``, or data that does not decode to ``n`` symbols of the alphabet.

        """
        raise NotImplementedError

    def bits(self, data: bytes) -> int:
        """Exact payload size of :meth:`encode`'s bytes, in bits (the module docstring says what counts).

        Args:
            data: the bytes.

        Returns:
            The payload bits, at most ``8 * len(data)``.

        Raises:
            ValueError: for data too short to be this coder's.

        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# ---------------------------------------------------------------------------------------------- Huffman
@lru_cache(maxsize=_CACHE)
def _huffman_book(key: bytes) -> HuffmanCodebook:
    return HuffmanCodebook.from_counts(np.frombuffer(key, dtype=np.int64))


class HuffmanCoder(ErrorCoder):
    """The paper's canonical Huffman code of the counts (the default; see the module docstring).

    Args:
        chunk_size: symbols per decoder chunk (:func:`~lightning_dqa.codec.huffman.encode`).

    Raises:
        ValueError: for a ``chunk_size`` below 1.

    """

    name = "huffman"

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if not is_int(chunk_size) or chunk_size < 1:
            raise ValueError(f"Expected chunk_size to be a positive int, got {chunk_size!r}")
        self.chunk_size = chunk_size

    def encode(self, symbols: np.ndarray | Tensor, counts: np.ndarray | Tensor | list[int]) -> bytes:  # noqa: D102
        stream = huffman_encode(symbols, _huffman_book(_as_counts(counts).tobytes()), self.chunk_size)
        offsets = stream.offsets[1:].astype(_offset_dtype(stream.bit_count))
        header = _HUFFMAN_HEADER.pack(stream.bit_count, self.chunk_size)
        return b"".join((header, offsets.tobytes(), stream.payload.tobytes()))

    def decode(self, data: bytes, counts: np.ndarray | Tensor | list[int], n: int) -> np.ndarray:  # noqa: D102
        _check_count(n)
        book = _huffman_book(_as_counts(counts).tobytes())
        bit_count = self.bits(data)
        chunk_size = _HUFFMAN_HEADER.unpack_from(data)[1]
        if chunk_size < 1:
            raise ValueError("Corrupted huffman data: chunk size 0")
        dtype = _offset_dtype(bit_count)
        chunks = -(-n // chunk_size)
        start = _HUFFMAN_HEADER.size + max(chunks - 1, 0) * dtype.itemsize
        if len(data) != start + (bit_count + 7) // 8:
            raise ValueError(f"Corrupted huffman data: {len(data)} bytes for {n} symbols and {bit_count} bits")
        offsets = np.zeros(chunks, dtype=np.int64)
        offsets[1:] = np.frombuffer(data, dtype=dtype, count=max(chunks - 1, 0), offset=_HUFFMAN_HEADER.size)
        payload = np.frombuffer(data, dtype=np.uint8, offset=start)
        out = huffman_decode(EncodedStream(payload, bit_count, int(n), chunk_size, offsets), book)
        return out.numpy()

    def bits(self, data: bytes) -> int:  # noqa: D102
        if len(data) < _HUFFMAN_HEADER.size:
            raise ValueError(f"Corrupted huffman data: {len(data)} bytes, shorter than its header")
        return int(_HUFFMAN_HEADER.unpack_from(data)[0])

    def __repr__(self) -> str:
        return f"HuffmanCoder(chunk_size={self.chunk_size})"


def _offset_dtype(bit_count: int) -> np.dtype:
    """Chunk offsets are stored as little-endian uint32 when every one fits, else uint64."""
    return np.dtype("<u4") if bit_count < 2**32 else np.dtype("<u8")


# ---------------------------------------------------------------------------------------------- optional coders
def _import(package: str, coder: str) -> Any:
    """Import an optional package, or raise an ``ImportError`` naming the extra that installs it.

    A lazy ``__import__``: the codec's modules import only the standard library, numpy and torch at import time.
    """
    try:
        return __import__(package)
    except ImportError as err:
        raise ImportError(
            f"The {coder!r} error coder needs the {package!r} package: pip install 'lightning-dqa[{EXTRA}]' "
            f"(or pip install {package})"
        ) from err


class ZstdCoder(ErrorCoder):
    """Zstandard level 1 on the symbols as bytes; the counts only fix the alphabet (see the module docstring).

    Raises:
        ImportError: without the ``zstandard`` package.

    """

    name = "zstd"
    package = "zstandard"

    def __init__(self) -> None:
        zstd = _import(self.package, self.name)
        self._error = zstd.ZstdError
        self._compressor = zstd.ZstdCompressor(level=_ZSTD_LEVEL)
        self._decompressor = zstd.ZstdDecompressor()

    def encode(self, symbols: np.ndarray | Tensor, counts: np.ndarray | Tensor | list[int]) -> bytes:  # noqa: D102
        num_symbols = _as_counts(counts).shape[0]
        s = _as_symbols(symbols, num_symbols)
        return self._compressor.compress(np.ascontiguousarray(s, dtype=_byte_dtype(num_symbols)).tobytes())

    def decode(self, data: bytes, counts: np.ndarray | Tensor | list[int], n: int) -> np.ndarray:  # noqa: D102
        _check_count(n)
        num_symbols = _as_counts(counts).shape[0]
        dtype = _byte_dtype(num_symbols)
        try:
            raw = self._decompressor.decompress(data, max_output_size=n * dtype.itemsize)
        except self._error as err:
            raise ValueError(f"Corrupted zstd data: {err}") from err
        if len(raw) != n * dtype.itemsize:
            raise ValueError(f"Corrupted zstd data: {len(raw)} bytes, expected {n * dtype.itemsize}")
        return _check_decoded(np.frombuffer(raw, dtype=dtype), num_symbols, n, self.name)

    def bits(self, data: bytes) -> int:  # noqa: D102
        return 8 * len(data)


def _byte_dtype(num_symbols: int) -> np.dtype:
    """Symbols go to zstd as uint8 when the alphabet fits, else as little-endian uint16."""
    return np.dtype(np.uint8) if num_symbols <= 256 else np.dtype("<u2")


class AnsCoder(ErrorCoder):
    """constriction's ANS coder with a categorical model of the counts, floored at 1 (see the module docstring).

    The symbol count is not stored: decoding more symbols than were coded is not detected (the empty coder
    keeps yielding symbols); fewer leave words over, which raises.

    Raises:
        ImportError: without the ``constriction`` package.

    """

    name = "ans"
    package = "constriction"

    def __init__(self) -> None:
        constriction = _import(self.package, self.name)
        self._stack = constriction.stream.stack
        self._categorical = constriction.stream.model.Categorical
        self._model = lru_cache(maxsize=_CACHE)(self._build_model)

    def _build_model(self, key: bytes) -> Any:
        weights = np.maximum(np.frombuffer(key, dtype=np.int64), 1).astype(np.float64)
        return self._categorical(weights, perfect=False)

    def encode(self, symbols: np.ndarray | Tensor, counts: np.ndarray | Tensor | list[int]) -> bytes:  # noqa: D102
        c = _as_counts(counts)
        s = _as_symbols(symbols, c.shape[0])
        if c.shape[0] == 1 or s.shape[0] == 0:  # nothing to code: a single symbol carries no information
            return b""
        coder = self._stack.AnsCoder()
        coder.encode_reverse(np.ascontiguousarray(s, dtype=np.int32), self._model(c.tobytes()))
        return coder.get_compressed().astype("<u4", copy=False).tobytes()

    def decode(self, data: bytes, counts: np.ndarray | Tensor | list[int], n: int) -> np.ndarray:  # noqa: D102
        _check_count(n)
        c = _as_counts(counts)
        if c.shape[0] == 1 or n == 0:
            if data:
                raise ValueError(f"Corrupted ans data: {len(data)} bytes for nothing to decode")
            return np.zeros(n, dtype=np.int32)
        if len(data) % 4:
            raise ValueError(f"Corrupted ans data: {len(data)} bytes, not a whole number of 32-bit words")
        try:
            coder = self._stack.AnsCoder(np.frombuffer(data, dtype="<u4").astype(np.uint32, copy=False))
            out = coder.decode(self._model(c.tobytes()), int(n))
        except (ValueError, KeyError, RuntimeError) as err:
            raise ValueError(f"Corrupted ans data: {err}") from err
        if not coder.is_empty():
            raise ValueError("Corrupted ans data: words left over after decoding every symbol")
        return _check_decoded(np.asarray(out), c.shape[0], n, self.name)

    def bits(self, data: bytes) -> int:  # noqa: D102
        if len(data) % 4:
            raise ValueError(f"Corrupted ans data: {len(data)} bytes, not a whole number of 32-bit words")
        if not data:
            return 0
        top = int.from_bytes(data[-4:], "little")
        return 8 * (len(data) - 4) + max(top.bit_length() - 1, 0)


# ---------------------------------------------------------------------------------------------- registry
CODERS: dict[str, type[ErrorCoder]] = {c.name: c for c in (HuffmanCoder, ZstdCoder, AnsCoder)}
"""Every coder by name, importable or not."""


def available_coders() -> list[str]:
    """Names of the coders whose packages are installed here, the default first.

    Returns:
        A subset of ``list(CODERS)``, in its order.

    """
    return [n for n, c in CODERS.items() if c.package is None or _importable(c.package)]


def _importable(package: str) -> bool:
    try:
        __import__(package)
    except ImportError:
        return False
    return True


def get_coder(name: str = DEFAULT_CODER) -> ErrorCoder:
    """A coder by name.

    Args:
        name: ``"huffman"`` (the default), ``"zstd"`` or ``"ans"``.

    Returns:
        The coder, with its default settings.

    Raises:
        ValueError: for an unknown name.
        ImportError: when the coder's package is not installed (the message names the extra to install).

    """
    if name not in CODERS:
        raise ValueError(f"Unknown error coder {name!r}; expected one of {sorted(CODERS)}")
    return CODERS[name]()
