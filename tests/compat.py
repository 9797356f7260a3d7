"""Helpers of the compatibility tests: a minimal LightningModule around any classifier, and tiny random data."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dqa.core.attach import quantizers_of


def random_images(n: int = 32, seed: int = 0, size: int = 32, classes: int = 10) -> TensorDataset:
    """``n`` random ``(3, size, size)`` images with labels in ``[0, classes)``."""
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g))


def images_loader(n: int = 32, seed: int = 0, batch_size: int = 16) -> DataLoader:
    """Two batches of 16 random 32x32 images by default."""
    return DataLoader(random_images(n, seed), batch_size=batch_size)


class Classifier(pl.LightningModule):
    """The least a user writes around a network: steps that log a loss, SGD, a calibration loader."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        out = self(batch[0])
        self.log("val/loss", F.cross_entropy(out, batch[1]))
        self.log("val/finite", torch.isfinite(out).all().float())

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def calibration_dataloader(self, num_samples: int, seed: int) -> DataLoader:
        return images_loader(num_samples, seed + 100)


def calibrated(model: nn.Module) -> bool:
    """Every installed quantizer calibrated and switched on."""
    qs = quantizers_of(model).values()
    return bool(qs) and all(bool(q.calibrated) and q.enabled for q in qs)


def small_cnn(classes: int = 10, width: int = 8) -> nn.Sequential:
    """Two conv blocks and a linear head; any input size."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, classes),
    )


def quantized_and_full(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``model(x)`` in eval mode with its quantizers on, then off (left off)."""
    model.eval()
    with torch.no_grad():
        quantized = model(x)
        for q in quantizers_of(model).values():
            q.enabled = False
        return quantized, model(x)
