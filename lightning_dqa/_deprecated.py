"""The 0.1 module paths, kept importable for one release: ``lightning_dqa.engine`` and the rest warn and resolve.

0.2 moved the 36 flat modules into layers (``core``, ``codec``, ``deploy``, ``calibration``, ``integration``).
``import lightning_dqa.engine`` (or ``from lightning_dqa.engine import calibrate``) still works: a finder on
``sys.meta_path`` answers an old path with a module that looks each name up in the modules that now hold it, after
one ``DeprecationWarning`` naming the new path. Old names of the settings and the quantizers keep their identity
(``lightning_dqa.config.DQAConfig is lightning_dqa.DQAConfig``). ``lightning_dqa.lightning_checkpoint`` resolves
without a warning: checkpoints on disk name its instantiator, and loading one is not code the user can change.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from collections.abc import Sequence
from typing import Any

__all__ = ["MODULES", "install"]

_P = "lightning_dqa."
_C, _D, _K, _I = _P + "core.", _P + "deploy.", _P + "calibration.", _P + "integration."
MODULES: dict[str, tuple[str, ...]] = {
    "config": (_C + "config", "lightning_dqa.core.widths"),
    "functional": (_C + "functional",),
    "quantizers": (_C + "quantizers",),
    "noisyquant": (_C + "noisyquant", _C + "attach"),
    "attach": (_C + "attach",),
    "fxgraph": (_C + "fxgraph",),
    "fields": (_C + "_fields",),
    "liveness": (_D + "liveness",),
    "compressed": (_D + "compressed",),
    "accounting": (_D + "accounting",),
    "meter": (_D + "meter",),
    "checkpoint": (_D + "checkpoint",),
    "export": (_D + "artifact", _D + "_schema"),
    "export.artifact": (_D + "artifact",),
    "export.schema": (_D + "_schema",),
    "export.atomic": (_D + "_atomic",),
    "onnx_export": (_D + "onnx.export",),
    "onnx_qdq": (_D + "onnx.qdq",),
    "onnx_verify": (_D + "onnx.verify",),
    "batches": (_K + "batches",),
    "sampling": (_K + "sampling",),
    "observers": (_K + "observers",),
    "collect": (_K + "collect",),
    "clipping": (_K + "clipping",),
    "selection": (_K + "selection",),
    "greedy": (_K + "greedy",),
    "fxreplay": (_K + "fxreplay",),
    "replicas": (_K + "replicas",),
    "methods": (_K + "methods", _C + "attach"),
    "noisyquant_search": (_K + "noisyquant_search",),
    "allocation": (_K + "allocation", "lightning_dqa.core.widths"),
    "engine": (_K + "engine", _C + "attach", _K + "report", _K + "scales", _K + "budget", _K + "batches"),
    "callback": (_I + "callback",),
    "callback_data": (_I + "data",),
    "distributed": (_I + "distributed",),
    "progress": (_I + "progress",),
    "cli": (_I + "cli",),
    "finite": (_I + "finite",),
    "lightning_checkpoint": (_I + "checkpoint_hooks",),
    "codec.layer": (_D + "layer_bytes",),
}
"""Old module (after ``lightning_dqa.``) -> the modules that now hold its names, the main one first."""
_SILENT = frozenset({"lightning_dqa.lightning_checkpoint"})
_REMOVAL = "0.3"


class _Moved(types.ModuleType):
    """An old module path: each attribute is looked up in the modules that hold it now."""

    def __init__(self, name: str, targets: tuple[str, ...]) -> None:
        super().__init__(name, f"Deprecated alias of {targets[0]}.")
        self._targets = targets

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        for target in self._targets:
            module = importlib.import_module(target)
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} (moved to {self._targets[0]!r}) has no attribute {attr!r}")

    def __dir__(self) -> list[str]:
        return sorted({n for t in self._targets for n in dir(importlib.import_module(t)) if not n.startswith("_")})


class _Loader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        old = spec.name.removeprefix("lightning_dqa.")
        targets = MODULES[old]
        if spec.name not in _SILENT:
            warnings.warn(
                f"{spec.name} moved to {targets[0]} in lightning_dqa 0.2; the old path goes in {_REMOVAL}. Public "
                f"names are importable from lightning_dqa itself",
                DeprecationWarning,
                stacklevel=_caller_level(),
            )
        module = _Moved(spec.name, targets)
        module.__path__ = []  # a package, so that lightning_dqa.export.schema resolves below lightning_dqa.export
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def _caller_level() -> int:
    """The stack level of the first frame outside the import machinery (where the user wrote the import)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith("<frozen") or frame.f_globals is globals()):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    return level


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.startswith("lightning_dqa.") and fullname.removeprefix("lightning_dqa.") in MODULES:
            return importlib.machinery.ModuleSpec(fullname, _Loader())
        return None


def install() -> None:
    """Answer the old module paths (idempotent)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
