"""Real-data smoke test: pretrained ResNet-32 on 1,000 CIFAR-10 test images through the callback.

Checks orderings that must hold, not exact figures: FP32 near its published 92.6 %, DQA above direct at
3 bits (by a wide margin in the paper's setting), measured bits per value between n and n + m.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from lightning.pytorch import Trainer

from lightning_dqa import DQACallback
from lightning_dqa.core.config import PAPER_QUANTIZER
from lightning_dqa.demos.data import CIFAR10DataModule
from lightning_dqa.demos.tasks import ImageClassifier

PAPER = PAPER_QUANTIZER


def _accuracy(cifar_root: Path, weights: Path, **kw) -> tuple[float, float]:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    dm = CIFAR10DataModule(root=str(cifar_root), limit_test=1000, eval_batch_size=500)
    model = ImageClassifier(arch="resnet32", weights=str(weights))
    cb = DQACallback(calibration_samples=500, verbose=False, **kw)
    trainer = Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[cb]
    )
    (m,) = trainer.validate(model, datamodule=dm, verbose=False)
    return 100 * m["val/acc"], m["dqa/bits_per_value"]


@pytest.fixture(scope="module")
def results(cifar_root, resnet32_weights) -> dict[str, tuple[float, float]]:
    return {
        "fp32": _accuracy(cifar_root, resnet32_weights, method="fp32"),
        "paper_direct": _accuracy(cifar_root, resnet32_weights, method="direct", bits=3, **PAPER),
        "paper_dqa": _accuracy(cifar_root, resnet32_weights, method="dqa", bits=3, ranking="fisher", **PAPER),
        "direct": _accuracy(cifar_root, resnet32_weights, method="direct", bits=3),
        "dqa": _accuracy(cifar_root, resnet32_weights, method="dqa", bits=3),
    }


def test_fp32_near_published(results):
    print({k: (round(acc, 2), round(float(bpv), 4)) for k, (acc, bpv) in results.items()})
    acc, bpv = results["fp32"]
    # 1,000 images, FP32: 92.70 % on the first 2,000 on every ISA setting tried (docs/CPU_SPREAD.md); the range
    # is +-1 point, over 3x the ~0.3 % of top-1 classes float32 noise between CPUs can flip.
    assert 91.5 <= acc <= 93.5
    assert bpv == 32.0


def test_dqa_beats_direct_at_3_bits(results):
    assert results["paper_dqa"][0] > results["paper_direct"][0] + 10  # paper: 82.13 vs 52.85; here 78.3 vs 54.8
    # default setting: about 2 points apart (quickstart, 2,000 images: 90.10 vs 92.10-92.30 across ISA settings),
    # several times the 0.2-0.3 points that float noise moves either figure between CPUs
    assert results["dqa"][0] >= results["direct"][0]
    assert results["dqa"][0] <= results["fp32"][0] + 1.0


def test_measured_bits_between_n_and_n_plus_m(results):
    for key in ("direct", "dqa", "paper_direct", "paper_dqa"):
        assert 3.0 <= results[key][1] < 6.0, key
    assert results["dqa"][1] > results["direct"][1]  # the shifting errors cost memory


def test_budget_at_uniform_bits_is_no_worse(results, cifar_root, resnet32_weights):
    """target_bits equal to what uniform 3-bit direct measures: allocation spends it no worse, never above it."""
    _, uniform_bits = results["direct"]
    acc, bpv = _accuracy(cifar_root, resnet32_weights, method="dqa", target_bits=uniform_bits)
    print(f"budget {float(uniform_bits):.4f}: acc {acc:.2f} (direct {results['direct'][0]:.2f}), {float(bpv):.4f} bits")
    # measured 92.00 against 91.30 (1,000 images): 7 images, over twice the ~3 a change of CPU can flip
    assert acc >= results["direct"][0]
    # measured on the evaluation images with the code book from calibration, inside the headroom kept free
    assert bpv <= uniform_bits
