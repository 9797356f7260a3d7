"""Models beyond classification, through ``Trainer`` as users write them (issue 20).

A regression model calibrates with its own MSE; unlabeled data with the label-free output objective; a torchvision
Faster R-CNN through validate and fit; a torchvision ViT and a Swin through validate, ``run_compressed`` and ONNX;
``predict`` calibrating on its own.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import torchvision
from compat import Classifier, calibrated, quantized_and_full
from tiny import TinyConvNet, quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_dqa import DQACallback, DQAConfig, calibrate, prepare, run_compressed
from lightning_dqa.core.attach import quantizers_of


# ----------------------------------------------------------------------------------------------- regression
class Denoiser(pl.LightningModule):
    """A regression CNN: batches ``(noisy, clean)``, its training_step returns an MSE and logs it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        noisy, clean = batch
        loss = F.mse_loss(self(noisy), clean)
        self.log("train/mse", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        noisy, clean = batch
        self.log("val/mse", F.mse_loss(self(noisy), clean))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def denoising_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(64, 3, 8, 8, generator=g)
    return DataLoader(TensorDataset(clean + 0.1 * torch.randn(clean.shape, generator=g), clean), batch_size=16)


def _engine_grad_sq(model: Denoiser, loss_fn) -> dict[str, torch.Tensor]:
    cfg = DQAConfig(bits=4)
    prepare(model, cfg)
    report = calibrate(model, cfg, denoising_loader(), forward_fn=lambda m, b: m(b[0]), loss_fn=loss_fn)
    return {name: s.grad_sq for name, s in report.stats.items()}


def test_regression_fisher_ranking_uses_the_modules_own_mse():
    model = Denoiser()
    fresh = copy.deepcopy(model)
    cb = DQACallback(bits=4, calibration_samples=64, calibration_source="val")
    quiet_trainer(callbacks=[cb]).validate(model, dataloaders=denoising_loader())
    assert cb.report is not None and cb.report.objective == "training_step (Denoiser.training_step)"
    assert "objective: training_step" in cb.report.summary(cb.config)
    got = {name: s.grad_sq for name, s in cb.report.stats.items()}
    mse = _engine_grad_sq(copy.deepcopy(fresh), lambda m, b: F.mse_loss(m(b[0]), b[1]))
    ce = _engine_grad_sq(copy.deepcopy(fresh), lambda m, b: F.cross_entropy(m(b[0]), b[1]))  # 0.2's default
    for name in got:
        assert torch.allclose(got[name], mse[name], rtol=1e-4, atol=0), name
    assert any(not torch.allclose(got[n], ce[n], rtol=1e-2) for n in got)  # cross-entropy would fail the test
    assert calibrated(model)


def test_cross_entropy_objective_refuses_float_targets():
    cb = DQACallback(bits=4, calibration_samples=32, calibration_source="val", objective="cross_entropy")
    with pytest.raises(ValueError, match=r"needs integer class targets, got torch.float32 targets of shape \(16, 3,"):
        quiet_trainer(callbacks=[cb]).validate(Denoiser(), dataloaders=denoising_loader())


# ----------------------------------------------------------------------------------------------- unlabeled data
class Features(pl.LightningModule):
    """A module for inference only (no training_step), validated on unlabeled images."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyConvNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/energy", self(batch[0]).square().mean())

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])


def images(n: int = 64) -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(2))), batch_size=16)


@pytest.mark.parametrize("ranking", ["fisher", "greedy"])
def test_unlabeled_data_calibrates_with_the_output_objective(ranking: str):
    model = Features()
    cb = DQACallback(bits=3, calibration_samples=32, calibration_source="val", ranking=ranking)
    quiet_trainer(callbacks=[cb]).validate(model, dataloaders=images())
    assert cb.report is not None and calibrated(model)
    if ranking == "fisher":
        assert cb.report.objective.startswith("output (FP32-vs-quantized divergence, auto); auto: Features has no")
        assert all(s.grad_seen for s in cb.report.stats.values())
    else:
        assert cb.report.objective == "greedy score: minus the output divergence from FP32"


class UnpacksLabels(Features):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch  # fails on unlabeled batches
        return F.cross_entropy(self(x), y)


def test_a_training_step_that_fails_on_unlabeled_data_falls_back_with_a_warning():
    model = UnpacksLabels()
    cb = DQACallback(bits=3, calibration_samples=32, calibration_source="val")
    with pytest.warns(UserWarning, match="output objective: training_step raised ValueError"):
        quiet_trainer(callbacks=[cb]).validate(model, dataloaders=images())
    assert cb.report is not None and "auto: training_step raised ValueError" in cb.report.objective


def test_objective_training_step_without_one_is_an_error_naming_why():
    cb = DQACallback(bits=3, calibration_samples=32, calibration_source="val", objective="training_step")
    with pytest.raises(ValueError, match="objective='training_step'\\): Features has no training_step"):
        quiet_trainer(callbacks=[cb]).validate(Features(), dataloaders=images())


def test_invalid_objective_arguments_are_named():
    with pytest.raises(ValueError, match="Expected objective to be one of"):
        DQACallback(objective="labels")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Expected output_divergence to be one of"):
        DQACallback(output_divergence="l2")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- predict
def test_predict_calibrates_on_its_own_unlabeled_loader_and_predicts_quantized():
    model = Features()
    cb = DQACallback(bits=3, calibration_samples=32)
    with pytest.warns(UserWarning, match="calibrates on the loaders passed to predict"):
        preds = torch.cat(quiet_trainer(callbacks=[cb]).predict(model, dataloaders=images()))
    assert cb.report is not None and cb.report.samples == 32 and calibrated(model)
    x = torch.cat([b[0] for b in images()])
    quantized, full = quantized_and_full(model, x)
    assert torch.equal(preds, quantized) and not torch.equal(preds, full)


class WithTrainData(Features):
    def train_dataloader(self) -> DataLoader:
        return images(48)


def test_predict_prefers_the_training_data_like_validate():
    model = WithTrainData()
    cb = DQACallback(bits=3, calibration_samples=1000)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*calibrates on the loaders passed to predict")
        quiet_trainer(callbacks=[cb]).predict(model, dataloaders=images(16))
    assert cb.report is not None and cb.report.samples == 48  # the 48 training images, not the 16 predicted


# ----------------------------------------------------------------------------------------------- detection
class Boxes(Dataset):
    """Random 64x64 images with one or two boxes of classes 1-2, as torchvision detection datasets yield them."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(i)
        k = 1 + i % 2
        xy = torch.randint(0, 32, (k, 2), generator=g).float()
        boxes = torch.cat([xy, xy + torch.randint(8, 32, (k, 2), generator=g)], dim=1)
        return torch.rand(3, 64, 64, generator=g), {"boxes": boxes, "labels": torch.randint(1, 3, (k,), generator=g)}


def detection_loader() -> DataLoader:
    return DataLoader(Boxes(), batch_size=2, collate_fn=lambda b: tuple(zip(*b, strict=True)))


class Detector(pl.LightningModule):
    """torchvision's Faster R-CNN in a LightningModule, written as its tutorial does."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
            weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64
        )

    def forward(self, images: list[torch.Tensor]) -> Any:
        return self.model(images)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        losses = self.model(list(images), list(targets))
        loss = sum(losses.values())
        self.log("train/loss", loss, batch_size=len(images))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, _ = batch
        found = sum(len(p["boxes"]) for p in self.model(list(images)))
        self.log("val/detections", float(found), batch_size=len(images))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-4)


def test_faster_rcnn_validates_with_its_own_loss_dict():
    model = Detector()
    running = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    cb = DQACallback(bits=4, calibration_samples=4, calibration_source="val")
    quiet_trainer(callbacks=[cb]).validate(model, dataloaders=detection_loader())
    assert cb.report is not None and cb.report.samples == 4 and calibrated(model)
    assert cb.report.objective == "training_step (Detector.training_step)"
    assert sum(s.grad_seen for s in cb.report.stats.values()) > len(cb.report.stats) // 2
    for name, before in running.items():  # the loss ran in training control flow, BatchNorm in eval
        assert torch.equal(dict(model.named_buffers())[name], before), name


def test_faster_rcnn_fine_tunes_quantized_for_a_few_steps():
    model = Detector()
    cb = DQACallback(bits=4, calibration_samples=4)
    t = quiet_trainer(callbacks=[cb], max_steps=2, limit_val_batches=1)
    t.fit(model, train_dataloaders=detection_loader(), val_dataloaders=detection_loader())
    assert t.global_step == 2 and calibrated(model)
    assert torch.isfinite(t.callback_metrics["train/loss"])


# ----------------------------------------------------------------------------------------------- transformers
def vit() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )


def swin() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[4, 4], num_classes=10
    )


def labeled_images() -> DataLoader:
    g = torch.Generator().manual_seed(3)
    return DataLoader(TensorDataset(torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)),
                      batch_size=16)  # fmt: skip


@pytest.mark.parametrize(
    ("build", "skipped"),
    [
        (vit, {"net.encoder.layers.encoder_layer_0.self_attention.out_proj",
               "net.encoder.layers.encoder_layer_1.self_attention.out_proj"}),
        (swin, {"net.features.1.0.attn.qkv", "net.features.1.0.attn.proj",
                "net.features.3.0.attn.qkv", "net.features.3.0.attn.proj"}),
    ],
    ids=["vit", "swin"],
)  # fmt: skip
def test_transformers_validate_run_compressed_and_export(build, skipped: set[str], tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (the onnx extra)")
    from lightning_dqa.deploy.onnx.export import export_onnx
    from lightning_dqa.deploy.onnx.verify import verify_onnx

    model = Classifier(build())
    cb = DQACallback(bits=4, calibration_samples=32, calibration_source="val")
    with pytest.warns(UserWarning, match="never called as modules") as record:
        quiet_trainer(callbacks=[cb]).validate(model, dataloaders=labeled_images())
    notes = [str(w.message) for w in record if "never called as modules" in str(w.message)]
    assert len(notes) == 1 and all(name in notes[0] for name in skipped)
    qs = quantizers_of(model)
    assert {n for n, q in qs.items() if q.passthrough} == skipped
    assert calibrated(model) and sum(not q.passthrough for q in qs.values()) >= 4
    model.eval()
    x = next(iter(labeled_images()))[0][:2]
    out, _ = run_compressed(model, x)
    with torch.no_grad():
        assert torch.equal(out + 0.0, model(x) + 0.0)
    path = export_onnx(model, x, tmp_path / "model.onnx")
    check = verify_onnx(model, path, x)
    assert len(check.layers) == sum(not q.passthrough for q in qs.values())
    assert check.off_tie == 0 and check.output_max_abs_diff < 1e-3


def test_a_checkpoint_with_skipped_layers_reloads_them_skipped(tmp_path):
    model = Classifier(vit())
    cb = DQACallback(bits=4, calibration_samples=32, calibration_source="val")
    t = quiet_trainer(tmp_path, callbacks=[cb])
    with pytest.warns(UserWarning, match="never called"):
        t.validate(model, dataloaders=labeled_images())
    path = tmp_path / "vit.ckpt"
    t.save_checkpoint(path)
    other = Classifier(vit())
    t2 = quiet_trainer(tmp_path, callbacks=[DQACallback(bits=4, calibration_samples=32, calibration_source="val")])
    t2.validate(other, dataloaders=labeled_images(), ckpt_path=path)
    mine, theirs = quantizers_of(model), quantizers_of(other)
    assert {n for n, q in theirs.items() if q.passthrough} == {n for n, q in mine.items() if q.passthrough}
    x = next(iter(labeled_images()))[0]
    with torch.no_grad():
        assert torch.equal(model.eval()(x), other.eval()(x))


def test_an_artifact_with_skipped_layers_applies_them_skipped(tmp_path):
    from lightning_dqa import apply_artifact, export_artifact

    model = Classifier(vit())
    cb = DQACallback(bits=4, calibration_samples=32, calibration_source="val", export_path=str(tmp_path / "a.json"))
    with pytest.warns(UserWarning, match="never called"):
        quiet_trainer(callbacks=[cb]).validate(model, dataloaders=labeled_images())
    export_artifact(model, tmp_path / "b.json", cb.config)
    for path in ("a.json", "b.json"):
        fresh = Classifier(vit())
        apply_artifact(fresh, tmp_path / path)
        x = next(iter(labeled_images()))[0]
        with torch.no_grad():
            assert torch.equal(model.eval()(x), fresh.eval()(x)), path
        assert {n for n, q in quantizers_of(fresh).items() if q.passthrough} == {
            n for n, q in quantizers_of(model).items() if q.passthrough
        }


@pytest.mark.parametrize("case", ["regression", "detection"])
def test_fp32_baseline_without_class_targets_warns_and_logs_nothing(case: str):
    model, data = (Denoiser(), denoising_loader()) if case == "regression" else (Detector(), detection_loader())
    cb = DQACallback(bits=4, calibration_samples=4, calibration_source="val", fp32_baseline=True)
    t = quiet_trainer(callbacks=[cb], limit_val_batches=1)
    with pytest.warns(UserWarning, match="dqa/fp32_acc is not logged"):
        t.validate(model, dataloaders=data)
    assert cb.fp32_metric is None and "dqa/fp32_acc" not in t.callback_metrics and calibrated(model)
