"""The paper's other two networks: MobileNetV2 on CIFAR-10 and a U-Net on CamVid, from committed checkpoints.

For each network: FP32; direct, NoisyQuant and DQA at 3, 4 and 5 bits in the paper's setting and in this
project's default setting (see ``reproduce_paper.SETTINGS``); DQA at 3 bits with the greedy ranking against
fisher on the same small calibration set; and 3-bit DQA fine-tuned briefly with the callback. Results go to
``docs/results/<network>.json``; ``make_report.py --render-only`` then puts them in docs/RESULTS.md (this script
calls it at the end).

The checkpoints come from ``lightning-dqa fit`` with ``examples/configs/*_train.yaml`` (see
``examples/checkpoints/README.md``). The U-Net is scored with torchmetrics' ``MulticlassJaccardIndex`` (mIoU over
the 11 classes, void ignored) on CamVid's 233 test images; its greedy search maximises minus the summed
cross-entropy of the calibration images (``DQACallback(greedy_objective="loss")``), which, unlike pixel accuracy,
still moves when a candidate changes confidences but not the arg-max.

Usage::

    python examples/report_networks.py                      # both networks, about 25 min on 2 CPU cores
    python examples/report_networks.py --nets unet --sections ptq
    python examples/report_networks.py --sections budget    # target_bits from 2.5 to 6 bits
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from reproduce_paper import REPO, SHARED, fine_tune_one, quiet, run_one

from lightning_dqa.demos.data import CamVidDataModule, CIFAR10DataModule

OUT_DIR = REPO / "docs" / "results"
CHECKPOINTS = REPO / "examples" / "checkpoints"

NETWORKS: dict[str, dict[str, Any]] = {
    "mobilenetv2": dict(
        json="mobilenetv2_cifar10.json",
        title="MobileNetV2 (width 0.5) on CIFAR-10",
        weights=CHECKPOINTS / "mobilenetv2_w050_cifar10.pt",
        model_kwargs={"arch_kwargs": {"width_mult": 0.5, "dropout": 0.0}, "channels_last": True},
        stage="validate",  # CIFAR10DataModule validates on the test set
        calib=5000,
        greedy_calib=128,  # 9,275 candidate channels
        qat=dict(steps=300, lr=0.002, freeze_bn_stats=True),  # 88.08 %; lr 0.0005: 88.01; lr 0.005, BN updating: 87.92
        callback={"greedy_objective": "accuracy"},
    ),
    "unet": dict(
        json="unet_camvid.json",
        title="U-Net (base width 16, depth 4) on CamVid",
        weights=CHECKPOINTS / "unet_w16_camvid.pt",
        model_kwargs={"base_width": 16, "depth": 4, "channels_last": True},
        stage="test",
        calib=100,
        greedy_calib=4,  # 1,475 candidate channels; 4 x 43,200 labelled pixels
        qat=dict(steps=150, lr=1e-4),
        callback={"greedy_objective": "loss", "ignore_index": 11},  # CamVid's void label
    ),
}


def datamodule(net: str, data_root: str | None) -> Any:
    if net == "unet":
        return CamVidDataModule(root=data_root or str(SHARED / "data" / "camvid"), batch_size=8, eval_batch_size=16)
    return CIFAR10DataModule(root=data_root or str(SHARED / "data" / "cifar10"), batch_size=128, eval_batch_size=500)


def _common(net: str, spec: dict[str, Any], dm: Any) -> dict[str, Any]:
    """``run_one``'s arguments that every run of one network shares."""
    return dict(
        arch="unet" if net == "unet" else "mobilenetv2",
        weights=str(spec["weights"]),
        datamodule=dm,
        model_kwargs=spec["model_kwargs"],
        stage=spec["stage"],
    )


def ptq_records(net: str, spec: dict[str, Any], dm: Any) -> list[dict[str, Any]]:
    common = _common(net, spec, dm)
    cb = spec["callback"]
    runs: list[dict[str, Any]] = [dict(method="fp32", bits=8, setting="default", calib_samples=spec["calib"], **cb)]
    for setting in ("paper", "default"):
        for bits in (3, 4, 5):
            for method in ("direct", "noisyquant", "dqa"):
                runs.append(dict(method=method, bits=bits, setting=setting, calib_samples=spec["calib"], **cb))
    for ranking in ("fisher", "greedy"):
        runs.append(
            dict(
                method="dqa",
                bits=3,
                ranking=ranking,
                calib_samples=spec["greedy_calib"],
                experiment="ranking_greedy_calib",
                **cb,
            )
        )
    out = []
    for run in runs:
        rec = run_one(**common, **run)
        print(json.dumps(rec), flush=True)
        out.append(rec)
    return out


def qat_records(net: str, spec: dict[str, Any], dm: Any) -> list[dict[str, Any]]:
    rec = fine_tune_one(
        arch="unet" if net == "unet" else "mobilenetv2",
        weights=str(spec["weights"]),
        datamodule=dm,
        bits=3,
        calib_samples=spec["calib"],
        model_kwargs=spec["model_kwargs"],
        stage=spec["stage"],
        **spec["qat"],
        **spec["callback"],
    )
    print(json.dumps(rec), flush=True)
    return [rec]


BUDGETS = (2.5, 3.0, 3.5, 4.0, 5.0, 6.0)


def budget_records(net: str, spec: dict[str, Any], dm: Any) -> list[dict[str, Any]]:
    """DQA with per-layer widths chosen under each ``target_bits`` (default setting)."""
    out = []
    for t in BUDGETS:
        rec = run_one(
            **_common(net, spec, dm),
            method="dqa",
            bits=4,
            target_bits=t,
            calib_samples=spec["calib"],
            experiment="budget",
            **spec["callback"],
        )
        rec["target_bits"] = t
        print(json.dumps(rec), flush=True)
        out.append(rec)
    return out


SECTIONS = {"ptq": ptq_records, "qat": qat_records, "budget": budget_records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--sections", nargs="+", default=["ptq", "qat"], choices=list(SECTIONS))
    parser.add_argument("--data-root", default=None, help="dataset folder (default: ../shared/data/<dataset>)")
    args = parser.parse_args()
    quiet()
    for net in args.nets:
        spec = NETWORKS[net]
        if not Path(spec["weights"]).is_file():
            raise SystemExit(f"{spec['weights']} is missing: train it first (examples/checkpoints/README.md)")
        path = OUT_DIR / spec["json"]
        results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        results["title"] = spec["title"]
        results["training"] = json.loads(torch.load(spec["weights"], weights_only=True)["meta"]["hyper_parameters"])
        dm = datamodule(net, args.data_root)
        for section in args.sections:
            start = time.perf_counter()
            recs = SECTIONS[section](net, spec, dm)
            results[section] = {
                "records": recs,
                "seconds": round(time.perf_counter() - start, 1),
                "command": "python examples/report_networks.py " + " ".join(sys.argv[1:]),
                "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
            }
            OUT_DIR.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=1))
    from make_report import write_report

    write_report()


if __name__ == "__main__":
    main()
