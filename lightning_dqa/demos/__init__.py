"""Demo models, data modules and LightningModules used by the examples, tests and YAML configs.

Not part of the quantization API: the core of ``lightning_dqa`` never imports this package. The data modules
read their folder from ``root`` or, when it is ``None``, from the ``LIGHTNING_DQA_DATA`` environment variable
(a folder holding ``cifar10/`` and ``camvid/``).
"""

from lightning_dqa.demos.data import (
    DATA_ENV_VAR,
    CamVidDataModule,
    CamVidDataset,
    CIFAR10DataModule,
    JointTransform,
    resolve_root,
)
from lightning_dqa.demos.models import (
    ARCHS,
    CifarResNet,
    UNet,
    build_model,
    cifar_resnet,
    load_pretrained,
    mobilenetv2,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
    unet,
)
from lightning_dqa.demos.tasks import ImageClassifier, SegmentationModel

__all__ = [
    "ARCHS",
    "DATA_ENV_VAR",
    "CIFAR10DataModule",
    "CamVidDataModule",
    "CamVidDataset",
    "CifarResNet",
    "ImageClassifier",
    "JointTransform",
    "SegmentationModel",
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
    "resolve_root",
    "unet",
]
