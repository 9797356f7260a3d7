"""Lossless storage of DQA codes: Huffman code books and coding, n-bit packing, and self-describing blobs.

The modules follow the data flow: ``codebook`` (code book from counts), ``huffman`` (encode, exact bit
counts), ``decode`` (the decoders), ``bitpack`` (n-bit main codes), ``blob`` (one activation's codes as bytes
and back) and ``layer`` (the same for a quantizer layer and a tensor, down to its fake-quantized values).
Nothing here imports Lightning, torchmetrics or torchvision; only ``layer`` imports the package's
``functional``.
"""

from lightning_dqa.codec.bitpack import MAX_PACK_BITS, MIN_PACK_BITS, pack_codes, packed_size, unpack_codes
from lightning_dqa.codec.blob import BlobHeader, decode_activation, encode_activation
from lightning_dqa.codec.codebook import MAX_CODE_LENGTH, MAX_SYMBOLS, HuffmanCodebook, huffman_lengths_reference
from lightning_dqa.codec.decode import decode
from lightning_dqa.codec.huffman import DEFAULT_CHUNK_SIZE, EncodedStream, bit_count, encode, symbol_counts
from lightning_dqa.codec.layer import bytes_to_values, quantizer_to_bytes

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
    "bytes_to_values",
    "decode",
    "decode_activation",
    "encode",
    "encode_activation",
    "huffman_lengths_reference",
    "pack_codes",
    "packed_size",
    "quantizer_to_bytes",
    "symbol_counts",
    "unpack_codes",
]
