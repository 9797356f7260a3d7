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
from lightning_dqa.codec import HuffmanCodebook, decode, encode, pack_codes, unpack_codes
from lightning_dqa.config import DQAConfig, paper_config
from lightning_dqa.demos.data import CIFAR10DataModule
from lightning_dqa.demos.models import build_model, load_pretrained
from lightning_dqa.engine import calibrate, prepare, set_quantizers_enabled

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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calib-samples", type=int, default=1000)
    parser.add_argument("--data-root", default=str(SHARED / "data" / "cifar10"))
    parser.add_argument("--weights", default=str(SHARED / "weights" / "resnet32-d509ac18.th"))
    parser.add_argument("--out", default=None)
    return parser.parse_args()


def load(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor, list[Any]]:
    """The pretrained ResNet-32 in eval mode, one test batch ``(batch, 3, 32, 32)`` and the calibration batches."""
    dm = CIFAR10DataModule(root=args.data_root, eval_batch_size=args.batch, limit_test=args.batch)
    dm.setup("test")
    x, _ = next(iter(dm.test_dataloader()))
    calib = list(dm.calibration_dataloader(args.calib_samples, 0, batch_size=250))
    model = build_model("resnet32")
    load_pretrained(model, args.weights)
    return model.eval(), x, calib


def _loss_fn(m: torch.nn.Module, b: Any) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(m(b[0]), b[1])


def quantize_model(model: torch.nn.Module, cfg: DQAConfig, calib: list[Any]) -> None:
    prepare(model, cfg)
    calibrate(model, cfg, calib, forward_fn=lambda m, b: m(b[0]), loss_fn=_loss_fn)


def forward_rows(model: torch.nn.Module, x: torch.Tensor, calib: list[Any], args: argparse.Namespace) -> list[dict]:
    """The FP32 forward, then the forward with fake quantization in the default and the paper setting."""
    with torch.inference_mode():
        rows = [{"step": "FP32 forward", "ms": 1e3 * best_of(lambda: model(x), args.repeats)}]
    for name, cfg in (
        ("DQA fake-quant forward, default (static scales)", DQAConfig(bits=args.bits)),
        ("DQA fake-quant forward, paper (dynamic maxima)", paper_config(args.bits, ranking="fisher")),
    ):
        quantize_model(model, cfg, calib)
        with torch.inference_mode():
            rows.append({"step": name, "ms": 1e3 * best_of(lambda: model(x), args.repeats)})
    return rows


def layer_inputs(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[str, Any, torch.Tensor]]:
    """``(name, quantizer, its real input for x)`` of every quantized (not passthrough) layer."""
    quantizers = quantizers_of(model)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [q.register_forward_hook(lambda mod, a, o, n=n: inputs.__setitem__(n, a[0])) for n, q in quantizers.items()]
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    set_quantizers_enabled(model, True)
    return [(n, q, inputs[n]) for n, q in quantizers.items() if not q.passthrough]


class StoragePath:
    """The real storage path over all quantized layers; each step's output is computed once as the next one's input.

    Args:
        layers: ``(name, quantizer, input)`` triples from :func:`layer_inputs`.

    """

    def __init__(self, layers: list[tuple[str, Any, torch.Tensor]]) -> None:
        self.layers = layers
        self.books = {n: HuffmanCodebook.from_counts(q.error_counts) for n, q, _ in layers}
        self.codes = self.quantize()
        self.shifted = self.shift()
        self.encoded = self.encode()

    def quantize(self) -> list[Any]:
        """Per layer: ``(n-bit codes, (n+m)-bit codes of the important channels, their indices, scale)``."""
        out = []
        for _n, q, t in self.layers:
            scale = q.current_scale(t)
            idx = torch.nonzero(q.important).flatten()
            low = F.quantize(t, scale, q.n, bool(q.signed), q.channel_dim)
            high = F.quantize(
                t.index_select(q.channel_dim, idx), scale[idx] / 2**q.m, q.n + q.m, bool(q.signed), q.channel_dim
            )
            out.append((low, high, idx, scale))
        return out

    def shift(self) -> list[Any]:
        """Per layer: ``(main codes, shifting errors, important indices, scale)``."""
        out = []
        for (_n, q, _t), (low, high, idx, scale) in zip(self.layers, self.codes, strict=True):
            main_imp, err = F.shift_split(high, q.m)
            out.append((low.index_copy(q.channel_dim, idx, main_imp), err, idx, scale))
        return out

    def encode(self) -> list[Any]:
        """Per layer: ``(bit-packed main codes, Huffman stream of the errors)``."""
        out = []
        for (n, q, _t), (main, err, _idx, _s) in zip(self.layers, self.shifted, strict=True):
            out.append((pack_codes(main, q.n, bool(q.signed)), encode(err.flatten(), self.books[n])))
        return out

    def decode(self) -> list[Any]:
        """Per layer: ``(unpacked main codes, decoded errors)``."""
        out = []
        steps = zip(self.layers, self.shifted, self.encoded, strict=True)
        for (n, q, _t), (main, _e, _i, _s), ((payload, _bits), stream) in steps:
            out.append((unpack_codes(payload, q.n, bool(q.signed), main.numel()), decode(stream, self.books[n])))
        return out

    def dequantize(self) -> None:
        """Dequantize every layer (results dropped: only the cost is wanted)."""
        for (_n, q, _t), (main, err, _idx, scale) in zip(self.layers, self.shifted, strict=True):
            F.dqa_dequantize(main, err, scale, q.m, q.important, q.channel_dim)

    def steps(self) -> list[tuple[str, Callable[[], Any]]]:
        """``(row name, step)`` pairs in the order of the storage path."""
        return [
            ("quantize (n and n+m bit codes)", self.quantize),
            ("shift (main code, shifting error)", self.shift),
            ("encode (bit-pack + Huffman)", self.encode),
            ("decode (unpack + Huffman)", self.decode),
            ("dequantize", self.dequantize),
        ]


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Print the rows with their ratio to the FP32 forward (the first row); write them to ``--out`` if given."""
    fp32_ms = rows[0]["ms"]
    for row in rows:
        row["ratio"] = row["ms"] / fp32_ms
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


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    model, x, calib = load(args)
    rows = forward_rows(model, x, calib, args)
    # the storage path, on the default setting's quantizers and the layers' real inputs for this batch
    quantize_model(model, DQAConfig(bits=args.bits), calib)
    path = StoragePath(layer_inputs(model, x))
    rows += [{"step": name, "ms": 1e3 * best_of(fn, args.repeats)} for name, fn in path.steps()]
    report(rows, args)


if __name__ == "__main__":
    main()
