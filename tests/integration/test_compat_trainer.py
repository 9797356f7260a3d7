"""The callback under Trainer set-ups users bring: bf16 autocast, predict after validate, several validation
loaders, gradient accumulation with ``delay_steps``, and the CSV and TensorBoard loggers."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from compat import Classifier, calibrated, images_loader, small_cnn
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from test_user_setups import trainer

from lightning_dqa import DQACallback
from lightning_dqa.core.attach import set_quantizers_enabled

pytestmark = pytest.mark.usefixtures("single_thread")


def callback(**kw) -> DQACallback:
    return DQACallback(**{"bits": 4, "calibration_samples": 32, "verbose": False, **kw})


def test_bf16_mixed_precision_validate():
    model = Classifier(small_cnn())
    dtypes = []
    model.net[3].register_forward_pre_hook(lambda mod, args: dtypes.append(args[0].dtype))  # a quantized conv
    t = trainer(callbacks=[callback()], precision="bf16-mixed", limit_val_batches=2)
    t.validate(model, dataloaders=images_loader())
    assert calibrated(model)
    assert dtypes[-1] == torch.bfloat16  # autocast activations reach the quantizer
    assert float(t.callback_metrics["val/finite"]) == 1.0
    assert 4.0 <= float(t.callback_metrics["dqa/bits_per_value"]) < 32.0


def test_predict_after_validate_returns_quantized_predictions():
    model = Classifier(small_cnn())
    t = trainer(callbacks=[callback()], limit_val_batches=2)
    t.validate(model, dataloaders=images_loader())
    preds = t.predict(model, dataloaders=images_loader(16, seed=7))
    assert preds is not None and len(preds) == 1
    x = images_loader(16, seed=7).dataset.tensors[0]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(preds[0], model(x))  # quantizers on, as in validation
        set_quantizers_enabled(model, False)
        assert not torch.allclose(preds[0], model(x))  # and not the full-precision output


class TwoLoaderClassifier(Classifier):
    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.log("val/loss", F.cross_entropy(self(batch[0]), batch[1]))


def test_several_validation_loaders():
    model = TwoLoaderClassifier(small_cnn())
    cb = callback()
    t = trainer(callbacks=[cb], limit_val_batches=2)
    results = t.validate(model, dataloaders=[images_loader(32, 1), images_loader(32, 2)])
    assert calibrated(model) and cb.report is not None and cb.report.samples == 32
    assert len(results) == 2
    assert {"val/loss/dataloader_idx_0", "val/loss/dataloader_idx_1"} <= set(t.callback_metrics)
    assert 4.0 <= float(t.callback_metrics["dqa/bits_per_value"]) < 32.0


class RecordingClassifier(Classifier):
    """Records, per training batch, the optimizer steps taken and whether fake quantization was on."""

    def __init__(self, net) -> None:
        super().__init__(net)
        self.seen: list[tuple[int, bool]] = []

    def training_step(self, batch, batch_idx):
        q = next(m for m in self.modules() if hasattr(m, "calibrated") and hasattr(m, "enabled"))
        self.seen.append((self.trainer.global_step, bool(q.calibrated) and q.enabled))
        return super().training_step(batch, batch_idx)


def test_gradient_accumulation_delay_steps_counts_optimizer_steps():
    model = RecordingClassifier(small_cnn())
    # The module records every training_step call; objective="auto" would also call it for calibration's loss.
    cb = callback(delay_steps=2, objective="cross_entropy")
    t = trainer(callbacks=[cb], accumulate_grad_batches=2, max_steps=4, limit_val_batches=0)
    t.fit(model, train_dataloaders=images_loader(32, 0, batch_size=4))
    assert t.global_step == 4
    # Two optimizer steps are four batches: full precision for batches 0-3, quantized from batch 4 on.
    assert model.seen == [(0, False), (0, False), (1, False), (1, False), (2, True), (2, True), (3, True), (3, True)]
    assert calibrated(model)


def test_csv_logger_receives_the_dqa_metrics(tmp_path: Path):
    logger = CSVLogger(tmp_path, name="csv")
    t = trainer(callbacks=[callback()], logger=logger, limit_val_batches=2)
    t.validate(Classifier(small_cnn()), dataloaders=images_loader())
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    assert {"dqa/bits_per_value", "dqa/memory_saving", "dqa/per_tensor_saving", "dqa/calibration_samples"} <= columns
    bits = [float(r["dqa/bits_per_value"]) for r in rows if r["dqa/bits_per_value"]]
    assert len(bits) == 1 and 4.0 <= bits[0] < 32.0


def test_tensorboard_logger_receives_the_dqa_metrics(tmp_path: Path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    t = trainer(callbacks=[callback()], logger=logger, limit_val_batches=2)
    t.validate(Classifier(small_cnn()), dataloaders=images_loader())
    events = list(Path(logger.log_dir).glob("events.out.tfevents.*"))
    assert events
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator", reason="tensorboard is not installed"
    )
    acc = event_accumulator.EventAccumulator(str(logger.log_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"dqa/bits_per_value", "dqa/memory_saving", "dqa/per_tensor_saving", "dqa/calibration_samples"} <= tags
    assert 4.0 <= acc.Scalars("dqa/bits_per_value")[0].value < 32.0
