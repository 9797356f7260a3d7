"""ChannelStatsObserver against statistics computed directly on the concatenated data."""

from __future__ import annotations

import itertools

import pytest
import torch

from lightning_dqa.calibration.observers import ChannelStats, ChannelStatsObserver
from lightning_dqa.calibration.sampling import sample_keys

pytestmark = pytest.mark.usefixtures("single_thread")


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def batches(seed: int = 0, n: int = 3, c: int = 4):
    return [randn(2 + i, c, 3, 5, seed=seed + i) * (i + 1) for i in range(n)]


def flat(xs, channel_dim: int = 1) -> torch.Tensor:
    """All values of a list of tensors as ``(C, values)``."""
    return torch.cat([x.movedim(channel_dim, 0).reshape(x.shape[channel_dim], -1) for x in xs], dim=1)


def test_returns_input_unchanged():
    obs = ChannelStatsObserver(4)
    x = randn(2, 4, 3, 3)
    assert obs(x) is x


def test_max_min_energy_count_over_several_batches():
    xs = batches()
    obs = ChannelStatsObserver(4, name="conv")
    for x in xs:
        obs(x)
    st = obs.compute()
    allv = flat(xs)
    assert isinstance(st, ChannelStats)
    assert torch.equal(st.max_abs, allv.abs().amax(dim=1))
    assert torch.equal(st.min, allv.amin(dim=1))
    # per-batch float32 reductions (no float64 copy of the activations) accumulated in float64
    assert torch.allclose(st.energy, allv.double().square().sum(dim=1), rtol=1e-5, atol=0)
    assert st.energy.dtype == torch.float64
    assert st.count == allv.shape[1] == sum(x.numel() // 4 for x in xs)
    assert st.numel_per_sample == 4 * 3 * 5
    assert not st.grad_seen
    assert torch.equal(st.grad_sq, torch.zeros(4, dtype=torch.float64))
    assert torch.equal(st.saliency, torch.zeros(4, dtype=torch.float64))


def test_loop_reference_for_max_and_min():
    xs = batches(seed=5, n=2, c=3)
    obs = ChannelStatsObserver(3)
    for x in xs:
        obs(x)
    st = obs.compute()
    for c in range(3):
        vals = [v for x in xs for v in x[:, c].flatten().tolist()]
        assert st.max_abs[c].item() == max(abs(v) for v in vals)
        assert st.min[c].item() == min(vals)
        assert st.energy[c].item() == pytest.approx(sum(v * v for v in vals), rel=1e-5)


def test_linear_layout_channel_last():
    xs = [randn(5, 7, seed=i) for i in range(2)]
    obs = ChannelStatsObserver(7, channel_dim=-1)
    for x in xs:
        obs(x)
    st = obs.compute()
    allv = flat(xs, channel_dim=-1)
    assert torch.equal(st.max_abs, allv.abs().amax(dim=1))
    assert st.count == 10
    assert st.numel_per_sample == 7


LAYOUTS = [((4, 3, 5, 5), 1), ((6, 3), -1), ((2, 5, 3), -1), ((2, 5, 3), 2), ((3, 7), 1)]


@pytest.mark.parametrize(
    ("shape", "channel_dim"),
    [*LAYOUTS, ((3, 6, 4), 0), ((3, 6), 0)],
)
def test_samples_for_every_layout(shape, channel_dim):
    c = shape[channel_dim]
    xs = [randn(*shape, seed=i) for i in range(2)]
    obs = ChannelStatsObserver(c, channel_dim=channel_dim, max_samples=4)
    for x in xs:
        obs(x)
    st = obs.compute()
    allv = flat(xs, channel_dim)
    assert torch.equal(st.max_abs, allv.abs().amax(dim=1))
    assert st.count == allv.shape[1]
    assert st.samples.shape == (c, min(4, allv.shape[1]))
    for j in range(st.samples.shape[1]):
        assert (allv == st.samples[:, j : j + 1]).all(dim=0).any()


def test_nonnegative_data_has_nonnegative_min():
    obs = ChannelStatsObserver(4)
    obs(randn(2, 4, 3, 3).relu())
    assert (obs.compute().min >= 0).all()


def test_samples_shape_and_values_are_real_distinct_positions():
    xs = batches()
    obs = ChannelStatsObserver(4, max_samples=20)
    for x in xs:
        obs(x)
    samples = obs.compute().samples
    assert samples.shape == (4, 20)
    allv = flat(xs)  # values are distinct (continuous), so each column names one position
    for j in range(samples.shape[1]):
        col = samples[:, j : j + 1]
        hits = (allv == col).all(dim=0)
        assert int(hits.sum()) == 1, "a sampled column must be the values of all channels at one real position"
    assert torch.unique(samples, dim=1).shape[1] == samples.shape[1]  # without replacement


def test_small_sets_are_kept_whole():
    xs = [randn(1, 2, 3, seed=i) for i in range(5)]
    obs = ChannelStatsObserver(2, max_samples=100)
    for x in xs:
        obs(x)
    s, allv = obs.samples(), flat(xs)
    assert s.shape == allv.shape == (2, 15)
    assert torch.equal(s[:, s[0].argsort()], allv[:, allv[0].argsort()])


def keyed(xs, bounds, max_samples=16, seed=0):
    """Observe the rows of ``xs`` cut into batches at ``bounds``, keyed by content like the statistics pass."""
    obs = ChannelStatsObserver(xs.shape[1], max_samples=max_samples, seed=seed)
    for lo, hi in itertools.pairwise(bounds):
        obs.set_batch_keys(sample_keys(xs[lo:hi], hi - lo))
        obs(xs[lo:hi])
    return obs


def test_keyed_sample_does_not_depend_on_batching_or_order():
    xs = randn(12, 3, 4, 4)
    a = keyed(xs, [0, 12]).samples()
    b = keyed(xs, [0, 1, 5, 6, 12]).samples()
    c = keyed(xs.flip(0), [0, 7, 12]).samples()
    assert a.shape == (3, 16)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, keyed(xs, [0, 12], seed=1).samples())


def test_reduce_of_shards_equals_one_observer_on_the_union():
    xs = randn(10, 3, 4, 4)
    whole = keyed(xs, [0, 4, 10])
    rank0, rank1 = keyed(xs[:3], [0, 3]), keyed(xs[3:], [0, 2, 7])  # uneven shards, other batch boundaries
    rank0.reduce_(TwoRanks(rank1))
    assert torch.equal(rank0.samples(), whole.samples())
    assert torch.equal(rank0.max_abs, whole.max_abs)
    assert rank0.count == whole.count


def test_duplicated_samples_are_kept_once():
    xs = randn(4, 2, 3)
    once = keyed(xs, [0, 4], max_samples=100).samples()
    twice = keyed(torch.cat([xs, xs[:2]]), [0, 3, 6], max_samples=100).samples()
    assert once.shape == (2, 12)
    assert torch.equal(once, twice)


def test_gradient_statistics_match_autograd():
    xs = batches(n=2)
    weights = [randn(*x.shape, seed=10 + i) for i, x in enumerate(xs)]
    obs = ChannelStatsObserver(4, track_gradients=True)
    grads = []
    for x, w in zip(xs, weights, strict=True):
        xr = x.clone().requires_grad_(True)
        loss = (obs(xr).tanh() * w).sum()
        (g,) = torch.autograd.grad(loss, xr)
        grads.append(g)
    st = obs.compute()
    assert st.grad_seen
    gall, xall = flat(grads).double(), flat(xs).double()
    assert torch.allclose(st.grad_sq, gall.square().sum(dim=1), rtol=1e-5)
    assert torch.allclose(st.saliency, (xall.abs() * gall.abs()).sum(dim=1), rtol=1e-5)
    # coherent sums: per sample and channel, the gradient summed over positions, squared, summed over samples
    per_sample = torch.cat([g.double().sum(dim=(2, 3)) for g in grads])  # (B, C) of (B, C, H, W) gradients
    assert torch.allclose(st.grad_coherent, per_sample.square().sum(dim=0), rtol=1e-5)


def test_coherent_gradient_sums_of_a_linear_input_equal_the_squared_sums():
    obs = ChannelStatsObserver(5, track_gradients=True)
    xr = randn(6, 5).requires_grad_(True)
    (obs(xr).sin() * randn(6, 5, seed=3)).sum().backward()
    st = obs.compute()
    assert torch.allclose(st.grad_coherent, st.grad_sq, rtol=1e-6)  # one position per sample and channel


def test_no_gradient_tracking_when_disabled_or_not_required():
    obs = ChannelStatsObserver(4, track_gradients=False)
    xr = randn(2, 4, 3).requires_grad_(True)
    obs(xr).sum().backward()
    assert not obs.compute().grad_seen
    obs2 = ChannelStatsObserver(4, track_gradients=True)
    obs2(randn(2, 4, 3))  # does not require grad: nothing to hook
    assert not obs2.compute().grad_seen


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_raises_naming_layer(bad):
    obs = ChannelStatsObserver(4, name="features.3")
    x = randn(2, 4, 3, 3)
    x[1, 2, 0, 1] = bad
    with pytest.raises(ValueError, match=r"features\.3.*1 NaN/Inf"):
        obs(x)


def test_compute_on_empty_observer_raises():
    obs = ChannelStatsObserver(4, name="fc")
    with pytest.raises(ValueError, match=r"'fc'.*no activations"):
        obs.compute()
    obs(randn(2, 4))
    obs.reset()
    with pytest.raises(ValueError, match="no activations"):
        obs.compute()
    assert obs.samples().shape == (4, 0)


def test_reset_clears_everything():
    obs = ChannelStatsObserver(4, track_gradients=True)
    xr = randn(2, 4, 3).requires_grad_(True)
    obs(xr).sum().backward()
    obs.reset()
    x = randn(3, 4, 2, seed=9)
    obs(x)
    st = obs.compute()
    assert torch.equal(st.max_abs, flat([x]).abs().amax(dim=1))
    assert st.count == 6 and not st.grad_seen


# ----------------------------------------------------------------------------------------------- reduce
class TwoRanks:
    """Fake distributed reduction: rank 0's reducer combines each call with rank 1's tensor of the same call."""

    OPS = {  # noqa: RUF012
        "sum": lambda a, b: a + b,
        "max": torch.maximum,
        "min": torch.minimum,
        "cat": lambda a, b: torch.cat([a, b], dim=-1),
    }

    def __init__(self, other: ChannelStatsObserver) -> None:
        self.recorded: list[tuple[torch.Tensor, str]] = []
        other.reduce_(self._record)  # rank 1 runs the same sequence of collectives
        self.calls = 0

    def _record(self, t: torch.Tensor, op: str) -> torch.Tensor:
        self.recorded.append((t.clone(), op))
        return t

    def __call__(self, t: torch.Tensor, op: str) -> torch.Tensor:
        other, other_op = self.recorded[self.calls]
        self.calls += 1
        assert op == other_op
        return self.OPS[op](t, other)


def _observe(xs, track=False):
    obs = ChannelStatsObserver(4, max_samples=6, track_gradients=track)
    for x in xs:
        xr = x.clone().requires_grad_(track)
        out = obs(xr)
        if track:
            (out.square() * 0.5).sum().backward()
    return obs


def test_reduce_with_two_fake_ranks_gives_merged_statistics():
    xa, xb = batches(seed=0, n=2), batches(seed=20, n=3)
    rank0, rank1 = _observe(xa, track=True), _observe(xb)
    reducer = TwoRanks(rank1)
    rank0.reduce_(reducer)
    assert reducer.calls == len(reducer.recorded)
    st = rank0.compute()
    allv = flat(xa + xb)
    assert torch.equal(st.max_abs, allv.abs().amax(dim=1))
    assert torch.equal(st.min, allv.amin(dim=1))
    assert torch.allclose(st.energy, allv.double().square().sum(dim=1), rtol=1e-5)
    assert st.count == allv.shape[1]
    assert st.grad_seen  # seen on rank 0 only: still seen after the reduction
    grads_a = flat(xa).double()  # d(0.5 x^2)/dx = x on rank 0, nothing on rank 1
    assert torch.allclose(st.grad_sq, grads_a.square().sum(dim=1), rtol=1e-5)
    per_sample = torch.cat([x.double().sum(dim=(2, 3)) for x in xa])
    assert torch.allclose(st.grad_coherent, per_sample.square().sum(dim=0), rtol=1e-5)
    # no batch keys: rows are keyed by their activations, so the merged sample is one observer's on all batches
    assert torch.equal(st.samples, _observe(xa + xb).samples())


def test_reduce_with_identity_reducer_is_a_no_op():
    xs = batches()
    obs = _observe(xs)
    before = obs.compute()
    obs.reduce_(lambda t, op: t)
    after = obs.compute()
    for field in ("max_abs", "min", "energy", "grad_sq", "grad_coherent", "saliency", "samples"):
        assert torch.equal(getattr(before, field), getattr(after, field)), field
    assert (before.count, before.grad_seen) == (after.count, after.grad_seen)


def test_reduce_keeps_large_counts_exact():
    obs = ChannelStatsObserver(3)
    obs(randn(1, 3, 1))  # one value per channel on this rank

    def reducer(t: torch.Tensor, op: str) -> torch.Tensor:
        if op == "sum" and t.shape == (2,):  # (count, grad_seen): the other rank saw 2**24 values per channel
            return t + torch.tensor([2**24, 0], dtype=t.dtype)
        return t  # the other rank contributes nothing else

    obs.reduce_(reducer)
    assert obs.count == 2**24 + 1


def test_extras_left_out_stay_zero_and_change_nothing_else():
    xs = batches(n=2)
    full, lean = ChannelStatsObserver(4, track_gradients=True), ChannelStatsObserver(4, track_gradients=True, extras=())
    for obs in (full, lean):
        for x in xs:
            xr = x.clone().requires_grad_(True)
            (obs(xr).tanh() * 2).sum().backward()
    a, b = full.compute(), lean.compute()
    assert bool(a.energy.gt(0).all()) and bool(a.saliency.gt(0).all())
    assert not bool(b.energy.any()) and not bool(b.saliency.any())
    for field in ("max_abs", "min", "grad_sq", "grad_coherent", "samples"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_unknown_extras_are_refused():
    with pytest.raises(ValueError, match=r"subset of \['energy', 'saliency'\], got unknown \['hessian'\]"):
        ChannelStatsObserver(4, extras=("energy", "hessian"))
