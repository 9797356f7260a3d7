"""The callback on ordinary user projects: loaders passed straight to the Trainer, fit-only datamodules, dict
batches with other key names, models returning tuples or dicts, predict, and each kind of progress bar."""

from __future__ import annotations

import warnings
from typing import ClassVar

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from compat import calibrated, quantized_and_full
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from tiny import TinyNet, make_data, quiet_trainer
from torch.utils.data import DataLoader, Dataset

from lightning_dqa import DQACallback
from lightning_dqa.integration.data import split_batch
from lightning_dqa.integration.progress import CalibrationProgress


def trainer(**kw) -> Trainer:
    return quiet_trainer(**kw)


class BareNet(pl.LightningModule):
    """A module with steps but no dataloader methods, as users write when they pass loaders to the Trainer."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyNet().net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", F.cross_entropy(self(batch[0]), batch[1]))

    def test_step(self, batch, batch_idx):
        self.log("test/loss", F.cross_entropy(self(batch[0]), batch[1]))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader(n: int = 96, seed: int = 1, batch_size: int = 32) -> DataLoader:
    return DataLoader(make_data(n, seed), batch_size=batch_size)


def test_validate_with_loaders_passed_straight_to_the_trainer():
    model, cb = BareNet(), DQACallback(bits=4, calibration_samples=64)
    with pytest.warns(UserWarning, match="calibrates on the validation loaders"):
        trainer(callbacks=[cb]).validate(model, dataloaders=loader())
    assert cb.report is not None and cb.report.samples == 64 and calibrated(model)


def test_test_with_loaders_passed_straight_and_calibration_source_val():
    model, cb = BareNet(), DQACallback(bits=4, calibration_samples=64, calibration_source="val")
    with pytest.warns(UserWarning, match="calibrates on the test loaders"):
        trainer(callbacks=[cb]).test(model, dataloaders=loader())
    assert cb.report is not None and cb.report.samples == 64 and calibrated(model)


def test_fit_with_train_loaders_passed_straight_calibrates_on_them():
    model, cb = BareNet(), DQACallback(bits=4, calibration_samples=64, ranking="fisher")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(callbacks=[cb], max_steps=2).fit(model, train_dataloaders=loader(256, 0))
    assert not [w for w in caught if "DQACallback" in str(w.message)]  # no fallback: the training loaders serve
    assert cb.report is not None and cb.report.samples == 64 and calibrated(model)


class FitOnlyData(pl.LightningDataModule):
    """The usual datamodule: ``setup`` builds the training set for ``fit`` only."""

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.train_set = make_data(128, 0)
        self.val_set = make_data(96, 1)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=32)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=32)


def test_fit_only_datamodule_falls_back_to_the_validation_data_and_says_why():
    model, cb = BareNet(), DQACallback(bits=4, calibration_samples=64)
    with pytest.warns(UserWarning, match=r"FitOnlyData\.train_dataloader\(\) raised AttributeError"):
        trainer(callbacks=[cb]).validate(model, datamodule=FitOnlyData())
    assert cb.report is not None and calibrated(model)


class DictData(Dataset):
    def __init__(self, keys: tuple[str, str], n: int = 64) -> None:
        self.data, self.keys = make_data(n, 1), keys

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.data[i]
        return {self.keys[0]: x, self.keys[1]: y}


class TupleOutputNet(BareNet):
    """Returns ``(logits, features)`` or a dict, and reads dict batches."""

    def __init__(self, output: str, keys: tuple[str, str]) -> None:
        super().__init__()
        self.output, self.keys = output, keys

    def forward(self, x: torch.Tensor):
        features = self.net[:-1](x)
        logits = self.net[-1](features)
        return (logits, features) if self.output == "tuple" else {"features": features, "logits": logits}

    def validation_step(self, batch, batch_idx):
        out = self(batch[self.keys[0]])
        logits = out[0] if self.output == "tuple" else out["logits"]
        self.log("val/loss", F.cross_entropy(logits, batch[self.keys[1]]))


@pytest.mark.parametrize("keys", [("img", "target"), ("pixel_values", "labels"), ("image", "mask")])
@pytest.mark.parametrize("output", ["tuple", "dict"])
def test_dict_batches_and_tuple_or_dict_outputs(keys, output):
    model = TupleOutputNet(output, keys)
    cb = DQACallback(bits=4, calibration_samples=64, ranking="fisher", calibration_source="val", fp32_baseline=True)
    trainer(callbacks=[cb]).validate(model, dataloaders=DataLoader(DictData(keys), batch_size=16))
    assert cb.report is not None and calibrated(model)
    assert cb.fp32_metric is not None and 0.0 <= cb.fp32_metric <= 1.0


def test_dict_batch_without_known_keys_names_found_and_accepted_keys():
    with pytest.raises(TypeError, match=r"keys \['feats', 'y_true'\].*pixel_values.*split_batch"):
        split_batch({"feats": torch.zeros(2), "y_true": torch.zeros(2)})


def test_predict_after_validate_predicts_with_the_quantized_model():
    model, cb = BareNet(), DQACallback(bits=3, calibration_samples=64, calibration_source="val")
    t = trainer(callbacks=[cb])
    t.validate(model, dataloaders=loader())
    preds = torch.cat(t.predict(model, dataloaders=loader()))
    x = torch.cat([b[0] for b in loader()])
    quantized, full = quantized_and_full(model, x)
    assert torch.equal(preds, quantized) and not torch.equal(preds, full)


class RecordingProgress(CalibrationProgress):
    kinds: ClassVar[list[str]] = []

    def close(self) -> None:
        RecordingProgress.kinds.append(self.kind)
        super().close()


@pytest.mark.parametrize(("bar", "kind"), [(TQDMProgressBar, "tqdm"), (RichProgressBar, "rich"), (None, "none")])
def test_calibration_shows_in_whichever_progress_bar_the_trainer_has(monkeypatch, bar, kind):
    pytest.importorskip("rich")
    monkeypatch.setattr("lightning_dqa.integration.callback.CalibrationProgress", RecordingProgress)
    RecordingProgress.kinds = []
    callbacks = [DQACallback(bits=4, calibration_samples=64, calibration_source="val")]
    extra = dict(enable_progress_bar=False) if bar is None else dict(enable_progress_bar=True)
    if bar is not None:
        callbacks.append(bar())
    trainer(callbacks=callbacks, **extra).validate(BareNet(), dataloaders=loader())
    assert RecordingProgress.kinds == [kind]


class NaNAfterCalibration(BareNet):
    """Feeds a non-finite value into the second conv at evaluation time, after calibration saw clean data."""

    poison: float | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.net[:3](x)
        if self.poison is not None:
            x = x.clone()
            x[:, 0, 0, 0] = self.poison  # one value per sample
        return self.net[3:](x)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_activations_at_evaluation_are_named_by_layer(value):
    model = NaNAfterCalibration()
    cb = DQACallback(bits=4, calibration_samples=64, calibration_source="val", measure_memory=False)
    t = trainer(callbacks=[cb])
    t.validate(model, dataloaders=loader())
    model.poison = value
    with pytest.raises(ValueError, match=r"NaN or Inf activations reached the quantized layers \['net\.3'"):
        t.validate(model, dataloaders=loader())
    cb_off = DQACallback(bits=4, calibration_samples=64, calibration_source="val", check_finite=False)
    trainer(callbacks=[cb_off]).validate(model, dataloaders=loader())  # switched off: no error


def test_fewer_calibration_samples_than_asked_for_says_so():
    cb = DQACallback(bits=4, calibration_samples=1000, calibration_source="val")
    with pytest.warns(UserWarning, match=r"calibrated on 96 samples, fewer than calibration_samples=1000"):
        trainer(callbacks=[cb]).validate(BareNet(), dataloaders=loader(96))


def test_an_empty_validation_loader_says_nothing_was_calibrated():
    empty = DataLoader(make_data(96, 1), batch_size=32)
    with pytest.warns(UserWarning, match="validate ran no batches, so nothing was calibrated"):
        trainer(callbacks=[DQACallback(bits=4)], limit_val_batches=0).validate(BareNet(), dataloaders=empty)


def test_loaders_with_a_distributed_sampler_are_not_sharded_again():
    from torch.utils.data import DistributedSampler

    from lightning_dqa.integration.distributed import rank_shard

    class Identity:
        def batch_to_device(self, batch):
            return batch

    data = make_data(64, 0)
    sharded = DataLoader(data, batch_size=8, sampler=DistributedSampler(data, num_replicas=2, rank=1, shuffle=False))
    assert len(list(rank_shard(sharded, Identity(), world=2, rank=1))) == 4  # all of this rank's 32 samples
    plain = DataLoader(data, batch_size=8)
    assert len(list(rank_shard(plain, Identity(), world=2, rank=1))) == 4  # every other of 8 batches


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_measured_peak_memory_is_logged_by_default(stage: str):
    from lightning_dqa.deploy.compressed import run_compressed

    model = BareNet()
    cb = DQACallback(bits=3, calibration_samples=64, calibration_source="val")
    t = trainer(callbacks=[cb])
    getattr(t, stage)(model, dataloaders=loader())
    logged = {k: float(t.callback_metrics[f"dqa/peak_{k}_kib_per_image"]) for k in ("stored", "int8", "fp32")}
    bounds = {k: float(t.callback_metrics[f"dqa/live_{k}_kib_per_image"]) for k in ("stored", "int8", "fp32")}
    assert all(0 < bounds[k] <= logged[k] for k in logged)  # an arena holds at least what is live at once
    assert 0 < bounds["stored"] <= bounds["int8"] <= bounds["fp32"]
    _, report = run_compressed(model.eval(), next(iter(loader()))[0][:1])
    assert logged == pytest.approx({k: v / 1024 for k, v in report.per_image().items()})
    # the headline is the peak's saving, the per-tensor sum has its own name
    saving = float(t.callback_metrics["dqa/memory_saving"])
    assert saving == pytest.approx(1 - logged["stored"] / logged["fp32"], rel=1e-6)
    assert float(t.callback_metrics["dqa/per_tensor_saving"]) != pytest.approx(saving)
    # the logged bits per value are the bytes the blobs really took
    values = sum(b.numel for b in report.blobs)
    want = 8 * sum(b.nbytes for b in report.blobs) / values
    assert float(t.callback_metrics["dqa/stored_bits_per_value"]) == pytest.approx(want, rel=1e-6)
    assert want == report.bits_per_value


class Untraceable(BareNet):
    """Data-dependent control flow: torch.fx cannot trace it, so it cannot run compressed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) if x.sum() > 0 else -self.net(x)


def test_banded_peak_is_logged_with_peak_runtime_banded():
    """``peak_runtime="banded"``: the banded runtime's arenas are logged, and the headline is their saving."""
    from lightning_dqa import run_banded

    model = BareNet()
    cb = DQACallback(bits=3, calibration_samples=64, calibration_source="val", shared_values="codes",
                     peak_runtime="banded")  # fmt: skip
    t = trainer(callbacks=[cb])
    t.validate(model, dataloaders=loader())
    banded = {k: float(t.callback_metrics[f"dqa/banded_{k}_kib_per_image"]) for k in ("stored", "int8", "fp32")}
    fp32 = float(t.callback_metrics["dqa/peak_fp32_kib_per_image"])
    _, report = run_banded(model.eval(), next(iter(loader()))[0][:1])
    kib = report.per_image()
    assert banded == pytest.approx({"stored": kib["stored"], "int8": kib["int8_banded"], "fp32": kib["fp32_banded"]})
    assert float(t.callback_metrics["dqa/memory_saving"]) == pytest.approx(1 - banded["stored"] / fp32, rel=1e-6)


def test_target_peak_bytes_limits_the_banded_peak_through_the_trainer():
    """``peak_runtime="banded"`` with ``target_peak_bytes``: calibration measures the first calibration image with
    run_banded, and a limit below the float32 scratch is refused with the banded runtime named."""
    from lightning_dqa import run_banded

    kwargs = dict(bits=3, target_bits=4.0, calibration_samples=64, calibration_source="val", shared_values="codes",
                  peak_runtime="banded", verbose=False)  # fmt: skip
    model, cb = BareNet(), DQACallback(target_peak_bytes=1e9, **kwargs)
    trainer(callbacks=[cb]).validate(model, dataloaders=loader())
    first = next(iter(loader()))[0][:1]
    assert cb.report.allocation.peak_bytes == run_banded(model.eval(), first)[1].peak
    with pytest.raises(ValueError, match=r"Expected target_peak_bytes >= .*the banded runtime's peak"):
        trainer(callbacks=[DQACallback(target_peak_bytes=100, **kwargs)]).validate(BareNet(), dataloaders=loader())


class _Residual(torch.nn.Module):
    """stem -> ReLU (a shared value: read by conv1 and by the residual add) -> block -> head."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.stem, self.relu = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.conv1, self.conv2, self.relu2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.stem(x))
        return self.head(self.relu2(self.conv2(torch.relu(self.conv1(h))) + h))


def test_shared_bits_narrow_the_banded_shortcut_through_the_trainer():
    """``shared_values="uniform", shared_bits=4`` from the callback: the shortcut is a 4-bit blob, so the banded
    peak it logs is below the 8-bit one."""
    stored = {}
    for values, bits in (("int8", 8), ("uniform", 4)):
        model = BareNet()
        model.net = _Residual()
        cb = DQACallback(bits=3, calibration_samples=64, calibration_source="val", shared_values=values,
                         shared_bits=bits, peak_runtime="banded", verbose=False)  # fmt: skip
        t = trainer(callbacks=[cb])
        t.validate(model, dataloaders=loader())
        assert cb.config.shared_bits == bits
        stored[values] = float(t.callback_metrics["dqa/banded_stored_kib_per_image"])
    assert stored["uniform"] < stored["int8"]


def test_peak_runtime_is_checked():
    with pytest.raises(ValueError, match=r"peak_runtime to be one of \['layer', 'banded'\], got 'bands'"):
        DQACallback(bits=3, peak_runtime="bands")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scale_mode 'static' or 'learnable' with peak_runtime='banded'"):
        DQACallback(bits=3, scale_mode="dynamic", clipping="none", peak_runtime="banded")


def test_a_model_that_cannot_run_compressed_warns_once_and_logs_no_peak():
    model, cb = Untraceable(), DQACallback(bits=4, calibration_samples=64, calibration_source="val")
    t = trainer(callbacks=[cb], max_epochs=2, limit_train_batches=1, num_sanity_val_steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(model, train_dataloaders=loader(), val_dataloaders=loader())
        t.validate(model, dataloaders=loader())
    about = [w for w in caught if "measure_peak_memory could not run the model compressed" in str(w.message)]
    assert len(about) == 1 and "torch.fx" in str(about[0].message)
    metrics = t.callback_metrics
    assert "dqa/per_tensor_saving" in metrics and "dqa/bits_per_value" in metrics
    assert not any(k.startswith(("dqa/peak_", "dqa/live_")) or k == "dqa/memory_saving" for k in metrics)


def test_measure_peak_memory_off_logs_no_peak():
    cb = DQACallback(bits=4, calibration_samples=64, calibration_source="val", measure_peak_memory=False)
    t = trainer(callbacks=[cb])
    t.validate(BareNet(), dataloaders=loader())
    assert "dqa/memory_saving" not in t.callback_metrics and "dqa/per_tensor_saving" in t.callback_metrics
