"""Where the logged ``dqa/bits_per_value`` comes from: main codes, shifting errors, side information, first layer.

For each network, DQA at ``--bits`` with the default setting (first layer's input, the image, at 8 bits;
r = 0.4, m = 3) is calibrated on CIFAR-10 training images and measured on test images with the memory meter
the callback logs from. torchvision models are built with random weights (nothing is downloaded), so their
accuracy means nothing here; the bits do not depend much on it.

    python examples/bits_breakdown.py                       # resnet32 (pretrained) and three torchvision nets
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torchvision
import torchvision.transforms as T
from torch import nn
from torch.utils.data import DataLoader, Subset

from lightning_dqa import DQAConfig, calibrate, prepare
from lightning_dqa.demos.models import build_model, load_pretrained
from lightning_dqa.deploy.meter import MemoryMeter

SHARED = Path(__file__).resolve().parents[2] / "shared"
TORCHVISION = ("resnet18", "mobilenet_v3_small", "efficientnet_b0")


def network(name: str, weights: Path) -> nn.Module:
    if name == "resnet32":
        return load_pretrained(build_model("resnet32"), str(weights))
    return getattr(torchvision.models, name)(weights=None, num_classes=10)


def loaders(root: Path, calib: int, test: int) -> tuple[DataLoader, DataLoader]:
    norm = T.Compose([T.ToTensor(), T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))])
    train = torchvision.datasets.CIFAR10(str(root), train=True, transform=norm, download=True)
    held = torchvision.datasets.CIFAR10(str(root), train=False, transform=norm, download=True)
    picks = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:calib].tolist()
    return DataLoader(Subset(train, picks), batch_size=128), DataLoader(Subset(held, range(test)), batch_size=128)


@torch.no_grad()
def measure(model: nn.Module, config: DQAConfig, calib: DataLoader, test: DataLoader) -> dict[str, float]:
    model.eval()
    prepare(model, config)
    loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    calibrate(model, config, calib, forward_fn=lambda m, b: m(b[0]), loss_fn=loss)
    meter = MemoryMeter(model)
    meter.build_codebooks()
    meter.active = True
    for x, _ in test:
        model(x)
    out = meter.compute()["ledger"]
    first = meter.names[0]
    return {
        "bits/value": float(out["total/bits_per_value"]),
        "main": float(out["total/uniform_bits_per_value"]),
        "errors": float(out["total/error_bits_per_value"]),
        "side": float(out["total/side_bits_per_value"]),
        "first layer share %": 100 * float(out[f"{first}/numel"] / out["total/numel"]),
        "first layer bits/value": float(out[f"{first}/bits_per_value"]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--nets", nargs="+", default=["resnet32", *TORCHVISION])
    parser.add_argument("--data-root", type=Path, default=SHARED / "data" / "cifar10")
    parser.add_argument("--weights", type=Path, default=SHARED / "weights" / "resnet32-d509ac18.th")
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--test-samples", type=int, default=256)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    calib, test = loaders(args.data_root, args.calib_samples, args.test_samples)
    config = DQAConfig(bits=args.bits)
    rows = {name: measure(network(name, args.weights), config, calib, test) for name in args.nets}
    keys = list(next(iter(rows.values())))
    print(f"{'network':<20}" + "".join(f"{k:>24}" for k in keys))
    for name, row in rows.items():
        print(f"{name:<20}" + "".join(f"{row[k]:>24.3f}" for k in keys))


if __name__ == "__main__":
    main()
