"""lightning_dqa: DQA deep activation quantization for PyTorch and PyTorch Lightning."""

from lightning_dqa.config import DQAConfig, paper_config
from lightning_dqa.quantizers import ActivationQuantizer

__all__ = ["ActivationQuantizer", "DQAConfig", "paper_config"]
__version__ = "0.1.0"
