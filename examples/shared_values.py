"""What ``shared_values="codes"`` costs and saves: top-1 and the whole network's peak at 3-bit DQA.

A value that a quantized layer and something else both read (a ResNet block's input: its first convolution and
the residual shortcut; an inverted residual's input: its expansion and the residual add) stays in float32 by
default (``shared_values="fp32"``). With ``"codes"`` it is quantized once where it is produced, with the reading
layer's quantizer, and every reader reads those values; ``run_compressed`` stores that layer's blob only. With
``"int8"`` it is stored as 8-bit codes on that layer's clip range, and the layer re-quantizes them.

* ResNet-32 (pretrained, ``../shared``): ``DQACallback(bits=3, shared_values=...)`` in a quiet Trainer,
  ``validate`` on the whole CIFAR-10 test set, exactly as ``examples/reproduce_paper.py``'s ``run_one`` does
  (default setting, Fisher ranking, ``--calib-samples`` training images): top-1 and the arena peak the
  callback logs (one image through ``run_compressed``).
* MobileNetV2 w0.5 and U-Net w16 (the committed checkpoints): the peak only, ``DQAConfig(bits=3,
  shared_values=...)`` calibrated on ``--calib`` training images (CamVid: a tenth), one test image, each
  compressed output checked bit for bit against the fake-quantized forward.

Run from the repository root with one thread::

    OMP_NUM_THREADS=1 python examples/shared_values.py --out docs/results/shared_values.json

``--modes`` runs some of ``fp32 codes int8`` only.

"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from memory_report import NETWORKS, calibrated, data
from reproduce_paper import DEFAULT_DATA, DEFAULT_WEIGHTS, make_datamodule, run_one

from lightning_dqa import DQAConfig
from lightning_dqa.core.config import SharedValues
from lightning_dqa.deploy.compressed import run_compressed

MODES: tuple[SharedValues, ...] = ("fp32", "codes", "int8")


def resnet_row(mode: SharedValues, args: argparse.Namespace) -> dict[str, Any]:
    """Top-1 on the test set and the logged peak of ResNet-32 at 3-bit DQA with ``shared_values=mode``."""
    dm = make_datamodule(str(DEFAULT_DATA), args.limit_test, args.calib_samples, 0)
    record = run_one(
        arch="resnet32", weights=str(DEFAULT_WEIGHTS), datamodule=dm, method="dqa", bits=3,
        calib_samples=args.calib_samples, shared_values=mode,
    )  # fmt: skip
    return {"network": "resnet32", "shared_values": mode, **record}


def peak_row(name: str, mode: SharedValues, args: argparse.Namespace) -> dict[str, Any]:
    """The arena peak of one test image (KiB) of ``name`` at 3-bit DQA with ``shared_values=mode``."""
    _, build, dataset, ignore = NETWORKS[name]
    loader, test = data(dataset, args.calib // 10 if dataset == "camvid" else args.calib, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = calibrated(build(), DQAConfig(bits=3, shared_values=mode), loader, ignore)
    out, report = run_compressed(model, test[0])
    with torch.no_grad():
        if not torch.equal(out + 0.0, model(test[0]) + 0.0):
            raise RuntimeError(f"{name}: compressed output differs from the fake-quantized forward ({mode})")
    peak = report.per_image()
    return {
        "network": name, "shared_values": mode,
        **{f"peak_{k}_kib": round(v / 1024, 2) for k, v in peak.items()},
        "peak_step": report.stored.step,
        "peak_live": [(what, round(b / 1024, 2)) for what, b in report.stored.live],
        "coded": len(report.coded), "kept_fp32": report.fp_shared,
        "warnings": [str(w.message) for w in caught if "shared_values" in str(w.message)],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calib-samples", type=int, default=5000, help="ResNet-32 calibration images")
    parser.add_argument("--limit-test", type=int, default=None, help="first N test images (default: all)")
    parser.add_argument("--calib", type=int, default=128, help="MobileNetV2 / U-Net calibration images")
    parser.add_argument("--networks", nargs="+", default=["resnet32", "mobilenetv2", "unet"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.networks:
        for mode in args.modes:
            row = resnet_row(mode, args) if name == "resnet32" else peak_row(name, mode, args)
            rows.append(row)
            keys = ("accuracy", "peak_fp32_kib", "peak_stored_kib", "peak_int8_kib", "peak_step", "coded")
            print(name, mode, {k: row[k] for k in keys if k in row}, flush=True)
    if args.out:
        meta = {"command": " ".join(["python", *sys.argv]), "machine": platform.machine(), "torch": torch.__version__}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
