"""load_quantized: weights_only loading, schema checks before the model is touched, all-or-nothing restore."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_export import CONFIGS, TinyConvNet, Wrapper, _assert_same, _structure, calibrated, data
from torch import nn

from lightning_dqa.deploy.checkpoint import load_quantized


def checkpoint_of(model: nn.Module, config_key: str = "noisyquant") -> dict[str, Any]:
    return {
        "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
        "callbacks": {"DQACallback{'bits': 3}": {"config": CONFIGS[config_key].to_dict()}},
        "epoch": 1,
    }


@pytest.fixture(scope="module")
def source() -> nn.Module:
    return calibrated(CONFIGS["noisyquant"])


def test_round_trip_through_a_file_and_a_prefix(tmp_path, source):
    path = tmp_path / "last.ckpt"
    torch.save(checkpoint_of(source), path)
    x = data(7, 8)
    with torch.no_grad():
        assert torch.equal(load_quantized(TinyConvNet(seed=3), path)(x), source(x))
    outer = calibrated(CONFIGS["noisyquant"], Wrapper())
    inner = load_quantized(TinyConvNet(seed=3), checkpoint_of(outer), state_dict_prefix="net.")
    with torch.no_grad():
        assert torch.equal(inner(x), outer(x))


class Payload:
    """Unpickling this creates a file: what a crafted checkpoint could do with weights_only=False."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.target), "w"))


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path, source):
    marker = tmp_path / "pwned"
    ckpt = checkpoint_of(source)
    ckpt["hyper_parameters"] = {"x": Payload(marker)}
    torch.save(ckpt, tmp_path / "evil.ckpt")
    assert not marker.exists()
    model = TinyConvNet()
    before = _structure(model)
    with pytest.raises(ValueError, match="weights_only"):
        load_quantized(model, tmp_path / "evil.ckpt")
    assert not marker.exists()
    _assert_same(before, model)
    torch.load(tmp_path / "evil.ckpt", weights_only=False)  # proof that the payload is live
    assert marker.exists()


def _edit(fn: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def apply(ckpt: dict[str, Any]) -> dict[str, Any]:
        fn(ckpt)
        return ckpt

    return apply


def _sd(ckpt: dict[str, Any]) -> dict[str, Any]:
    return ckpt["state_dict"]


Q = "conv2.dqa_quantizer."
MALFORMED_CHECKPOINTS: list[tuple[str, str, Callable[[dict[str, Any]], Any], dict[str, Any]]] = [
    ("state_dict not a mapping", "state_dict", _edit(lambda c: c.update(state_dict=[1])), {}),
    ("state_dict entry not a tensor", "tensors", _edit(lambda c: _sd(c).update({"conv1.weight": [0.0]})), {}),
    ("no callback state", "DQACallback", _edit(lambda c: c.pop("callbacks")), {}),
    ("callbacks not a mapping", "DQACallback", _edit(lambda c: c.update(callbacks=[1])), {}),
    ("config not a mapping", "DQACallback", _edit(lambda c: c.update(callbacks={"DQACallback": {"config": 3}})), {}),
    ("unknown config key", "config", _edit(lambda c: next(iter(c["callbacks"].values()))["config"].update(b=1)), {}),
    ("bad config value", "config", _edit(lambda c: next(iter(c["callbacks"].values()))["config"].update(bits=0)), {}),
    ("weight missing", "missing keys", _edit(lambda c: _sd(c).pop("conv1.weight")), {}),
    ("weight of another shape", "conv1.weight", _edit(lambda c: _sd(c).update({"conv1.weight": torch.zeros(1)})), {}),
    ("quantizer buffer missing", "noise", _edit(lambda c: _sd(c).pop(Q + "noise")), {}),
    ("quantizer bits differ", "bits=4", _edit(lambda c: _sd(c)[Q + "bits"].fill_(4)), {}),
    ("quantizer dtype differs", "dtype", _edit(lambda c: _sd(c).update({Q + "important": torch.zeros(8)})), {}),
    ("unexpected quantizer entry", "unexpected", _edit(lambda c: _sd(c).update({Q + "extra": torch.zeros(1)})), {}),
    ("layer without quantizer", "fc", _edit(lambda c: [_sd(c).pop(k) for k in list(_sd(c)) if "fc.dqa" in k]), {}),
    ("full precision", "full-precision", _edit(lambda c: [_sd(c).pop(k) for k in list(_sd(c)) if "dqa" in k]), {}),
    ("not a mapping", "mapping", lambda c: [c], {}),
    ("malformed prefix", "state_dict_prefix", lambda c: c, {"state_dict_prefix": "net"}),
    ("config of another method", "noise", lambda c: c, {"config": CONFIGS["direct"]}),
]


@pytest.mark.parametrize(
    ("match", "corrupt", "kwargs"),
    [(m, c, k) for _, m, c, k in MALFORMED_CHECKPOINTS],
    ids=[n for n, *_ in MALFORMED_CHECKPOINTS],
)
def test_malformed_checkpoint_fails_clearly_and_leaves_the_model_alone(tmp_path, source, match, corrupt, kwargs):
    bad = corrupt(checkpoint_of(source))
    path = tmp_path / "bad.ckpt"
    torch.save(bad, path)
    model = load_quantized(TinyConvNet(seed=9), checkpoint_of(calibrated(CONFIGS["dqa"], TinyConvNet(seed=9)), "dqa"))
    for target in (model, TinyConvNet(seed=4)):
        before = _structure(target)
        for ckpt in (path, copy.deepcopy(bad)):
            with pytest.raises(ValueError, match=match):
                load_quantized(target, ckpt, **kwargs)
            _assert_same(before, target)


def test_a_failure_while_loading_restores_weights_and_quantizers(monkeypatch, source):
    model = TinyConvNet(seed=4)
    before = _structure(model)

    def half_load(self: nn.Module, state: Any, strict: bool = True, assign: bool = False) -> Any:
        with torch.no_grad():
            for p in self.parameters():
                p.zero_()
        raise RuntimeError("power cut")

    monkeypatch.setattr(nn.Module, "load_state_dict", half_load)
    with pytest.raises(RuntimeError, match="power cut"):
        load_quantized(model, checkpoint_of(source))
    _assert_same(before, model)
