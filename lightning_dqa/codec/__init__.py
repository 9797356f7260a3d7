"""Lossless storage of DQA codes: Huffman code books and coding, n-bit packing, and self-describing blobs.

The modules follow the data flow: ``codebook`` (code book from counts), ``huffman`` (encode, exact bit
counts), ``decode`` (the decoders), ``bitpack`` (n-bit main codes), ``blob`` (one activation's codes as bytes
and back), ``layout`` (the blob's sections), ``entropy`` (the other coders of the shifting errors) and
``bytepath`` with ``native`` (the fused encode/decode and its C++ kernel). Layer 1 of the package: bytes only,
importing nothing above ``core``. A quantizer's tensor to a blob and back
(:func:`~lightning_dqa.deploy.layer_bytes.quantizer_to_bytes`) lives in ``deploy``, the layer that knows both.
"""

from lightning_dqa.codec.bitpack import MAX_PACK_BITS, MIN_PACK_BITS, pack_codes, packed_size, unpack_codes
from lightning_dqa.codec.blob import BlobHeader, decode_activation, encode_activation
from lightning_dqa.codec.codebook import MAX_CODE_LENGTH, MAX_SYMBOLS, HuffmanCodebook, huffman_lengths_reference
from lightning_dqa.codec.decode import decode
from lightning_dqa.codec.huffman import DEFAULT_CHUNK_SIZE, EncodedStream, bit_count, encode, symbol_counts

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAX_CODE_LENGTH",
    "MAX_PACK_BITS",
    "MAX_SYMBOLS",
    "MIN_PACK_BITS",
    "BlobHeader",
    "EncodedStream",
    "HuffmanCodebook",
    "bit_count",
    "decode",
    "decode_activation",
    "encode",
    "encode_activation",
    "huffman_lengths_reference",
    "pack_codes",
    "packed_size",
    "symbol_counts",
    "unpack_codes",
]


_MOVED = dict.fromkeys(("quantizer_to_bytes", "bytes_to_values"), "lightning_dqa.deploy.layer_bytes")


def __getattr__(name: str) -> object:
    if name in _MOVED:  # codec holds bytes only; it cannot import the layer above it to forward the name
        raise AttributeError(f"lightning_dqa.codec.{name} moved to {_MOVED[name]}.{name} in lightning_dqa 0.2")
    raise AttributeError(f"module 'lightning_dqa.codec' has no attribute {name!r}")
