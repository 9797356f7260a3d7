"""How well the budget allocation's noise estimate ranks layers: estimate against measured loss, per layer (not a test).

``target_bits`` chooses per-layer widths from an estimated loss increase (:mod:`lightning_dqa.calibration.allocation`).
This script checks that estimate against the real thing. It calibrates the network (default setting, fisher
statistics), sets every allocatable layer to uniform 4-bit codes, then, for each layer alone, drops it to 2
and to 3 bits and measures the mean loss on the calibration images. Each row prints the measured loss increase
next to two estimates of it, with their ratio:

* ``plain``: ``sum_c F_c * mse_c``, the Fisher-weighted squared error;
* ``allocator``: what the allocator uses, which also weighs each channel's mean error (bias) by its coherent
  gradient sums (``ChannelStats.grad_coherent``).

An estimate is useful to the allocator when the ratio is about the same for every layer. The summary gives the
Spearman rank correlation of estimate and measurement and the spread (standard deviation of log10 of the ratio)
over the rows with a positive measured increase.

    python examples/check_noise_estimate.py --net unet        # CamVid U-Net, 100 calibration images, ~4 min
    python examples/check_noise_estimate.py --net resnet32    # ResNet-32, 1,000 CIFAR-10 training images, ~4 min
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
import torch.nn.functional as F
from reproduce_paper import DEFAULT_WEIGHTS, SETTINGS, SHARED, build_task

from lightning_dqa import DQAConfig
from lightning_dqa.calibration.allocation import NOISE_SAMPLES, _width_table, layer_options
from lightning_dqa.calibration.engine import calibrate
from lightning_dqa.calibration.scales import freeze_scales
from lightning_dqa.core.attach import prepare, quantizers_of

UNIFORM = 4


def _ranks(values: list[float]) -> torch.Tensor:
    order = torch.tensor(values, dtype=torch.float64).argsort()
    ranks = torch.empty(len(values), dtype=torch.float64)
    ranks[order] = torch.arange(len(values), dtype=torch.float64)
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (no tie correction: the values are continuous)."""
    ra, rb = _ranks(a), _ranks(b)
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def setup(net: str) -> tuple[Any, list[Any], int]:
    """The task, its calibration batches and the label the loss ignores."""
    if net == "unet":
        from report_networks import CHECKPOINTS

        from lightning_dqa.demos.data import CamVidDataModule

        dm = CamVidDataModule(root=str(SHARED / "data" / "camvid"), batch_size=8, eval_batch_size=16)
        dm.setup("fit")
        weights = str(CHECKPOINTS / "unet_w16_camvid.pt")
        task = build_task("unet", weights, {"base_width": 16, "depth": 4, "channels_last": True})
        return task, list(dm.calibration_dataloader(100, 0)), 11
    from lightning_dqa.demos.data import CIFAR10DataModule

    dm = CIFAR10DataModule(root=str(SHARED / "data" / "cifar10"), batch_size=128, eval_batch_size=250)
    dm.setup("fit")
    return build_task("resnet32", str(DEFAULT_WEIGHTS)), list(dm.calibration_dataloader(1000, 0)), -100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", choices=["unet", "resnet32"], default="unet")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task, batches, ignore = setup(args.net)
    task.eval()
    config = DQAConfig(bits=UNIFORM, method="dqa", seed=0, **SETTINGS["default"])
    prepare(task, config)

    def loss_fn(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        return F.cross_entropy(model(batch[0]), batch[1], ignore_index=ignore)

    report = calibrate(task, config, batches, forward_fn=lambda m, b: m(b[0]), loss_fn=loss_fn)
    quantizers = quantizers_of(task)
    layers = [n for n, q in quantizers.items() if not q.passthrough and q.n == UNIFORM]  # the first layer is 8-bit

    def set_width(name: str, bits: int) -> None:
        q = quantizers[name]
        q.set_widths(bits, 0)
        q.important.zero_()
        freeze_scales({name: q}, report.stats, config, important_bits=True)

    @torch.no_grad()
    def mean_loss() -> float:
        total, count = 0.0, 0
        for x, y in batches:
            total += float(F.cross_entropy(task(x), y, ignore_index=ignore, reduction="sum"))
            count += int((y != ignore).sum())
        return total / count

    for name in layers:
        set_width(name, UNIFORM)
    base = mean_loss()
    print(f"{args.net}: {len(layers)} layers at {UNIFORM} bits, calibration loss {base:.5f}")
    print(f"{'layer':<28}{'w':>3}{'measured':>11}{'plain':>11}{'x':>9}{'allocator':>11}{'x':>9}{'G/F':>8}")
    rows = []
    for name in layers:
        st, q = report.stats[name], quantizers[name]
        signed = bool(q.signed)
        options = layer_options(st, None, signed, config.clipping, config.percentile, True)
        allocator = {o.bits: o.noise for o in options}
        mse, _, _ = _width_table(
            st.samples[:, :NOISE_SAMPLES].float(), st.max_abs.float(), signed, config.clipping, config.percentile
        )
        plain = {w: float((st.grad_sq.double() * mse[w]).sum()) for w in (2, 3, UNIFORM)}
        coherence = float((st.grad_coherent / st.grad_sq.clamp_min(1e-30)).median())
        for w in (2, 3):
            set_width(name, w)
            measured = mean_loss() - base
            set_width(name, UNIFORM)
            ep, ea = plain[w] - plain[UNIFORM], allocator[w] - allocator[UNIFORM]
            rows.append((measured, ep, ea))
            print(
                f"{name[-28:]:<28}{w:>3}{measured:>+11.5f}{ep:>11.3g}{measured / ep:>9.3g}{ea:>11.3g}"
                f"{measured / ea:>9.3g}{coherence:>8.3g}"
            )
    for label, i in (("plain", 1), ("allocator", 2)):
        logs = [math.log10(r[0] / r[i]) for r in rows if r[0] > 0 and r[i] > 0]
        spread = float(torch.tensor(logs).std())
        rho = spearman([r[0] for r in rows], [r[i] for r in rows])
        print(f"{label:>9}: Spearman {rho:.3f}, log10 ratio spread {spread:.3f} over {len(logs)} rows")


if __name__ == "__main__":
    main()
