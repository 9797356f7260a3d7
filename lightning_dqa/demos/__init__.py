"""Demo models, data modules and LightningModules used by the examples, tests and YAML configs.

Not part of the quantization API: the core of ``lightning_dqa`` never imports this package. The data modules
read their folder from ``root`` or, when it is ``None``, from the ``LIGHTNING_DQA_DATA`` environment variable
(a folder holding ``cifar10/`` and ``camvid/``).
"""

from lightning_dqa.demos import data, models, tasks
from lightning_dqa.demos.data import *  # noqa: F403  (re-exports data.__all__)
from lightning_dqa.demos.models import *  # noqa: F403  (re-exports models.__all__)
from lightning_dqa.demos.tasks import *  # noqa: F403  (re-exports tasks.__all__)

__all__ = sorted([*data.__all__, *models.__all__, *tasks.__all__])
