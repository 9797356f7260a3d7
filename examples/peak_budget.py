"""A peak activation limit on top of a bits budget (``target_peak_bytes``), on the pretrained ResNet-32 (not a test).

Calibrates ``DQAConfig(target_bits=B)`` on seeded-random CIFAR-10 training images, measures the whole network's
peak activation bytes per image with :func:`lightning_dqa.run_compressed` on the first test image, then
calibrates again with ``target_peak_bytes`` at fractions of that peak. Prints, per run, the measured peak, what
holds it, the bits per value on the calibration sample and the top-1 accuracy on the first test images; a limit
below what the full-precision tensors at the peak need prints the refusal.

    python examples/peak_budget.py                    # target_bits 4, limits 100/99/98/95 %, 2,000 test images
    python examples/peak_budget.py --peak-runtime banded --fractions 1.0 0.95 0.9 0.8

``--peak-runtime banded`` calibrates with ``shared_values="codes", peak_runtime="banded"``: the limit is then on
:func:`lightning_dqa.run_banded`'s arena (row bands of one row, every stored value coded).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_dqa import DQAConfig, calibrate, prepare, run_banded
from lightning_dqa.demos.data import CIFAR10DataModule
from lightning_dqa.demos.models import build_model, load_pretrained
from lightning_dqa.deploy.compressed import run_compressed

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-bits", type=float, default=4.0)
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.99, 0.98, 0.95])
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--limit-test", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--peak-runtime", choices=["layer", "banded"], default="layer")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dm = CIFAR10DataModule(root=str(SHARED / "data" / "cifar10"), limit_test=args.limit_test)
    dm.setup("test")
    images, labels = next(iter(DataLoader(dm.test_set, batch_size=len(dm.test_set))))
    calib = list(DataLoader(dm.calibration_subset(args.calib_samples, seed=0), batch_size=128))

    def run(peak: float | None) -> float | None:
        model = load_pretrained(build_model("resnet32"), str(SHARED / "weights" / "resnet32-d509ac18.th")).eval()
        banded = args.peak_runtime == "banded"
        config = DQAConfig(
            target_bits=args.target_bits, target_peak_bytes=peak, peak_runtime=args.peak_runtime,
            shared_values="codes" if banded else "fp32",
        )  # fmt: skip
        prepare(model, config)
        try:
            report = calibrate(
                model, config, calib, forward_fn=lambda m, b: m(b[0]),
                loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]), example_input=calib[0][0],
            )  # fmt: skip
        except ValueError as err:
            print(f"limit {peak:>9.0f} B: refused: {err}")
            return None
        if banded:
            _, report_b = run_banded(model, images[:1])
            step = report_b.peak_step()
            kib, where, live = report_b.peak / 1024, report_b.steps[step or 0], report_b.at_peak()
        else:
            _, compressed = run_compressed(model, images[:1])
            kib, where, live = compressed.per_image()["stored"] / 1024, compressed.stored.step, compressed.stored.live
        with torch.no_grad():
            acc = 100 * float(torch.cat([model(x).argmax(1) for x in images.split(500)]).eq(labels).float().mean())
        allocation = report.allocation
        assert allocation is not None
        what = "none" if peak is None else f"{peak:.0f} B"
        held = ", ".join(f"{w} {b / 1024:.1f} KiB" for w, b in live[:3])
        print(
            f"limit {what:>11}: peak {kib:7.2f} KiB per image at {where} ({held}); "
            f"{allocation.achieved_bits:.3f} bits per value; top-1 {acc:.2f} %"
        )
        return kib * 1024

    print(f"ResNet-32, target_bits={args.target_bits:g}, {args.peak_runtime} runtime, {args.calib_samples} "
          f"calibration images, {len(labels)} test images")  # fmt: skip
    free = run(None)
    assert free is not None
    for fraction in args.fractions:
        run(fraction * free)


if __name__ == "__main__":
    main()
