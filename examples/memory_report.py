"""Measured peak activation memory per image: FP32, uniform 8-bit, direct n-bit and DQA n-bit (n = 3, 4, 5).

Each network is calibrated with the default setting ``DQAConfig(bits=n, method=...)`` on a few training images,
then a handful of test images run one at a time through :func:`lightning_dqa.compressed.run_compressed`: every
quantized activation is stored as a blob and decoded when its layer runs (the output is checked bit for bit
against the fake-quantized forward). The peak is the whole network's, under the liveness rule of
:mod:`lightning_dqa.liveness`: residual shortcuts, concatenated skips, the input and the tensors between two
quantization points (conv outputs before BatchNorm) stay in full precision. FP32 and uniform 8-bit are the same
pass with every quantized activation at 4 or 1 byte per value. Run from the repository root, ``../shared`` beside
it::

    python examples/memory_report.py --calib 256 --images 4

"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as TF
from torch import nn

from lightning_dqa import DQAConfig, calibrate, prepare
from lightning_dqa.compressed import run_compressed
from lightning_dqa.demos.data import CamVidDataModule, CIFAR10DataModule
from lightning_dqa.demos.models import build_model, load_pretrained

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


def measure(base: nn.Module, cfg: DQAConfig, loader: Any, test: list[torch.Tensor], ignore: int) -> tuple[dict, Any]:
    """Mean peak KiB per image of one calibrated configuration, ``{"fp32", "int8", "stored"}``; the last report."""
    model = copy.deepcopy(base).eval()
    prepare(model, cfg)
    calibrate(
        model, cfg, loader, forward_fn=lambda m, b: m(b[0]),
        loss_fn=lambda m, b: TF.cross_entropy(m(b[0]), b[1], ignore_index=ignore),
    )  # fmt: skip
    sums = {"fp32": 0.0, "int8": 0.0, "stored": 0.0}
    for x in test:
        out, report = run_compressed(model, x)
        with torch.no_grad():
            if not torch.equal(out + 0.0, model(x) + 0.0):
                raise RuntimeError(f"compressed output differs from fake quantization ({cfg})")
        for k, v in report.per_image().items():
            sums[k] += v / 1024 / len(test)
    return sums, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--calib", type=int, default=256, help="calibration images (CamVid: a tenth)")
    parser.add_argument("--images", type=int, default=4, help="test images, run one at a time")
    args = parser.parse_args()
    torch.manual_seed(0)
    print("$ python examples/memory_report.py " + " ".join(sys.argv[1:]))
    cols = [m + " " + str(b) for b in (3, 4, 5) for m in "ND"]
    head = f"{'network':<34}{'FP32':>8}{'8-bit':>8}" + "".join(f"{c:>10}" for c in cols)
    print("Peak activation KiB per image (N = direct n-bit, D = DQA n-bit; mean over the test images)")
    print(head)
    print("-" * len(head))
    for net in args.nets:
        title, build, dataset, ignore = NETWORKS[net]
        base = build().eval()
        loader, test = data(dataset, args.calib // 10 if dataset == "camvid" else args.calib, args.images)
        cells, fp32, int8, notes = [], 0.0, 0.0, []
        for bits in (3, 4, 5):
            for method in ("direct", "dqa"):
                peak, report = measure(base, DQAConfig(bits=bits, method=method), loader, test, ignore)
                cells.append(peak["stored"])
                if (bits, method) == (3, "dqa"):
                    live = ", ".join(f"{w} {b / 1024:.1f}" for w, b in report.stored.live[:4])
                    notes.append(f"  DQA 3 peak at step {report.stored.step}: {live} KiB")
                fp32, int8 = peak["fp32"], peak["int8"]
        shape = "x".join(str(s) for s in test[0].shape[1:])
        print(f"{title + ' ' + shape:<34}{fp32:>8.1f}{int8:>8.1f}" + "".join(f"{c:>10.1f}" for c in cells))
        print("\n".join(notes), flush=True)


if __name__ == "__main__":
    main()
