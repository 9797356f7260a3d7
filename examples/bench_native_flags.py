"""Portable vs ``-march=native`` builds of the byte path's kernel, timed side by side on ResNet-32 (not a test).

The package builds ``_bytepath.cpp`` with portable flags (``lightning_dqa/codec/_build.py``: ``-O3``, x86-64
baseline, no fast-math, no FP contraction) so that a wheel or a shared environment runs on any CPU; on x86-64
Linux its two walks also get an AVX2 clone picked at load time (``target_clones``). This script compiles the same
source three times into a temporary folder: as shipped, the baseline alone (``-DDQA_NO_MULTIVERSION``: what a CPU
without AVX2 runs) and with ``-march=native -mtune=native`` added; it times them on the real inputs of every
quantized layer of the pretrained ResNet-32 (default setting, one batch of CIFAR-10 test images): store
(``quantizer_to_bytes``) and restore (``bytes_to_values``), interleaved rounds, minimum kept. The blobs and
restored values of the three builds are checked to be identical first::

    python examples/bench_native_flags.py --batch 256 --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from bench_overhead import SHARED, StoragePath, interleaved, layer_inputs, load, quantize_model

import lightning_dqa.codec.bytepath as bytepath
from lightning_dqa.codec._build import compile_library, find_compiler, portable_flags
from lightning_dqa.codec.native import NativeKernels, bind
from lightning_dqa.core.config import DQAConfig

NATIVE_EXTRA = ["-march=native", "-mtune=native"]
VARIANTS = {"shipped": [], "baseline only": ["-DDQA_NO_MULTIVERSION"], "-march=native": NATIVE_EXTRA}


@contextmanager
def using(lib: NativeKernels) -> Iterator[None]:
    """The byte path runs ``lib`` inside the block."""
    with mock.patch.object(bytepath, "native_library", lambda: lib):
        yield


def timed(path: StoragePath, lib: NativeKernels, step: str) -> Callable[[], Any]:
    def run() -> Any:
        with using(lib):
            return path.store() if step == "store" else path.restore()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the kernel splits over them)")
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--data-root", default=str(SHARED / "data" / "cifar10"))
    parser.add_argument("--weights", default=str(SHARED / "weights" / "resnet32-d509ac18.th"))
    args = parser.parse_args()
    compiler, why = find_compiler()
    if compiler is None:
        raise SystemExit(f"Expected a C++ compiler to build the two variants, got none: {why}")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model, x, calib = load(args)
    quantize_model(model, DQAConfig(bits=args.bits), calib)
    with tempfile.TemporaryDirectory() as tmp:
        libs: dict[str, NativeKernels] = {}
        for i, (name, extra) in enumerate(VARIANTS.items()):
            compile_library(Path(tmp) / f"variant{i}.so", compiler, extra)
            libs[name] = bind(Path(tmp) / f"variant{i}.so")
        with using(libs["shipped"]):
            layers = layer_inputs(model, x)
            path = StoragePath(layers)
            values = path.restore()
        for name, lib in libs.items():
            with using(lib):
                other = StoragePath(layers)
                same_bytes = other.blobs == path.blobs
                same_values = all(torch.equal(a, b) for a, b in zip(values, other.restore(), strict=True))
            if not (same_bytes and same_values):
                raise SystemExit(f"{name} differs from shipped: same blobs {same_bytes}, same values {same_values}")
        fns = {f"{step} {name}": timed(path, lib, step) for step in ("store", "restore") for name, lib in libs.items()}
        ms = interleaved(fns, args.repeats)
    n = sum(t.numel() for _n, _q, t in layers)
    print(f"ResNet-32 batch {args.batch}, {args.bits}-bit DQA, {n:,} values in {len(layers)} layers, {args.threads} "
          f"thread(s), minimum of {args.repeats} interleaved rounds; {compiler}")  # fmt: skip
    print(f"portable flags: {' '.join(portable_flags())}; variants add {VARIANTS}")
    print("blobs and restored values identical between the builds: yes")
    for step in ("store", "restore"):
        nat = ms[f"{step} -march=native"]
        times = {name: ms[f"{step} {name}"] for name in libs}
        cells = "   ".join(f"{name} {t:7.1f} ms ({t / nat:5.3f}x)" for name, t in times.items())
        print(f"{step:<8} {cells}   (x: time / -march=native time)")


if __name__ == "__main__":
    main()
