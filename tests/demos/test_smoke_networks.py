"""Real-data smoke tests of the committed MobileNetV2 (CIFAR-10) and U-Net (CamVid) checkpoints.

A few batches each, through the callback and through ``lightning-dqa validate`` with the shipped YAML configs.
The checkpoints are part of the repository, so a missing one fails; the data sets come from ``../shared`` and
skip with the reason when absent. Orderings that must hold are checked, not exact figures (those are in
docs/RESULTS.md): the FP32 score near the one measured on the full split, 3-bit DQA within reach of FP32, DQA
not below direct at 3 bits in the paper's setting, and measured bits per value between n and n + m.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightning.pytorch import LightningDataModule, LightningModule, Trainer

from lightning_dqa import DQACallback
from lightning_dqa.core.config import PAPER_QUANTIZER
from lightning_dqa.demos.data import CamVidDataModule, CIFAR10DataModule
from lightning_dqa.demos.tasks import ImageClassifier, SegmentationModel
from lightning_dqa.integration.cli import run_cli

REPO = Path(__file__).resolve().parents[2]
CHECKPOINTS = REPO / "examples" / "checkpoints"
MOBILENET = CHECKPOINTS / "mobilenetv2_w050_cifar10.pt"
UNET = CHECKPOINTS / "unet_w16_camvid.pt"
PAPER = PAPER_QUANTIZER


def _score(
    model: LightningModule, dm: LightningDataModule, stage: str, key: str, **callback: Any
) -> tuple[float, float]:
    """``(100 * metric, bits per value)`` of one quiet validate / test run with a fresh callback."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    cb = DQACallback(verbose=False, **callback)
    trainer = Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[cb]
    )
    run = trainer.validate if stage == "validate" else trainer.test
    (m,) = run(model, datamodule=dm, verbose=False)
    return 100 * float(m[key]), float(m["dqa/bits_per_value"])


def test_checkpoints_are_committed_and_small() -> None:
    for path in (MOBILENET, UNET):
        assert path.is_file(), f"{path} is part of the repository (see examples/checkpoints/README.md)"
        assert path.stat().st_size <= 10 * 2**20, f"{path} is over 10 MiB"


# ----------------------------------------------------------------- MobileNetV2 on CIFAR-10


@pytest.fixture(scope="module")
def mobilenet(cifar_root: Path) -> dict[str, tuple[float, float]]:
    dm = CIFAR10DataModule(root=str(cifar_root), limit_test=500, eval_batch_size=250)

    def score(**callback: Any) -> tuple[float, float]:
        model = ImageClassifier(
            arch="mobilenetv2", arch_kwargs={"width_mult": 0.5, "dropout": 0.0}, weights=str(MOBILENET)
        )
        return _score(model, dm, "validate", "val/acc", calibration_samples=256, **callback)

    return {
        "fp32": score(method="fp32"),
        "paper_direct": score(method="direct", bits=3, **PAPER),
        "paper_dqa": score(method="dqa", bits=3, **PAPER),
        "dqa": score(method="dqa", bits=3),
    }


def test_mobilenet_fp32_near_its_full_test_accuracy(mobilenet: dict[str, tuple[float, float]]) -> None:
    acc, bpv = mobilenet["fp32"]
    assert MOBILENET_FP32_RANGE[0] <= acc <= MOBILENET_FP32_RANGE[1]
    assert bpv == 32.0


def test_mobilenet_dqa_orderings(mobilenet: dict[str, tuple[float, float]]) -> None:
    fp32 = mobilenet["fp32"][0]
    print({k: (round(acc, 2), round(bpv, 4)) for k, (acc, bpv) in mobilenet.items()})
    assert mobilenet["paper_dqa"][0] >= mobilenet["paper_direct"][0]
    assert fp32 - MOBILENET_MAX_DROP <= mobilenet["dqa"][0] <= fp32 + 2.0
    for key in ("paper_direct", "paper_dqa", "dqa"):
        assert 3.0 <= mobilenet[key][1] < 6.0, key


# ----------------------------------------------------------------- U-Net on CamVid


@pytest.fixture(scope="module")
def unet(camvid_root: Path) -> dict[str, tuple[float, float]]:
    dm = CamVidDataModule(root=str(camvid_root), eval_batch_size=4, limit_val=8)

    def score(**callback: Any) -> tuple[float, float]:
        model = SegmentationModel(base_width=16, depth=4, weights=str(UNET))
        return _score(model, dm, "validate", "val/miou", calibration_samples=8, ignore_index=11, **callback)

    return {
        "fp32": score(method="fp32"),
        "paper_direct": score(method="direct", bits=3, **PAPER),
        "paper_dqa": score(method="dqa", bits=3, **PAPER),
        "dqa": score(method="dqa", bits=3),
    }


def test_unet_fp32_miou_is_useful(unet: dict[str, tuple[float, float]]) -> None:
    miou, bpv = unet["fp32"]
    assert UNET_FP32_RANGE[0] <= miou <= UNET_FP32_RANGE[1]
    assert bpv == 32.0


def test_unet_dqa_orderings(unet: dict[str, tuple[float, float]]) -> None:
    fp32 = unet["fp32"][0]
    print({k: (round(acc, 2), round(bpv, 4)) for k, (acc, bpv) in unet.items()})
    assert unet["paper_dqa"][0] >= unet["paper_direct"][0]
    assert fp32 - UNET_MAX_DROP <= unet["dqa"][0] <= fp32 + 2.0
    for key in ("paper_direct", "paper_dqa", "dqa"):
        assert 3.0 <= unet[key][1] < 6.0, key


# ----------------------------------------------------------------- the shipped YAML configs


@pytest.mark.parametrize(
    ("config", "data", "data_limit", "calibration", "key"),
    [
        ("mobilenetv2_cifar10_ptq.yaml", "cifar_root", {"limit_test": 250}, 256, "val/acc"),
        ("unet_camvid_ptq.yaml", "camvid_root", {"limit_val": 4}, 4, "val/miou"),
    ],
)
def test_lightning_dqa_validate_runs_each_checkpoint_config(
    config: str,
    data: str,
    data_limit: dict[str, int],
    calibration: int,
    key: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``lightning-dqa validate --config examples/configs/<config>`` with fewer samples, from the repo root."""
    request.getfixturevalue(data)  # skips with the reason when ../shared lacks the data set
    spec = yaml.safe_load((REPO / "examples" / "configs" / config).read_text())
    spec["trainer"]["callbacks"][0]["init_args"]["calibration_samples"] = calibration
    spec["trainer"]["enable_progress_bar"] = False
    spec["data"]["init_args"].update(data_limit)
    small = tmp_path / config
    small.write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(REPO)  # the configs' paths are relative to the repository root
    cli = run_cli(["validate", "--config", str(small), "--trainer.default_root_dir", str(tmp_path)])
    metrics = cli.trainer.callback_metrics
    assert 0.0 < float(metrics[key]) <= 1.0
    assert 3.0 <= float(metrics["dqa/bits_per_value"]) < 6.0


# From the full-split runs in docs/RESULTS.md (section 6) and examples/checkpoints/README.md: MobileNetV2 89.03 %
# top-1 on the 10,000 test images, 3-bit DQA (default setting) 1.84 points below; U-Net 45.59 % mIoU on the 101
# val pairs, 3-bit DQA 0.30 below on the test split. The ranges leave room for a few hundred images' noise and
# exclude an untrained network (about 10 % top-1, a few % mIoU).
MOBILENET_FP32_RANGE = (85.0, 93.0)
MOBILENET_MAX_DROP = 6.0
UNET_FP32_RANGE = (25.0, 70.0)
UNET_MAX_DROP = 6.0
