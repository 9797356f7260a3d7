"""Measured peak activation memory per image: FP32, uniform 8-bit, direct n-bit and DQA n-bit (n = 3, 4, 5).

Each network is calibrated with the default setting ``DQAConfig(bits=n, method=...)`` on a few training images,
then a handful of test images run one at a time through :func:`lightning_dqa.deploy.compressed.run_compressed`: every
quantized activation is stored as a blob and decoded when its layer runs (the output is checked bit for bit
against the fake-quantized forward). The peak is the whole network's, under the liveness rule of
:mod:`lightning_dqa.deploy.liveness`: residual shortcuts, concatenated skips, the input and the tensors between two
quantization points (conv outputs before BatchNorm) stay in full precision. FP32 and uniform 8-bit are the same
pass with every quantized activation at 4 or 1 byte per value. Run from the repository root, ``../shared`` beside
it::

    python examples/memory_report.py --calib 256 --images 4

With ``--out`` it also times the byte path of DQA at 3 and 4 bits on one batch of ``--batch`` test images
(store: every quantized activation to its blob; restore: back to values) interleaved with the FP32 forward,
and writes every figure as JSON for ``docs/RESULTS.md`` (section 7, ``examples/report_render.py``)::

    python examples/memory_report.py --calib 256 --images 4 --batch 256 --out docs/results/memory_networks.json

"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as TF
from bench_overhead import StoragePath, fp32_forward, interleaved, layer_inputs
from torch import nn

from lightning_dqa import DQAConfig, calibrate, prepare
from lightning_dqa.codec.native import native_status
from lightning_dqa.demos.data import CamVidDataModule, CIFAR10DataModule
from lightning_dqa.demos.models import build_model, load_pretrained
from lightning_dqa.deploy.compressed import run_compressed

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CHECKPOINTS = REPO / "examples" / "checkpoints"
PREFIXES = ("module.", "net.")


def resnet32() -> nn.Module:
    return load_pretrained(build_model("resnet32"), SHARED / "weights" / "resnet32-d509ac18.th")


def mobilenetv2() -> nn.Module:
    model = build_model("mobilenetv2", width_mult=0.5, dropout=0.0)
    return load_pretrained(model, CHECKPOINTS / "mobilenetv2_w050_cifar10.pt", strip_prefixes=PREFIXES)


def unet() -> nn.Module:
    model = build_model("unet", base_width=16, depth=4)
    return load_pretrained(model, CHECKPOINTS / "unet_w16_camvid.pt", strip_prefixes=PREFIXES)


NETWORKS: dict[str, tuple[str, Callable[[], nn.Module], str, int]] = {
    "resnet32": ("ResNet-32, CIFAR-10", resnet32, "cifar10", -100),
    "mobilenetv2": ("MobileNetV2 w0.5, CIFAR-10", mobilenetv2, "cifar10", -100),
    "unet": ("U-Net w16, CamVid", unet, "camvid", CamVidDataModule.ignore_index),
}


def data(name: str, calib: int, images: int) -> tuple[Any, list[torch.Tensor]]:
    """Calibration batches and ``images`` single test images ``(1, 3, H, W)``."""
    if name == "camvid":
        dm: Any = CamVidDataModule(root=str(SHARED / "data" / "camvid"), eval_batch_size=8, limit_test=images)
    else:
        dm = CIFAR10DataModule(root=str(SHARED / "data" / "cifar10"), eval_batch_size=128, limit_test=images)
    dm.setup("test")
    test = [x[i : i + 1] for x, _ in dm.test_dataloader() for i in range(len(x))][:images]
    return dm.calibration_dataloader(calib), test


def calibrated(base: nn.Module, cfg: DQAConfig, loader: Any, ignore: int) -> nn.Module:
    """A calibrated copy of ``base`` in eval mode."""
    model = copy.deepcopy(base).eval()
    prepare(model, cfg)
    calibrate(
        model, cfg, loader, forward_fn=lambda m, b: m(b[0]),
        loss_fn=lambda m, b: TF.cross_entropy(m(b[0]), b[1], ignore_index=ignore),
    )  # fmt: skip
    return model


def measure(base: nn.Module, cfg: DQAConfig, loader: Any, test: list[torch.Tensor], ignore: int) -> tuple[dict, Any]:
    """Mean peak KiB per image of one calibrated configuration, ``{"fp32", "int8", "stored"}``; the last report."""
    model = calibrated(base, cfg, loader, ignore)
    sums = {"fp32": 0.0, "int8": 0.0, "stored": 0.0, "bits_per_value": 0.0}
    for x in test:
        out, report = run_compressed(model, x)
        with torch.no_grad():
            if not torch.equal(out + 0.0, model(x) + 0.0):
                raise RuntimeError(f"compressed output differs from fake quantization ({cfg})")
        for k, v in report.per_image().items():
            sums[k] += v / 1024 / len(test)
        sums["bits_per_value"] += report.bits_per_value / len(test)  # 8 * blob bytes / values
    return sums, report


def timing_batch(dataset: str, batch: int) -> torch.Tensor:
    """One batch of ``batch`` test images, e.g. ``(256, 3, 32, 32)``."""
    if dataset == "camvid":
        dm: Any = CamVidDataModule(root=str(SHARED / "data" / "camvid"), eval_batch_size=batch, limit_test=batch)
    else:
        dm = CIFAR10DataModule(root=str(SHARED / "data" / "cifar10"), eval_batch_size=batch, limit_test=batch)
    dm.setup("test")
    return next(iter(dm.test_dataloader()))[0]


def time_byte_path(model: nn.Module, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Store and restore of every quantized activation of ``model(x)``, ms, interleaved with the FP32 forward."""
    path = StoragePath(layer_inputs(model, x))

    fp32 = fp32_forward(model, x)
    ms = interleaved({"fp32": fp32, "store": path.store, "restore": path.restore}, repeats)
    return {"fp32_ms": ms["fp32"], "store_ms": ms["store"], "restore_ms": ms["restore"],
            "store_ratio": ms["store"] / ms["fp32"], "restore_ratio": ms["restore"] / ms["fp32"]}  # fmt: skip


def network_row(net: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every figure of one network: peaks per configuration, and the byte path's cost at 3 and 4 bits."""
    title, build, dataset, ignore = NETWORKS[net]
    base = build().eval()
    loader, test = data(dataset, args.calib // 10 if dataset == "camvid" else args.calib, args.images)
    row: dict[str, Any] = {"network": title, "shape": list(test[0].shape[1:]), "peaks": {}, "timing": {}}
    for bits in (3, 4, 5):
        for method in ("direct", "dqa"):
            peak, report = measure(base, DQAConfig(bits=bits, method=method), loader, test, ignore)
            row["peaks"][f"{method} {bits}"] = peak
            row["fp32"], row["int8"] = peak["fp32"], peak["int8"]
            if (bits, method) == (3, "dqa"):
                row["dqa3_peak_step"] = report.stored.step
                row["dqa3_peak_live"] = [[w, b / 1024] for w, b in report.stored.live[:4]]
    if args.out:
        x = timing_batch(dataset, args.batch // 32 if dataset == "camvid" else args.batch)
        row["timing_batch"] = int(x.shape[0])
        for bits in (3, 4):
            model = calibrated(base, DQAConfig(bits=bits), loader, ignore)
            row["timing"][f"dqa {bits}"] = time_byte_path(model, x, args.repeats)
    return row


def print_row(row: dict[str, Any]) -> None:
    cells = [row["peaks"][f"{m} {b}"]["stored"] for b in (3, 4, 5) for m in ("direct", "dqa")]
    shape = "x".join(str(s) for s in row["shape"])
    print(
        f"{row['network'] + ' ' + shape:<34}{row['fp32']:>8.1f}{row['int8']:>8.1f}"
        + "".join(f"{c:>10.1f}" for c in cells)
    )
    live = ", ".join(f"{w} {kib:.1f}" for w, kib in row["dqa3_peak_live"])
    print(f"  DQA 3 peak at step {row['dqa3_peak_step']}: {live} KiB")
    for key, t in row["timing"].items():
        print(
            f"  {key}-bit byte path, batch {row['timing_batch']}: "
            f"store {t['store_ms']:.1f} ms ({t['store_ratio']:.2f}x "
            f"FP32 forward {t['fp32_ms']:.1f} ms), restore {t['restore_ms']:.1f} ms ({t['restore_ratio']:.2f}x)",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--calib", type=int, default=256, help="calibration images (CamVid: a tenth)")
    parser.add_argument("--images", type=int, default=4, help="test images, run one at a time")
    parser.add_argument("--batch", type=int, default=256, help="timing batch (CamVid: a 32nd)")
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats (the minimum is kept)")
    parser.add_argument("--out", default=None, help="write the figures as JSON and time the byte path")
    args = parser.parse_args()
    torch.manual_seed(0)
    command = "python examples/memory_report.py " + " ".join(sys.argv[1:])
    print("$ " + command)
    cols = [m + " " + str(b) for b in (3, 4, 5) for m in "ND"]
    head = f"{'network':<34}{'FP32':>8}{'8-bit':>8}" + "".join(f"{c:>10}" for c in cols)
    print("Peak activation KiB per image (N = direct n-bit, D = DQA n-bit; mean over the test images)")
    print(head)
    print("-" * len(head))
    rows = []
    for net in args.nets:
        rows.append(network_row(net, args))
        print_row(rows[-1])
    if args.out:
        meta = {
            "command": command,
            "byte_path": native_status(),
            "calib": args.calib,
            "images": args.images,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        }
        Path(args.out).write_text(json.dumps({**meta, "networks": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
