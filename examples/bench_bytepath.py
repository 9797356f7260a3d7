"""Which tool for the byte path? The store step written four ways, timed side by side on ResNet-32 (not a test).

On the real inputs of every quantized layer of the pretrained ResNet-32 (default setting, one batch of CIFAR-10
test images), the time to turn all of them into main codes + Huffman-coded shifting errors:

* ``C++ kernels``: the package's path (``quantizer_to_bytes`` minus the header, ``lightning_dqa/codec/_bytepath.cpp``):
  one fused walk per layer, split over torch's threads;
* ``numpy/torch``: the reference path the package falls back to (torch ops for the codes, numpy bit packing and
  Huffman placement), many full-size passes;
* ``torch.compile``: the codes (quantize, shift, narrow to uint8) as one inductor kernel per layer, then the
  numpy packing and Huffman coding (inductor cannot express a bit writer);
* ``numba``: the C++ loop written with ``numba.njit`` (single thread), when numba is installed.

Every variant's bytes are checked against the package's. Each variant runs in turn, ``--repeats`` rounds; the
minimum is kept, with the FP32 forward of the same batch timed in the same rounds::

    python examples/bench_bytepath.py --batch 256 --repeats 5
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any
from unittest import mock

import numpy as np
import torch
from bench_overhead import SHARED, fp32_forward, interleaved, layer_inputs, load, quantize_model

import lightning_dqa.codec.bytepath as bytepath
from lightning_dqa.codec import HuffmanCodebook, encode, pack_codes
from lightning_dqa.core import functional as F
from lightning_dqa.core.config import DQAConfig
from lightning_dqa.deploy.layer_bytes import _scale_n

Layer = tuple[Any, torch.Tensor, torch.Tensor, HuffmanCodebook]  # quantizer, input, n-bit scales, code book


def codes_torch(
    x: torch.Tensor, inv: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, m: int, nmask: int, imp: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Main codes and errors of all channels, uint8 like ``x``; ``inv``, ``lo``, ``hi``, ``imp``: e.g. (1, C, 1, 1)."""
    q = torch.clamp(torch.round(x * inv), lo, hi).to(torch.int32)
    main = torch.where(imp, q >> m, q) & nmask  # the n-bit two's complement field, as packed
    return main.to(torch.uint8), (q & (2**m - 1)).to(torch.uint8)


def compiled_store(layers: list[Layer]) -> Callable[[], Any]:
    fn = torch.compile(codes_torch, dynamic=False)
    prepared = []
    for q, x, s, book in layers:
        (lo_n, hi_n), (lo_h, hi_h) = F.quant_range(q.n, bool(q.signed)), F.quant_range(q.n + q.m, bool(q.signed))
        view = (1, -1) + (1,) * (x.ndim - 2)  # channels on dim 1: (1, C, 1, 1) for a conv input, (1, C) for a linear
        inv = torch.where(q.important, 1.0 / (s / 2**q.m), 1.0 / s).view(view)
        lo = torch.where(q.important, float(lo_h), float(lo_n)).view(view)
        hi = torch.where(q.important, float(hi_h), float(hi_n)).view(view)
        imp = q.important.view(view)
        idx = torch.nonzero(q.important).flatten()
        prepared.append((x, inv, lo, hi, q, imp, idx, book))

    def run() -> list[Any]:
        out = []
        for x, inv, lo, hi, q, imp, idx, book in prepared:
            main, err = fn(x, inv, lo, hi, q.m, 2**q.n - 1, imp)
            out.append((pack_codes(main, q.n, False), encode(err.index_select(1, idx), book)))
        return out

    return run


def numba_store(layers: list[Layer]) -> Callable[[], Any] | None:
    try:
        import numba
    except ImportError:
        return None

    @numba.njit(cache=False, nogil=True)
    def kernel(x, inv_n, inv_hi, imp, n, m, lo_n, hi_n, lo_h, hi_h, codes, lens, main_out, err_out):  # compiled
        outer, channels, inner = x.shape
        acc, nacc, nb = np.uint64(0), 0, 0
        eacc, enacc, eb = np.uint64(0), 0, 0
        for o in range(outer):
            for c in range(channels):
                inv = inv_hi[c] if imp[c] else inv_n[c]
                hi = hi_h if imp[c] else hi_n
                lo = lo_h if imp[c] else lo_n
                for i in range(inner):
                    v = np.float32(np.round(np.float32(x[o, c, i] * inv)))
                    v = min(max(v, np.float32(lo)), np.float32(hi))
                    qv = np.int64(v)
                    mc = (qv >> m if imp[c] else qv) & (2**n - 1)
                    acc = (acc << np.uint64(n)) | np.uint64(mc)
                    nacc += n
                    if nacc >= 32:
                        nacc -= 32
                        w = (acc >> np.uint64(nacc)) & np.uint64(0xFFFFFFFF)
                        for b in range(4):
                            main_out[nb + b] = np.uint8((w >> np.uint64(24 - 8 * b)) & np.uint64(255))
                        nb += 4
                    if imp[c]:
                        e = qv & (2**m - 1)
                        eacc = (eacc << np.uint64(lens[e])) | np.uint64(codes[e])
                        enacc += lens[e]
                        if enacc >= 32:
                            enacc -= 32
                            w = (eacc >> np.uint64(enacc)) & np.uint64(0xFFFFFFFF)
                            for b in range(4):
                                err_out[eb + b] = np.uint8((w >> np.uint64(24 - 8 * b)) & np.uint64(255))
                            eb += 4
        return nb, nacc, eb, enacc

    prepared = []
    for q, x, s, book in layers:
        x3 = x.reshape(x.shape[0], x.shape[1], -1).numpy()
        inv_n, inv_hi = (1.0 / s).numpy(), (1.0 / (s / 2**q.m)).numpy()
        main = np.empty(x.numel() * q.n // 8 + 8, np.uint8)
        err = np.empty(x.numel() * book.max_len // 8 + 8, np.uint8)
        (lo_n, hi_n), (lo_h, hi_h) = F.quant_range(q.n, bool(q.signed)), F.quant_range(q.n + q.m, bool(q.signed))
        prepared.append((x3, inv_n, inv_hi, q.important.numpy(), q.n, q.m, float(lo_n), float(hi_n), float(lo_h),
                         float(hi_h), book.codes.astype(np.uint64),
                         book.lengths.astype(np.int64), main, err))  # fmt: skip

    def run() -> list[Any]:
        return [kernel(*p) for p in prepared]

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--data-root", default=str(SHARED / "data" / "cifar10"))
    parser.add_argument("--weights", default=str(SHARED / "weights" / "resnet32-d509ac18.th"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model, x, calib = load(args)
    quantize_model(model, DQAConfig(bits=args.bits), calib)
    raw = layer_inputs(model, x)
    layers = [(q, t, _scale_n(q, t), HuffmanCodebook.from_counts(q.error_counts)) for _n, q, t in raw]

    fp32 = fp32_forward(model, x)

    def package() -> list[Any]:
        return [
            bytepath.encode_values(t, s, q.important, q.n, q.m, bool(q.signed), 1, b, 4096) for q, t, s, b in layers
        ]

    def reference() -> list[Any]:
        with mock.patch.object(bytepath, "native_library", lambda: None):
            return package()

    fns: dict[str, Callable[[], Any]] = {"FP32 forward": fp32, "C++ kernels": package, "numpy/torch": reference}
    start = time.perf_counter()
    fns["torch.compile"] = compiled_store(layers)
    fns["torch.compile"]()  # compile every layer's shape now, not inside the timing
    compile_s = time.perf_counter() - start
    nb = numba_store(layers)
    if nb is not None:
        start = time.perf_counter()
        nb()
        compile_s_numba = time.perf_counter() - start
        fns["numba (1 thread)"] = nb
    want = package()
    got = fns["torch.compile"]()
    for w, (main, stream) in zip(want, got, strict=True):
        assert np.array_equal(w.main, main[0]) and np.array_equal(w.error, stream.payload), "torch.compile bytes differ"
    ms = interleaved(fns, args.repeats)
    values = sum(t.numel() for _q, t, _s, _b in layers)
    print(f"ResNet-32 batch {args.batch}, {args.bits}-bit DQA store of {values:,} values in {len(layers)} layers, "
          f"{torch.get_num_threads()} threads, minimum of {args.repeats} interleaved rounds")  # fmt: skip
    for name, t in ms.items():
        print(f"{name:<18}{t:9.1f} ms  {t / ms['FP32 forward']:6.2f}x FP32 forward  {1e6 * t / values:6.2f} ns/value")
    print(f"one-off compile: torch.compile {compile_s:.1f} s" + (f", numba {compile_s_numba:.1f} s" if nb else ""))


if __name__ == "__main__":
    main()
