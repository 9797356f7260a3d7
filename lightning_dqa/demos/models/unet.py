"""U-Net for semantic segmentation, for inputs of any size.

Encoder: a double conv (Conv-BN-ReLU twice) at full resolution, then ``depth`` stages of 2x2 max-pool and a
double conv, doubling the width each time. Decoder: ``depth`` stages that upsample (a stride-2
``ConvTranspose2d`` or bilinear interpolation plus a 1x1 conv), concatenate the encoder's map of the same level
and apply a double conv. A 1x1 conv gives the class logits.

Sizes that are not multiples of ``2 ** depth`` (CamVid's 180 rows: 180 -> 90 -> 45 -> 22) work: max-pooling
floors, so an upsampled map is at most one pixel smaller than its skip, and it is zero-padded at the bottom /
right to the skip's size (bilinear mode interpolates straight to that size). The output always has the input's
spatial size. The padding amounts are computed from tensor shapes, which ``torch.fx.symbolic_trace`` records
as graph operations, so the model is fx-traceable.

Example:
    >>> import torch
    >>> UNet(base_width=8, depth=3)(torch.randn(1, 3, 45, 61)).shape
    torch.Size([1, 11, 45, 61])

"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_dqa.core._checks import is_int

__all__ = ["UP_MODES", "DoubleConv", "UNet", "Up", "unet"]

UpMode = Literal["transpose", "bilinear"]
UP_MODES: tuple[str, ...] = ("transpose", "bilinear")


class DoubleConv(nn.Sequential):
    """Conv3x3-BN-ReLU twice: ``(N, in_channels, H, W) -> (N, out_channels, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )


class Down(nn.Sequential):
    """2x2 max-pool, then a double conv: ``(N, C_in, H, W) -> (N, C_out, floor(H/2), floor(W/2))``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))


class Up(nn.Module):
    """Upsample to the skip's size, concatenate the skip, double conv.

    Args:
        in_channels: channels of the coarse input (twice ``out_channels``).
        out_channels: channels of the skip and of the output.
        mode: ``transpose`` (2x2 stride-2 transposed conv, then zero-pad to the skip's size) or ``bilinear``
            (interpolate to the skip's size, then a 1x1 conv).

    """

    def __init__(self, in_channels: int, out_channels: int, mode: UpMode = "transpose") -> None:
        super().__init__()
        self.mode = mode
        if mode == "transpose":
            self.up: nn.Module = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        else:
            self.up = nn.Conv2d(in_channels, out_channels, 1)
        self.conv = DoubleConv(2 * out_channels, out_channels)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        """Fuse a coarse map with its skip.

        Args:
            x: ``(N, in_channels, h, w)`` with ``h = floor(H / 2)``, ``w = floor(W / 2)``.
            skip: ``(N, out_channels, H, W)``.

        Returns:
            ``(N, out_channels, H, W)``.

        """
        if self.mode == "transpose":
            x = self.up(x)  # (N, C_out, 2h, 2w), at most one pixel short of the skip per dimension
            x = F.pad(x, (0, skip.shape[-1] - x.shape[-1], 0, skip.shape[-2] - x.shape[-2]))  # (N, C_out, H, W)
        else:
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)  # (N, C_in, H, W)
            x = self.up(x)  # (N, C_out, H, W)
        return self.conv(torch.cat([skip, x], dim=1))  # (2 C_out channels in) -> (N, C_out, H, W)


class UNet(nn.Module):
    """U-Net with ``depth`` down-sampling stages.

    Args:
        in_channels: image channels.
        num_classes: output channels (logits per class).
        base_width: channels of the first level; level ``i`` has ``base_width * 2 ** i``.
        depth: number of 2x down-sampling stages (and of up-sampling stages).
        up_mode: ``transpose`` or ``bilinear`` (see :class:`Up`).

    Raises:
        ValueError: if an argument is out of range.

    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 11,
        base_width: int = 32,
        depth: int = 4,
        up_mode: UpMode = "transpose",
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("base_width", base_width),
            ("depth", depth),
        ):
            if not is_int(value) or value < 1:
                raise ValueError(f"Expected {name} to be a positive int, got {value!r}")
        if up_mode not in UP_MODES:
            raise ValueError(f"Expected up_mode to be one of {list(UP_MODES)}, got {up_mode!r}")
        widths = [base_width * 2**i for i in range(depth + 1)]
        self.depth = depth
        self.stem = DoubleConv(in_channels, widths[0])
        self.down = nn.ModuleList(Down(widths[i], widths[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(Up(widths[i + 1], widths[i], up_mode) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Per-pixel logits.

        Args:
            x: images ``(N, in_channels, H, W)``, any ``H, W >= 2 ** depth``.

        Returns:
            ``(N, num_classes, H, W)``.

        """
        x = self.stem(x)  # (N, w, H, W)
        skips = [x]
        for down in self.down:
            x = down(x)  # (N, 2C, H/2, W/2), floored
            skips.append(x)
        skips.pop()  # the bottleneck is not a skip
        for up in self.up:
            x = up(x, skips.pop())  # (N, C/2, 2h (+1), 2w (+1))
        return self.head(x)  # (N, num_classes, H, W)


def unet(num_classes: int = 11, **kwargs: Any) -> UNet:
    """A :class:`UNet` (the constructor registered as ``"unet"``); ``kwargs`` are its other arguments, by name.

    Example:
        >>> unet(5, base_width=8, depth=2).head.out_channels
        5

    """
    return UNet(num_classes=num_classes, **kwargs)
