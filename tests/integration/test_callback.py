"""DQACallback inside Lightning's lifecycle: PTQ (validate/test), QAT (fit), resume, errors, composition."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import tiny
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, ModelPruning
from tiny import TinyData, TinyNet

from lightning_dqa import DQACallback
from lightning_dqa.core.attach import quantizers_of
from lightning_dqa.deploy.artifact import apply_artifact, export_artifact
from lightning_dqa.deploy.checkpoint import load_quantized


def quiet_trainer(tmp_path: Path | None = None, **kw) -> Trainer:
    return tiny.quiet_trainer(tmp_path, **{"deterministic": True, **kw})


def quantizer_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".dqa_quantizer." in k}


def test_ptq_validate_calibrates_and_logs_memory():
    torch.manual_seed(0)
    model, cb = TinyNet(), DQACallback(bits=4, calibration_samples=100, ranking="energy")
    trainer = quiet_trainer(callbacks=[cb])
    (metrics,) = trainer.validate(model, datamodule=TinyData())
    assert cb.report is not None and cb.report.samples == 100
    qs = quantizers_of(model)
    assert len(qs) == 3 and all(bool(q.calibrated) and q.enabled for q in qs.values())
    # 40 % of 8 and of 16 channels are important on the two quantized conv/linear inputs after the first
    assert [int(q.important.sum()) for q in qs.values()] == [1, 3, 6]
    assert 4.0 < metrics["dqa/bits_per_value"] < 8.0
    # the per-tensor figure keeps its own name; dqa/memory_saving is the whole network's peak saving
    assert metrics["dqa/per_tensor_saving"] == pytest.approx(1 - metrics["dqa/bits_per_value"] / 32, rel=1e-6)
    peak = {k: metrics[f"dqa/peak_{k}_kib_per_image"] for k in ("stored", "fp32")}
    assert metrics["dqa/memory_saving"] == pytest.approx(1 - peak["stored"] / peak["fp32"], rel=1e-6)
    assert metrics["dqa/memory_saving"] < metrics["dqa/per_tensor_saving"]  # a peak holds full-precision tensors too
    assert "val/acc" in metrics


def test_ptq_test_and_fp32_baseline_close_at_high_bits():
    torch.manual_seed(0)
    model = TinyNet()
    quiet_trainer(max_epochs=3).fit(model, datamodule=TinyData())
    cb = DQACallback(bits=8, first_layer_bits=None, calibration_samples=128, fp32_baseline=True, ranking="energy")
    (metrics,) = quiet_trainer(callbacks=[cb]).test(model, datamodule=TinyData())
    print(f"fp32 {metrics['dqa/fp32_acc']:.4f}, 8-bit DQA {metrics['test/acc']:.4f}")
    assert metrics["dqa/fp32_acc"] > 0.8
    # 8-bit DQA is nearly lossless: measured 0.9922 both (128 samples). 0.02 is 2 samples: an 8-bit code moves an
    # activation by ~0.2 % of its range, which turns a sample only if its logits sit that close, a property of the
    # model and data, not of the CPU's float noise (~1e-6 relative).
    assert abs(metrics["test/acc"] - metrics["dqa/fp32_acc"]) <= 0.02


def test_quantization_changes_outputs_and_more_bits_are_closer():
    torch.manual_seed(0)
    base = TinyNet()
    quiet_trainer(max_epochs=2).fit(base, datamodule=TinyData())
    x = TinyData().val_dataloader().dataset.tensors[0]
    ref = base.eval()(x)
    errs = {}
    for bits in (3, 6):
        model = copy.deepcopy(base)
        quiet_trainer(callbacks=[DQACallback(bits=bits, calibration_samples=128)]).validate(
            model, datamodule=TinyData()
        )
        errs[bits] = (model.eval()(x) - ref).square().mean().item()
    print(errs)
    assert 0 < errs[6] < errs[3]


def test_never_calibrates_during_sanity_check():
    seen = []

    class Probe(Callback):
        def on_validation_start(self, trainer, pl_module):
            if trainer.sanity_checking:
                seen.append(any(bool(q.calibrated) for q in quantizers_of(pl_module).values()))

    cb = DQACallback(bits=4, calibration_samples=64, delay_steps=3)
    trainer = quiet_trainer(callbacks=[cb, Probe()], num_sanity_val_steps=1, max_steps=5)
    trainer.fit(TinyNet(), datamodule=TinyData())
    assert seen == [False]
    assert cb.report is not None  # calibrated once the delay passed


def test_qat_fit_learnable_scales_train_with_users_optimizer():
    torch.manual_seed(0)
    model = TinyNet()
    cb = DQACallback(bits=3, scale_mode="learnable", calibration_samples=64)
    trainer = quiet_trainer(callbacks=[cb], max_epochs=2)
    trainer.fit(model, datamodule=TinyData())
    q = next(iter(quantizers_of(model).values()))
    assert isinstance(q.scale, torch.nn.Parameter)
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert id(q.scale) in opt_params  # the user's configure_optimizers saw it: no change to their code
    print(f"train/loss {float(trainer.callback_metrics['train/loss']):.4f}")
    assert trainer.callback_metrics["train/loss"] < 1.0


def _fit(tmp_path: Path, max_epochs: int, ckpt_path: str | None = None, seed: int = 0):
    torch.manual_seed(seed)
    losses = []

    class Rec(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    model = TinyNet()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1, save_top_k=-1)
    trainer = quiet_trainer(
        tmp_path,
        callbacks=[DQACallback(bits=3, calibration_samples=64), ckpt, Rec()],
        enable_checkpointing=True,
        max_epochs=max_epochs,
    )
    trainer.fit(model, datamodule=TinyData(), ckpt_path=ckpt_path)
    return model, losses


def test_interrupted_fit_resumes_with_identical_quantizer_state_and_losses(tmp_path):
    full_model, full_losses = _fit(tmp_path / "full", 3)
    _, first_losses = _fit(tmp_path / "part", 1)
    part_ckpt = next((tmp_path / "part").glob("epoch=0*.ckpt"))
    # a different seed proves nothing is recomputed from randomness: state comes from the checkpoint
    resumed_model, resumed_losses = _fit(tmp_path / "part", 3, ckpt_path=str(part_ckpt), seed=123)
    assert first_losses + resumed_losses == pytest.approx(full_losses, abs=0, rel=0)
    a, b = quantizer_state(full_model), quantizer_state(resumed_model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_validate_from_checkpoint_and_load_outside_trainer(tmp_path):
    model, _ = _fit(tmp_path, 1)
    ckpt = str(tmp_path / "last.ckpt")
    x = TinyData().val_dataloader().dataset.tensors[0]
    expected = model.eval()(x)
    # a Trainer validates the checkpoint: state restored, no recalibration
    cb = DQACallback(bits=3, calibration_samples=64)
    fresh = TinyNet()
    quiet_trainer(callbacks=[cb]).validate(fresh, datamodule=TinyData(), ckpt_path=ckpt)
    assert cb.report is None
    assert torch.equal(fresh.eval()(x), expected)
    # and outside any Trainer
    restored = load_quantized(TinyNet(), ckpt)
    assert torch.equal(restored(x), expected)


def test_full_precision_checkpoint_is_calibrated_afresh(tmp_path):
    model = TinyNet()
    trainer = quiet_trainer(tmp_path, max_epochs=1, enable_checkpointing=True)
    trainer.fit(model, datamodule=TinyData())
    ckpt = trainer.checkpoint_callback.best_model_path
    cb = DQACallback(bits=4, calibration_samples=64)
    restored = TinyNet()
    quiet_trainer(callbacks=[cb]).validate(restored, datamodule=TinyData(), ckpt_path=ckpt)
    assert cb.report is not None and cb.report.samples == 64
    # the checkpoint's FP32 weights were loaded (not the fresh initialisation), then calibrated
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    mine = restored.state_dict()
    assert saved and all(torch.equal(mine[k], v) for k, v in saved.items())
    assert all(bool(q.calibrated) and q.enabled for q in quantizers_of(restored).values())


def test_checkpoint_with_other_layout_names_the_layer(tmp_path):
    _fit(tmp_path, 1)
    cb = DQACallback(bits=3, calibration_samples=64, exclude=[r"^net\.3$"])
    with pytest.raises(ValueError, match=r"net\.3"):
        quiet_trainer(callbacks=[cb]).validate(TinyNet(), datamodule=TinyData(), ckpt_path=str(tmp_path / "last.ckpt"))
    cb = DQACallback(bits=4, calibration_samples=64)
    with pytest.raises(ValueError, match=r"bits=3.*bits=4"):
        quiet_trainer(callbacks=[cb]).validate(TinyNet(), datamodule=TinyData(), ckpt_path=str(tmp_path / "last.ckpt"))


def test_export_artifact_round_trip(tmp_path):
    model = TinyNet()
    quiet_trainer(callbacks=[DQACallback(bits=3, calibration_samples=64)]).validate(model, datamodule=TinyData())
    path = tmp_path / "dqa.json"
    art = export_artifact(model, path, DQACallback(bits=3).config)
    assert [layer["name"] for layer in art["layers"]] == ["net.0", "net.3", "net.8"]
    restored = apply_artifact(TinyNet().eval(), path)
    restored.load_state_dict({k: v for k, v in model.state_dict().items() if ".dqa_quantizer." not in k}, strict=False)
    x = TinyData().val_dataloader().dataset.tensors[0]
    assert torch.equal(restored(x), model.eval()(x))


def test_composes_with_checkpoint_early_stopping_and_pruning(tmp_path):
    cbs = [
        DQACallback(bits=4, calibration_samples=64),
        ModelCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max"),
        EarlyStopping(monitor="val/acc", mode="max", patience=5),
        ModelPruning("l1_unstructured", amount=0.2, parameter_names=["weight"], verbose=0),
    ]
    model = TinyNet()
    trainer = quiet_trainer(tmp_path, callbacks=cbs, enable_checkpointing=True, max_epochs=2)
    trainer.fit(model, datamodule=TinyData())
    assert all(bool(q.calibrated) for q in quantizers_of(model).values())
    assert trainer.checkpoint_callback.best_model_path


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 0}, r"bits.*\[2, 8\].*0"),
        ({"bits": 9}, r"bits.*9"),
        ({"bits": 8, "extra_bits": 9}, r"bits \+ extra_bits <= 16"),
        ({"ratio": 1.5}, r"ratio.*\[0, 1\].*1.5"),
        ({"method": "magic"}, r"method.*'magic'"),
        ({"ranking": "best"}, r"ranking.*'best'"),
        ({"calibration_samples": 0}, r"calibration_samples.*0"),
        ({"delay_steps": -1}, r"delay_steps.*-1"),
        ({"scale_mode": "dynamic"}, r"clipping='none'"),
    ],
)
def test_invalid_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DQACallback(**kwargs)


def test_unsupported_strategy_is_refused():
    class FSDPStrategy:  # stands in for lightning's FSDPStrategy, which needs CUDA
        pass

    class FakeTrainer:
        strategy = FSDPStrategy()

    with pytest.raises(ValueError, match=r"FSDPStrategy.*ddp"):
        DQACallback().setup(FakeTrainer(), TinyNet(), "fit")


def test_empty_calibration_data_is_an_error():
    with pytest.raises(ValueError, match="at least one sample"):
        quiet_trainer(callbacks=[DQACallback(calibration_samples=10)]).validate(
            TinyNet(), datamodule=TinyData(empty_calibration=True)
        )


def test_non_finite_activations_name_the_layer():
    model = TinyNet()
    with torch.no_grad():
        model.net[1].running_var.fill_(-1.0)  # BatchNorm of a negative variance: NaN after it
    with pytest.raises(ValueError, match=r"net\.3.*NaN/Inf"):
        quiet_trainer(callbacks=[DQACallback(calibration_samples=10, ranking="energy")]).validate(
            model, datamodule=TinyData()
        )


def test_model_without_quantizable_layers_is_an_error():
    class NoConv(TinyNet):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Identity())

    with pytest.raises(ValueError, match="at least one quantizable layer"):
        quiet_trainer(callbacks=[DQACallback()]).validate(NoConv(), datamodule=TinyData())


def test_callback_defaults_equal_dqaconfig_defaults():
    """The callback re-declares DQAConfig's fields (flat, LightningCLI-friendly); nothing may drift apart."""
    import dataclasses
    import inspect

    from lightning_dqa import DQAConfig

    params = inspect.signature(DQACallback.__init__).parameters
    fields = {f.name: f.default for f in dataclasses.fields(DQAConfig)}
    assert set(fields) <= set(params)
    for name, default in fields.items():
        assert params[name].default == default, name
    assert DQACallback().config == DQAConfig()


@pytest.mark.parametrize("name", ["include", "exclude", "layer_types"])
def test_a_string_where_a_list_is_expected_is_refused(name):
    with pytest.raises(ValueError, match=rf"Expected {name} to be a list of strings, got 'conv'"):
        DQACallback(**{name: "conv"})


@pytest.mark.parametrize(
    ("kwargs", "parts"),
    [
        (dict(ignore_index=1.5), ["ignore_index", "int", "1.5"]),
        (dict(ignore_index=True), ["ignore_index", "True"]),
        (dict(measure_memory="yes"), ["measure_memory", "bool", "'yes'"]),
        (dict(verbose=1), ["verbose", "bool", "1"]),
        (dict(export_path=""), ["export_path", "''"]),
        (dict(export_path=3), ["export_path", "3"]),
        (dict(seed=1.0), ["seed", "int", "1.0"]),
        (dict(calibration_samples=0), ["calibration_samples", "positive", "0"]),
        (dict(bits=8, extra_bits=9), ["bits + extra_bits", "17"]),
        (dict(first_layer_bits=8, extra_bits=9, bits=3), ["first_layer_bits + extra_bits", "17"]),
    ],
)
def test_invalid_arguments_are_named(kwargs, parts):
    with pytest.raises(ValueError) as info:
        DQACallback(**kwargs)
    for part in parts:
        assert part in str(info.value)
