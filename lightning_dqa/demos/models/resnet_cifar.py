"""The CIFAR ResNet family of He et al. (depth ``6n + 2``) with the parameter-free "option A" shortcut.

Parameter names and shapes follow the layout of the widely used pretrained CIFAR-10 checkpoints
(``conv1``, ``bn1``, ``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}``, ``linear``), so ``resnet32()`` loads
``resnet32-d509ac18.th`` with :func:`load_pretrained`. The forward pass has no data-dependent control flow,
so every model here is ``torch.fx.symbolic_trace``-able.

Example:
    >>> import torch
    >>> model = resnet20()
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])

"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_dqa.core._checks import is_int

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "PadShortcut",
    "cifar_resnet",
    "load_pretrained",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
]

WIDTHS: tuple[int, int, int] = (16, 32, 64)


class PadShortcut(nn.Module):
    """Option-A shortcut: keep every second pixel and zero-pad the channels, ``pad`` planes on each side.

    Args:
        pad: zero channels added before and after the input's channels.

    """

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        """Subsample and pad.

        Args:
            x: ``(N, C, H, W)``.

        Returns:
            ``(N, C + 2 * pad, ceil(H / 2), ceil(W / 2))``.

        """
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))  # (N, C + 2 pad, H/2, W/2)

    def extra_repr(self) -> str:
        """Shown by ``print(model)``."""
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut, ReLU after the sum.

    Args:
        in_planes: input channels.
        planes: output channels.
        stride: stride of the first convolution (1 or 2).

    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        if stride != 1 or in_planes != planes:
            # Option A of the ResNet paper: the CIFAR checkpoints use planes // 4 zero channels each side.
            self.shortcut: nn.Module = PadShortcut(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Residual block.

        Args:
            x: ``(N, in_planes, H, W)``.

        Returns:
            ``(N, planes, H / stride, W / stride)``.

        """
        out = self.relu1(self.bn1(self.conv1(x)))  # (N, planes, H', W')
        out = self.bn2(self.conv2(out))  # (N, planes, H', W')
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 images: a 3x3 stem, three stages of ``n`` basic blocks (16, 32, 64 wide), pool, linear.

    Args:
        blocks_per_stage: ``n``; the depth is ``6n + 2``.
        num_classes: outputs of the final linear layer.

    Raises:
        ValueError: if ``blocks_per_stage`` or ``num_classes`` is not a positive int.

    """

    def __init__(self, blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        for name, value in (("blocks_per_stage", blocks_per_stage), ("num_classes", num_classes)):
            if not is_int(value) or value < 1:
                raise ValueError(f"Expected {name} to be a positive int, got {value!r}")
        self.conv1 = nn.Conv2d(3, WIDTHS[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        self.relu = nn.ReLU()
        in_planes = WIDTHS[0]
        stages = []
        for i, planes in enumerate(WIDTHS):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(in_planes, planes, stride)]
            blocks += [BasicBlock(planes, planes, 1) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(WIDTHS[-1], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        """Logits.

        Args:
            x: images ``(N, 3, H, W)`` (32x32 for CIFAR).

        Returns:
            ``(N, num_classes)``.

        """
        x = self.relu(self.bn1(self.conv1(x)))  # (N, 16, H, W)
        x = self.layer3(self.layer2(self.layer1(x)))  # (N, 64, H/4, W/4)
        x = torch.flatten(self.pool(x), 1)  # (N, 64)
        return self.linear(x)


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    """A CIFAR ResNet of the given depth.

    Args:
        depth: ``6n + 2`` for an integer ``n >= 1`` (20, 32, 44, 56, 110, ...).
        num_classes: outputs of the final linear layer.

    Returns:
        The model, randomly initialised.

    Raises:
        ValueError: if ``depth`` is not of the form ``6n + 2``.

    """
    if not is_int(depth) or depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"Expected depth to be 6n + 2 for an integer n >= 1 (e.g. 20, 32, 44, 56, 110), got {depth!r}")
    return CifarResNet((depth - 2) // 6, num_classes)


def resnet20(num_classes: int = 10) -> CifarResNet:
    """ResNet-20 (0.27 M parameters)."""
    return cifar_resnet(20, num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    """ResNet-32 (0.46 M parameters); loads ``resnet32-d509ac18.th``."""
    return cifar_resnet(32, num_classes)


def resnet44(num_classes: int = 10) -> CifarResNet:
    """ResNet-44 (0.66 M parameters)."""
    return cifar_resnet(44, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    """ResNet-56 (0.85 M parameters)."""
    return cifar_resnet(56, num_classes)


def resnet110(num_classes: int = 10) -> CifarResNet:
    """ResNet-110 (1.7 M parameters)."""
    return cifar_resnet(110, num_classes)


def _is_url(path_or_url: str | os.PathLike[str]) -> bool:
    return urlparse(str(path_or_url)).scheme in ("http", "https")


def _sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_sha256(path: str | os.PathLike[str], expected: str | None) -> None:
    if expected is None:
        return
    actual = _sha256(path)
    if actual != expected.lower():
        raise ValueError(f"Expected sha256 of {str(path)!r} to be {expected}, got {actual}; the file differs")


def _state_dict_of(checkpoint: object, strip_prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    """The tensors of a checkpoint (a plain state dict or a dict holding one under ``state_dict``), unprefixed."""
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"Expected a checkpoint holding a state dict, got {type(checkpoint).__name__}")
    out = {}
    for key, value in checkpoint.items():
        for prefix in strip_prefixes:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        out[key] = value
    return out


def _check_keys(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Raise unless ``state`` matches ``model`` key for key and shape (``num_batches_tracked`` may be missing)."""
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in expected)
    if missing or unexpected:
        raise ValueError(
            f"Checkpoint keys do not match {type(model).__name__}: missing {missing}, unexpected {unexpected}; "
            "check the architecture (e.g. the depth) and the key prefixes"
        )
    wrong = [
        f"{k}: {tuple(v.shape)} != {tuple(expected[k].shape)}" for k, v in state.items() if v.shape != expected[k].shape
    ]
    if wrong:
        raise ValueError(f"Checkpoint shapes do not match {type(model).__name__} (checkpoint != model): {wrong}")


def load_pretrained(
    model: nn.Module,
    path_or_url: str | os.PathLike[str],
    sha256: str | None = None,
    strip_prefixes: tuple[str, ...] = ("module.",),
    weights_only: bool = True,
) -> nn.Module:
    """Load a checkpoint into ``model`` in place, with a strict key check.

    Only ``num_batches_tracked`` buffers may be missing from the checkpoint (BatchNorm keeps its own).

    Args:
        model: the module to fill.
        path_or_url: a local file or an ``http(s)`` URL (downloaded once into the ``torch.hub`` cache).
        sha256: when given, the file's expected sha256 hex digest.
        strip_prefixes: key prefixes removed from the checkpoint's keys (the first that matches), e.g. the
            ``module.`` that ``DataParallel`` adds.
        weights_only: passed to ``torch.load``; keep ``True`` for files you do not trust.

    Returns:
        ``model``, with the weights loaded.

    Raises:
        FileNotFoundError: if a local path does not exist.
        ValueError: on a sha256 mismatch, or naming the missing / unexpected keys or mismatched shapes.

    Example::

        model = load_pretrained(resnet32(), "weights/resnet32-d509ac18.th")

    """
    if _is_url(path_or_url):
        url = str(path_or_url)
        checkpoint = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=weights_only)
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
        _check_sha256(cached, sha256)
    else:
        path = Path(path_or_url)
        if not path.is_file():
            raise FileNotFoundError(f"Expected path_or_url to be an existing file or an http(s) URL, got {str(path)!r}")
        _check_sha256(path, sha256)
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
    state = _state_dict_of(checkpoint, strip_prefixes)
    _check_keys(model, state)
    model.load_state_dict(state, strict=False)  # only num_batches_tracked can be absent, checked above
    return model
