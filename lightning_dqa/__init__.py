"""lightning_dqa: DQA deep activation quantization (3-5 bit) for PyTorch and PyTorch Lightning."""

from lightning_dqa.callback import DQACallback
from lightning_dqa.checkpoint import load_quantized
from lightning_dqa.config import DQAConfig, paper_config
from lightning_dqa.engine import calibrate, prepare
from lightning_dqa.export import apply_artifact, export_artifact

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
