"""The framework-free API loads no Lightning, torchmetrics or torchvision module; the callback loads them on use."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("lightning", "pytorch_lightning", "torchmetrics", "torchvision")


def loaded_after(code: str) -> list[str]:
    """Top-level heavy packages in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return [m for m in json.loads(out.splitlines()[-1]) if m in HEAVY]


def test_framework_free_api_loads_no_lightning():
    code = (
        "import lightning_dqa\n"
        "from lightning_dqa import DQAConfig, apply_artifact, calibrate, export_artifact, load_quantized, prepare\n"
        "import lightning_dqa.core.functional, lightning_dqa.calibration.engine\n"
        "import lightning_dqa.deploy.artifact, lightning_dqa.calibration.selection\n"
        "import torch\n"
        "model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))\n"
        "config = DQAConfig(bits=4, ranking='energy', first_layer_bits=None)\n"
        "prepare(model, config)\n"
        "calibrate(model, config, [torch.randn(8, 3, 8, 8)], forward_fn=lambda m, b: m(b))\n"
    )
    assert loaded_after(code) == []


def test_the_callback_loads_lightning_on_first_use():
    assert "lightning" in loaded_after("from lightning_dqa import DQACallback\nDQACallback(bits=4)")
