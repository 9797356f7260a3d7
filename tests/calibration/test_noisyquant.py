"""NoisyQuant baseline: the quantizer against a per-element loop, the search's guarantees, the engine path."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import TinyConvNet
from torch import nn

from lightning_dqa.calibration.engine import calibrate
from lightning_dqa.calibration.noisyquant_search import search_noisyquant
from lightning_dqa.core import functional as F
from lightning_dqa.core.attach import (
    attach_quantizers,
    find_quant_points,
    prepare,
    quantizer_factory,
    quantizers_of,
    set_quantizers_enabled,
)
from lightning_dqa.core.config import DQAConfig
from lightning_dqa.core.noisyquant import NoisyQuantizer, noise_draw
from lightning_dqa.core.quantizers import ActivationQuantizer

f32 = np.float32


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- reference
def ref_noisy(x, scale, noise, bits, signed, channel_dim=1):
    """Per element, in float32 like the kernel: ``clamp(round((v + n) * (1/s))) * s - n``."""
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    moved = x.movedim(channel_dim, 0)
    out = []
    for c, vals in enumerate(moved.reshape(moved.shape[0], -1).tolist()):
        s, n = f32(scale[c]), f32(noise[c])
        inv = f32(f32(1.0) / s)
        row = []
        for v in vals:
            code = min(max(round(float(f32(f32(f32(v) + n) * inv))), qmin), qmax)
            row.append(float(f32(f32(f32(code) * s) - n)))
        out.append(row)
    return torch.tensor(out, dtype=torch.float32).reshape(moved.shape).movedim(0, channel_dim)


def conv_out(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The layer's functional forward: no hook, no quantizer."""
    return TF.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def activations(kind: str, shape=(64, 16, 8, 8), seed: int = 0) -> torch.Tensor:
    """Per-channel spread activations: symmetric (``gauss``) or post-ReLU (``relu``)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * (torch.rand(1, shape[1], 1, 1, generator=g) * 2 + 0.1)
    return x.relu() if kind == "relu" else x


def conv_model(channels: int = 16, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1))


# ----------------------------------------------------------------------------------------------- quantizer
@settings(max_examples=25, deadline=None)
@given(
    bits=st.integers(2, 8),
    signed=st.booleans(),
    linear=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_forward_matches_loop_reference(bits, signed, linear, seed):
    shape, channel_dim = ((3, 4, 5), -1) if linear else ((2, 3, 4, 4), 1)
    c = shape[channel_dim]
    x = randn(*shape, seed=seed) * 2
    scale = torch.rand(c, generator=torch.Generator().manual_seed(seed + 1)) * 0.5 + 0.05
    noise = (torch.rand(c, generator=torch.Generator().manual_seed(seed + 2)) - 0.5) * 3 * scale
    q = NoisyQuantizer(c, bits=bits, signed=signed, channel_dim=channel_dim, name="L")
    q.set_static_scale(scale)
    q.set_noise(noise)
    assert torch.equal(q(x), ref_noisy(x, scale, noise, bits, signed, channel_dim))


def test_zero_noise_is_direct_quantization():
    x = randn(4, 6, 5, 5)
    scale = torch.linspace(0.1, 0.6, 6)
    noisy, direct = NoisyQuantizer(6, bits=3), ActivationQuantizer(6, bits=3, scale_mode="static")
    noisy.set_static_scale(scale)
    direct.set_static_scale(scale)
    assert torch.equal(noisy(x), direct(x))


def test_disabled_and_passthrough_return_input():
    x = randn(2, 3, 4, 4)
    q = NoisyQuantizer(3, bits=3)
    q.set_noise(torch.tensor([0.1, 0.2, 0.3]))
    q.enabled = False
    assert q(x) is x
    assert NoisyQuantizer(3, bits=0)(x) is x


def test_codes_are_those_of_x_plus_noise():
    x = randn(2, 3, 4, 4)
    q = NoisyQuantizer(3, bits=4)
    q.set_static_scale(torch.tensor([0.1, 0.2, 0.3]))
    q.set_noise(torch.tensor([0.05, -0.07, 0.11]))
    main, _, scale = q.codes(x)
    noise = F.channel_view(q.noise, 4)
    assert torch.equal(F.dequantize(main, scale) - noise, q(x))


def test_factory_builds_static_quantizers_whatever_the_config():
    config = DQAConfig(method="noisyquant", bits=3, scale_mode="dynamic", clipping="none", code="unsigned")
    quantizers = attach_quantizers(conv_model(), config, quantizer_factory(config))
    (q,) = quantizers.values()
    assert isinstance(q, NoisyQuantizer)
    assert (q.scale_mode, q.n, bool(q.signed), q.channel_dim, q.name) == ("static", 8, False, 1, "0")


# ----------------------------------------------------------------------------------------------- search
def direct_error(x, layer_fn, clip, bits, signed):
    """MSE after ``layer_fn`` of direct quantization at ``clip * max`` (an ActivationQuantizer, no noise)."""
    q = ActivationQuantizer(x.shape[1], bits=bits, scale_mode="static", signed=signed)
    q.set_static_scale(F.scale_from_max(F.channel_absmax(x) * clip, bits, signed))
    return float((layer_fn(q(x)) - layer_fn(x)).square().mean())


@pytest.mark.parametrize(
    ("where", "kind", "bits"),
    [("input", "gauss", 3), ("input", "relu", 3), ("output", "gauss", 4), ("output", "relu", 3)],
)
@torch.no_grad()
def test_search_is_never_worse_than_direct(where, kind, bits):
    x = activations(kind)
    signed = kind == "gauss"
    config = DQAConfig(method="noisyquant", bits=bits, where=where, first_layer_bits=None, code="auto")
    model = conv_model()
    (q,) = attach_quantizers(model, config, quantizer_factory(config)).values()  # enabled: hook is live
    q.set_signed(signed)
    (point,) = find_quant_points(model, config)
    result = search_noisyquant(point, q, x, config)

    layer_fn = (lambda t: conv_out(model[0], t)) if where == "input" else (lambda t: t)
    noisy = float((layer_fn(q(x)) - layer_fn(x)).square().mean())
    direct = direct_error(x, layer_fn, result.direct_clip, bits, signed)
    assert noisy <= direct
    assert noisy == pytest.approx(result.mse, rel=1e-5)
    assert direct == pytest.approx(result.direct_mse, rel=1e-5)
    assert q.enabled  # switched off during the search only
    assert not q.important.any()
    assert float(q.clip_ratio) == pytest.approx(result.clip) and float(q.noise_range) == pytest.approx(
        result.noise_range
    )


@torch.no_grad()
def test_search_uses_the_shift_on_symmetric_data():
    # Signed 3-bit codes span [-4, 3]: a half-step shift makes the grid symmetric, so noise must win here.
    x = activations("gauss")
    config = DQAConfig(method="noisyquant", bits=3, where="output")
    q = NoisyQuantizer(16, bits=3, name="0")
    (point,) = find_quant_points(conv_model(), config)
    result = search_noisyquant(point, q, x, config)
    assert result.mse < result.direct_mse
    assert result.noise_range != 0 or result.noise_shift != 0


@torch.no_grad()
def test_search_is_deterministic_by_seed_and_leaves_global_rng_alone():
    x = activations("gauss", seed=1)
    states = []
    for seed in (7, 7):
        config = DQAConfig(method="noisyquant", bits=4, seed=seed)
        model = conv_model()
        (q,) = attach_quantizers(model, config, quantizer_factory(config)).values()
        (point,) = find_quant_points(model, config)
        rng = torch.get_rng_state()
        search_noisyquant(point, q, x, config)
        assert torch.equal(rng, torch.get_rng_state())
        states.append(q.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])

    assert torch.equal(noise_draw(7, "layer1.0.conv1", 16), noise_draw(7, "layer1.0.conv1", 16))
    assert not torch.equal(noise_draw(7, "layer1.0.conv1", 16), noise_draw(8, "layer1.0.conv1", 16))
    assert not torch.equal(noise_draw(7, "layer1.0.conv1", 16), noise_draw(7, "layer1.0.conv2", 16))


@torch.no_grad()
def test_state_dict_round_trip():
    x = activations("gauss", seed=2)
    config = DQAConfig(method="noisyquant", bits=3, where="output")
    q = NoisyQuantizer(16, bits=3, name="0")
    (point,) = find_quant_points(conv_model(), config)
    search_noisyquant(point, q, x, config)
    assert q.noise.abs().sum() > 0  # the shift wins on this data (see above), so the noise is not trivial

    buffer = io.BytesIO()
    torch.save(q.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    assert {"noise", "scale", "clip_ratio", "noise_range", "noise_shift"} <= state.keys()
    fresh = NoisyQuantizer(16, bits=3, name="0")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.noise, q.noise) and torch.equal(fresh.scale, q.scale)
    assert torch.equal(fresh(x), q(x))


def test_search_validates_its_arguments():
    config = DQAConfig(method="noisyquant", bits=3)
    model = conv_model()
    (point,) = find_quant_points(model, config)
    with pytest.raises(TypeError, match="NoisyQuantizer"):
        search_noisyquant(point, ActivationQuantizer(16, bits=3), randn(4, 16, 4, 4), config)
    with pytest.raises(ValueError, match="16 channels"):
        search_noisyquant(point, NoisyQuantizer(16, bits=3), randn(4, 8, 4, 4), config)
    with pytest.raises(ValueError, match="pass-through"):
        search_noisyquant(point, NoisyQuantizer(16, bits=0), randn(4, 16, 4, 4), config)
    with pytest.raises(ValueError, match="finite"):
        search_noisyquant(point, NoisyQuantizer(16, bits=3), torch.full((4, 16, 4, 4), float("nan")), config)


# ----------------------------------------------------------------------------------------------- engine


@pytest.mark.parametrize("where", ["input", "output"])
def test_engine_prepare_and_calibrate(where):
    torch.manual_seed(0)
    model = TinyConvNet()
    config = DQAConfig(method="noisyquant", bits=3, where=where)
    quantizers = prepare(model, config)
    assert all(isinstance(q, NoisyQuantizer) for q in quantizers.values())
    data = randn(96, 3, 8, 8, seed=5)
    batches = [(data[i : i + 32],) for i in range(0, 96, 32)]
    calibrate(model, config, batches, forward_fn=lambda m, b: m(b[0]))

    x = randn(16, 3, 8, 8, seed=6)
    with torch.no_grad():
        out = model(x)
        set_quantizers_enabled(model, False)
        reference = model(x)
        set_quantizers_enabled(model, True)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, reference)
    for name, q in quantizers_of(model).items():
        assert q.calibrated and not q.important.any(), name
        assert not torch.equal(q.scale, torch.ones_like(q.scale)), name  # the search froze real scales
        assert 0 < float(q.clip_ratio) <= 1, name

    restored = TinyConvNet()
    prepare(restored, config)
    restored.load_state_dict(model.state_dict())
    set_quantizers_enabled(restored, True)
    with torch.no_grad():
        assert torch.equal(restored(x), out)
