"""Throughput and coded size of the shifting-error codec (and of n-bit main-code packing) on one CPU thread.

Two symbol streams of ``m``-bit shifting errors:

* ``skewed``: real DQA shifting errors of a post-ReLU activation (``relu(randn)``, per-channel maxima,
  ``n + m``-bit codes split by ``functional.dqa_quantize``): every zero activation gives error 0, so symbol 0
  dominates;
* ``uniform``: errors drawn uniformly from ``[0, 2**m - 1]`` (incompressible).

For each, the code book is built from the stream's own histogram; encode and decode are timed (best of
``--repeats``, both wall time and process CPU time, which differ when other jobs share the core) and the
round trip is checked.

Usage::

    python examples/bench_codec.py                    # 10 M symbols, m = 3
    python examples/bench_codec.py --symbols 1000000 --m 4 --chunk-size 2048
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from lightning_dqa.codec import (
    DEFAULT_CHUNK_SIZE,
    HuffmanCodebook,
    decode,
    encode,
    pack_codes,
    symbol_counts,
    unpack_codes,
)
from lightning_dqa.core import functional as F


def best_time(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """Smallest wall time and smallest process CPU time of ``repeats`` calls, and the last result.

    On a shared machine the wall time includes waiting for the core; the CPU time of this single-threaded
    process is what one core spends on the work.
    """
    wall, cpu, out = float("inf"), float("inf"), None
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = min(wall, time.perf_counter() - w0), min(cpu, time.process_time() - c0)
    return wall, cpu, out


def skewed_errors(count: int, bits: int, extra_bits: int, seed: int) -> torch.Tensor:
    """Shifting errors of a post-ReLU activation quantized by DQA, every channel important."""
    gen = torch.Generator().manual_seed(seed)
    channels, side = 64, 32
    samples = -(-count // (channels * side * side))
    x = torch.relu(torch.randn(samples, channels, side, side, generator=gen))  # (N, C, H, W)
    important = torch.ones(channels, dtype=torch.bool)
    _, error, _ = F.dqa_quantize(x, F.channel_absmax(x), bits, extra_bits, important, signed=True)
    return error.flatten()[:count].contiguous()


def entropy_bits(counts: np.ndarray) -> float:
    """Empirical entropy in bits per symbol."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def bench_stream(name: str, symbols: torch.Tensor, m: int, chunk_size: int, repeats: int) -> dict[str, Any]:
    counts = symbol_counts(symbols, 2**m)
    book = HuffmanCodebook.from_counts(counts)
    w_enc, c_enc, stream = best_time(lambda: encode(symbols, book, chunk_size), repeats)
    w_dec, c_dec, out = best_time(lambda: decode(stream, book), repeats)
    if not torch.equal(out, symbols):
        raise RuntimeError(f"{name}: the round trip changed the symbols")
    n = symbols.numel()
    return {
        "stream": name,
        "m": m,
        "symbols": n,
        "p(0)": float(counts[0] / n),
        "entropy b/sym": entropy_bits(counts),
        "payload b/sym": stream.bit_count / n,
        "+index b/sym": stream.total_bits / n,
        "payload / m": stream.bit_count / n / m,
        "book bits": book.size_bits,
        "max len": book.max_len,
        "enc M/s wall": n / w_enc / 1e6,
        "enc M/s cpu": n / c_enc / 1e6,
        "dec M/s wall": n / w_dec / 1e6,
        "dec M/s cpu": n / c_dec / 1e6,
    }


def bench_pack(bits: int, count: int, repeats: int, seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (count,), generator=gen, dtype=torch.int32)
    w_pack, c_pack, (payload, nbits) = best_time(lambda: pack_codes(codes, bits, signed=True), repeats)
    w_unpack, c_unpack, out = best_time(lambda: unpack_codes(payload, bits, True, count), repeats)
    if not torch.equal(out, codes):
        raise RuntimeError(f"{bits}-bit packing: the round trip changed the codes")
    return {
        "main codes": f"{bits}-bit signed",
        "codes": count,
        "bits/code": nbits / count,
        "pack M/s wall": count / w_pack / 1e6,
        "pack M/s cpu": count / c_pack / 1e6,
        "unpack M/s wall": count / w_unpack / 1e6,
        "unpack M/s cpu": count / c_unpack / 1e6,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    """Print rows of equal keys as a right-aligned text table."""

    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) and v < 10 else f"{v:.1f}" if isinstance(v, float) else str(v)

    cells = [list(rows[0])] + [[fmt(v) for v in r.values()] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    for k, line in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--symbols", type=int, default=10_000_000, help="symbols per stream")
    parser.add_argument("--m", type=int, default=3, help="extra bits m: errors in [0, 2**m - 1] (1..14)")
    parser.add_argument("--bits", type=int, default=3, help="n, for the skewed errors and the main-code packing")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="symbols per decoder chunk")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (best is reported)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    streams = {
        "skewed": skewed_errors(args.symbols, args.bits, args.m, args.seed),
        "uniform": torch.randint(0, 2**args.m, (args.symbols,), generator=torch.Generator().manual_seed(args.seed)),
    }
    streams["uniform"] = streams["uniform"].to(torch.int32)
    print(f"Huffman codec, 1 thread, chunk size {args.chunk_size}, best of {args.repeats} (wall and process CPU time)")
    print_table([bench_stream(k, v, args.m, args.chunk_size, args.repeats) for k, v in streams.items()])
    print()
    print(f"Main-code packing, 1 thread, best of {args.repeats}")
    print_table([bench_pack(args.bits, args.symbols, args.repeats, args.seed)])


if __name__ == "__main__":
    main()
