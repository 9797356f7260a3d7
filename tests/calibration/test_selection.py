"""Channel rankings (each score against its definition) and the important-channel mask."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_dqa.calibration.observers import ChannelStats, ChannelStatsObserver
from lightning_dqa.calibration.selection import GRADIENT_RANKINGS, RANKINGS, important_mask, rank_channels

pytestmark = pytest.mark.usefixtures("single_thread")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def observed_stats(c: int = 6, with_grad: bool = True) -> tuple[ChannelStats, torch.Tensor, torch.Tensor]:
    """Statistics from a real observer, with the activations and their gradients for direct computation."""
    x = torch.randn(3, c, 4, 4, generator=gen(1)) * torch.linspace(0.2, 2.0, c).view(1, c, 1, 1)
    w = torch.randn(3, c, 4, 4, generator=gen(2))
    obs = ChannelStatsObserver(c, track_gradients=with_grad, name="layer")
    xr = x.clone().requires_grad_(with_grad)
    out = obs(xr)
    g = torch.zeros_like(x)
    if with_grad:
        (g,) = torch.autograd.grad((out * w).sum(), xr)
    return obs.compute(), x, g


# ----------------------------------------------------------------------------------------------- mask
@settings(max_examples=60, deadline=None)
@given(c=st.integers(1, 64), ratio=st.floats(0.0, 1.0), seed=st.integers(0, 100))
def test_important_mask_counts_round_r_c_and_picks_the_top(c, ratio, seed):
    scores = torch.rand(c, generator=gen(seed))
    mask = important_mask(scores, ratio)
    assert mask.dtype == torch.bool and mask.shape == (c,)
    k = round(ratio * c)
    assert int(mask.sum()) == k
    if 0 < k < c:
        assert scores[mask].min() >= scores[~mask].max()


def test_important_mask_ratio_zero_and_one():
    scores = torch.tensor([3.0, 1.0, 2.0])
    assert not important_mask(scores, 0.0).any()
    assert important_mask(scores, 1.0).all()
    assert important_mask(scores, 0.4).tolist() == [True, False, False]  # round(1.2) = 1


def test_important_mask_ties_broken_by_lower_index():
    assert important_mask(torch.tensor([0.1, 0.9, 0.5, 0.9]), 0.5).tolist() == [False, True, False, True]
    assert important_mask(torch.ones(6), 0.5).tolist() == [True, True, True, False, False, False]
    assert important_mask(torch.tensor([2.0, 1.0, 1.0, 1.0, 0.0]), 0.4).tolist() == [True, True, False, False, False]
    scores = torch.zeros(40)
    assert important_mask(scores, 0.25).nonzero().flatten().tolist() == list(range(10))


def test_important_mask_deterministic_and_cpu():
    scores = torch.randn(32, generator=gen(0)).round()  # many ties
    a, b = important_mask(scores, 0.4), important_mask(scores.clone(), 0.4)
    assert torch.equal(a, b) and a.device.type == "cpu"


# ----------------------------------------------------------------------------------------------- rankings
def test_fisher_score_is_sum_of_squared_gradients():
    stats, _, g = observed_stats()
    score = rank_channels("fisher", stats, gen())
    assert torch.allclose(score.double(), g.double().square().sum(dim=(0, 2, 3)), rtol=1e-6)


def test_saliency_score_is_sum_abs_activation_times_abs_gradient():
    stats, x, g = observed_stats()
    score = rank_channels("saliency", stats, gen())
    expected = (x.double().abs() * g.double().abs()).sum(dim=(0, 2, 3))
    assert torch.allclose(score.double(), expected, rtol=1e-6)


def test_energy_score_is_sum_of_squares():
    stats, x, _ = observed_stats(with_grad=False)
    score = rank_channels("energy", stats, gen())
    assert torch.allclose(score.double(), x.double().square().sum(dim=(0, 2, 3)), rtol=1e-6)


def test_max_score_is_max_abs():
    stats, x, _ = observed_stats(with_grad=False)
    assert torch.equal(rank_channels("max", stats, gen()), x.abs().amax(dim=(0, 2, 3)))


def test_random_score_is_seeded_and_independent_of_statistics():
    stats, _, _ = observed_stats(with_grad=False)
    a = rank_channels("random", stats, gen(5))
    assert torch.equal(a, rank_channels("random", stats, gen(5)))
    assert not torch.equal(a, rank_channels("random", stats, gen(6)))
    assert a.shape == (6,)
    other, _, _ = observed_stats(c=6, with_grad=True)
    assert torch.equal(a, rank_channels("random", other, gen(5)))


def test_scores_are_cpu_float_and_detached():
    stats, _, _ = observed_stats()
    for name in ("fisher", "saliency", "energy", "max", "random"):
        s = rank_channels(name, stats, gen())
        assert s.device.type == "cpu" and s.dtype == torch.float32 and not s.requires_grad


@pytest.mark.parametrize("name", sorted(GRADIENT_RANKINGS))
def test_gradient_ranking_without_gradients_raises(name):
    stats, _, _ = observed_stats(with_grad=False)
    with pytest.raises(ValueError, match=rf"'block\.conv'.*{name}.*gradients"):
        rank_channels(name, stats, gen(), layer="block.conv")


@pytest.mark.parametrize("name", ["bogus", "greedy", ""])
def test_unknown_or_greedy_name_raises(name):
    stats, _, _ = observed_stats(with_grad=False)
    with pytest.raises(ValueError, match="one-pass ranking"):
        rank_channels(name, stats, gen())


def test_registry():
    assert set(RANKINGS) >= {"fisher", "saliency", "energy", "max", "random", "greedy"}
    assert GRADIENT_RANKINGS == {"fisher", "saliency"}
