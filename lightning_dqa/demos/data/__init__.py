"""Data modules used by the examples: CIFAR-10 classification and CamVid segmentation."""

from lightning_dqa.demos.data.camvid import CamVidDataModule, CamVidDataset, JointTransform
from lightning_dqa.demos.data.cifar10 import CIFAR10DataModule

__all__ = ["CIFAR10DataModule", "CamVidDataModule", "CamVidDataset", "JointTransform"]
