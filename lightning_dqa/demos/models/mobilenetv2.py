"""MobileNetV2 adapted to 32x32 inputs (CIFAR), built on ``torchvision.models.MobileNetV2``.

The ImageNet network downsamples 32 times, which would leave a 1x1 map for a 32x32 image. The usual CIFAR
adaptation, used here, removes two of the five stride-2 steps:

- the stem convolution has stride 1 instead of 2;
- the second stage (24 channels) has stride 1 instead of 2, so the stage strides are ``(1, 1, 2, 2, 1, 2, 1)``.

A 32x32 input therefore reaches the last stage at 4x4 (overall stride 8). Everything else (expansion factors,
widths, depths, ReLU6, the 1x1 head convolution to 1280 channels, dropout before the classifier) is
torchvision's. The model is ``torch.fx.symbolic_trace``-able.

Example:
    >>> import torch
    >>> mobilenetv2(num_classes=10)(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])

"""

from __future__ import annotations

from torchvision.models import MobileNetV2

from lightning_dqa.core._checks import is_int

__all__ = ["CIFAR_INVERTED_RESIDUAL_SETTING", "mobilenetv2"]

# (expansion t, output channels c, repeats n, stride s) per stage; torchvision's ImageNet strides are
# (1, 2, 2, 2, 1, 2, 1).
CIFAR_INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def mobilenetv2(num_classes: int = 10, width_mult: float = 1.0, dropout: float = 0.2) -> MobileNetV2:
    """MobileNetV2 for 32x32 images (stem stride 1, stage strides ``(1, 1, 2, 2, 1, 2, 1)``).

    Args:
        num_classes: outputs of the classifier.
        width_mult: multiplier of every layer's width (channels rounded to multiples of 8).
        dropout: dropout probability before the classifier.

    Returns:
        A ``torchvision.models.MobileNetV2``: ``(N, 3, H, W) -> (N, num_classes)``.

    Raises:
        ValueError: if an argument is out of range.

    """
    if not is_int(num_classes) or num_classes < 1:
        raise ValueError(f"Expected num_classes to be a positive int, got {num_classes!r}")
    if not width_mult > 0:
        raise ValueError(f"Expected width_mult to be > 0, got {width_mult!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"Expected dropout to be in [0, 1), got {dropout!r}")
    model = MobileNetV2(
        num_classes=num_classes,
        width_mult=width_mult,
        inverted_residual_setting=[list(s) for s in CIFAR_INVERTED_RESIDUAL_SETTING],
        dropout=dropout,
    )
    stem = model.features[0][0]  # torchvision hard-codes stride 2 here; padding 1 keeps the size at stride 1
    stem.stride = (1, 1)
    return model
