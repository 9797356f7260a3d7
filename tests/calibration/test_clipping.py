"""clip_max: none, percentile (against torch.quantile) and MSE (against a brute-force search)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_dqa.calibration.clipping import CLIP_RATIOS, clip_max
from lightning_dqa.core import functional as F

pytestmark = pytest.mark.usefixtures("single_thread")


def data(c: int = 5, k: int = 400, seed: int = 0, heavy: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(c, k, generator=g)
    if heavy:  # a few outliers per channel: clipping pays off
        x[:, :3] *= 12.0
    return x


def sq_error(x: torch.Tensor, max_abs: torch.Tensor, bits, signed: bool) -> torch.Tensor:
    """Per-channel sum of squared fake-quantization error with clipping maximum ``max_abs``: ``(C,)``."""
    b = torch.as_tensor(bits).expand_as(max_abs)
    out = []
    for c in range(x.shape[0]):
        bc = int(b[c])
        scale = F.scale_from_max(max_abs[c : c + 1], bc, signed)
        fq = F.fake_quantize(x[c : c + 1][None], scale, bc, signed, channel_dim=1)[0]
        out.append(float((fq - x[c : c + 1]).double().square().sum()))
    return torch.tensor(out, dtype=torch.float64)


def test_none_returns_the_maximum_as_a_copy():
    x = data()
    max_abs = x.abs().amax(dim=1)
    out = clip_max("none", max_abs, x, 3, True)
    assert torch.equal(out, max_abs)
    out[0] = -1
    assert max_abs[0] != -1


@pytest.mark.parametrize("pct", [50.0, 90.0, 99.0, 99.99])
def test_percentile_against_torch_quantile(pct):
    x = data()
    max_abs = x.abs().amax(dim=1)
    out = clip_max("percentile", max_abs, x, 3, True, percentile=pct)
    expected = torch.quantile(x.abs(), pct / 100.0, dim=1)
    assert torch.allclose(out, torch.minimum(expected, max_abs), rtol=1e-6, atol=0)
    assert (out <= max_abs).all()


def test_percentile_loop_reference_linear_interpolation():
    x = data(c=2, k=11, heavy=False)
    max_abs = x.abs().amax(dim=1)
    out = clip_max("percentile", max_abs, x, 3, True, percentile=75.0)
    for c in range(2):
        vals = sorted(abs(v) for v in x[c].tolist())
        pos = 0.75 * (len(vals) - 1)
        lo = int(pos)
        expected = vals[lo] + (vals[min(lo + 1, len(vals) - 1)] - vals[lo]) * (pos - lo)
        assert out[c].item() == pytest.approx(expected, rel=1e-6)


def test_percentile_100_and_empty_samples_return_max():
    x = data()
    max_abs = x.abs().amax(dim=1)
    assert torch.equal(clip_max("percentile", max_abs, x, 3, True, percentile=100.0), max_abs)
    assert torch.equal(clip_max("percentile", max_abs, torch.zeros(5, 0), 3, True), max_abs)
    assert torch.equal(clip_max("mse", max_abs, torch.zeros(5, 0), 3, True), max_abs)


def test_percentile_never_zeroes_a_live_sparse_channel():
    x = torch.zeros(2, 1000)
    x[0, :5] = 3.0  # fires at 0.5% of positions
    x[1] = data(c=1, k=1000)[0].abs()
    max_abs = x.abs().amax(dim=1)
    out = clip_max("percentile", max_abs, x, 3, False, percentile=99.0)
    assert (out > 0).all()


def test_percentile_never_above_max_with_stale_samples():
    x = data()
    max_abs = torch.full((5,), 0.5)  # samples larger than the maximum: result is still capped
    out = clip_max("percentile", max_abs, x, 3, True, percentile=99.0)
    assert torch.equal(out, max_abs)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [3, 5])
def test_mse_beats_unclipped_and_is_a_candidate_ratio(bits, signed):
    x = data(seed=bits)
    if not signed:
        x = x.abs()
    max_abs = x.abs().amax(dim=1)
    out = clip_max("mse", max_abs, x, bits, signed)
    assert (out <= max_abs).all()
    err = sq_error(x, out, bits, signed)
    unclipped = sq_error(x, max_abs, bits, signed)
    assert (err <= unclipped * (1 + 1e-6)).all()
    assert (err < unclipped).any()  # heavy tails: some channel really clips
    candidates = max_abs[None, :] * CLIP_RATIOS[:, None]  # (R, C)
    assert (candidates == out[None, :]).any(dim=0).all()
    # brute force over every candidate: the search finds the minimum (up to float summation order)
    best = torch.stack([sq_error(x, candidates[r], bits, signed) for r in range(len(CLIP_RATIOS))]).amin(dim=0)
    assert torch.allclose(err, best, rtol=1e-4, atol=1e-6)


def test_mse_unsigned_codes_with_negative_samples():
    """A user may force unsigned codes on data with some negatives: those clamp to 0 in the search too."""
    x = data(seed=11) - 0.5
    max_abs = x.abs().amax(dim=1)
    out = clip_max("mse", max_abs, x, 3, False)
    candidates = max_abs[None, :] * CLIP_RATIOS[:, None]
    errors = torch.stack([sq_error(x, candidates[r], 3, False) for r in range(len(CLIP_RATIOS))])  # (R, C)
    assert torch.allclose(sq_error(x, out, 3, False), errors.amin(dim=0), rtol=1e-4, atol=1e-6)


def test_mse_per_channel_bits():
    x = data(c=4, seed=7)
    max_abs = x.abs().amax(dim=1)
    bits = torch.tensor([3, 6, 3, 6])  # important channels search at n + m
    out = clip_max("mse", max_abs, x, bits, True)
    for c in range(4):
        single = clip_max("mse", max_abs[c : c + 1], x[c : c + 1], int(bits[c]), True)
        assert out[c] == single[0]
    assert (sq_error(x, out, bits, True) <= sq_error(x, max_abs, bits, True) * (1 + 1e-6)).all()


def test_zero_channels_keep_zero():
    x = data(c=3)
    x[1] = 0.0
    max_abs = x.abs().amax(dim=1)
    for method in ("none", "percentile", "mse"):
        out = clip_max(method, max_abs, x, 3, True)
        assert out[1] == 0.0, method
        assert torch.isfinite(out).all()


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 1000),
    bits=st.integers(2, 6),
    signed=st.booleans(),
    method=st.sampled_from(["none", "percentile", "mse"]),
)
def test_never_above_max_and_positive(seed, bits, signed, method):
    x = data(c=3, k=64, seed=seed)
    max_abs = x.abs().amax(dim=1)
    out = clip_max(method, max_abs, x, bits, signed, percentile=99.0)
    assert out.shape == max_abs.shape
    assert (out <= max_abs).all() and (out > 0).all()


def test_unknown_method_raises():
    with pytest.raises(ValueError, match=r"clipping.*'minmax'"):
        clip_max("minmax", torch.ones(2), torch.zeros(2, 4), 3, True)


@pytest.mark.parametrize("chunk", [1, 400, 5 * 400, 3 * 5 * 400, 1 << 19])
@pytest.mark.parametrize("mixed", [False, True])
def test_mse_choice_does_not_depend_on_the_blocking(monkeypatch, chunk, mixed):
    """Blocks of one channel and one ratio, of several channels, of several ratios, or everything: same maxima."""
    import lightning_dqa.calibration.clipping as clipping

    x = data(c=5, k=400, seed=3)
    max_abs = x.abs().amax(dim=1)
    bits = torch.tensor([3, 6, 3, 6, 4]) if mixed else torch.full((5,), 3)
    reference = clip_max("mse", max_abs, x, bits, True)
    monkeypatch.setattr(clipping, "_CHUNK_ELEMENTS", chunk)
    assert torch.equal(clip_max("mse", max_abs, x, bits, True), reference)
    one = [clip_max("mse", max_abs[c : c + 1], x[c : c + 1], bits[c : c + 1], True) for c in range(5)]
    per_channel = torch.cat(one)
    assert torch.equal(per_channel, reference)
