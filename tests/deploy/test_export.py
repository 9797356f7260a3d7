"""Deployment artifacts: every method round-trips bit for bit; malformed files fail clearly and touch nothing."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from tiny import TinyConvNet
from torch import nn

from lightning_dqa import DQAConfig
from lightning_dqa.calibration.engine import calibrate
from lightning_dqa.core.attach import prepare, quantizers_of
from lightning_dqa.core.quantizers import ActivationQuantizer
from lightning_dqa.deploy._schema import FORMAT
from lightning_dqa.deploy.artifact import apply_artifact, export_artifact, load_artifact


class Wrapper(nn.Module):
    """Stands for a LightningModule holding the network as ``net``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyConvNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


CONFIGS = {
    "dqa": DQAConfig(bits=3, ranking="energy"),
    "dqa-dynamic": DQAConfig(bits=3, ranking="energy", scale_mode="dynamic", clipping="none", code="signed"),
    "direct": DQAConfig(bits=3, method="direct"),
    "noisyquant": DQAConfig(bits=3, method="noisyquant"),
    "fp32": DQAConfig(bits=3, method="fp32"),
}


def data(seed: int, n: int = 48) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def calibrated(config: DQAConfig, model: nn.Module | None = None) -> nn.Module:
    model = TinyConvNet() if model is None else model
    prepare(model, config)
    x = data(1)
    calibrate(model, config, [(x[i : i + 16],) for i in range(0, 48, 16)], forward_fn=lambda m, b: m(b[0]))
    return model.eval()


def quantizer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".dqa_quantizer." in k}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_every_method_round_trips_bit_for_bit(tmp_path, method):
    config = CONFIGS[method]
    model = calibrated(config)
    path = tmp_path / "dqa.json"
    artifact = export_artifact(model, path, config)
    assert artifact["format"] == FORMAT == "lightning-dqa/2"
    fresh = apply_artifact(TinyConvNet(), path)
    x = data(2, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    mine, theirs = quantizer_state(model), quantizer_state(fresh)
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert mine[key].dtype == theirs[key].dtype and torch.equal(mine[key], theirs[key]), key
    assert all(q.enabled and bool(q.calibrated) for q in quantizers_of(fresh).values())
    if method == "noisyquant":  # the bug this guards: noise silently zeroed
        assert any(bool(q.noise.any()) for q in quantizers_of(fresh).values())


def test_prefix_applies_onto_the_inner_network(tmp_path):
    config = CONFIGS["noisyquant"]
    outer = calibrated(config, Wrapper())
    export_artifact(outer, tmp_path / "a.json", config)
    with pytest.raises(ValueError, match="state_dict_prefix"):
        apply_artifact(TinyConvNet(), tmp_path / "a.json")
    inner = apply_artifact(TinyConvNet(), tmp_path / "a.json", state_dict_prefix="net.")
    x = data(3, 8)
    with torch.no_grad():
        assert torch.equal(inner(x), outer(x))
    with pytest.raises(ValueError, match="state_dict_prefix"):
        apply_artifact(TinyConvNet(), tmp_path / "a.json", state_dict_prefix="net")


def _as_v1(artifact: dict[str, Any]) -> dict[str, Any]:
    old = copy.deepcopy(artifact)
    old["format"] = "lightning-dqa/1"
    for layer in old["layers"]:
        for key in ("error_counts", "noise", "clip_ratio", "noise_range", "noise_shift"):
            layer.pop(key, None)
    return old


def test_format_1_is_still_read_except_noisyquant(tmp_path):
    config = CONFIGS["dqa"]
    model = calibrated(config)
    old = _as_v1(export_artifact(model, tmp_path / "a.json", config))
    fresh = apply_artifact(TinyConvNet(), old)
    x = data(4, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    noisy = CONFIGS["noisyquant"]
    old = _as_v1(export_artifact(calibrated(noisy), tmp_path / "b.json", noisy))
    with pytest.raises(ValueError, match="noise"):
        apply_artifact(TinyConvNet(), old)


# ----------------------------------------------------------------------------------------- malformed files
def _layer(i: int, **changes: Any) -> Callable[[dict[str, Any]], None]:
    def edit(a: dict[str, Any]) -> None:
        a["layers"][i].update(changes)

    return edit


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(a: dict[str, Any]) -> None:
        target = a
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


def _drop(i: int, key: str) -> Callable[[dict[str, Any]], None]:
    return lambda a: a["layers"][i].pop(key)


def _deep(a: dict[str, Any]) -> None:
    nested: Any = 0
    for _ in range(100_000):
        nested = [nested]
    a["layers"][1]["scales"] = nested


# (name, the field the error must name, the corruption); layer 1 is an ordinary 8-channel DQA layer.
MALFORMED: list[tuple[str, str, Callable[[dict[str, Any]], None]]] = [
    ("nan scale", "scales", _layer(1, scales=[float("nan")] + [1.0] * 7)),
    ("inf scale", "scales", _layer(1, scales=[float("inf")] + [1.0] * 7)),
    ("zero scale", "scales", _layer(1, scales=[0.0] + [1.0] * 7)),
    ("negative scale", "scales", _layer(1, scales=[-0.5] + [1.0] * 7)),
    ("scale overflowing float32", "scales", _layer(1, scales=[1e300] + [1.0] * 7)),
    ("too few scales", "scales", _layer(1, scales=[1.0] * 7)),
    ("string scale", "scales", _layer(1, scales=["0.1"] + [1.0] * 7)),
    ("index -1", "important", _layer(1, important=[-1])),
    ("index 1.5", "important", _layer(1, important=[1.5])),
    ("index past the end", "important", _layer(1, important=[8])),
    ("duplicate index", "important", _layer(1, important=[2, 2])),
    ("bool index", "important", _layer(1, important=[True])),
    ("Kraft violated", "codebook_lengths", _layer(1, codebook_lengths=[1, 1, 1, 1, 1, 1, 1, 1])),
    ("length 0", "codebook_lengths", _layer(1, codebook_lengths=[0, 3, 3, 3, 3, 3, 3, 3])),
    ("length 17", "codebook_lengths", _layer(1, codebook_lengths=[17, 3, 3, 3, 3, 3, 3, 3])),
    ("too few lengths", "codebook_lengths", _layer(1, codebook_lengths=[1, 1])),
    ("lengths of another book", "codebook_lengths", _layer(1, codebook_lengths=[3] * 8)),
    ("codebook_hex tampered", "codebook_hex", _layer(1, codebook_hex="00")),
    ("codebook_hex missing", "codebook_hex", _drop(1, "codebook_hex")),
    ("negative error count", "error_counts", _layer(1, error_counts=[-1] + [0] * 7)),
    ("signed as a string", "signed", _layer(1, signed="false")),
    ("signed as 0", "signed", _layer(1, signed=0)),
    ("extra_bits off the config", "extra_bits", _layer(1, extra_bits=2)),
    ("bits off the config", "bits", _layer(1, bits=4)),
    ("bits as a float", "bits", _layer(1, bits=3.0)),
    ("bits as a bool", "bits", _layer(1, bits=True)),
    ("channels off the model", "channels", _layer(1, channels=9)),
    ("channel_dim off the model", "channel_dim", _layer(1, channel_dim=-1)),
    ("where off the config", "where", _layer(1, where="output")),
    ("scale_mode off the config", "scale_mode", _layer(1, scale_mode="dynamic")),
    ("layer the model lacks", "name", _layer(1, name="conv9")),
    ("duplicate layer", "name", lambda a: a["layers"].append(copy.deepcopy(a["layers"][1]))),
    ("model layer missing", "layers", lambda a: a["layers"].pop(1)),
    ("layer not an object", "layers", _set(("layers", 1), [1, 2])),
    ("scales missing", "scales", _drop(1, "scales")),
    ("other format", "format", _set(("format",), "lightning-dqa/9")),
    ("config not an object", "config", _set(("config",), [])),
    ("unknown config field", "config", _set(("config", "bitz"), 3)),
    ("bad config value", "config", _set(("config", "bits"), 99)),
    ("layers empty", "layers", _set(("layers",), [])),
    ("nesting too deep", "nest", _deep),
]


def _structure(model: nn.Module) -> dict[str, Any]:
    """Everything apply_artifact could change: tensors, submodules, hooks, modes, quantizer switches."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modules": [(n, id(m), m.training) for n, m in model.named_modules()],
        "hooks": [
            (n, list(m._forward_pre_hooks.values()), list(m._forward_hooks.values())) for n, m in model.named_modules()
        ],
        "enabled": {n: q.enabled for n, q in quantizers_of(model).items()},
    }


def _assert_same(before: dict[str, Any], model: nn.Module) -> None:
    after = _structure(model)
    assert before["state"].keys() == after["state"].keys()
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])
    assert before["modules"] == after["modules"] and before["hooks"] == after["hooks"]
    assert before["enabled"] == after["enabled"]


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    config = CONFIGS["dqa"]
    art = export_artifact(calibrated(config), tmp_path_factory.mktemp("valid") / "dqa.json", config)
    assert art["layers"][1]["channels"] == 8 and art["layers"][1]["important"]
    return art


@pytest.fixture(scope="module")
def direct_artifact(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    config = CONFIGS["direct"]
    return export_artifact(calibrated(config), tmp_path_factory.mktemp("direct") / "d.json", config)


@pytest.mark.parametrize(("field", "corrupt"), [(f, c) for _, f, c in MALFORMED], ids=[n for n, _, _ in MALFORMED])
def test_malformed_artifact_fails_clearly_and_leaves_the_model_alone(tmp_path, valid, direct_artifact, field, corrupt):
    bad = copy.deepcopy(valid)
    corrupt(bad)
    # a model already quantized by another artifact: it must keep that state, quantizers and hooks
    model = apply_artifact(TinyConvNet(seed=5), direct_artifact)
    before = _structure(model)
    path = tmp_path / "bad.json"
    try:
        path.write_text(json.dumps(bad))
    except RecursionError:
        path.write_text("[" * 100_000 + "]" * 100_000)
    for source in (path, bad):
        with pytest.raises(ValueError, match=field):
            apply_artifact(model, source)
        _assert_same(before, model)
    fresh = TinyConvNet()
    before = _structure(fresh)
    with pytest.raises(ValueError, match=field):
        apply_artifact(fresh, path)
    _assert_same(before, fresh)


def test_noisyquant_entries_are_checked(tmp_path):
    config = CONFIGS["noisyquant"]
    art = export_artifact(calibrated(config), tmp_path / "n.json", config)
    cases = [
        ("noise", [float("nan")] * 8),
        ("noise", [0.0] * 3),
        ("clip_ratio", 0.0),
        ("clip_ratio", 1.5),
        ("noise_range", -1.0),
        ("noise_shift", "x"),
        ("important", [0]),
    ]
    for field, value in cases:
        bad = copy.deepcopy(art)
        bad["layers"][1][field] = value
        model = TinyConvNet()
        before = _structure(model)
        with pytest.raises(ValueError, match=field):
            apply_artifact(model, bad)
        _assert_same(before, model)


def test_a_failure_while_applying_restores_the_model(monkeypatch, valid, direct_artifact):
    model = apply_artifact(TinyConvNet(seed=5), direct_artifact)
    model.train()
    before = _structure(model)
    calls = []

    def flaky(self: ActivationQuantizer, checked: dict[str, torch.Tensor]) -> None:
        calls.append(self.name)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        original(self, checked)

    original = ActivationQuantizer.load_artifact_entry
    monkeypatch.setattr(ActivationQuantizer, "load_artifact_entry", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        apply_artifact(model, valid)
    _assert_same(before, model)
    assert model.training
    x = data(5, 4)
    monkeypatch.undo()
    with torch.no_grad():  # the old quantizers and their hooks still work
        model.eval()
        assert torch.equal(model(x), model(x))
    assert len(quantizers_of(model)) == 4


def test_load_artifact_reads_top_level_only(tmp_path, valid):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(valid))
    assert load_artifact(path)["format"] == FORMAT
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="UTF-8 JSON"):
        load_artifact(path)
    path.write_text('{"format": "lightning-dqa/2", "format": "x"}')
    with pytest.raises(ValueError, match="duplicate"):
        load_artifact(path)
