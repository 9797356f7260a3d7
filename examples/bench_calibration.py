"""Calibration cost against a plain FP32 pass over the same samples, in CPU time on one thread (not a test).

For each network and number of calibration samples, prints the CPU seconds of one FP32 forward pass over the
samples (no quantizers), of an FP32 forward and backward pass to the inputs (the floor of a gradient ranking:
fisher needs every quantized tensor's loss gradient) and of :func:`lightning_dqa.calibration.engine.calibrate` for each
configuration, and their ratio to the forward pass.
CPU time of one thread is what the issue's aim (at most 2x an FP32 pass, linear in the samples) is stated in,
and it is less disturbed by other jobs on the machine than wall time. Data are in memory (no loading cost).

* ``resnet32``: the pretrained ResNet-32 on seeded-random CIFAR-10 training images (``../shared``);
* ``convnext_tiny``: torchvision's ConvNeXt-Tiny (random weights) on 32x32 random images.

    python examples/bench_calibration.py --nets resnet32 convnext_tiny --samples 256 1000 2000
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_dqa import DQAConfig
from lightning_dqa.calibration.engine import calibrate
from lightning_dqa.core.attach import prepare

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

CONFIGS: dict[str, dict[str, Any]] = {
    "default (fisher, mse)": {},
    "no ranking (direct, mse)": {"method": "direct"},
    "target_bits=3.5": {"target_bits": 3.5},
}


def build(net: str) -> tuple[Callable[[], nn.Module], Callable[[int], torch.Tensor], Callable[[int], torch.Tensor]]:
    """Model factory and image / label makers for ``net``."""
    if net == "resnet32":
        from lightning_dqa.demos.data import CIFAR10DataModule
        from lightning_dqa.demos.models import build_model, load_pretrained

        dm = CIFAR10DataModule(root=str(SHARED / "data" / "cifar10"), batch_size=128)
        dm.setup("fit")
        xs, ys = zip(*dm.calibration_dataloader(2000, 0), strict=True)
        images, labels = torch.cat(xs), torch.cat(ys)

        def make() -> nn.Module:
            m = build_model("resnet32")
            load_pretrained(m, str(SHARED / "weights" / "resnet32-d509ac18.th"))
            return m

        return make, lambda n: images[:n], lambda n: labels[:n]
    import torchvision

    g = torch.Generator().manual_seed(0)
    images = torch.randn(2000, 3, 32, 32, generator=g)
    labels = torch.randint(0, 10, (2000,), generator=g)
    return lambda: torchvision.models.convnext_tiny(num_classes=10), lambda n: images[:n], lambda n: labels[:n]


def cpu_seconds(fn: Callable[[], Any]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def _input_gradients(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The loss gradient with respect to the input, no weight gradients: the least work a gradient ranking does.

    Fisher and saliency need every quantized tensor's loss gradient, so calibration with them costs at least one
    forward and one backward pass through the activations (no weight gradients); this row measures that floor.
    """
    x = batch[0].detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), batch[1])
        return torch.autograd.grad(loss, x)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nets", nargs="+", default=["resnet32", "convnext_tiny"])
    p.add_argument("--samples", nargs="+", type=int, default=[256, 1000, 2000])
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"{'network':<14}{'samples':>8}  {'configuration':<26}{'CPU s':>8}{'x FP32 pass':>13}")
    for net in args.nets:
        make, images, labels = build(net)
        for n in args.samples:
            x, y = images(n), labels(n)
            batches = [(x[i : i + args.batch_size], y[i : i + args.batch_size]) for i in range(0, n, args.batch_size)]
            model = make().eval()
            with torch.no_grad():
                fp32 = cpu_seconds(lambda model=model, batches=batches: [model(b[0]) for b in batches])
            print(f"{net:<14}{n:>8}  {'FP32 pass':<26}{fp32:>8.1f}{1.0:>13.2f}", flush=True)
            floor = cpu_seconds(lambda model=model, batches=batches: [_input_gradients(model, b) for b in batches])
            print(f"{net:<14}{n:>8}  {'FP32 fwd + bwd to inputs':<26}{floor:>8.1f}{floor / fp32:>13.2f}", flush=True)
            for name, changes in CONFIGS.items():
                config = DQAConfig(**changes)
                model = make().eval()
                prepare(model, config)
                sec = cpu_seconds(
                    lambda model=model, config=config, batches=batches: calibrate(
                        model, config, batches, forward_fn=lambda m, b: m(b[0]),
                        loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                    )
                )  # fmt: skip
                print(f"{net:<14}{n:>8}  {name:<26}{sec:>8.1f}{sec / fp32:>13.2f}", flush=True)


if __name__ == "__main__":
    main()
