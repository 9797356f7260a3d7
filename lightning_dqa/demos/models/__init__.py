"""Models used by the examples: the CIFAR ResNet family, MobileNetV2 for 32x32 images and a U-Net.

Example:
    >>> model = build_model("resnet20", num_classes=10)

"""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType
from typing import Any

from torch import nn

from lightning_dqa.demos.models.mobilenetv2 import mobilenetv2
from lightning_dqa.demos.models.resnet_cifar import (
    CifarResNet,
    cifar_resnet,
    load_pretrained,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
)
from lightning_dqa.demos.models.unet import UNet, unet

__all__ = [
    "ARCHS",
    "CifarResNet",
    "UNet",
    "build_model",
    "cifar_resnet",
    "load_pretrained",
    "mobilenetv2",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "unet",
]

ARCHS: MappingProxyType[str, Callable[..., nn.Module]] = MappingProxyType(
    {
        "resnet20": resnet20,
        "resnet32": resnet32,
        "resnet44": resnet44,
        "resnet56": resnet56,
        "resnet110": resnet110,
        "mobilenetv2": mobilenetv2,
        "unet": unet,
    }
)


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Construct the architecture registered as ``name``.

    Args:
        name: a key of :data:`ARCHS`.
        **kwargs: passed to the constructor (e.g. ``num_classes``, ``width_mult``, ``base_width``).

    Returns:
        The model, randomly initialised.

    Raises:
        ValueError: if ``name`` is not registered.

    """
    if name not in ARCHS:
        raise ValueError(f"Expected name to be one of {sorted(ARCHS)}, got {name!r}")
    return ARCHS[name](**kwargs)
