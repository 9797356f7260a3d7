"""Runtime overhead of DQA on the pretrained ResNet-32, measured side by side in one run (not a test).

Prints, for one batch of real CIFAR-10 test images:

* the FP32 forward, and the forward with DQA fake quantization (default setting: static scales; paper
  setting: dynamic maxima), with their ratio (target <= 1.3x at batch 256);
* the real storage path summed over all quantized layers: quantize (codes at n and n+m bits), shift
  (split into main code and shifting error), encode (bit-pack main codes + Huffman-code the errors),
  decode (the reverse), dequantize, each against the FP32 forward.

    python examples/bench_overhead.py --batch 256 --repeats 5 --out docs/results/overhead_resnet32.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lightning_dqa import functional as F
from lightning_dqa.attach import quantizers_of
from lightning_dqa.bitpack import pack_codes, unpack_codes
from lightning_dqa.config import DQAConfig, paper_config
from lightning_dqa.demos.data import CIFAR10DataModule
from lightning_dqa.demos.models import build_model, load_pretrained
from lightning_dqa.engine import calibrate, prepare, set_quantizers_enabled
from lightning_dqa.huffman import HuffmanCodebook, decode, encode

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    """Minimum wall time of ``fn`` over ``repeats`` runs after one warm-up, in seconds."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calib-samples", type=int, default=1000)
    parser.add_argument("--data-root", default=str(SHARED / "data" / "cifar10"))
    parser.add_argument("--weights", default=str(SHARED / "weights" / "resnet32-d509ac18.th"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    dm = CIFAR10DataModule(root=args.data_root, eval_batch_size=args.batch, limit_test=args.batch)
    dm.setup("test")
    x, _ = next(iter(dm.test_dataloader()))
    calib = list(dm.calibration_dataloader(args.calib_samples, 0, batch_size=250))
    model = build_model("resnet32")
    load_pretrained(model, args.weights)
    model.eval()

    def loss_fn(m: torch.nn.Module, b: Any) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(m(b[0]), b[1])

    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        fp32 = best_of(lambda: model(x), args.repeats)
    rows.append({"step": "FP32 forward", "ms": 1e3 * fp32})
    for name, cfg in (
        ("DQA fake-quant forward, default (static scales)", DQAConfig(bits=args.bits)),
        ("DQA fake-quant forward, paper (dynamic maxima)", paper_config(args.bits, ranking="fisher")),
    ):
        prepare(model, cfg)
        calibrate(model, cfg, calib, forward_fn=lambda m, b: m(b[0]), loss_fn=loss_fn)
        with torch.inference_mode():
            rows.append({"step": name, "ms": 1e3 * best_of(lambda: model(x), args.repeats)})

    # the storage path, on the default setting's quantizers and the layers' real inputs for this batch
    cfg = DQAConfig(bits=args.bits)
    prepare(model, cfg)
    calibrate(model, cfg, calib, forward_fn=lambda m, b: m(b[0]), loss_fn=loss_fn)
    quantizers = quantizers_of(model)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [q.register_forward_hook(lambda mod, a, o, n=n: inputs.__setitem__(n, a[0])) for n, q in quantizers.items()]
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    set_quantizers_enabled(model, True)
    layers = [(n, q, inputs[n]) for n, q in quantizers.items() if not q.passthrough]
    books = {n: HuffmanCodebook.from_counts(q.error_counts) for n, q, _ in layers}

    def quantize() -> list[Any]:
        out = []
        for _n, q, t in layers:
            scale = q.current_scale(t)
            idx = torch.nonzero(q.important).flatten()
            low = F.quantize(t, scale, q.n, bool(q.signed), q.channel_dim)
            high = F.quantize(
                t.index_select(q.channel_dim, idx), scale[idx] / 2**q.m, q.n + q.m, bool(q.signed), q.channel_dim
            )
            out.append((low, high, idx, scale))
        return out

    codes = quantize()

    def shift() -> list[Any]:
        out = []
        for (_n, q, _t), (low, high, idx, scale) in zip(layers, codes, strict=True):
            main_imp, err = F.shift_split(high, q.m)
            out.append((low.index_copy(q.channel_dim, idx, main_imp), err, idx, scale))
        return out

    shifted = shift()

    def enc() -> list[Any]:
        out = []
        for (n, q, _t), (main, err, _idx, _s) in zip(layers, shifted, strict=True):
            out.append((pack_codes(main, q.n, bool(q.signed)), encode(err.flatten(), books[n])))
        return out

    encoded = enc()

    def dec() -> list[Any]:
        out = []
        for (n, q, _t), (main, _e, _i, _s), ((payload, _bits), stream) in zip(layers, shifted, encoded, strict=True):
            out.append((unpack_codes(payload, q.n, bool(q.signed), main.numel()), decode(stream, books[n])))
        return out

    def dequantize() -> None:
        for (_n, q, _t), (main, err, _idx, scale) in zip(layers, shifted, strict=True):
            F.dqa_dequantize(main, err, scale, q.m, q.important, q.channel_dim)

    for name, fn in (
        ("quantize (n and n+m bit codes)", quantize),
        ("shift (main code, shifting error)", shift),
        ("encode (bit-pack + Huffman)", enc),
        ("decode (unpack + Huffman)", dec),
        ("dequantize", dequantize),
    ):
        rows.append({"step": name, "ms": 1e3 * best_of(fn, args.repeats)})
    for row in rows:
        row["ratio"] = row["ms"] / (1e3 * fp32)
    width = max(len(r["step"]) for r in rows)
    print(f"ResNet-32, batch {args.batch}, {args.bits}-bit DQA, {torch.get_num_threads()} threads")
    for row in rows:
        print(f"{row['step']:<{width}}  {row['ms']:9.1f} ms  {row['ratio']:6.2f}x FP32 forward")
    result = {
        "rows": rows,
        "batch": args.batch,
        "bits": args.bits,
        "command": "python examples/bench_overhead.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
