"""Post-training quantization of common torchvision architectures (random weights, 32x32 inputs) through
``Trainer.validate``: every quantizer is calibrated and on, outputs stay finite, memory is logged."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from compat import Classifier, calibrated, images_loader
from test_user_setups import trainer
from torch import nn
from torchvision import models

from lightning_dqa import DQACallback

pytestmark = pytest.mark.usefixtures("single_thread")

ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: models.resnet18(weights=None, num_classes=10),
    "mobilenet_v3_small": lambda: models.mobilenet_v3_small(weights=None, num_classes=10),
    "efficientnet_b0": lambda: models.efficientnet_b0(weights=None, num_classes=10),
    "regnet_x_400mf": lambda: models.regnet_x_400mf(weights=None, num_classes=10),
    "convnext_tiny": lambda: models.convnext_tiny(weights=None, num_classes=10),
    "squeezenet1_1": lambda: models.squeezenet1_1(weights=None, num_classes=10),
    "densenet121": lambda: models.densenet121(weights=None, num_classes=10),
    "shufflenet_v2_x0_5": lambda: models.shufflenet_v2_x0_5(weights=None, num_classes=10),
}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_torchvision_architecture_validates_quantized(arch: str):
    torch.manual_seed(0)
    model = Classifier(ARCHITECTURES[arch]())
    cb = DQACallback(bits=4, calibration_samples=32, verbose=False)
    t = trainer(callbacks=[cb], limit_val_batches=2)
    t.validate(model, dataloaders=images_loader())
    assert calibrated(model)
    assert cb.report is not None and cb.report.samples == 32
    metrics = t.callback_metrics
    assert float(metrics["val/finite"]) == 1.0
    assert torch.isfinite(metrics["val/loss"])
    assert 4.0 <= float(metrics["dqa/bits_per_value"]) < 32.0
