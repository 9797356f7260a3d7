"""CIFAR-10 as a LightningDataModule, with a seeded calibration subset that uses the evaluation transforms.

By default the validation set *is* the test set, as in the DQA paper, which reports test accuracy; pick
``val_split="holdout"`` to hold out part of the training set instead.

Example::

    dm = CIFAR10DataModule(root="/data/cifar10", limit_test=1000)
    dm.setup("test")
    images, labels = next(iter(dm.test_dataloader()))  # (256, 3, 32, 32), (256,)

"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T
from torchvision.datasets import CIFAR10

from lightning_dqa.core._checks import is_int
from lightning_dqa.demos.data.base import DemoDataModule, check_mean_std, check_num_workers, check_positive_int
from lightning_dqa.demos.data.root import resolve_root

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "CIFAR10DataModule", "TransformedDataset"]

# The statistics the pretrained ResNet-32 was trained with (ImageNet's), per the README of its weights.
CIFAR10_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
CIFAR10_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
BASE_FOLDER = "cifar-10-batches-py"
TRAIN_SIZE = 50_000
TEST_SIZE = 10_000


class TransformedDataset(Dataset):
    """A view of ``(image, target)`` pairs with ``transform`` applied to the image.

    Lets the training and calibration views share one decoded copy of the data.

    Args:
        base: a dataset of ``(PIL image, int)`` pairs.
        transform: applied to each image.

    """

    def __init__(self, base: Dataset, transform: Callable[[Any], Tensor]) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, target = self.base[index]
        return self.transform(image), target


class CIFAR10DataModule(DemoDataModule):
    """CIFAR-10 train / val / test loaders and calibration subsets.

    Batches are ``(B, 3, 32, 32)`` float images and ``(B,)`` labels; the test loader keeps the file's order.

    Args:
        root: folder that holds ``cifar-10-batches-py/``; ``None`` reads ``$LIGHTNING_DQA_DATA/cifar10`` (see
            :func:`~lightning_dqa.demos.data.root.resolve_root`).
        download: passed to ``torchvision.datasets.CIFAR10``; it verifies the files present and fetches the
            archive only when they are missing or corrupted.
        batch_size: training batch size.
        eval_batch_size: validation / test / calibration batch size.
        num_workers: data-loading worker processes.
        augment: random crop (32, padding 4) and horizontal flip for training; ``False`` uses the
            evaluation transforms everywhere.
        val_split: ``test`` validates on the test set (the paper's protocol); ``holdout`` validates on
            ``holdout_size`` training images, drawn with ``seed``, and trains on the rest.
        holdout_size: size of the held-out validation set for ``val_split="holdout"``.
        limit_train: keep only the first ``limit_train`` training images (after the holdout split).
        limit_test: keep only the first ``limit_test`` test images (also for validation when
            ``val_split="test"``).
        normalize: normalize with ``mean`` / ``std`` after ``ToTensor``.
        mean: per-channel mean (the default is what the pretrained ResNet-32 expects).
        std: per-channel standard deviation.
        seed: seed of the holdout split and the default seed of :meth:`calibration_subset`.

    Raises:
        ValueError: for an argument out of range, ``root=None`` with ``LIGHTNING_DQA_DATA`` unset, or a ``root``
            without ``cifar-10-batches-py`` when ``download=False``.

    """

    def __init__(
        self,
        root: str | None = None,
        download: bool = False,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        augment: bool = True,
        val_split: Literal["test", "holdout"] = "test",
        holdout_size: int = 5000,
        limit_train: int | None = None,
        limit_test: int | None = None,
        normalize: bool = True,
        mean: tuple[float, float, float] = CIFAR10_MEAN,
        std: tuple[float, float, float] = CIFAR10_STD,
        seed: int = 0,
    ) -> None:
        super().__init__()
        root = resolve_root(root, "cifar10")
        self.save_hyperparameters()
        self.root = root
        self.download = download
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.augment = augment
        self.val_split = val_split
        self.holdout_size = holdout_size
        self.limit_train = limit_train
        self.limit_test = limit_test
        self.normalize = normalize
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.seed = seed
        self._check_args()
        self._train_base: CIFAR10 | None = None
        self._test_base: CIFAR10 | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _check_args(self) -> None:
        """Raise a ``ValueError`` naming the first constructor argument out of range."""
        check_positive_int("batch_size", self.batch_size)
        check_positive_int("eval_batch_size", self.eval_batch_size)
        check_positive_int("holdout_size", self.holdout_size)
        check_positive_int("limit_train", self.limit_train, allow_none=True)
        check_positive_int("limit_test", self.limit_test, allow_none=True)
        check_num_workers(self.num_workers)
        if self.val_split not in ("test", "holdout"):
            raise ValueError(f"Expected val_split to be one of ['test', 'holdout'], got {self.val_split!r}")
        if self.val_split == "holdout" and self.holdout_size >= TRAIN_SIZE:
            raise ValueError(f"Expected holdout_size < {TRAIN_SIZE} (the training set), got {self.holdout_size}")
        check_mean_std(self.mean, self.std)
        if not is_int(self.seed):
            raise ValueError(f"Expected seed to be an int, got {self.seed!r}")
        root = Path(self.root)
        if not self.download and not (root / BASE_FOLDER).is_dir():
            raise ValueError(
                f"Expected root to contain {BASE_FOLDER}/, got root={self.root!r} (resolved: {root.resolve()}); "
                "point root at the folder holding it, or pass download=True to fetch CIFAR-10"
            )

    # ----------------------------------------------------------------- transforms

    def eval_transform(self) -> Callable[[Any], Tensor]:
        """PIL image -> ``(3, 32, 32)`` float tensor: ``ToTensor`` then (optionally) ``Normalize``."""
        steps: list[Callable[[Any], Any]] = [T.ToTensor()]
        if self.normalize:
            steps.append(T.Normalize(self.mean, self.std))
        return T.Compose(steps)

    def train_transform(self) -> Callable[[Any], Tensor]:
        """The evaluation transform, preceded by random crop and flip when ``augment`` is set."""
        if not self.augment:
            return self.eval_transform()
        return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), self.eval_transform()])

    # ----------------------------------------------------------------- datasets

    def prepare_data(self) -> None:
        """Verify (and with ``download=True`` fetch) the files; runs on one process only."""
        if self.download:
            CIFAR10(self.root, train=True, download=True)
            CIFAR10(self.root, train=False, download=True)

    def _train_data(self) -> CIFAR10:
        if self._train_base is None:
            self._train_base = CIFAR10(self.root, train=True, download=False)
        return self._train_base

    def _test_data(self) -> CIFAR10:
        if self._test_base is None:
            self._test_base = CIFAR10(self.root, train=False, download=False)
        return self._test_base

    def _split_indices(self) -> tuple[list[int], list[int]]:
        """``(train_indices, holdout_indices)`` into the 50,000 training images."""
        if self.val_split == "test":
            return list(range(TRAIN_SIZE)), []
        order = torch.randperm(TRAIN_SIZE, generator=torch.Generator().manual_seed(self.seed)).tolist()
        return sorted(order[self.holdout_size :]), sorted(order[: self.holdout_size])

    def _limited_test(self) -> Dataset:
        test = TransformedDataset(self._test_data(), self.eval_transform())
        if self.limit_test is not None and self.limit_test < TEST_SIZE:
            return Subset(test, range(self.limit_test))
        return test

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets needed by ``stage`` (``fit``, ``validate``, ``test``, ``predict`` or all)."""
        if stage in (None, "fit"):
            train_idx, _ = self._split_indices()
            if self.limit_train is not None:
                train_idx = train_idx[: self.limit_train]
            self.train_set = Subset(TransformedDataset(self._train_data(), self.train_transform()), train_idx)
        if stage in (None, "fit", "validate"):
            if self.val_split == "test":
                self.val_set = self._limited_test()
            else:
                _, holdout_idx = self._split_indices()
                self.val_set = Subset(TransformedDataset(self._train_data(), self.eval_transform()), holdout_idx)
        if stage in (None, "test", "predict"):
            self.test_set = self._limited_test()

    def calibration_subset(self, n: int, seed: int | None = None) -> Subset:
        """A seeded random subset of the training split with the *evaluation* transforms (no augmentation).

        Args:
            n: number of images, at most the size of the training split.
            seed: seed of the draw; ``None`` uses the module's ``seed``.

        Returns:
            A ``Subset`` of ``(image (3, 32, 32), label)`` pairs; the same ``(n, seed)`` gives the same images.

        Raises:
            ValueError: if ``n`` is not a positive int no larger than the training split.

        """
        check_positive_int("n", n)
        train_idx, _ = self._split_indices()
        if n > len(train_idx):
            raise ValueError(f"Expected n <= {len(train_idx)} (the training split), got {n}")
        g = torch.Generator().manual_seed(self.seed if seed is None else seed)
        picks = torch.randperm(len(train_idx), generator=g)[:n].tolist()
        base = TransformedDataset(self._train_data(), self.eval_transform())
        return Subset(base, [train_idx[i] for i in picks])

    # ----------------------------------------------------------------- loaders

    def calibration_dataloader(self, n: int, seed: int | None = None, batch_size: int | None = None) -> DataLoader:
        """Batches of :meth:`calibration_subset` in a fixed order (``eval_batch_size`` unless given)."""
        return self._calibration_loader(self.calibration_subset(n, seed), batch_size)
