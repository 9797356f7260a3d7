"""A small plain ``nn.Module`` and the calibration helpers the engine and ONNX tests share."""

from __future__ import annotations

import torch
from torch import nn

from lightning_dqa import DQAConfig


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(10)
        self.conv2 = nn.Conv2d(10, 10, 3, padding=1)
        self.conv3 = nn.Conv2d(10, 10, 3, padding=1)
        self.fc = nn.Linear(10, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean(dim=(2, 3)))


def tiny() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


def make_batches(n: int = 4, size: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 8, 8, generator=g), torch.randint(0, 5, (size,), generator=g)) for _ in range(n)]


def fwd(model: nn.Module, batch) -> torch.Tensor:
    return model(batch[0])


def loss(model: nn.Module, batch) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


def config(**kw) -> DQAConfig:
    base = dict(bits=4, ranking="energy", clipping="none", first_layer_bits=None)
    base.update(kw)
    return DQAConfig(**base)
