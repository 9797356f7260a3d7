"""What the demo data modules share: argument checks, the train / val / test / predict loaders and calibration batches.

A subclass sets ``batch_size``, ``eval_batch_size`` and ``num_workers``, builds ``train_set``, ``val_set`` and
``test_set`` in its ``setup``, and implements ``calibration_subset`` and a ``calibration_dataloader`` that hands
that subset to :meth:`DemoDataModule._calibration_loader` (each keeps its own seed default).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lightning_dqa.core._checks import is_int

__all__ = ["DemoDataModule", "check_mean_std", "check_num_workers", "check_positive_int"]


def check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is an int >= 1 (or ``None`` with ``allow_none``)."""
    if allow_none and value is None:
        return
    if not is_int(value) or value < 1:
        suffix = " or None" if allow_none else ""
        raise ValueError(f"Expected {name} to be a positive int{suffix}, got {value!r}")


def check_num_workers(num_workers: Any) -> None:
    """Raise a ``ValueError`` unless ``num_workers`` is an int >= 0."""
    if not is_int(num_workers) or num_workers < 0:
        raise ValueError(f"Expected num_workers to be an int >= 0, got {num_workers!r}")


def check_mean_std(mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """Raise a ``ValueError`` unless ``mean`` and ``std`` have 3 entries each and every ``std`` entry is > 0."""
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(f"Expected mean and std to have 3 entries, std > 0, got mean={mean!r}, std={std!r}")


class DemoDataModule(LightningDataModule):
    """A LightningDataModule whose loaders read ``train_set`` / ``val_set`` / ``test_set`` built by ``setup``.

    Training batches are shuffled and ``batch_size`` long; validation, test and predict batches keep the
    dataset's order and are ``eval_batch_size`` long; predict reuses the test set. Worker processes persist
    across epochs when ``num_workers > 0``.
    """

    batch_size: int
    eval_batch_size: int
    num_workers: int
    train_set: Dataset | None
    val_set: Dataset | None
    test_set: Dataset | None

    def _loader(self, dataset: Dataset | None, name: str, batch_size: int, shuffle: bool = False) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"The {name} set is not built; call setup() with the matching stage first")
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _calibration_loader(self, subset: Dataset, batch_size: int | None) -> DataLoader:
        """``subset`` in a fixed order, ``batch_size`` (``eval_batch_size`` unless given) per batch."""
        return DataLoader(
            subset,
            batch_size=batch_size or self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented training batches."""
        return self._loader(self.train_set, "training", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches, in the dataset's order."""
        return self._loader(self.val_set, "validation", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        """Test batches, in the dataset's order."""
        return self._loader(self.test_set, "test", self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        """The test batches."""
        return self.test_dataloader()
