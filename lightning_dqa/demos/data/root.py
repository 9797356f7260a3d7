"""Where the demo data modules find their data: the ``root`` argument, else one environment variable.

``LIGHTNING_DQA_DATA`` names a folder that holds one sub-folder per data set (``cifar10/``, ``camvid/``); an
explicit ``root`` always wins. There is no built-in default, so an installed package never guesses a path.

Example (shell)::

    export LIGHTNING_DQA_DATA=/data   # /data/cifar10, /data/camvid
    python -c "from lightning_dqa.demos import CIFAR10DataModule; CIFAR10DataModule()"

"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DATA_ENV_VAR", "resolve_root"]

DATA_ENV_VAR = "LIGHTNING_DQA_DATA"


def resolve_root(root: str | os.PathLike[str] | None, subfolder: str) -> str:
    """The data set folder: ``root`` when given, else ``$LIGHTNING_DQA_DATA/<subfolder>``.

    Args:
        root: the data set folder, or ``None`` to read the environment variable.
        subfolder: the data set's folder name inside ``$LIGHTNING_DQA_DATA`` (e.g. ``cifar10``).

    Returns:
        The folder as a string (not checked for existence here; the data modules check their own layout).

    Raises:
        ValueError: if ``root`` is ``None`` and ``LIGHTNING_DQA_DATA`` is unset or empty.

    Example:
        >>> resolve_root("/data/camvid", "camvid")  # an explicit root is used as given
        '/data/camvid'

    """
    if root is not None:
        return os.fspath(root)
    base = os.environ.get(DATA_ENV_VAR, "")
    if not base:
        raise ValueError(
            f"Expected root to be the {subfolder} folder, or the {DATA_ENV_VAR} environment variable to name a "
            f"folder holding {subfolder}/; got root=None and {DATA_ENV_VAR} unset. Pass root=... or set "
            f"{DATA_ENV_VAR}=/path/to/data"
        )
    return str(Path(base) / subfolder)
