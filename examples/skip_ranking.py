"""How a coded U-Net skip's channels are ranked, and what it costs: mIoU and the banded peak (issue 22).

With ``shared_values="codes"`` a U-Net skip is stored once, as the leading channels of the decoder convolution's
DQA codes, and read by the max-pool of the next encoder stage and by that convolution. The ``fisher`` ranking
picks the convolution's important channels; this script compares ranking the skip's channels by

* ``concatenation``: the gradient of the concatenation the convolution reads (the convolution's path only; the
  ranking before this change, restored here by switching off the hook that takes the skip's own gradient), and
* ``every reader``: the skip's own gradient, summed over both readers (the library's ranking),

for each ``--seeds`` calibration seed: mIoU on the CamVid test set (fake-quantized), how many of the convolution's
important channels fall in the skip, and ``run_banded``'s peak for one test image with the concatenation run
whole and split (``split_concat``). U-Net w16 (the committed checkpoint), 3-bit DQA, calibrated on a tenth of
``--calib`` training images. Run from the repository root with one thread::

    OMP_NUM_THREADS=1 python examples/skip_ranking.py --out docs/results/skip_ranking.json

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
from memory_report import calibrated
from peak_banded import forward_all, score, test_batches
from peak_table import NETWORKS, network_setup

import lightning_dqa.calibration.collect as collect
from lightning_dqa import DQAConfig, run_banded
from lightning_dqa.core.attach import quantizers_of

KIB = 1024.0
LAYER = "up.3.conv.0"  # the decoder convolution that reads the stem's skip (16 of its 32 input channels)


def row(base: torch.nn.Module, batches: Any, x: torch.Tensor, tests: Any, every: bool, seed: int) -> dict[str, Any]:
    """One calibration: its mIoU, its important channels among the skip's and the banded peaks."""
    hook = collect._Taps._skip_hook
    if not every:  # the concatenation's gradient alone: the skip's own gradient is not taken
        collect._Taps._skip_hook = lambda self, name: lambda _m, _a, _o: None  # type: ignore[method-assign]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = DQAConfig(bits=3, method="dqa", shared_values="codes", seed=seed)
            model = calibrated(base, cfg, batches, NETWORKS["unet"][4])
    finally:
        collect._Taps._skip_hook = hook  # type: ignore[method-assign]
    q = quantizers_of(model)[LAYER]
    skip = int(q.important[: q.num_channels // 2].sum())
    peaks = {}
    for split in (False, True):
        _, report = run_banded(model, x, split_concat=split)
        peaks["split" if split else "cat"] = report.peak / KIB
    miou = score(forward_all(model, tests), tests, NETWORKS["unet"][4])
    return {"ranking": "every reader" if every else "concatenation", "seed": seed, "miou": miou,
            "skip_important": skip, "important": int(q.important.sum()), "peak_kib": peaks}  # fmt: skip


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'skip ranked by':<16}{'seed':>6}{'mIoU':>8}{'important in skip':>19}{'peak, cat':>12}{'peak, split':>13}"
    lines = [head, "-" * len(head)]
    for r in rows:
        imp = f"{r['skip_important']} of {r['important']}"
        lines.append(
            f"{r['ranking']:<16}{r['seed']:>6}{r['miou']:>8.2f}{imp:>19}{r['peak_kib']['cat']:>12.1f}"
            f"{r['peak_kib']['split']:>13.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--calib", type=int, default=512, help="calibration images (CamVid: a tenth)")
    parser.add_argument("--out", default=None, help="write the figures as JSON (docs/results/skip_ranking.json)")
    args = parser.parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    command = "OMP_NUM_THREADS=1 python examples/skip_ranking.py " + " ".join(given)
    print("$ " + command.strip(), flush=True)
    torch.manual_seed(0)
    base, batches, x, _ = network_setup("unet", args.calib)
    tests = test_batches("camvid", None, 8, None)
    rows = []
    for seed in args.seeds:
        for every in (False, True):
            rows.append(row(base, batches, x, tests, every, seed))
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    text = format_table(rows)
    print(text)
    if args.out:
        machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
        meta = {"command": command.strip(), "calib": args.calib, "layer": LAYER, "machine": machine}
        Path(args.out).write_text(json.dumps({**meta, "rows": rows, "text": text}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
