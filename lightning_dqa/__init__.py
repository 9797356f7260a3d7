"""lightning_dqa: DQA deep activation quantization (3-5 bit) for PyTorch and PyTorch Lightning.

The framework-free API (:func:`prepare`, :func:`calibrate`, :class:`DQAConfig`, the artifact) imports no
Lightning module; :class:`DQACallback` loads Lightning on first use.
"""

from typing import TYPE_CHECKING, Any

from lightning_dqa.checkpoint import load_quantized
from lightning_dqa.config import DQAConfig, paper_config
from lightning_dqa.engine import calibrate, prepare
from lightning_dqa.export import apply_artifact, export_artifact
from lightning_dqa.lightning_checkpoint import register_instantiators

if TYPE_CHECKING:
    from lightning_dqa.callback import DQACallback

__all__ = [
    "DQACallback",
    "DQAConfig",
    "apply_artifact",
    "calibrate",
    "export_artifact",
    "load_quantized",
    "paper_config",
    "prepare",
]
__version__ = "0.1.0"

register_instantiators()  # MyModule.load_from_checkpoint(path) of a quantized checkpoint, without the callback


def __getattr__(name: str) -> Any:
    if name == "DQACallback":  # Lightning is imported only by whoever asks for the callback
        from lightning_dqa.callback import DQACallback

        return DQACallback
    raise AttributeError(f"module 'lightning_dqa' has no attribute {name!r}")
