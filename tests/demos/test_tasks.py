from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_dqa.demos.data import CamVidDataModule, CIFAR10DataModule
from lightning_dqa.demos.models import load_pretrained, resnet32
from lightning_dqa.demos.tasks import ImageClassifier, SegmentationModel


def _trainer(**kwargs: object) -> Trainer:
    defaults = dict(
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    return Trainer(**{**defaults, **kwargs})


def _images(n: int = 16, classes: int = 10, size: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def _segments(n: int = 4, h: int = 20, w: int = 26) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, h, w, generator=g)
    y = torch.randint(0, 12, (n, h, w), generator=g)  # 11 is void
    return DataLoader(TensorDataset(x, y), batch_size=2)


def test_image_classifier_fits_and_logs() -> None:
    torch.manual_seed(0)
    model = ImageClassifier(arch="resnet20", lr=0.05)
    assert "net.layer1.0.conv1" in dict(model.named_modules())
    assert model.hparams.arch == "resnet20"
    before = model.net.conv1.weight.detach().clone()
    trainer = _trainer()
    trainer.fit(model, train_dataloaders=_images(), val_dataloaders=_images())
    assert trainer.global_step == 2
    assert not torch.equal(before, model.net.conv1.weight)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine over 2 steps
    (val,) = trainer.validate(model, dataloaders=_images(), verbose=False)
    assert set(val) == {"val/acc", "val/loss"} and 0.0 <= val["val/acc"] <= 1.0
    (test,) = trainer.test(model, dataloaders=_images(), verbose=False)
    assert set(test) == {"test/acc", "test/loss"}


def test_image_classifier_accuracy_matches_manual_count() -> None:
    torch.manual_seed(0)
    model = ImageClassifier(arch="resnet20", schedule="constant").eval()
    loader = _images(n=24)
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in loader)
    (val,) = _trainer().validate(model, dataloaders=loader, verbose=False)
    assert val["val/acc"] == pytest.approx(correct / 24)


def test_image_classifier_loads_weights(resnet32_weights: Path) -> None:
    model = ImageClassifier(arch="resnet32", weights=str(resnet32_weights))
    reference = load_pretrained(resnet32(), resnet32_weights)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.net.state_dict()[key], value), key


def test_image_classifier_loads_its_own_checkpoint(tmp_path: Path) -> None:
    source = ImageClassifier(arch="resnet20", num_classes=4)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "ckpt.ckpt")  # the layout Lightning writes
    copy = ImageClassifier(arch="resnet20", num_classes=4, weights=str(tmp_path / "ckpt.ckpt"))
    assert torch.equal(copy.net.linear.weight, source.net.linear.weight)


def test_image_classifier_arch_kwargs_and_errors() -> None:
    model = ImageClassifier(arch="mobilenetv2", num_classes=100, arch_kwargs={"width_mult": 0.25})
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    with pytest.raises(ValueError, match="name to be one of"):
        ImageClassifier(arch="vgg16")
    with pytest.raises(ValueError, match="schedule"):
        ImageClassifier(schedule="step")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="label_smoothing"):
        ImageClassifier(label_smoothing=1.0)


def test_segmentation_model_fits_and_logs() -> None:
    torch.manual_seed(0)
    model = SegmentationModel(base_width=4, depth=2, class_weights=[1.0] * 11)
    assert model(torch.randn(1, 3, 20, 26)).shape == (1, 11, 20, 26)
    trainer = _trainer()
    trainer.fit(model, train_dataloaders=_segments(), val_dataloaders=_segments())
    assert trainer.global_step == 2
    (val,) = trainer.validate(model, dataloaders=_segments(), verbose=False)
    assert set(val) == {"val/miou", "val/acc", "val/loss"}
    assert 0.0 <= val["val/miou"] <= 1.0 and 0.0 <= val["val/acc"] <= 1.0
    (test,) = trainer.test(model, dataloaders=_segments(), verbose=False)
    assert set(test) == {"test/miou", "test/acc", "test/loss"}


def test_segmentation_metrics_ignore_void() -> None:
    model = SegmentationModel(base_width=4, depth=1, num_classes=3, ignore_index=3)
    preds = torch.tensor([[0, 1, 2, 2]])
    target = torch.tensor([[0, 1, 3, 3]])  # the two wrong pixels are void
    model.val_pixel_acc.update(preds, target)
    model.val_miou.update(preds, target)
    assert model.val_pixel_acc.compute() == 1.0
    with pytest.raises(ValueError, match="class_weights"):
        SegmentationModel(class_weights=[1.0, 2.0])


def test_cli_parses_tasks_and_data(tmp_path: Path) -> None:
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=jsonargparse.ActionConfigFile)
    parser.add_class_arguments(ImageClassifier, "model")
    parser.add_class_arguments(CIFAR10DataModule, "data")
    parser.add_class_arguments(SegmentationModel, "seg")
    parser.add_class_arguments(CamVidDataModule, "camvid")
    config = tmp_path / "config.yaml"
    config.write_text(
        "model:\n  arch: resnet20\n  lr: 0.01\n  arch_kwargs: {}\n"
        "data:\n  val_split: holdout\n  limit_test: 1000\n  mean: [0.5, 0.5, 0.5]\n"
        "seg:\n  depth: 3\n  class_weights: [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
        "camvid:\n  crop_size: [128, 160]\n  scale_range: [0.75, 1.25]\n"
    )
    cfg = parser.parse_args(["--config", str(config)])
    assert cfg.model.arch == "resnet20" and cfg.model.schedule == "cosine"
    assert cfg.data.val_split == "holdout" and tuple(cfg.data.mean) == (0.5, 0.5, 0.5)
    assert tuple(cfg.camvid.crop_size) == (128, 160)
    (tmp_path / "cifar" / "cifar-10-batches-py").mkdir(parents=True)
    (tmp_path / "camvid").mkdir()
    for split in ("train", "val", "test"):
        (tmp_path / "camvid" / f"{split}.txt").write_text("")
    args = ["--model.arch=resnet20", "--seg.base_width=4", f"--data.root={tmp_path / 'cifar'}"]
    init = parser.instantiate(parser.parse_args([*args, f"--camvid.root={tmp_path / 'camvid'}"]))
    assert isinstance(init.model, ImageClassifier) and isinstance(init.seg, SegmentationModel)
    assert isinstance(init.data, CIFAR10DataModule) and isinstance(init.camvid, CamVidDataModule)
    with pytest.raises(jsonargparse.ArgumentError):
        parser.parse_args(["--data.val_split=train"])


@pytest.mark.parametrize("task", ["classifier", "segmentation"])
def test_channels_last_gives_the_same_outputs_and_gradients(task: str) -> None:
    torch.manual_seed(0)
    if task == "classifier":
        kw: dict = dict(arch="mobilenetv2", arch_kwargs={"width_mult": 0.25})
        x, make = torch.randn(3, 3, 32, 32), ImageClassifier
    else:
        kw = dict(base_width=4, depth=2)
        x, make = torch.randn(2, 3, 20, 28), SegmentationModel
    plain, fast = make(**kw).eval(), make(**kw, channels_last=True).eval()
    fast.load_state_dict(plain.state_dict())
    conv = next(m for m in fast.net.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    out_plain, out_fast = plain(x), fast(x)
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-4, atol=1e-5)
    out_plain.square().sum().backward()
    out_fast.square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4, msg=name)


def test_dqa_calibrates_a_channels_last_model_like_a_plain_one() -> None:
    from lightning_dqa import DQAConfig, calibrate, prepare
    from lightning_dqa.core.attach import quantizers_of

    torch.manual_seed(0)
    kw: dict = dict(arch="mobilenetv2", arch_kwargs={"width_mult": 0.25})
    plain, fast = ImageClassifier(**kw).eval(), ImageClassifier(**kw, channels_last=True).eval()
    fast.load_state_dict(plain.state_dict())
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(2)]
    config = DQAConfig(bits=4, ranking="energy")
    for model in (plain, fast):
        prepare(model, config)
        calibrate(model, config, batches, forward_fn=lambda m, b: m(b[0]))
    for (name, q), r in zip(quantizers_of(plain).items(), quantizers_of(fast).values(), strict=True):
        assert torch.equal(q.important, r.important), name
        torch.testing.assert_close(r.scale, q.scale, rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():
        a, b = plain(batches[0][0]), fast(batches[0][0])
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.75  # a code may flip at a rounding boundary


def test_greedy_ranking_traces_a_channels_last_model() -> None:
    import warnings

    from lightning_dqa import DQAConfig, calibrate, prepare

    torch.manual_seed(0)
    model = SegmentationModel(base_width=4, depth=2, channels_last=True).eval()
    batches = [(torch.randn(2, 3, 12, 16), torch.randint(0, 11, (2, 12, 16)))]
    config = DQAConfig(bits=3, ranking="greedy")
    prepare(model, config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fx fast path must not fall back to the per-candidate loop
        calibrate(
            model,
            config,
            batches,
            forward_fn=lambda m, b: m(b[0]),
            objective_fn=lambda out, b: -torch.nn.functional.cross_entropy(out, b[1], reduction="sum"),
        )


@pytest.mark.parametrize("task", ["classifier", "segmentation"])
@pytest.mark.parametrize("freeze", [False, True])
def test_freeze_bn_stats_keeps_running_statistics_through_a_fit_with_validation(task: str, freeze: bool) -> None:
    torch.manual_seed(0)
    if task == "classifier":
        model, data = ImageClassifier(arch="resnet20", lr=0.05, freeze_bn_stats=freeze), _images
    else:
        model, data = SegmentationModel(base_width=4, depth=2, freeze_bn_stats=freeze), _segments
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [(m.running_mean.clone(), m.running_var.clone(), m.weight.detach().clone()) for m in bns]
    # validation inside the fit: Lightning puts the module back in train mode afterwards
    _trainer(max_steps=4, val_check_interval=1).fit(model, train_dataloaders=data(), val_dataloaders=data())
    pairs = list(zip(bns, before, strict=True))
    stats_kept = all(torch.equal(m.running_mean, mu) and torch.equal(m.running_var, var) for m, (mu, var, _) in pairs)
    assert stats_kept == freeze
    assert any(not torch.equal(m.weight, w) for m, (_, _, w) in pairs)  # the affine weights still learn
