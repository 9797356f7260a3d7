"""lightning_dqa: DQA deep activation quantization (3-5 bit) for PyTorch and PyTorch Lightning.

The public API is what ``__all__`` lists; everything else is internal. The package is layered, each layer
importing only those before it (``tests/test_layers.py`` holds the rule)::

    core  <-  codec  <-  deploy  <-  calibration  <-  integration  <-  demos

Names are loaded on first use, so ``from lightning_dqa import run_compressed`` imports no calibration code and
no Lightning; only :class:`DQACallback` loads Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_dqa import _deprecated
from lightning_dqa.integration.checkpoint_hooks import register_instantiators

if TYPE_CHECKING:
    from lightning_dqa.calibration.engine import calibrate
    from lightning_dqa.calibration.report import CalibrationReport
    from lightning_dqa.codec.native import native_status
    from lightning_dqa.core.attach import prepare
    from lightning_dqa.core.config import DQAConfig, paper_config
    from lightning_dqa.deploy.artifact import apply_artifact, export_artifact, load_artifact
    from lightning_dqa.deploy.banded import BandedReport, run_banded
    from lightning_dqa.deploy.checkpoint import load_quantized
    from lightning_dqa.deploy.compressed import CompressedReport, CompressedRunner, run_compressed
    from lightning_dqa.deploy.onnx.export import export_onnx
    from lightning_dqa.deploy.onnx.verify import verify_onnx
    from lightning_dqa.integration.callback import DQACallback

_PUBLIC: dict[str, str] = {
    "DQACallback": "lightning_dqa.integration.callback",
    "DQAConfig": "lightning_dqa.core.config",
    "paper_config": "lightning_dqa.core.config",
    "prepare": "lightning_dqa.core.attach",
    "calibrate": "lightning_dqa.calibration.engine",
    "CalibrationReport": "lightning_dqa.calibration.report",
    "run_compressed": "lightning_dqa.deploy.compressed",
    "run_banded": "lightning_dqa.deploy.banded",
    "BandedReport": "lightning_dqa.deploy.banded",
    "CompressedReport": "lightning_dqa.deploy.compressed",
    "CompressedRunner": "lightning_dqa.deploy.compressed",
    "export_artifact": "lightning_dqa.deploy.artifact",
    "apply_artifact": "lightning_dqa.deploy.artifact",
    "load_artifact": "lightning_dqa.deploy.artifact",
    "load_quantized": "lightning_dqa.deploy.checkpoint",
    "export_onnx": "lightning_dqa.deploy.onnx.export",
    "verify_onnx": "lightning_dqa.deploy.onnx.verify",
    "native_status": "lightning_dqa.codec.native",
}

__all__ = [
    "BandedReport",
    "CalibrationReport",
    "CompressedReport",
    "CompressedRunner",
    "DQACallback",
    "DQAConfig",
    "apply_artifact",
    "calibrate",
    "export_artifact",
    "export_onnx",
    "load_artifact",
    "load_quantized",
    "native_status",
    "paper_config",
    "prepare",
    "run_banded",
    "run_compressed",
    "verify_onnx",
]
__version__ = "0.2.0"

_deprecated.install()  # the 0.1 module paths (lightning_dqa.engine, ...) still import, with a DeprecationWarning
register_instantiators()  # MyModule.load_from_checkpoint(path) of a quantized checkpoint, without the callback


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    moved = _deprecated.MODULES.get(name)
    if moved is not None:  # lightning_dqa.engine as an attribute: the old module, through its alias
        return importlib.import_module(f"lightning_dqa.{name}")
    raise AttributeError(f"module 'lightning_dqa' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
