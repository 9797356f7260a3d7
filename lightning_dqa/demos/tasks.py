"""LightningModules for the examples and the CLI: image classification and semantic segmentation.

The network sits in ``self.net``, so layer names read ``net.layer1.0.conv1``. Constructor arguments are flat,
typed and defaulted, so LightningCLI YAML files can express them.

Example:
    >>> import torch
    >>> model = ImageClassifier(arch="resnet20")
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])

"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from lightning_dqa.demos.models import build_model, load_pretrained

__all__ = ["ImageClassifier", "SegmentationModel"]

Schedule = Literal["cosine", "constant"]
# DataParallel checkpoints prefix keys with "module.", this module's own checkpoints with "net.".
_PREFIXES: tuple[str, ...] = ("module.", "net.")


def _cosine_or_constant(module: LightningModule, optimizer: torch.optim.Optimizer, schedule: Schedule) -> Any:
    """``configure_optimizers`` output: a per-step cosine decay over the whole run, or no scheduler."""
    if schedule == "constant":
        return optimizer
    total = module.trainer.estimated_stepping_batches
    if not math.isfinite(total) or total < 1:  # no max_steps / max_epochs: nothing to anneal over
        return optimizer
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(total))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _to_channels_last(x: Tensor) -> Tensor:
    """``x`` in ``torch.channels_last`` layout when it is a 4-D batch.

    oneDNN's preferred layout on CPUs: measured 0.27 s against 0.70 s per MobileNetV2-0.5 training step of
    128 CIFAR images on 2 cores.
    """
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


# A leaf for torch.fx (the greedy ranking traces the module): its ndim test cannot run on a Proxy.
torch.fx.wrap("_to_channels_last")


def _check_schedule_and_lr(schedule: str, lr: float) -> None:
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"Expected schedule to be one of ['cosine', 'constant'], got {schedule!r}")
    if not lr > 0:
        raise ValueError(f"Expected lr to be > 0, got {lr!r}")


class _Task(LightningModule):
    """What both tasks share: the network in ``net``, the training and predict steps and the optimizer's schedule.

    A subclass saves its hyperparameters (``channels_last`` and ``schedule`` among them), calls
    :meth:`_build_net` and implements ``_loss`` and ``_optimizer``.
    """

    net: nn.Module

    def _build_net(self, arch: str, weights: str | None, weights_sha256: str | None, **kwargs: Any) -> None:
        """``net``: the architecture ``arch`` built with ``kwargs``, ``weights`` loaded, in channels-last format."""
        self.net = build_model(arch, **kwargs)
        if weights is not None:
            load_pretrained(self.net, weights, sha256=weights_sha256, strip_prefixes=_PREFIXES)
        if self.hparams["channels_last"]:
            self.net.to(memory_format=torch.channels_last)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """With ``freeze_bn_stats``, put BatchNorm layers in eval mode before each training step.

        Fine-tuning a trained network with quantized activations would move BatchNorm's running statistics towards
        noisy small-batch estimates of a shifted input; frozen, they stay what calibration saw (the usual practice
        in quantization-aware training). Lightning switches the module back to train mode after each validation,
        so this runs per step.
        """
        if self.hparams.get("freeze_bn_stats", False):
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def forward(self, x: Tensor) -> Tensor:
        """Logits of images ``(N, C, H, W)``: ``(N, num_classes)``, or ``(N, num_classes, H, W)`` per pixel."""
        return self.net(_to_channels_last(x) if self.hparams["channels_last"] else x)

    def _loss(self, logits: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def _optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        raise NotImplementedError

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """The loss of one batch ``(images, targets)``; logs ``train/loss``."""
        x, y = batch
        loss = self._loss(self(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Predicted classes: ``(N,)`` per image, or ``(N, H, W)`` per pixel."""
        return self(batch[0]).argmax(dim=1)

    def configure_optimizers(self) -> Any:
        """The task's optimizer over every trainable parameter (quantizer scales included), with its schedule."""
        optimizer = self._optimizer([p for p in self.parameters() if p.requires_grad])
        return _cosine_or_constant(self, optimizer, self.hparams["schedule"])


class ImageClassifier(_Task):
    """Classifier trained with SGD + momentum and cross-entropy; reports top-1 accuracy.

    Args:
        arch: a name of :data:`lightning_dqa.demos.models.ARCHS` (e.g. ``resnet32``, ``mobilenetv2``).
        num_classes: number of classes.
        weights: a checkpoint path or http(s) URL loaded into ``net`` (see
            :func:`lightning_dqa.demos.models.load_pretrained`; ``module.`` and ``net.`` key prefixes are stripped,
            so this module's own Lightning checkpoints load too), or ``None`` for random weights.
        weights_sha256: expected sha256 of ``weights``, checked when given.
        lr: initial learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        nesterov: Nesterov momentum.
        schedule: ``cosine`` decays the rate per step to 0 over the Trainer's run (``max_steps`` or
            ``max_epochs``); ``constant`` keeps it.
        label_smoothing: cross-entropy label smoothing.
        arch_kwargs: extra constructor arguments of the architecture (e.g. ``{"width_mult": 0.5}``).
        channels_last: keep the network's weights and its input in ``torch.channels_last`` memory format
            (same results; on CPUs it trains MobileNetV2 about 2.5x faster, see :func:`_to_channels_last`).
        freeze_bn_stats: keep BatchNorm layers in eval mode while training (running statistics frozen; their
            affine weights still learn), for fine-tuning a trained network (see :meth:`on_train_batch_start`).

    Raises:
        ValueError: for an unknown ``arch`` or ``schedule``, an out-of-range value, or weights that do not fit.

    """

    def __init__(
        self,
        arch: str = "resnet32",
        num_classes: int = 10,
        weights: str | None = None,
        weights_sha256: str | None = None,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        schedule: Schedule = "cosine",
        label_smoothing: float = 0.0,
        arch_kwargs: dict[str, Any] | None = None,
        channels_last: bool = False,
        freeze_bn_stats: bool = False,
    ) -> None:
        super().__init__()
        _check_schedule_and_lr(schedule, lr)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"Expected label_smoothing to be in [0, 1), got {label_smoothing!r}")
        self.save_hyperparameters()
        self._build_net(arch, weights, weights_sha256, num_classes=num_classes, **(arch_kwargs or {}))
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def _loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits, target, label_smoothing=self.hparams["label_smoothing"])

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, metric: MulticlassAccuracy) -> Tensor:
        x, y = batch
        logits = self(x)  # (N, num_classes)
        loss = F.cross_entropy(logits, y)
        metric.update(logits, y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(y))
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Updates and logs ``val/acc`` and ``val/loss``."""
        return self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Updates and logs ``test/acc`` and ``test/loss``."""
        return self._evaluate(batch, "test", self.test_acc)

    def _optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            params,
            lr=self.hparams["lr"],
            momentum=self.hparams["momentum"],
            weight_decay=self.hparams["weight_decay"],
            nesterov=self.hparams["nesterov"],
        )


class SegmentationModel(_Task):
    """Semantic segmentation trained with AdamW and cross-entropy; reports mIoU and pixel accuracy.

    Args:
        arch: a name of :data:`lightning_dqa.demos.models.ARCHS` that maps images to per-pixel logits (``unet``).
        num_classes: number of real classes (11 for CamVid).
        ignore_index: target value left out of the loss and the metrics (11, void, for CamVid).
        in_channels: image channels.
        base_width: U-Net width of the first level.
        depth: U-Net down-sampling stages.
        weights: a checkpoint path or URL loaded into ``net``, or ``None``.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        schedule: ``cosine`` (per step over the run) or ``constant``.
        class_weights: one cross-entropy weight per class, or ``None`` for equal weights.
        arch_kwargs: extra constructor arguments (e.g. ``{"up_mode": "bilinear"}``).
        channels_last: keep weights and input in ``torch.channels_last`` memory format (same results, faster
            convolutions on CPUs).
        freeze_bn_stats: keep BatchNorm layers in eval mode while training (see :meth:`_Task.on_train_batch_start`).

    Raises:
        ValueError: for an unknown ``arch`` or ``schedule``, or ``class_weights`` of the wrong length.

    """

    def __init__(
        self,
        arch: str = "unet",
        num_classes: int = 11,
        ignore_index: int = 11,
        in_channels: int = 3,
        base_width: int = 32,
        depth: int = 4,
        weights: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        schedule: Schedule = "cosine",
        class_weights: list[float] | None = None,
        arch_kwargs: dict[str, Any] | None = None,
        channels_last: bool = False,
        freeze_bn_stats: bool = False,
    ) -> None:
        super().__init__()
        _check_schedule_and_lr(schedule, lr)
        if class_weights is not None and len(class_weights) != num_classes:
            raise ValueError(
                f"Expected class_weights to have num_classes={num_classes} entries, got {len(class_weights)}"
            )
        self.save_hyperparameters()
        kwargs: dict[str, Any] = {"num_classes": num_classes}
        if arch == "unet":
            kwargs.update(in_channels=in_channels, base_width=base_width, depth=depth)
        self._build_net(arch, weights, None, **kwargs, **(arch_kwargs or {}))
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.class_weights: Tensor | None
        self.register_buffer("class_weights", weight)
        self.val_miou = MulticlassJaccardIndex(num_classes, ignore_index=ignore_index, average="macro")
        self.val_pixel_acc = MulticlassAccuracy(num_classes, ignore_index=ignore_index, average="micro")
        self.test_miou = MulticlassJaccardIndex(num_classes, ignore_index=ignore_index, average="macro")
        self.test_pixel_acc = MulticlassAccuracy(num_classes, ignore_index=ignore_index, average="micro")

    def _loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits, target, weight=self.class_weights, ignore_index=self.hparams["ignore_index"])

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        logits = self(x)  # (N, K, H, W)
        loss = self._loss(logits, y)
        miou = self.val_miou if stage == "val" else self.test_miou
        pixel_acc = self.val_pixel_acc if stage == "val" else self.test_pixel_acc
        preds = logits.argmax(dim=1)  # (N, H, W)
        miou.update(preds, y)
        pixel_acc.update(preds, y)
        n = len(y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=n)
        self.log(f"{stage}/miou", miou, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        self.log(f"{stage}/acc", pixel_acc, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Updates and logs ``val/miou``, ``val/acc`` (pixel accuracy) and ``val/loss``."""
        return self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Updates and logs ``test/miou``, ``test/acc`` and ``test/loss``."""
        return self._evaluate(batch, "test")

    def _optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])
