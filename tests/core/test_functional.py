"""lightning_dqa.core.functional against slow, obviously correct per-element references and properties.

The references below follow DQA_METHOD.md sections 2 and 4 literally, one Python scalar at a time, in float32
arithmetic (numpy scalars): ``scale = max / 2**(n-1)`` (signed) or ``max / 2**n`` (unsigned), code =
round-half-to-even of ``x * (1 / scale)`` clamped to the code range, value = ``scale * code``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_dqa.core import functional as F

pytestmark = pytest.mark.usefixtures("single_thread")


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
f32 = np.float32


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- references
def ref_range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def ref_scale(max_abs: float, bits: int, signed: bool) -> np.float32:
    """Scale of one channel; a channel whose maximum is 0 gets scale 1 (its codes are 0 anyway)."""
    if max_abs <= 0:
        return f32(1.0)
    return f32(f32(max_abs) / f32(2.0 ** (bits - 1 if signed else bits)))


def ref_code(x: float, scale: np.float32, qmin: int, qmax: int) -> int:
    inv = f32(f32(1.0) / scale)
    v = f32(f32(x) * inv)
    return min(max(round(float(v)), qmin), qmax)  # Python's round() is round-half-to-even


def to_channels(x: torch.Tensor, channel_dim: int) -> tuple[list[list[float]], torch.Size]:
    moved = x.movedim(channel_dim, 0)
    return moved.reshape(moved.shape[0], -1).tolist(), moved.shape


def from_channels(rows: list[list], shape: torch.Size, channel_dim: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype).reshape(shape).movedim(0, channel_dim)


def ref_codes(x, bits, signed, channel_dim=1, max_abs=None):
    """Per-channel codes and scales; ``bits`` is an int or a per-channel list."""
    rows, shape = to_channels(x, channel_dim)
    codes, scales = [], []
    for c, vals in enumerate(rows):
        b = bits[c] if isinstance(bits, list) else bits
        m = max(abs(v) for v in vals) if max_abs is None else float(max_abs[c])
        s = ref_scale(m, b, signed)
        qmin, qmax = ref_range(b, signed)
        codes.append([ref_code(v, s, qmin, qmax) for v in vals])
        scales.append(float(s))
    return from_channels(codes, shape, channel_dim, torch.int64), torch.tensor(scales, dtype=torch.float32)


def ref_fake_quant_scales(x, scales, qmins, qmaxs, channel_dim=1):
    """Fake quantization with explicit per-channel scales and code ranges."""
    rows, shape = to_channels(x, channel_dim)
    out = []
    for c, vals in enumerate(rows):
        s = f32(scales[c])
        out.append([float(f32(f32(ref_code(v, s, int(qmins[c]), int(qmaxs[c]))) * s)) for v in vals])
    return from_channels(out, shape, channel_dim, torch.float32)


def ref_fake_quant(x, bits, signed, channel_dim=1, max_abs=None):
    codes, scales = ref_codes(x, bits, signed, channel_dim, max_abs)
    rows, shape = to_channels(codes, channel_dim)
    out = [[float(f32(f32(q) * f32(scales[c]))) for q in vals] for c, vals in enumerate(rows)]
    return from_channels(out, shape, channel_dim, torch.float32)


# ----------------------------------------------------------------------------------------------- strategies
SPECIAL = [0.0, 0.5, 1.5, 2.5, -2.5, 0.25, 4.0, -4.0, 3.5, 1.0, -0.5, 7.5]
values = st.one_of(
    st.floats(-1e4, 1e4, width=32, allow_subnormal=False).filter(lambda v: v == 0 or abs(v) > 1e-6),
    st.sampled_from(SPECIAL),
)


@st.composite
def activations(draw, nonneg: bool = False, min_dims: int = 2):
    """Small float32 tensors ``(N, C, ...)`` with ties, zeros and whole-zero channels mixed in."""
    n = draw(st.integers(1, 3))
    c = draw(st.integers(1, 4))
    extra = draw(st.lists(st.integers(1, 3), min_size=min_dims - 2, max_size=2))
    shape = (n, c, *extra)
    numel = int(np.prod(shape))
    vals = draw(st.lists(values, min_size=numel, max_size=numel))
    x = torch.tensor(vals, dtype=torch.float32).reshape(shape)
    if nonneg:
        x = x.clamp_min(0.0)
    if c > 1 and draw(st.booleans()):
        x[:, draw(st.integers(0, c - 1))] = 0.0  # a dead channel
    return x


@st.composite
def dyadic_activations(draw, signed: bool):
    """ReLU-like (or signed) data on an exact dyadic grid with power-of-two channel maxima.

    Every value is ``k * M / 2**10`` with ``M`` a power of two, so ``x / s`` and ``x * (1 / s)`` are both exact
    and halfway ties (``k + 0.5`` codes) are *exact* ties: any correct implementation must agree bit for bit.
    """
    n, c, v = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 6))
    rows = []
    for _ in range(c):
        exp = draw(st.integers(-6, 6))
        lo = -1024 if signed else 0
        ks = draw(st.lists(st.integers(lo, 1024), min_size=n * v, max_size=n * v))
        if not signed:
            ks = [k if draw(st.integers(0, 3)) else 0 for k in ks]  # many exact zeros after ReLU
        if draw(st.integers(0, 5)):  # else maybe a dead channel (all zeros) or a small maximum
            ks[0] = draw(st.sampled_from([1024, -1024])) if signed else 1024  # max|x| is exactly 2**exp
        rows.append([k * 2.0**exp / 1024 for k in ks])
    x = torch.tensor(rows, dtype=torch.float32).reshape(c, n, v).movedim(0, 1)
    return x.contiguous()


# ----------------------------------------------------------------------------------------------- basics
@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_quant_range(bits):
    assert F.quant_range(bits, True) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert F.quant_range(bits, False) == (0, 2**bits - 1)


def test_channel_absmax_loop_reference():
    x = randn(3, 4, 5, 2)
    for cd in (1, -1, 0, 2):
        rows, _ = to_channels(x, cd)
        expected = torch.tensor([max(abs(v) for v in r) for r in rows])
        assert torch.equal(F.channel_absmax(x, cd), expected)
    xg = randn(2, 3).requires_grad_(True)
    assert not F.channel_absmax(xg).requires_grad


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_scale_from_max_loop_reference(bits, signed):
    max_abs = torch.tensor([0.0, 1.0, 0.3, 7.25, 1e-3, 123.456])
    expected = torch.tensor([float(ref_scale(float(m), bits, signed)) for m in max_abs])
    assert torch.equal(F.scale_from_max(max_abs, bits, signed), expected)


def test_scale_from_max_per_channel_bits_and_signs():
    max_abs = torch.tensor([1.0, 0.3, 5.0, 0.0])
    bits = torch.tensor([3, 6, 4, 3])
    signed = torch.tensor([True, False, True, False])
    expected = torch.tensor(
        [float(ref_scale(float(m), int(b), bool(s))) for m, b, s in zip(max_abs, bits, signed, strict=True)]
    )
    assert torch.equal(F.scale_from_max(max_abs, bits, signed), expected)


def test_scale_power_of_two_relation_is_exact():
    """scale(n) == scale(n + m) * 2**m exactly: what makes the shift lossless."""
    max_abs = torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 100 + 1e-4
    for n, m in [(3, 3), (4, 2), (2, 6)]:
        assert torch.equal(F.scale_from_max(max_abs, n, True), F.scale_from_max(max_abs, n + m, True) * 2**m)


def test_round_ste_half_to_even_and_identity_gradient():
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49, 0.51], requires_grad=True)
    y = F.round_ste(x)
    assert y.tolist() == [round(v) for v in x.tolist()]
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


# ----------------------------------------------------------------------------------------------- quantize
@SETTINGS
@given(x=activations(), bits=st.integers(2, 8), signed=st.booleans())
def test_quantize_and_dequantize_match_reference(x, bits, signed):
    codes, scales = ref_codes(x, bits, signed)
    scale = F.scale_from_max(F.channel_absmax(x), bits, signed)
    assert torch.equal(scale, scales)
    q = F.quantize(x, scale, bits, signed)
    assert q.dtype == torch.int32
    assert torch.equal(q.long(), codes)
    expected = ref_fake_quant(x, bits, signed)
    assert torch.equal(F.dequantize(q, scale), expected)
    assert not torch.isnan(expected).any()


@SETTINGS
@given(x=dyadic_activations(signed=True), bits=st.integers(2, 6), signed=st.booleans())
def test_fake_quantize_matches_reference_on_exact_ties(x, bits, signed):
    scale = F.scale_from_max(F.channel_absmax(x), bits, signed)
    assert torch.equal(F.fake_quantize(x, scale, bits, signed), ref_fake_quant(x, bits, signed))


def test_fake_quantize_matches_reference_on_near_ties_with_arbitrary_scales():
    x, scale, bits = _near_tie_data(signed=False)
    assert torch.equal(F.fake_quantize(x, scale, bits, False), F.dequantize(F.quantize(x, scale, bits, False), scale))


def test_quantize_channel_last_layout():
    x = randn(5, 7)
    scale = F.scale_from_max(F.channel_absmax(x, -1), 4, True)
    codes, scales = ref_codes(x, 4, True, channel_dim=-1)
    assert torch.equal(scale, scales)
    assert torch.equal(F.quantize(x, scale, 4, True, channel_dim=-1).long(), codes)
    assert torch.equal(F.fake_quantize(x, scale, 4, True, channel_dim=-1), ref_fake_quant(x, 4, True, -1))


def test_half_to_even_on_exact_ties():
    # max 4, 3-bit signed: scale 1, so x is its own code; 3.5 clamps to 3, -4.5 to -4
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -4.5, 4.0]]).T.reshape(1, 1, 9)
    scale = torch.tensor([1.0])
    assert F.quantize(x, scale, 3, True).flatten().tolist() == [0, 2, 2, 0, -2, -2, 3, -4, 3]


def test_zero_channel_gives_zeros_not_nan():
    x = randn(2, 3, 4, 4)
    x[:, 1] = 0.0
    for signed in (True, False):
        scale = F.scale_from_max(F.channel_absmax(x), 3, signed)
        assert scale[1] == 1.0
        for out in (
            F.fake_quantize(x, scale, 3, signed),
            F.dequantize(F.quantize(x, scale, 3, signed), scale),
            F.mixed_fake_quantize(
                x, scale, torch.full((3,), 0 if not signed else -4), torch.full((3,), 7 if not signed else 3)
            ),
        ):
            assert torch.isfinite(out).all()
            assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
        main, err, s = F.dqa_quantize(x, F.channel_absmax(x), 3, 3, torch.tensor([True, True, False]), signed)
        out = F.dqa_dequantize(main, err, s, 3, torch.tensor([True, True, False]))
        assert torch.isfinite(out).all()
        assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))


def test_unsigned_clamps_negatives_to_zero():
    x = torch.tensor([[-1.0, -0.1, 0.0, 1.0, 2.0]]).reshape(1, 1, 5)
    scale = F.scale_from_max(F.channel_absmax(x), 2, False)  # 2 / 4 = 0.5
    assert F.quantize(x, scale, 2, False).flatten().tolist() == [0, 0, 0, 2, 3]


# ----------------------------------------------------------------------------------------------- shifting
@SETTINGS
@given(n=st.integers(2, 8), m=st.integers(1, 8), signed=st.booleans(), data=st.data())
def test_shift_split_merge_round_trip_and_ranges(n, m, signed, data):
    lo, hi = ref_range(n + m, signed)
    vals = data.draw(st.lists(st.integers(lo, hi), min_size=1, max_size=50))
    codes = torch.tensor(vals, dtype=torch.int32)
    q, e = F.shift_split(codes, m)
    qlo, qhi = ref_range(n, signed)
    for big, main, err in zip(vals, q.tolist(), e.tolist(), strict=True):
        assert main == big // 2**m  # arithmetic shift = floor division, also for negative codes
        assert err == big - main * 2**m
        assert qlo <= main <= qhi
        assert 0 <= err <= 2**m - 1
        assert big == main * 2**m + err
    assert torch.equal(F.shift_merge(q, e, m), codes)


def test_shift_split_negative_codes_explicit():
    q, e = F.shift_split(torch.tensor([-1, -8, -9, -32, 31, 0], dtype=torch.int32), 3)
    assert q.tolist() == [-1, -1, -2, -4, 3, 0]
    assert e.tolist() == [7, 0, 7, 0, 7, 0]


def _dqa_reference(x, max_abs, n, m, important, signed, channel_dim=1):
    """``scale_{n+m} * Q`` on important channels and ``scale_n * q`` elsewhere, plus the reference codes."""
    bits = [n + m if bool(i) else n for i in important]
    codes, scales = ref_codes(x, bits, signed, channel_dim, max_abs)
    rows, shape = to_channels(codes, channel_dim)
    out = [[float(f32(f32(q) * f32(scales[c]))) for q in vals] for c, vals in enumerate(rows)]
    return from_channels(out, shape, channel_dim, torch.float32), codes


@SETTINGS
@given(x=activations(), n=st.integers(2, 6), m=st.integers(1, 6), signed=st.booleans(), data=st.data())
def test_dqa_round_trip_equals_high_precision_reference(x, n, m, signed, data):
    c = x.shape[1]
    important = torch.tensor(data.draw(st.lists(st.booleans(), min_size=c, max_size=c)))
    max_abs = F.channel_absmax(x)
    main, err, scale_n = F.dqa_quantize(x, max_abs, n, m, important, signed)
    expected, codes = _dqa_reference(x, max_abs, n, m, important, signed)
    # main codes: the high-precision code shifted right on important channels, direct n-bit elsewhere
    idx = important.nonzero().flatten()
    expected_main = codes.clone()
    expected_main[:, idx] = torch.div(codes[:, idx], 2**m, rounding_mode="floor")
    assert main.dtype == torch.int32 and err.dtype == torch.int32
    assert torch.equal(main.long(), expected_main)
    qlo, qhi = ref_range(n, signed)
    assert int(main.min()) >= qlo and int(main.max()) <= qhi
    assert err.shape == (x.shape[0], int(important.sum()), *x.shape[2:])
    if err.numel():
        assert int(err.min()) >= 0 and int(err.max()) <= 2**m - 1
        assert torch.equal(err.long(), codes[:, idx] - expected_main[:, idx] * 2**m)
    assert torch.equal(scale_n, F.scale_from_max(max_abs, n, signed))
    assert torch.equal(F.dqa_dequantize(main, err, scale_n, m, important), expected)


def test_dqa_all_or_no_important_channels():
    x = randn(2, 3, 4)
    max_abs = F.channel_absmax(x)
    none = torch.zeros(3, dtype=torch.bool)
    main, err, s = F.dqa_quantize(x, max_abs, 3, 3, none, True)
    assert err.shape == (2, 0, 4)
    assert torch.equal(F.dqa_dequantize(main, err, s, 3, none), ref_fake_quant(x, 3, True))
    everything = torch.ones(3, dtype=torch.bool)
    main, err, s = F.dqa_quantize(x, max_abs, 3, 3, everything, True)
    assert torch.equal(F.dqa_dequantize(main, err, s, 3, everything), ref_fake_quant(x, 6, True))


def test_dqa_with_calibrated_max_clamps_outliers():
    x = torch.tensor([[-3.0, -0.3, 0.2, 0.7, 5.0]]).reshape(1, 1, 5)
    max_abs = torch.tensor([1.0])  # static, clipped maximum below the observed one
    imp = torch.tensor([True])
    main, err, s = F.dqa_quantize(x, max_abs, 3, 2, imp, True)
    expected, _ = _dqa_reference(x, max_abs, 3, 2, imp, True)
    assert torch.equal(F.dqa_dequantize(main, err, s, 2, imp), expected)
    assert expected.flatten().tolist()[0] == -1.0 and expected.flatten().tolist()[-1] == 1.0 - 1.0 / 16


def test_dqa_linear_layout_channel_last():
    x = randn(4, 6)
    imp = torch.tensor([True, False, False, True, True, False])
    max_abs = F.channel_absmax(x, -1)
    main, err, s = F.dqa_quantize(x, max_abs, 3, 3, imp, True, channel_dim=-1)
    assert err.shape == (4, 3)
    expected, _ = _dqa_reference(x, max_abs, 3, 3, imp, True, channel_dim=-1)
    assert torch.equal(F.dqa_dequantize(main, err, s, 3, imp, channel_dim=-1), expected)


# ----------------------------------------------------------------------------------------------- mixed
def _mixed_setup(x, n, m, signed, important):
    """Scales and ranges as ActivationQuantizer builds them: (n+m)-bit on important channels."""
    scale_n = F.scale_from_max(F.channel_absmax(x), n, signed)
    lo_n, hi_n = ref_range(n, signed)
    lo_h, hi_h = ref_range(n + m, signed)
    scale = torch.where(important, scale_n / 2**m, scale_n)
    qmin = torch.where(important, lo_h, lo_n)
    qmax = torch.where(important, hi_h, hi_n)
    return scale, qmin, qmax


@SETTINGS
@given(signed=st.booleans(), n=st.integers(2, 5), m=st.integers(1, 4), data=st.data())
def test_mixed_fake_quantize_paths_agree_with_reference_on_exact_ties(signed, n, m, data):
    x = data.draw(dyadic_activations(signed))
    c = x.shape[1]
    important = torch.tensor(data.draw(st.lists(st.booleans(), min_size=c, max_size=c)))
    scale, qmin, qmax = _mixed_setup(x, n, m, signed, important)
    expected = ref_fake_quant_scales(x, scale.tolist(), qmin.tolist(), qmax.tolist())
    # expected is also the paper's definition: (n+m)-bit DQA values on important channels, n-bit elsewhere
    dqa, _ = _dqa_reference(x, F.channel_absmax(x), n, m, important, signed)
    assert torch.equal(expected, dqa)
    with torch.no_grad():
        inference = F.mixed_fake_quantize(x, scale, qmin, qmax)
    autograd = F.mixed_fake_quantize(x.clone().requires_grad_(True), scale, qmin, qmax)
    assert torch.equal(inference, expected)
    assert torch.equal(autograd.detach(), expected)


@SETTINGS
@given(x=activations(nonneg=True, min_dims=3), signed=st.booleans(), n=st.integers(2, 5), data=st.data())
def test_mixed_fake_quantize_inference_path_matches_reference(x, signed, n, data):
    c = x.shape[1]
    important = torch.tensor(data.draw(st.lists(st.booleans(), min_size=c, max_size=c)))
    scale, qmin, qmax = _mixed_setup(x, n, 3, signed, important)
    expected = ref_fake_quant_scales(x, scale.tolist(), qmin.tolist(), qmax.tolist())
    with torch.no_grad():
        assert torch.equal(F.mixed_fake_quantize(x, scale, qmin, qmax), expected)


def _near_tie_data(signed: bool):
    """Values ``fl((k + 0.5) * s)`` for arbitrary (non power of two) scales: rounding-sensitive near-ties."""
    g = torch.Generator().manual_seed(1)
    c, bits = 6, 3
    max_abs = torch.rand(c, generator=g) * 3 + 0.1
    scale = F.scale_from_max(max_abs, bits, signed)
    lo, hi = ref_range(bits, signed)
    k = torch.randint(lo, hi, (50, c), generator=g).float()
    return ((k + 0.5) * scale).contiguous(), scale, bits


def test_mixed_fake_quantize_inference_path_matches_reference_on_near_ties():
    for signed in (True, False):
        x, scale, bits = _near_tie_data(signed)
        lo, hi = ref_range(bits, signed)
        qmin, qmax = torch.full((6,), lo), torch.full((6,), hi)
        expected = ref_fake_quant_scales(x, scale.tolist(), qmin.tolist(), qmax.tolist())
        with torch.no_grad():
            assert torch.equal(F.mixed_fake_quantize(x, scale, qmin, qmax), expected)


def test_mixed_fake_quantize_autograd_path_equals_inference_path_on_near_ties():
    x, scale, bits = _near_tie_data(signed=False)
    qmin, qmax = torch.zeros(6, dtype=torch.long), torch.full((6,), 2**bits - 1)
    with torch.no_grad():
        inference = F.mixed_fake_quantize(x, scale, qmin, qmax)
    autograd = F.mixed_fake_quantize(x.clone().requires_grad_(True), scale, qmin, qmax)
    assert torch.equal(autograd.detach(), inference)


def test_mixed_fake_quantize_fp_mask_passes_channels_through():
    x = randn(2, 4, 3)
    scale, qmin, qmax = _mixed_setup(x, 3, 3, True, torch.tensor([True, False, False, False]))
    mask = torch.tensor([False, True, False, True])
    for xx in (x, x.clone().requires_grad_(True)):
        out = F.mixed_fake_quantize(xx, scale, qmin, qmax, fp_mask=mask).detach()
        assert torch.equal(out[:, mask], x[:, mask])
        ref = ref_fake_quant_scales(x, scale.tolist(), qmin.tolist(), qmax.tolist())
        assert torch.equal(out[:, ~mask], ref[:, ~mask])


def test_mixed_fake_quantize_channels_last_matches_reference_on_random_data():
    x = randn(3, 5, 4, 4).to(memory_format=torch.channels_last)
    scale, qmin, qmax = _mixed_setup(x, 3, 2, True, torch.tensor([True, False, True, False, False]))
    expected = ref_fake_quant_scales(x, scale.tolist(), qmin.tolist(), qmax.tolist())
    with torch.no_grad():
        out = F.mixed_fake_quantize(x, scale, qmin, qmax)
    assert torch.equal(out, expected)


def test_mixed_fake_quantize_channels_last_matches_reference_on_near_ties():
    x, scale, _ = _near_tie_data(signed=True)
    x = x.t().contiguous().t()  # same values, column-major storage
    assert not x.is_contiguous()
    qmin, qmax = torch.full((6,), -4), torch.full((6,), 3)
    expected = ref_fake_quant_scales(x, scale.tolist(), qmin.tolist(), qmax.tolist())
    with torch.no_grad():
        assert torch.equal(F.mixed_fake_quantize(x, scale, qmin, qmax), expected)


# ----------------------------------------------------------------------------------------------- gradients
# Units v = x / s: with a power-of-two scale, x = v * s and x / s are exact. 3-bit signed: codes in [-4, 3].
# Interior units round to a code strictly inside the range; outside units are clamped by any convention.
INTERIOR_SIGNED = [-3.2, -2.5, -1.2, -0.4, 0.3, 0.5, 1.5, 2.2, 2.4]
OUTSIDE_SIGNED = [-9.0, -4.75, 3.75, 6.0]
# Units whose code *equals* qmin or qmax although they lie inside [qmin, qmax]: LSQ says gradient 1 / round(v)-v.
BOUNDARY_SIGNED = [-4.0, -3.8, 2.6, 2.9, 3.0]


def _grad_case(units, scale_value=0.25, channels=2):
    v = torch.tensor(units, dtype=torch.float32)
    x = (v[:, None] * scale_value).repeat(1, channels).reshape(1, len(units), channels).movedim(2, 1).contiguous()
    scale = torch.full((channels,), scale_value)
    return x, scale


def _lsq_reference(x, scale, qmin, qmax):
    """Per-element d out / d x and per-channel d out / d s from the LSQ formulas (Esser et al., 2020)."""
    rows, shape = to_channels(x, 1)
    gx, gs = [], []
    for c, vals in enumerate(rows):
        s = float(scale[c])
        gxc, gsc = [], 0.0
        for val in vals:
            v = val / s
            if v < qmin:
                gxc.append(0.0)
                gsc += qmin
            elif v > qmax:
                gxc.append(0.0)
                gsc += qmax
            else:
                gxc.append(1.0)
                gsc += round(v) - v
        gx.append(gxc)
        gs.append(gsc)
    return from_channels(gx, shape, 1, torch.float32), torch.tensor(gs)


def _grads(fn, x, scale):
    xr = x.clone().requires_grad_(True)
    sr = scale.clone().requires_grad_(True)
    fn(xr, sr).sum().backward()
    return xr.grad, sr.grad


def _fq(x, s):
    return F.fake_quantize(x, s, 3, True)


def _mixed(x, s):
    c = s.numel()
    return F.mixed_fake_quantize(x, s, torch.full((c,), -4), torch.full((c,), 3))


@pytest.mark.parametrize("fn", [_fq, _mixed], ids=["fake_quantize", "mixed_fake_quantize"])
def test_straight_through_and_lsq_gradients_inside_and_clamped(fn):
    x, scale = _grad_case(INTERIOR_SIGNED + OUTSIDE_SIGNED)
    gx, gs = _grads(fn, x, scale)
    ref_gx, ref_gs = _lsq_reference(x, scale, -4, 3)
    assert torch.equal(gx, ref_gx)
    assert torch.allclose(gs, ref_gs, atol=1e-5)
    # x alone requiring grad (no scale grad): same straight-through gradient
    xr = x.clone().requires_grad_(True)
    fn(xr, scale).sum().backward()
    assert torch.equal(xr.grad, ref_gx)


@pytest.mark.parametrize(
    "fn",
    [
        pytest.param(
            _fq,
            id="fake_quantize",
        ),
        pytest.param(
            _mixed,
            id="mixed_fake_quantize",
        ),
    ],
)
def test_gradients_for_in_range_values_on_boundary_codes(fn):
    x, scale = _grad_case(BOUNDARY_SIGNED)
    gx, gs = _grads(fn, x, scale)
    ref_gx, ref_gs = _lsq_reference(x, scale, -4, 3)
    assert torch.equal(gx, ref_gx)
    assert torch.allclose(gs, ref_gs, atol=1e-5)


def test_unsigned_gradients_interior_and_clamped():
    # unsigned 3-bit: codes [0, 7]; units 1.2 .. 6.4 are interior, 9 is clamped
    x, scale = _grad_case([1.2, 2.5, 4.4, 6.4, 9.0])
    ref_gx, ref_gs = _lsq_reference(x, scale, 0, 7)
    for fn in (
        lambda a, s: F.fake_quantize(a, s, 3, False),
        lambda a, s: F.mixed_fake_quantize(a, s, torch.zeros(2, dtype=torch.long), torch.full((2,), 7)),
    ):
        gx, gs = _grads(fn, x, scale)
        assert torch.equal(gx, ref_gx)
        assert torch.allclose(gs, ref_gs, atol=1e-5)
