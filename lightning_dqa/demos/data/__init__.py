"""Data modules used by the examples: CIFAR-10 classification and CamVid segmentation.

Their ``root`` defaults to ``None``, which reads ``$LIGHTNING_DQA_DATA/<cifar10|camvid>`` (see :mod:`.root`).
"""

from lightning_dqa.demos.data.camvid import CamVidDataModule, CamVidDataset, JointTransform
from lightning_dqa.demos.data.cifar10 import CIFAR10DataModule
from lightning_dqa.demos.data.root import DATA_ENV_VAR, resolve_root

__all__ = ["DATA_ENV_VAR", "CIFAR10DataModule", "CamVidDataModule", "CamVidDataset", "JointTransform", "resolve_root"]
