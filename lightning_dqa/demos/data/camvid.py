"""CamVid road-scene segmentation (SegNet's 11-class split at 240x180) as a LightningDataModule.

The folder layout (``root``, or ``$LIGHTNING_DQA_DATA/camvid``): ``train.txt``, ``val.txt`` and ``test.txt`` list one
``"image annotation"`` pair of paths per line, relative to the root; images are RGB PNGs, annotations 8-bit PNGs
whose pixel values are class ids 0..10, with 11 for void (the ignore index).

Example::

    dm = CamVidDataModule(root="/data/camvid", batch_size=4)
    dm.setup("fit")
    images, masks = next(iter(dm.train_dataloader()))
    images.shape, masks.dtype  # (torch.Size([4, 3, 180, 240]), torch.int64)

"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms.functional import pil_to_tensor

from lightning_dqa.core._checks import is_int
from lightning_dqa.demos.data.base import DemoDataModule, check_mean_std, check_num_workers, check_positive_int
from lightning_dqa.demos.data.root import resolve_root

__all__ = [
    "CAMVID_CLASSES",
    "CAMVID_IGNORE_INDEX",
    "CamVidDataModule",
    "CamVidDataset",
    "JointTransform",
    "read_pair_list",
]

CAMVID_CLASSES: tuple[str, ...] = (
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
)
CAMVID_IGNORE_INDEX = 11  # "Unlabelled" (void)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
SPLITS: tuple[str, ...] = ("train", "val", "test")
Split = Literal["train", "val", "test"]


def read_pair_list(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """The ``(image, annotation)`` paths listed in ``root/<split>.txt``.

    Args:
        root: the dataset folder.
        split: ``train``, ``val`` or ``test``.

    Returns:
        Absolute-or-root-relative path pairs, in the list's order.

    Raises:
        FileNotFoundError: if the list file is missing.
        ValueError: if a line does not hold exactly two paths.

    """
    list_file = Path(root) / f"{split}.txt"
    if not list_file.is_file():
        raise FileNotFoundError(f"Expected the list file {list_file} for split {split!r}; is root={str(root)!r} right?")
    pairs = []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"Expected '<image> <annotation>' on line {number} of {list_file}, got {line!r}")
        pairs.append((Path(root) / parts[0], Path(root) / parts[1]))
    return pairs


class JointTransform:
    """Normalize an image and apply the same random flip / scale / crop to it and its mask.

    Order: normalize, horizontal flip (probability 0.5), rescale by a factor drawn uniformly from
    ``scale_range`` (bilinear for the image, nearest for the mask, so no new labels appear), then a random
    crop to ``crop_size``; regions outside the image are padded with 0 (the mean colour after
    normalization) in the image and with ``ignore_index`` in the mask. With ``scale_range`` and no
    ``crop_size``, the crop restores the input size so that batches stack.

    Args:
        mean: per-channel mean subtracted from the ``[0, 1]`` image.
        std: per-channel standard deviation.
        hflip: whether to flip at random.
        scale_range: ``(low, high)`` scale factors, or ``None`` for no rescaling.
        crop_size: ``(height, width)`` of the random crop, or ``None``.
        ignore_index: mask value used for padding.

    """

    def __init__(
        self,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        hflip: bool = False,
        scale_range: tuple[float, float] | None = None,
        crop_size: tuple[int, int] | None = None,
        ignore_index: int = CAMVID_IGNORE_INDEX,
    ) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.hflip = hflip
        self.scale_range = scale_range
        self.crop_size = crop_size
        self.ignore_index = ignore_index

    def __call__(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Transform one pair.

        Args:
            image: ``(3, H, W)`` float in ``[0, 1]``.
            mask: ``(H, W)`` long class ids.

        Returns:
            ``(image (3, h, w) float, mask (h, w) long)``; ``(h, w)`` is ``crop_size`` when set, else ``(H, W)``.

        """
        height, width = mask.shape
        image = (image - self.mean) / self.std  # (3, H, W)
        if self.hflip and torch.rand(()) < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        if self.scale_range is not None:
            low, high = self.scale_range
            scale = low + (high - low) * torch.rand(()).item()
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]  # (3, h', w')
            mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()  # (h', w')
        crop = self.crop_size if self.crop_size is not None else (height, width) if self.scale_range else None
        if crop is not None:
            image, mask = self._random_crop(image, mask, crop)
        return image, mask

    def _random_crop(self, image: Tensor, mask: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Pad to at least ``size`` (image with 0, mask with ``ignore_index``), then crop at a random offset."""
        crop_h, crop_w = size
        pad_h, pad_w = max(0, crop_h - mask.shape[0]), max(0, crop_w - mask.shape[1])
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            mask = F.pad(mask, (0, pad_w, 0, pad_h), value=self.ignore_index)
        top = int(torch.randint(mask.shape[0] - crop_h + 1, ()).item())
        left = int(torch.randint(mask.shape[1] - crop_w + 1, ()).item())
        return image[:, top : top + crop_h, left : left + crop_w], mask[top : top + crop_h, left : left + crop_w]


class CamVidDataset(Dataset):
    """One split of CamVid: ``(image (3, H, W) float, mask (H, W) long)`` pairs.

    Args:
        root: the dataset folder.
        split: ``train``, ``val`` or ``test``.
        transform: joint transform; ``None`` gives the raw ``[0, 1]`` image.
        limit: keep only the first ``limit`` pairs of the list.

    """

    def __init__(
        self, root: str | Path, split: Split, transform: JointTransform | None = None, limit: int | None = None
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"Expected split to be one of {list(SPLITS)}, got {split!r}")
        self.pairs = read_pair_list(root, split)[:limit]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image_path, mask_path = self.pairs[index]
        with Image.open(image_path) as img:
            image = pil_to_tensor(img.convert("RGB")).float().div_(255)  # (3, H, W)
        with Image.open(mask_path) as ann:
            if ann.mode not in ("L", "P"):
                raise ValueError(f"Expected an 8-bit single-channel annotation, got mode {ann.mode!r} in {mask_path}")
            mask = pil_to_tensor(ann)[0].long()  # (H, W)
        if image.shape[1:] != mask.shape:
            raise ValueError(f"Image {image_path} is {tuple(image.shape[1:])} but its mask is {tuple(mask.shape)}")
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image, mask


def _check_args(
    root: str,
    batch_size: int,
    eval_batch_size: int,
    num_workers: int,
    limits: dict[str, int | None],
    scale_range: tuple[float, float] | None,
    crop_size: tuple[int, int] | None,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> None:
    """Raise a ``ValueError`` naming the first :class:`CamVidDataModule` argument out of range."""
    check_positive_int("batch_size", batch_size)
    check_positive_int("eval_batch_size", eval_batch_size)
    check_num_workers(num_workers)
    for limit_name, limit in limits.items():
        check_positive_int(limit_name, limit, allow_none=True)
    if scale_range is not None and (len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]):
        raise ValueError(f"Expected scale_range to be (low, high) with 0 < low <= high, got {scale_range!r}")
    if crop_size is not None and (len(crop_size) != 2 or any(int(s) != s or s < 1 for s in crop_size)):
        raise ValueError(f"Expected crop_size to be (height, width) of positive ints, got {crop_size!r}")
    check_mean_std(mean, std)
    missing = [f"{s}.txt" for s in SPLITS if not (Path(root) / f"{s}.txt").is_file()]
    if missing:
        raise ValueError(
            f"Expected root to be the CamVid folder with train.txt, val.txt and test.txt, got root={root!r} "
            f"(resolved: {Path(root).resolve()}), which lacks {missing}"
        )


class CamVidDataModule(DemoDataModule):
    """CamVid train / val / test loaders (11 classes, void = 11 ignored).

    Batches are ``(B, 3, h, w)`` float images and ``(B, h, w)`` long masks: training batches are augmented
    (flipped, rescaled and cropped as configured), validation and test batches are full size, in the lists' order.

    Args:
        root: the dataset folder (with ``train.txt``, ``val.txt``, ``test.txt``); ``None`` reads
            ``$LIGHTNING_DQA_DATA/camvid`` (see :func:`~lightning_dqa.demos.data.root.resolve_root`).
        batch_size: training batch size.
        eval_batch_size: validation / test batch size.
        num_workers: data-loading worker processes.
        augment: random horizontal flips for training.
        scale_range: ``(low, high)`` random rescaling for training, or ``None``.
        crop_size: ``(height, width)`` random training crop, or ``None`` (full images).
        limit_train: keep only the first ``limit_train`` training pairs.
        limit_val: likewise for validation.
        limit_test: likewise for test.
        mean: per-channel normalization mean.
        std: per-channel normalization standard deviation.

    Raises:
        ValueError: for an argument out of range, ``root=None`` with ``LIGHTNING_DQA_DATA`` unset, or a ``root``
            without the three list files.

    """

    num_classes: int = len(CAMVID_CLASSES)
    ignore_index: int = CAMVID_IGNORE_INDEX

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        augment: bool = True,
        scale_range: tuple[float, float] | None = None,
        crop_size: tuple[int, int] | None = None,
        limit_train: int | None = None,
        limit_val: int | None = None,
        limit_test: int | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        root = resolve_root(root, "camvid")
        _check_args(
            root=root,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            limits={"limit_train": limit_train, "limit_val": limit_val, "limit_test": limit_test},
            scale_range=scale_range,
            crop_size=crop_size,
            mean=mean,
            std=std,
        )
        self.save_hyperparameters()
        self.root = root
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.limits: dict[str, int | None] = {"train": limit_train, "val": limit_val, "test": limit_test}
        self.eval_transform = JointTransform(mean, std)
        self.train_transform = JointTransform(
            mean,
            std,
            hflip=augment,
            scale_range=tuple(scale_range) if scale_range is not None else None,  # type: ignore[arg-type]
            crop_size=tuple(int(s) for s in crop_size) if crop_size is not None else None,  # type: ignore[arg-type]
            ignore_index=self.ignore_index,
        )
        self.train_set: CamVidDataset | None = None
        self.val_set: CamVidDataset | None = None
        self.test_set: CamVidDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets needed by ``stage`` (``fit``, ``validate``, ``test``, ``predict`` or all)."""
        if stage in (None, "fit"):
            self.train_set = CamVidDataset(self.root, "train", self.train_transform, self.limits["train"])
        if stage in (None, "fit", "validate"):
            self.val_set = CamVidDataset(self.root, "val", self.eval_transform, self.limits["val"])
        if stage in (None, "test", "predict"):
            self.test_set = CamVidDataset(self.root, "test", self.eval_transform, self.limits["test"])

    def calibration_subset(self, n: int, seed: int = 0) -> Subset:
        """A seeded random subset of the training pairs with the *evaluation* transform (no augmentation).

        Args:
            n: number of pairs, at most the size of the (limited) training split.
            seed: seed of the draw; the same ``(n, seed)`` gives the same pairs.

        Returns:
            A ``Subset`` of ``(image (3, H, W), mask (H, W))`` pairs at full size.

        Raises:
            ValueError: if ``n`` is not a positive int no larger than the training split.

        """
        train = CamVidDataset(self.root, "train", self.eval_transform, self.limits["train"])
        if not is_int(n) or not 1 <= n <= len(train):
            raise ValueError(f"Expected n to be an int in [1, {len(train)}] (the training split), got {n!r}")
        picks = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n].tolist()
        return Subset(train, picks)

    def calibration_dataloader(self, n: int, seed: int = 0, batch_size: int | None = None) -> DataLoader:
        """Batches of :meth:`calibration_subset` in a fixed order (``eval_batch_size`` unless given).

        :class:`~lightning_dqa.DQACallback` calls this with its ``calibration_samples`` and seed, so
        calibration sees un-augmented training images rather than random crops.
        """
        return self._calibration_loader(self.calibration_subset(n, seed), batch_size)
