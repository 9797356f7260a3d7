"""ActivationQuantizer against a per-element reference of DQA_METHOD.md sections 2 and 4."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from lightning_dqa.core import functional as F
from lightning_dqa.core.quantizers import ActivationQuantizer

pytestmark = pytest.mark.usefixtures("single_thread")


f32 = np.float32


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- reference
def ref_range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def ref_quantizer(x, scales_n, n, m, important, signed, channel_dim=1):
    """Per element: important channels at n+m bits with scale s/2**m, the others at n bits with scale s."""
    moved = x.movedim(channel_dim, 0)
    rows = moved.reshape(moved.shape[0], -1).tolist()
    out = []
    for c, vals in enumerate(rows):
        bits = n + m if bool(important[c]) else n
        s = f32(scales_n[c]) / f32(2**m) if bool(important[c]) else f32(scales_n[c])
        qmin, qmax = ref_range(bits, signed)
        inv = f32(f32(1.0) / s)
        codes = [min(max(round(float(f32(f32(v) * inv))), qmin), qmax) for v in vals]
        out.append([float(f32(f32(q) * s)) for q in codes])
    return torch.tensor(out, dtype=torch.float32).reshape(moved.shape).movedim(0, channel_dim)


def ref_dynamic_scales(x, n, signed, channel_dim=1):
    moved = x.movedim(channel_dim, 0)
    out = []
    for vals in moved.reshape(moved.shape[0], -1).tolist():
        mx = max(abs(v) for v in vals)
        out.append(float(f32(mx) / f32(2.0 ** (n - 1 if signed else n))) if mx > 0 else 1.0)
    return out


IMPORTANT = torch.tensor([True, False, True, False, False])


def make(mode="static", bits=3, m=3, signed=True, important=None, c=5, channel_dim=1, x=None):
    q = ActivationQuantizer(
        c, bits=bits, extra_bits=m, scale_mode=mode, signed=signed, channel_dim=channel_dim, name="L"
    )
    if important is not None:
        q.important.copy_(important)
    if mode != "dynamic" and x is not None:
        q.set_static_scale(F.scale_from_max(F.channel_absmax(x, channel_dim), bits, signed))
    return q


# ----------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("important", [None, IMPORTANT], ids=["direct", "dqa"])
def test_static_forward_matches_reference(signed, important):
    x = randn(4, 5, 3, 3)
    if not signed:
        x = x.relu()
    calib = randn(8, 5, 3, 3, seed=1) * 0.8  # static scales from other data: some values clamp
    q = make("static", signed=signed, important=important, x=calib.relu() if not signed else calib)
    imp = important if important is not None else torch.zeros(5, dtype=torch.bool)
    expected = ref_quantizer(x, q.scale.tolist(), 3, 3, imp, signed)
    with torch.no_grad():
        assert torch.equal(q(x), expected)
    assert torch.equal(q(x), expected)  # grad mode, x not requiring grad: same values


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("important", [None, IMPORTANT], ids=["direct", "dqa"])
def test_dynamic_forward_matches_reference(signed, important):
    x = randn(4, 5, 3, 3)
    if not signed:
        x = x.relu()
    x[:, 3] = 0.0  # a dead channel: zeros out, no NaN
    q = make("dynamic", signed=signed, important=important)
    imp = important if important is not None else torch.zeros(5, dtype=torch.bool)
    expected = ref_quantizer(x, ref_dynamic_scales(x, 3, signed), 3, 3, imp, signed)
    out = q(x)
    assert torch.equal(out, expected)
    assert torch.equal(out[:, 3], torch.zeros_like(out[:, 3]))


def test_important_channels_are_the_paper_n_plus_m_bit_quantizer():
    """Dynamic DQA: important channels equal direct quantization at n + m bits, the rest at n bits."""
    x = randn(3, 5, 4, 4)
    dqa = make("dynamic", bits=3, m=2, important=IMPORTANT)(x)
    at_n = make("dynamic", bits=3)(x)
    at_nm = make("dynamic", bits=5)(x)
    assert torch.equal(dqa[:, IMPORTANT], at_nm[:, IMPORTANT])
    assert torch.equal(dqa[:, ~IMPORTANT], at_n[:, ~IMPORTANT])


def test_linear_layout_channel_dim_last():
    x = randn(6, 5)
    q = make("dynamic", important=IMPORTANT, channel_dim=-1)
    expected = ref_quantizer(x, ref_dynamic_scales(x, 3, True, -1), 3, 3, IMPORTANT, True, channel_dim=-1)
    assert torch.equal(q(x), expected)


def test_dynamic_versus_static_modes():
    x = randn(4, 5, 3, 3)
    dyn = make("dynamic", important=IMPORTANT)
    stat = make("static", important=IMPORTANT, x=x)
    assert torch.equal(dyn(x), stat(x))  # static scales frozen from x itself: same as dynamic on x
    big = 2 * x
    assert torch.equal(dyn(big), 2 * dyn(x))  # dynamic follows the run-time maximum (exact: power of two)
    out = stat(big)
    assert not torch.equal(out, dyn(big))
    # static keeps the frozen grid: everything beyond the calibrated range clamps to the frozen extremes
    scale = stat.scale.view(1, -1, 1, 1)
    hi = torch.where(IMPORTANT.view(1, -1, 1, 1), (2**5 - 1) * scale / 8, 3 * scale)
    assert (out <= hi + 1e-6).all()
    assert torch.equal(out, ref_quantizer(big, stat.scale.tolist(), 3, 3, IMPORTANT, True))


def test_static_scale_defaults_and_set_static_scale():
    q = make("static")
    assert torch.equal(q.scale, torch.ones(5))
    q.set_static_scale(torch.arange(1, 6, dtype=torch.float64))
    assert q.scale.dtype == torch.float32
    assert torch.equal(q.scale, torch.arange(1, 6, dtype=torch.float32))


def test_passthrough_bits_zero_and_disabled():
    x = randn(2, 5, 3)
    q = make("static", bits=0)
    assert q.passthrough
    assert q(x) is x
    q2 = make("dynamic")
    q2.enabled = False
    assert q2(x) is x
    q2.enabled = True
    assert not torch.equal(q2(x), x)


def test_fp_mask_leaves_channels_in_full_precision():
    x = randn(2, 5, 3)
    q = make("dynamic", important=IMPORTANT)
    full = q(x)
    q.fp_mask = torch.tensor([False, False, True, True, False])
    out = q(x)
    assert torch.equal(out[:, q.fp_mask], x[:, q.fp_mask])
    assert torch.equal(out[:, ~q.fp_mask], full[:, ~q.fp_mask])


def test_channel_count_mismatch_raises_naming_layer():
    q = ActivationQuantizer(5, bits=3, scale_mode="dynamic", name="layer1.0.conv2")
    with pytest.raises(ValueError, match=r"layer1\.0\.conv2.*5 channels"):
        q(torch.zeros(2, 4, 3, 3))


# ----------------------------------------------------------------------------------------------- codes
@pytest.mark.parametrize("mode", ["static", "dynamic", "learnable"])
@pytest.mark.parametrize("signed", [True, False])
def test_codes_dequantize_equals_forward(mode, signed):
    x = randn(4, 5, 3, 3, seed=3)
    if not signed:
        x = x.relu()
    q = make(mode, bits=3, m=3, signed=signed, important=IMPORTANT, x=randn(4, 5, 3, 3, seed=4).abs() * 0.9)
    main, err, scale_n = q.codes(x)
    lo, hi = ref_range(3, signed)
    assert int(main.min()) >= lo and int(main.max()) <= hi
    assert err.shape == (4, int(IMPORTANT.sum()), 3, 3)
    assert int(err.min()) >= 0 and int(err.max()) <= 7
    values = F.dqa_dequantize(main, err, scale_n, 3, q.important)
    with torch.no_grad():
        assert torch.equal(q(x), values)
    assert torch.equal(q(x).detach(), values)  # grad mode (learnable: the autograd path)


def test_learnable_forward_equals_codes_on_near_ties():
    g = torch.Generator().manual_seed(1)
    q = make("learnable", bits=3, signed=False, c=6)
    scale = F.scale_from_max(torch.rand(6, generator=g) * 3 + 0.1, 3, False)
    q.set_static_scale(scale)
    k = torch.randint(0, 7, (50, 6), generator=g).float()
    x = (k + 0.5) * scale  # near-ties
    main, err, scale_n = q.codes(x)
    assert torch.equal(q(x).detach(), F.dqa_dequantize(main, err, scale_n, 3, q.important))


# ----------------------------------------------------------------------------------------------- state
@pytest.mark.parametrize("mode", ["static", "learnable", "dynamic"])
def test_state_dict_round_trip_into_fresh_quantizer(mode):
    x = randn(4, 5, 3, 3)
    q = make(mode, bits=4, m=2, signed=False, important=IMPORTANT, x=x.relu())
    q.calibrated.fill_(True)
    sd = q.state_dict()
    assert {"scale", "important", "signed", "calibrated", "bits", "extra_bits"} <= set(sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = ActivationQuantizer(5, bits=4, extra_bits=2, scale_mode=mode, signed=True)
    fresh.load_state_dict(torch.load(buf))
    assert bool(fresh.signed) is False and bool(fresh.calibrated) is True
    assert torch.equal(fresh.important, IMPORTANT)
    assert torch.equal(fresh.scale.detach(), q.scale.detach())
    assert torch.equal(fresh(x.relu()), q(x.relu()))
    assert torch.equal(fresh(x), q(x))


def test_state_dict_records_widths():
    q = ActivationQuantizer(3, bits=5, extra_bits=2)
    assert int(q.state_dict()["bits"]) == 5 and int(q.state_dict()["extra_bits"]) == 2
    other = ActivationQuantizer(3, bits=3, extra_bits=2)
    other.load_state_dict(q.state_dict())
    assert other.n == 5 and other.m == 2


def test_state_dict_shape_mismatch_is_caught():
    q = ActivationQuantizer(4, bits=3)
    with pytest.raises(RuntimeError, match="size mismatch"):
        ActivationQuantizer(5, bits=3).load_state_dict(q.state_dict())


def test_learnable_scale_is_parameter_and_gets_gradient():
    x = randn(4, 5, 3, 3)
    q = make("learnable", important=IMPORTANT, x=x * 0.7)
    assert isinstance(q.scale, nn.Parameter)
    assert any(p is q.scale for p in q.parameters())
    assert "scale" not in dict(q.named_buffers())
    q(x).square().sum().backward()
    assert q.scale.grad is not None
    assert q.scale.grad.shape == (5,)
    assert torch.isfinite(q.scale.grad).all() and (q.scale.grad != 0).all()


def test_static_and_dynamic_have_no_parameters():
    for mode in ("static", "dynamic"):
        q = make(mode)
        assert list(q.parameters()) == []
        assert "scale" in dict(q.named_buffers())


def test_learnable_scale_survives_sign_flip():
    x = randn(2, 5, 3)
    q = make("learnable", x=x)
    expected = q(x).detach()
    with torch.no_grad():
        q.scale.neg_()
    assert torch.allclose(q(x).detach(), expected)


def test_unknown_scale_mode_raises():
    with pytest.raises(ValueError, match="scale_mode"):
        ActivationQuantizer(4, bits=3, scale_mode="dynamc")
