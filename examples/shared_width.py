"""The width of the residual stream and skips: ``shared_values="uniform"`` at 4, 5 and 6 bits (not a test).

For each demo network (the pretrained ResNet-32, the committed MobileNetV2 w0.5 and U-Net w16), calibrated as
``examples/peak_banded.py`` calibrates them (3-bit DQA, 512 CIFAR-10 / 51 CamVid training images): the banded peak
of one test image (:func:`lightning_dqa.run_banded`, band rows of one, input and output listed apart, KiB) and the
score on the whole test set (CIFAR-10 top-1, CamVid mIoU, %) with ``shared_values="fp32"`` (today) and with
``shared_values="uniform", shared_bits=w``. Section 7c has ``codes`` (3-bit DQA codes) and ``int8`` (8 bits).
Run from the repository root with one thread::

    OMP_NUM_THREADS=1 python examples/shared_width.py --out docs/results/shared_width.json

"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from memory_report import calibrated
from peak_banded import forward_all, score, test_batches
from peak_table import NETWORKS, network_setup

from lightning_dqa import DQAConfig, run_banded

DEMOS = ("resnet32", "mobilenetv2", "unet")


def network_row(name: str, widths: list[int], calib: int, limit: int | None) -> dict[str, Any]:
    """Today's score, and the banded peak and score at each width, of one network."""
    base, batches, x, row = network_setup(name, calib)
    _, _, dataset, _, ignore = NETWORKS[name]
    tests = test_batches(dataset, None, 100, limit)
    row["score_name"] = "top-1" if dataset == "cifar10" else "mIoU"
    row["images"] = sum(len(y) for _, y in tests)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        today = calibrated(base, DQAConfig(bits=3), batches, ignore)
    row["score_today"] = score(forward_all(today, tests), tests, ignore)
    row["widths"] = {}
    for bits in widths:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = DQAConfig(bits=3, shared_values="uniform", shared_bits=bits)
            model = calibrated(base, config, batches, ignore)
        _, report = run_banded(model, x)
        scored = score(forward_all(model, tests), tests, ignore)
        row["widths"][str(bits)] = {"peak_kib": report.peak / 1024, "score": scored}
    return row


def format_table(rows: list[dict[str, Any]], widths: list[int]) -> str:
    """Peak KiB and score per width, next to today's score."""
    head = f"{'network':<36}{'score':>7}{'today':>8}" + "".join(f"{f'{w}-bit KiB':>12}{'score':>8}" for w in widths)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = "".join(f"{r['widths'][str(w)]['peak_kib']:>12.1f}{r['widths'][str(w)]['score']:>8.2f}" for w in widths)
        lines.append(f"{r['network']:<36}{r['score_name']:>7}{r['score_today']:>8.2f}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", nargs="+", default=list(DEMOS), choices=list(DEMOS))
    parser.add_argument("--widths", nargs="+", type=int, default=[4, 5, 6])
    parser.add_argument("--calib", type=int, default=512, help="calibration images (CamVid: a tenth)")
    parser.add_argument("--limit-test", type=int, default=None, help="test images (all)")
    parser.add_argument("--out", default=None, help="write the figures as JSON (docs/results/shared_width.json)")
    args = parser.parse_args(argv)
    print("$", " ".join(["OMP_NUM_THREADS=1 python", *sys.argv]), flush=True)
    rows = []
    for name in args.nets:
        start = time.perf_counter()
        rows.append(network_row(name, args.widths, args.calib, args.limit_test))
        print(f"done: {rows[-1]['network']} ({time.perf_counter() - start:.0f} s)", flush=True)
    text = format_table(rows, args.widths)
    print(text)
    if args.out:
        machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
        data = {
            "command": "OMP_NUM_THREADS=1 python examples/shared_width.py --out docs/results/shared_width.json",
            "calib": args.calib, "widths": args.widths, "machine": machine, "networks": rows, "text": text,
        }  # fmt: skip
        Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
