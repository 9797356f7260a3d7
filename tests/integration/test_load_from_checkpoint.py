"""``MyModule.load_from_checkpoint(path)`` on a checkpoint of a DQA run gives the quantized model, no callback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from tiny import TinyNet, fit_quantized, make_data
from torch.utils.data import DataLoader

from lightning_dqa.core.attach import quantizers_of

TESTS = Path(__file__).resolve().parents[1]  # tests/, where tiny.py is


def outputs(model: torch.nn.Module) -> torch.Tensor:
    x = make_data(32, 7).tensors[0]
    model.eval()
    with torch.no_grad():
        return model(x)


def test_load_from_checkpoint_returns_the_quantized_model(tmp_path):
    ckpt, trained = fit_quantized(tmp_path)
    loaded = TinyNet.load_from_checkpoint(ckpt)
    qs = quantizers_of(loaded)
    assert qs and all(bool(q.calibrated) and q.enabled for q in qs.values())
    assert torch.equal(outputs(loaded), outputs(trained))
    assert loaded.on_load_checkpoint.__func__ is TinyNet.on_load_checkpoint  # the one-shot hook is gone


def test_load_from_checkpoint_then_validate_with_ckpt_path_without_the_callback(tmp_path):
    ckpt, trained = fit_quantized(tmp_path)
    loaded = TinyNet.load_from_checkpoint(ckpt)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.validate(loaded, dataloaders=DataLoader(make_data(64, 1), batch_size=32), ckpt_path=ckpt)
    assert 0.0 <= metrics["val/acc"] <= 1.0
    assert all(q.enabled for q in quantizers_of(loaded).values())
    assert torch.equal(outputs(loaded), outputs(trained))


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=str(TESTS), timeout=300, check=False
    )


@pytest.mark.parametrize("order", ["dqa_first", "lightning_first"])
def test_importing_lightning_dqa_before_or_after_lightning_allows_the_load(tmp_path, order):
    ckpt, _ = fit_quantized(tmp_path)
    imports = ["import lightning_dqa", "import lightning.pytorch"]
    if order == "lightning_first":
        imports.reverse()
    load = [
        "from tiny import TinyNet",
        f"m = TinyNet.load_from_checkpoint({str(ckpt)!r})",
        "from lightning_dqa.core.attach import quantizers_of",
        "print(all(q.enabled for q in quantizers_of(m).values()))",
    ]
    code = "\n".join([*imports, *load])
    done = _run(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "True"


def test_without_lightning_dqa_imported_lightning_refuses_the_instantiator_clearly(tmp_path):
    ckpt, _ = fit_quantized(tmp_path)
    done = _run(f"from tiny import TinyNet\nTinyNet.load_from_checkpoint({str(ckpt)!r})")
    assert done.returncode != 0
    assert "lightning_dqa.integration.checkpoint_hooks.instantiate_quantized" in done.stderr
    assert "allowlist" in done.stderr
