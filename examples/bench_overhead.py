"""Runtime overhead of DQA on the pretrained ResNet-32, measured side by side in one run (not a test).

Prints, for one batch of real CIFAR-10 test images:

* the FP32 forward, and the forward with DQA fake quantization (default setting: static scales; paper
  setting: dynamic maxima), with their ratio (target <= 1.3x at batch 256);
* the package's byte path over all quantized layers (default setting, 3 and 4 bits): store
  (``quantizer_to_bytes``: quantize, shift, pack, entropy-code in one fused pass per layer) and restore
  (``bytes_to_values``: the reverse), per entropy coder (huffman, ans, zstd where installed) with the blob bits
  per value, each timed interleaved with the FP32 forward (minimum of the repeats; the ratio uses the FP32 time
  of the same round of runs);
* the same store and restore with the C++ kernels off (the numpy/torch path), side by side.

    python examples/bench_overhead.py --batch 256 --repeats 5 --out docs/results/overhead_resnet32.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from lightning_dqa.calibration.engine import calibrate
from lightning_dqa.codec.entropy import available_coders
from lightning_dqa.codec.native import native_status
from lightning_dqa.core.attach import prepare, quantizers_of, set_quantizers_enabled
from lightning_dqa.core.config import DQAConfig, paper_config
from lightning_dqa.demos.data import CIFAR10DataModule
from lightning_dqa.demos.models import build_model, load_pretrained
from lightning_dqa.deploy.layer_bytes import bytes_to_values, quantizer_to_bytes

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--store-bits", type=int, nargs="+", default=[3, 4], help="widths of the storage rows")
    parser.add_argument("--coders", nargs="+", default=["huffman", "ans", "zstd"], help="entropy coders to compare")
    parser.add_argument("--no-reference", action="store_true", help="skip the numpy/torch path rows (slow)")
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
    """The FP32 forward, then the forward with fake quantization in the default and the paper setting (interleaved)."""
    models = {"FP32 forward": model}
    for name, cfg in (
        ("DQA fake-quant forward, default (static scales)", DQAConfig(bits=args.bits)),
        ("DQA fake-quant forward, paper (dynamic maxima)", paper_config(args.bits, ranking="fisher")),
    ):
        models[name] = copy.deepcopy(model)
        quantize_model(models[name], cfg, calib)

    def forward(m: torch.nn.Module) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode():
                return m(x)

        return run

    ms = interleaved({name: forward(m) for name, m in models.items()}, args.repeats)
    return [{"step": name, "ms": t, "fp32_ms": ms["FP32 forward"]} for name, t in ms.items()]


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
    """The package's byte path over all quantized layers: store = ``quantizer_to_bytes``, restore = ``bytes_to_values``.

    Args:
        layers: ``(name, quantizer, input)`` triples from :func:`layer_inputs`.
        coder: entropy coder of the shifting errors.

    """

    def __init__(self, layers: list[tuple[str, Any, torch.Tensor]], coder: str = "huffman") -> None:
        self.layers, self.coder = layers, coder
        self.blobs = self.store()

    def store(self) -> list[bytes]:
        """Every layer's activation as a blob (quantize, shift, pack, entropy-code: one fused pass per layer)."""
        return [quantizer_to_bytes(q, t, coder=self.coder) for _n, q, t in self.layers]

    def restore(self) -> list[torch.Tensor]:
        """Every layer's fake-quantized values back from its blob (one fused pass per layer)."""
        return [bytes_to_values(q, b) for (_n, q, _t), b in zip(self.layers, self.blobs, strict=True)]

    def nbytes(self) -> int:
        """Total blob bytes."""
        return sum(len(b) for b in self.blobs)


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Minimum wall time in ms of each function, the functions run in turn ``repeats`` times (one warm-up each).

    Interleaving keeps a change of the machine's load from favouring one of them.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: 1e3 * min(v) for k, v in times.items()}


def fp32_forward(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """The model's forward on ``x`` with its quantizers off (the FP32 network), as a timing callable."""

    def run() -> None:
        set_quantizers_enabled(model, False)
        try:
            with torch.inference_mode():
                model(x)
        finally:
            set_quantizers_enabled(model, True)

    return run


def storage_rows(model: torch.nn.Module, x: torch.Tensor, calib: list[Any], args: argparse.Namespace) -> list[dict]:
    """Store and restore of every quantized activation, per width and coder, timed with the FP32 forward."""
    fp32 = fp32_forward(model, x)
    rows = []
    for bits in args.store_bits:
        quantize_model(model, DQAConfig(bits=bits), calib)
        layers = layer_inputs(model, x)
        values = sum(t.numel() for _n, _q, t in layers)
        fns: dict[str, Callable[[], Any]] = {"fp32": fp32}
        sizes = {}
        for coder in [c for c in args.coders if c in available_coders()]:
            path = StoragePath(layers, coder)
            fns[f"store {coder}"], fns[f"restore {coder}"] = path.store, path.restore
            sizes[coder] = path.nbytes()
        ms = interleaved(fns, args.repeats)
        for key, t in ms.items():
            if key == "fp32":
                continue
            action, coder = key.split()
            rows.append({"step": f"{bits}-bit DQA {action} ({coder})", "ms": t, "fp32_ms": ms["fp32"],
                         "bits_per_value": 8 * sizes[coder] / values, "values": values})  # fmt: skip
    return rows


def reference_rows(model: torch.nn.Module, x: torch.Tensor, calib: list[Any], args: argparse.Namespace) -> list[dict]:
    """The same store and restore with the C++ kernels switched off (the numpy/torch path), side by side."""
    import lightning_dqa.codec.bytepath as bytepath

    quantize_model(model, DQAConfig(bits=args.bits), calib)
    layers = layer_inputs(model, x)
    fast = StoragePath(layers)
    with mock.patch.object(bytepath, "native_library", lambda: None):
        slow = StoragePath(layers)
        assert slow.blobs == fast.blobs, "the numpy path must write the kernels' bytes"

    def with_reference(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with mock.patch.object(bytepath, "native_library", lambda: None):
                return fn()

        return run

    ms = interleaved(
        {"fp32": fp32_forward(model, x), "store C++": fast.store, "restore C++": fast.restore,
         "store numpy/torch": with_reference(slow.store), "restore numpy/torch": with_reference(slow.restore)},
        max(2, args.repeats // 2),
    )  # fmt: skip
    return [{"step": f"{args.bits}-bit DQA {k} (huffman)", "ms": v, "fp32_ms": ms["fp32"]}
            for k, v in ms.items() if k != "fp32"]  # fmt: skip


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Print the rows with their ratio to the FP32 forward; write them to ``--out`` if given."""
    fp32_ms = rows[0]["ms"]
    for row in rows:
        row["ratio"] = row["ms"] / row.get("fp32_ms", fp32_ms)
    width = max(len(r["step"]) for r in rows)
    print(f"ResNet-32, batch {args.batch}, {torch.get_num_threads()} threads; byte path: {native_status()}")
    for row in rows:
        bpv = f"  {row['bits_per_value']:6.3f} bits/value" if "bits_per_value" in row else ""
        print(f"{row['step']:<{width}}  {row['ms']:9.1f} ms  {row['ratio']:6.2f}x FP32 forward{bpv}")
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
    # the byte path, on the default setting's quantizers and the layers' real inputs for this batch
    rows += storage_rows(model, x, calib, args)
    if not args.no_reference:
        rows += reference_rows(model, x, calib, args)
    report(rows, args)


if __name__ == "__main__":
    main()
