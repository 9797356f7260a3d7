"""Finding quantization points, installing and removing quantizers, and what survives copies and pickles."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from lightning_dqa import DQAConfig
from lightning_dqa.core.attach import (
    QUANTIZER_ATTR,
    attach_quantizers,
    detach_quantizers,
    find_quant_points,
    quantizers_of,
)
from lightning_dqa.core.quantizers import ActivationQuantizer

pytestmark = pytest.mark.usefixtures("single_thread")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv1d(8, 4, 1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.stem(x))  # (N, 8, H, W)
        x = self.head(x.flatten(2)).mean(-1)  # (N, 4)
        return self.fc(x)


def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def inputs() -> torch.Tensor:
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def dynamic(**kw) -> DQAConfig:
    base = dict(bits=3, scale_mode="dynamic", clipping="none", code="signed", first_layer_bits=None)
    base.update(kw)
    return DQAConfig(**base)


# ----------------------------------------------------------------------------------------------- finding
def test_find_points_by_type_in_registration_order():
    pts = find_quant_points(net(), dynamic())
    assert [p.name for p in pts] == ["stem", "block.1", "fc"]
    assert [(p.num_channels, p.channel_dim, p.where) for p in pts] == [
        (3, 1, "input"),
        (6, 1, "input"),
        (4, -1, "input"),
    ]
    out = find_quant_points(net(), dynamic(where="output", layer_types=("Conv2d", "Conv1d", "Linear")))
    assert [(p.name, p.num_channels, p.channel_dim) for p in out] == [
        ("stem", 6, 1),
        ("block.1", 8, 1),
        ("head", 4, 1),
        ("fc", 5, -1),
    ]
    m = net()
    assert find_quant_points(m, dynamic())[0].layer is m.stem


def test_include_and_exclude_regex():
    cfg = dynamic(include=(r"^block\.",))
    assert [p.name for p in find_quant_points(net(), cfg)] == ["block.1"]
    cfg = dynamic(exclude=("stem", r"fc$"))
    assert [p.name for p in find_quant_points(net(), cfg)] == ["block.1"]
    cfg = dynamic(include=("stem", "fc"), exclude=("fc",))
    assert [p.name for p in find_quant_points(net(), cfg)] == ["stem"]


def test_no_layer_error_names_types_filters_and_model():
    with pytest.raises(ValueError) as info:
        find_quant_points(net(), dynamic(layer_types=("Conv3d",), include=("xyz",), exclude=("abc",)))
    msg = str(info.value)
    for part in ("Conv3d", "xyz", "abc", "Net", "at least one"):
        assert part in msg, (part, msg)
    with pytest.raises(ValueError, match="found none in Sequential"):
        attach_quantizers(nn.Sequential(nn.ReLU()), dynamic())


def test_root_module_itself_is_not_a_point():
    with pytest.raises(ValueError):
        find_quant_points(nn.Linear(3, 4), dynamic())


# ----------------------------------------------------------------------------------------------- hooks
def test_input_hooks_apply_quantizer_to_layer_inputs():
    m = net()
    x = inputs()
    qs = attach_quantizers(m, dynamic(where="input"))
    assert list(qs) == ["stem", "block.1", "fc"]
    with torch.no_grad():
        h = m.stem(x)  # hooked: quantizes x first
        assert torch.equal(h, nn.functional.conv2d(qs["stem"](x), m.stem.weight, m.stem.bias, padding=1))
        a = torch.relu(h)
        b = m.block[3](m.block[2](m.block[1]._conv_forward(qs["block.1"](a), m.block[1].weight, m.block[1].bias)))
        z = m.head(b.flatten(2)).mean(-1)
        expected = nn.functional.linear(qs["fc"](z), m.fc.weight, m.fc.bias)
        assert torch.equal(m(x), expected)


def test_output_hooks_apply_quantizer_to_layer_outputs():
    m = net()
    x = inputs()
    qs = attach_quantizers(m, dynamic(where="output"))
    with torch.no_grad():
        raw = nn.functional.conv2d(x, m.stem.weight, m.stem.bias, padding=1)
        assert torch.equal(m.stem(x), qs["stem"](raw))
        z = nn.functional.linear(torch.ones(2, 4), m.fc.weight, m.fc.bias)
        assert torch.equal(m.fc(torch.ones(2, 4)), qs["fc"](z))


def test_quantizers_change_output_and_disabled_quantizers_do_not():
    m = net()
    x = inputs()
    with torch.no_grad():
        fp = m(x)
        qs = attach_quantizers(m, dynamic())
        assert not torch.equal(m(x), fp)
        for q in qs.values():
            q.enabled = False
        assert torch.equal(m(x), fp)


def test_layer_bits_first_and_last_overrides_and_fp32():
    qs = attach_quantizers(net(), dynamic(first_layer_bits=8, last_layer_bits=0))
    assert [q.n for q in qs.values()] == [8, 3, 0]
    assert qs["fc"].passthrough
    qs = attach_quantizers(net(), dynamic(method="fp32"))
    assert all(q.passthrough for q in qs.values())
    qs = attach_quantizers(net(), dynamic(code="unsigned", extra_bits=2))
    assert all(not bool(q.signed) and q.m == 2 for q in qs.values())
    assert [q.name for q in qs.values()] == ["stem", "block.1", "fc"]


def test_attach_is_idempotent():
    m = net()
    attach_quantizers(m, dynamic())
    qs = attach_quantizers(m, dynamic(bits=4))
    assert len(m.stem._forward_pre_hooks) == 1
    assert [q.n for q in quantizers_of(m).values()] == [4, 4, 4]
    assert all(quantizers_of(m)[k] is v for k, v in qs.items())


def test_detach_removes_everything():
    m = net()
    keys_before = set(m.state_dict())
    x = inputs()
    with torch.no_grad():
        fp = m(x)
    attach_quantizers(m, dynamic(where="output"))
    assert any(QUANTIZER_ATTR in k for k in m.state_dict())
    detach_quantizers(m)
    assert quantizers_of(m) == {}
    assert set(m.state_dict()) == keys_before
    for mod in m.modules():
        assert not hasattr(mod, QUANTIZER_ATTR)
        assert len(mod._forward_hooks) == 0 and len(mod._forward_pre_hooks) == 0
        assert not any(k.startswith("_dqa") for k in vars(mod))
    with torch.no_grad():
        assert torch.equal(m(x), fp)
    detach_quantizers(m)  # twice is harmless


# ----------------------------------------------------------------------------------------------- copies
def _calibrated_model() -> tuple[Net, torch.Tensor, torch.Tensor]:
    m = net()
    qs = attach_quantizers(m, DQAConfig(bits=3, first_layer_bits=None, code="signed", clipping="none"))
    x = inputs()
    g = torch.Generator().manual_seed(3)
    for q in qs.values():  # static scales and a DQA selection, as calibration would leave them
        q.set_static_scale(torch.rand(q.num_channels, generator=g) * 0.3 + 0.05)
        q.important.copy_(torch.rand(q.num_channels, generator=g) > 0.5)
    with torch.no_grad():
        y = m(x)
    return m, x, y


def test_deepcopy_keeps_quantizers_and_outputs_and_detaches_independently():
    m, x, y = _calibrated_model()
    c = copy.deepcopy(m)
    assert list(quantizers_of(c)) == list(quantizers_of(m))
    with torch.no_grad():
        assert torch.equal(c(x), y)
    detach_quantizers(c)
    assert quantizers_of(c) == {}
    assert all(len(mod._forward_pre_hooks) == 0 for mod in c.modules())
    with torch.no_grad():
        assert torch.equal(m(x), y)  # the original keeps its quantizers and hooks
        assert not torch.equal(c(x), y)


@pytest.mark.parametrize("how", ["torch", "pickle"])
def test_whole_module_pickle_round_trip(how):
    m, x, y = _calibrated_model()
    if how == "torch":
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
    else:
        loaded = pickle.loads(pickle.dumps(m))
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    qa, qb = quantizers_of(m), quantizers_of(loaded)
    assert list(qa) == list(qb)
    for name in qa:
        assert torch.equal(qa[name].scale, qb[name].scale) and torch.equal(qa[name].important, qb[name].important)
    detach_quantizers(loaded)
    assert all(len(mod._forward_pre_hooks) == 0 for mod in loaded.modules())


def test_weights_load_by_original_keys():
    src = net()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    plain = src.state_dict()
    m = net()
    attach_quantizers(m, dynamic())
    result = m.load_state_dict(plain, strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(f".{QUANTIZER_ATTR}." in k for k in result.missing_keys)
    assert {k.split(f".{QUANTIZER_ATTR}.")[0] for k in result.missing_keys} == {"stem", "block.1", "fc"}
    for k, v in plain.items():
        assert torch.equal(m.state_dict()[k], v)


def test_checkpoint_with_quantizers_restores_bit_for_bit():
    m, x, y = _calibrated_model()
    sd = m.state_dict()
    fresh = net()
    attach_quantizers(fresh, DQAConfig(bits=3, first_layer_bits=None, code="signed", clipping="none"))
    fresh.load_state_dict(sd, strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), y)


def test_quantizers_of_returns_only_activation_quantizers():
    m = net()
    assert quantizers_of(m) == {}
    qs = attach_quantizers(m, dynamic())
    assert all(isinstance(q, ActivationQuantizer) for q in qs.values())
    assert quantizers_of(m) == qs
