"""A tiny classifier and data module for callback tests (importable by spawned DDP workers)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy


class TinyConvNet(nn.Module):
    """Three convolutions and a classifier; the last conv's output is signed (no ReLU before the pool)."""

    def __init__(self, seed: int | None = 0) -> None:
        super().__init__()
        if seed is not None:  # the same weights for every instance unless seed=None
            torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = self.conv3(x)
        return self.fc(x.mean(dim=(2, 3)))


def quiet_trainer(tmp_path=None, **kw) -> pl.Trainer:
    """A CPU Trainer that prints and saves nothing unless asked (``tmp_path`` sets ``default_root_dir``)."""
    args = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        max_epochs=1,
    )
    if tmp_path is not None:
        args["default_root_dir"] = str(tmp_path)
    args.update(kw)
    return pl.Trainer(**args)


def make_data(n: int = 256, seed: int = 0) -> TensorDataset:
    """Separable 4-class images: the class sets the mean of one colour channel."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 3, 8, 8, generator=g) * 0.5
    x[torch.arange(n), y % 3] += (y[:, None, None].float() + 1.0) * 0.6
    return TensorDataset(x, y)


class TinyNet(pl.LightningModule):
    def __init__(self, lr: float = 0.05, width: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, 4),
        )
        self.val_acc = MulticlassAccuracy(4, average="micro")
        self.test_acc = MulticlassAccuracy(4, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val/acc", self.val_acc, on_epoch=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test/acc", self.test_acc, on_epoch=True)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9)}


class TinyData(pl.LightningDataModule):
    def __init__(self, n: int = 256, batch_size: int = 32, empty_calibration: bool = False) -> None:
        super().__init__()
        self.n, self.batch_size, self.empty_calibration = n, batch_size, empty_calibration

    def train_dataloader(self):
        return DataLoader(make_data(self.n, 0), batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self):
        return DataLoader(make_data(128, 1), batch_size=64)

    def test_dataloader(self):
        return DataLoader(make_data(128, 2), batch_size=64)

    def calibration_dataloader(self):
        if self.empty_calibration:
            return DataLoader(TensorDataset(torch.zeros(0, 3, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=8)
        return DataLoader(make_data(self.n, 3), batch_size=self.batch_size)


# Shared by the checkpoint and ONNX tests.


def fit_quantized(tmp_path: Path, model: TinyNet | None = None) -> tuple[Path, TinyNet]:
    from lightning_dqa import DQACallback  # here: `from tiny import TinyNet` must not import lightning_dqa

    model = model or TinyNet()
    cb = DQACallback(bits=3, calibration_samples=64, ranking="energy", verbose=False)
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        max_steps=3,
        callbacks=[cb],
    )
    trainer.fit(model, datamodule=TinyData())
    return Path(trainer.checkpoint_callback.best_model_path), model
