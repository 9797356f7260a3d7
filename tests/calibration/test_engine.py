"""The calibration engine end to end on a tiny conv net with random data."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_engine import TinyNet, config, fwd, loss, make_batches, tiny
from torch import nn

from lightning_dqa import DQAConfig
from lightning_dqa.calibration.batches import default_batch_size
from lightning_dqa.calibration.clipping import clip_max
from lightning_dqa.calibration.engine import calibrate
from lightning_dqa.core import functional as F
from lightning_dqa.core.attach import prepare, quantizers_of, set_quantizers_enabled

pytestmark = pytest.mark.usefixtures("single_thread")


def run(cfg: DQAConfig, model: nn.Module | None = None, data=None, **kw):
    model = tiny() if model is None else model
    prepare(model, cfg)
    report = calibrate(model, cfg, make_batches() if data is None else data, forward_fn=fwd, loss_fn=loss, **kw)
    return model, report


def held_out() -> torch.Tensor:
    return torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(99))


def rel_mse(model: nn.Module, x: torch.Tensor, fp: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x) - fp).square().mean() / fp.square().mean())


# ----------------------------------------------------------------------------------------------- errors
def test_empty_batches_raise():
    cfg = config()
    m = tiny()
    prepare(m, cfg)
    with pytest.raises(ValueError, match="at least one sample"):
        calibrate(m, cfg, [], forward_fn=fwd)
    with pytest.raises(ValueError, match="at least one sample"):
        calibrate(m, cfg, iter([]), forward_fn=fwd, num_samples=10)


def test_argument_errors():
    cfg = config()
    with pytest.raises(ValueError, match="prepare"):
        calibrate(tiny(), cfg, make_batches(), forward_fn=fwd)
    m = tiny()
    prepare(m, cfg)
    with pytest.raises(ValueError, match=r"num_samples.*0"):
        calibrate(m, cfg, make_batches(), forward_fn=fwd, num_samples=0)
    fisher = config(ranking="fisher")
    with pytest.raises(ValueError, match="loss_fn"):
        calibrate(m, fisher, make_batches(), forward_fn=fwd)


def test_nan_input_raises_naming_a_layer():
    cfg = config()
    m = tiny()
    prepare(m, cfg)
    data = make_batches(2)
    data[1][0][3, 1, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"Layer 'conv1'.*NaN/Inf"):
        calibrate(m, cfg, data, forward_fn=fwd)


def test_training_mode_restored_when_calibration_fails():
    cfg = config()
    m = tiny()
    prepare(m, cfg)
    m.train()
    data = make_batches(1)
    data[0][0][0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError):
        calibrate(m, cfg, data, forward_fn=fwd)
    assert m.training and m.bn1.training


def test_layer_not_reached_by_forward_stays_full_precision_with_one_warning():
    m = tiny()
    m.aux = nn.Linear(10, 2)  # registered, never called
    cfg = config()
    prepare(m, cfg)
    with pytest.warns(UserWarning, match=r"\['aux'\] were never called.*exclude=\['\^aux\$'\]") as record:
        report = calibrate(m, cfg, make_batches(), forward_fn=fwd)
    assert len([w for w in record if "never called" in str(w.message)]) == 1
    q = m.aux.dqa_quantizer
    assert "aux" not in report.order and q.passthrough and bool(q.calibrated) and q.enabled
    x = torch.randn(3, 10)
    assert torch.equal(m.aux(x), nn.functional.linear(x, m.aux.weight, m.aux.bias))
    assert all(not other.passthrough for name, other in quantizers_of(m).items() if name != "aux")
    excluded = config().replace(exclude=(r"^aux$",))
    prepare(m, excluded)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = calibrate(m, excluded, make_batches(), forward_fn=fwd)
    assert "aux" not in report.order


def test_no_layer_reached_is_an_error():
    m = tiny()
    cfg = config()
    prepare(m, cfg)
    with pytest.raises(ValueError, match=r"None of the .* quantized layers was reached"):
        calibrate(m, cfg, make_batches(), forward_fn=lambda model, batch: batch[0].sum())


# ----------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize(("num_samples", "expected"), [(1, 1), (16, 16), (40, 40), (64, 64), (1000, 64)])
def test_num_samples_truncates_exactly(num_samples, expected):
    consumed: list[int] = []
    _, report = run(config(), num_samples=num_samples, progress=consumed.append)
    assert report.samples == expected
    assert sum(consumed) == expected
    assert report.stats["conv1"].count == expected * 8 * 8  # values per channel of conv1's input
    assert report.stats["fc"].count == expected


def test_truncated_data_is_the_prefix():
    """Statistics of 40 samples equal those of an explicit 40-sample prefix."""
    _, a = run(config(), num_samples=40)
    data = make_batches()
    prefix = [data[0], data[1], (data[2][0][:8], data[2][1][:8])]
    _, b = run(config(), data=prefix)
    assert a.samples == b.samples == 40
    for name in a.stats:
        assert torch.equal(a.stats[name].max_abs, b.stats[name].max_abs)
        assert torch.equal(a.stats[name].energy, b.stats[name].energy)


def test_default_batch_size():
    assert default_batch_size(torch.zeros(7, 3)) == 7
    assert default_batch_size((torch.zeros(5, 2), torch.zeros(5))) == 5
    assert default_batch_size({"label": [torch.zeros(3)], "x": torch.zeros(3, 1)}) == 3
    with pytest.raises(TypeError):
        default_batch_size("nope")


# ----------------------------------------------------------------------------------------------- outcome
def test_quantizers_enabled_and_output_close_to_fp():
    x = held_out()
    m = tiny().eval()
    with torch.no_grad():
        fp = m(x)
    m, _ = run(config(bits=4))
    m.eval()
    qs = quantizers_of(m)
    assert all(q.enabled and bool(q.calibrated) for q in qs.values())
    with torch.no_grad():
        out = m(x)
    assert not torch.equal(out, fp)
    print(f"4-bit rel. MSE {rel_mse(m, x, fp):.5f}")
    assert rel_mse(m, x, fp) < 0.02
    set_quantizers_enabled(m, False)
    with torch.no_grad():
        assert torch.equal(m(x), fp)


def test_static_scales_are_per_channel_maxima_without_clipping():
    m, report = run(config(bits=3, code="signed", ratio=0.0))
    for name, q in quantizers_of(m).items():
        expected = F.scale_from_max(report.stats[name].max_abs, 3, True)
        assert torch.equal(q.scale, expected), name


@pytest.mark.parametrize("clipping", ["percentile", "mse"])
def test_static_scales_follow_the_clipping_method(clipping):
    m, report = run(config(bits=3, clipping=clipping, percentile=99.0, ratio=0.4), data=make_batches(2, 8))
    clipped_somewhere = False
    for name, q in quantizers_of(m).items():
        st, signed = report.stats[name], bool(q.signed)
        if clipping == "percentile":
            q99 = torch.quantile(st.samples.abs(), 0.99, dim=1)
            clip = torch.minimum(torch.where(q99 > 0, q99, st.max_abs), st.max_abs)  # sparse channels keep max
        else:  # the MSE search itself is checked against brute force in test_clipping; here: its inputs
            bits = torch.where(q.important, q.n + q.m, q.n)  # important channels are searched at n + m bits
            clip = clip_max("mse", st.max_abs, st.samples, bits, signed)
        # exactly: after ranking only the important channels are searched again, the others keep their n-bit clip
        assert torch.equal(q.scale, F.scale_from_max(clip, q.n, signed)), name
        unclipped = F.scale_from_max(st.max_abs, q.n, signed)
        live = clip > 0
        assert (q.scale[live] <= unclipped[live]).all()
        clipped_somewhere |= bool((q.scale[live] < unclipped[live]).any())
    assert clipped_somewhere


def test_percentile_clipping_keeps_every_live_channel_alive():
    m, report = run(config(bits=3, clipping="percentile", percentile=99.0, ratio=0.4))
    for name, q in quantizers_of(m).items():
        st = report.stats[name]
        live = st.max_abs > 0
        assert (q.scale[live] <= F.scale_from_max(st.max_abs, q.n, bool(q.signed))[live]).all(), name
        with torch.no_grad():
            out = q(st.samples.t().contiguous())  # (K, C): the calibration samples themselves
        nonzero_in = (st.samples != 0).any(dim=1)
        assert (out.abs().amax(dim=0)[nonzero_in] > 0).all(), name


def test_error_histogram_counts_shifting_errors_of_calibration_samples():
    m, report = run(config(bits=3, extra_bits=2, ratio=0.4, code="auto"))
    for name, q in quantizers_of(m).items():
        samples = report.stats[name].samples  # (C, K)
        lo, hi = (-(2 ** (q.n + q.m - 1)), 2 ** (q.n + q.m - 1) - 1) if bool(q.signed) else (0, 2 ** (q.n + q.m) - 1)
        expected = [0] * 2**q.m
        for c in q.important.nonzero().flatten().tolist():
            s_hi = q.scale[c] / 2**q.m
            for code in torch.clamp(torch.round(samples[c] * (1 / s_hi)), lo, hi).long().tolist():
                expected[code % 2**q.m] += 1  # Python's % is the low m bits, also for negative codes
        assert q.error_counts.tolist() == expected, name
        assert sum(expected) == int(q.important.sum()) * samples.shape[1]


@pytest.mark.parametrize("ranking", ["fisher", "energy"])
def test_dqa_beats_direct_at_three_bits(ranking):
    x = held_out()
    with torch.no_grad():
        fp = tiny().eval()(x)
    errors = {}
    for method in ("dqa", "direct"):
        m, _ = run(config(bits=3, method=method, ranking=ranking, ratio=0.4, extra_bits=3))
        errors[method] = rel_mse(m, x, fp)
    print(ranking, errors, errors["dqa"] / errors["direct"])
    # margins measured over seeds 0-5: dqa/direct <= 0.93 (fisher), <= 0.32 (energy); this seed gives 0.36 / 0.22
    assert errors["dqa"] < (0.95 if ranking == "fisher" else 0.5) * errors["direct"], errors


def test_important_channel_counts():
    m, report = run(config(ratio=0.4))
    for row in report.layers:
        assert row.important == round(0.4 * row.channels)
        assert int(quantizers_of(m)[row.name].important.sum()) == row.important
    m, report = run(config(method="direct"))
    assert all(row.important == 0 for row in report.layers)
    assert not any(q.important.any() for q in quantizers_of(m).values())


def test_fisher_ranking_leaves_parameter_gradients_untouched():
    m = tiny()
    m, report = run(config(ranking="fisher"), model=m)
    assert all(p.grad is None for p in m.parameters())
    assert all(p.requires_grad for p in m.parameters())
    assert all(report.stats[name].grad_seen for name in report.order)
    assert all((report.stats[name].grad_sq > 0).any() for name in report.order)


@pytest.mark.parametrize("training", [True, False])
def test_training_mode_restored(training):
    m = tiny()
    m.train(training)
    run(config(), model=m)
    assert m.training is training and m.bn1.training is training


def test_batchnorm_running_stats_not_updated():
    m = tiny()
    m.train()
    before = m.bn1.running_mean.clone()
    run(config(), model=m)
    assert torch.equal(m.bn1.running_mean, before)


def test_code_auto_picks_unsigned_after_relu_and_signed_for_first_layer():
    m, report = run(config(code="auto"))
    qs = quantizers_of(m)
    assert bool(qs["conv1"].signed)  # the image: negative values
    for name in ("conv2", "conv3", "fc"):
        assert not bool(qs[name].signed), name
    assert [row.signed for row in report.layers] == [True, False, False, False]


def test_report_table_and_order():
    m, report = run(config(first_layer_bits=8))
    assert report.order == ["conv1", "conv2", "conv3", "fc"]
    assert [row.name for row in report.layers] == report.order
    lines = report.table().splitlines()
    assert len(lines) == 2 + len(quantizers_of(m))
    for line, row in zip(lines[2:], report.layers, strict=True):
        assert line.startswith(row.name)
    assert lines[2].split()[2] == "8"  # first layer kept at 8 bits
    assert report.layers[0].numel_per_sample == 3 * 8 * 8
    assert report.layers[-1].numel_per_sample == 10


def test_report_order_follows_the_forward_pass():
    class Reversed(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(10, 5)
            self.first = nn.Conv2d(3, 3, 1)  # registered last, runs first

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(self.first(x))

    torch.manual_seed(0)
    m, report = run(config(), model=Reversed())
    assert report.order == ["first", "conv1", "conv2", "conv3", "fc"]
    assert list(quantizers_of(m))[-1] == "first"


def test_identity_reducer_and_broadcast_do_not_change_the_result():
    x = held_out()
    a, _ = run(config(bits=3, clipping="mse"))
    calls: list[str] = []

    def reducer(t: torch.Tensor, op: str) -> torch.Tensor:
        calls.append(op)
        return t

    b, _ = run(config(bits=3, clipping="mse"), reducer=reducer, broadcast=lambda t: t.clone())
    a.eval()
    b.eval()
    assert {"sum", "max", "min", "cat"} <= set(calls)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert all(p.grad is None for p in b.parameters())


def test_dynamic_mode_and_fp32_method():
    x = held_out()
    with torch.no_grad():
        fp = tiny().eval()(x)
    m, report = run(config(scale_mode="dynamic", clipping="none", bits=4))
    print(f"dynamic 4-bit rel. MSE {rel_mse(m, x, fp):.5f}")
    assert 0 < rel_mse(m, x, fp) < 0.02
    m, report = run(config(method="fp32"))
    assert all(q.passthrough for q in quantizers_of(m).values())
    assert rel_mse(m, x, fp) == 0.0
    assert all(row.bits == 0 for row in report.layers)
    assert "fp" in report.table().splitlines()[2]


def test_calibration_is_deterministic():
    x = held_out()
    a, _ = run(config(bits=3, ranking="random", clipping="mse", seed=5))
    b, _ = run(config(bits=3, ranking="random", clipping="mse", seed=5))
    for (na, qa), (nb, qb) in zip(quantizers_of(a).items(), quantizers_of(b).items(), strict=True):
        assert na == nb and torch.equal(qa.important, qb.important) and torch.equal(qa.scale, qb.scale)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_gradient_statistics_of_a_value_two_layers_read_sum_both_paths():
    """A block input read by a convolution and by the residual shortcut: the ``fisher`` statistics of the
    convolution's input are ``(dL/dh)**2`` with ``dL/dh`` summed over both readers, so the important channels
    are chosen for the shortcut too (what ``shared_values="codes"`` then stores for both)."""
    from lightning_dqa.calibration.collect import collect

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.conv = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.stem(x))
            return (self.conv(h) + 3.0 * h).mean(dim=(2, 3))

    torch.manual_seed(0)
    model = Block().eval()
    cfg = DQAConfig(bits=3, ranking="fisher", first_layer_bits=None)
    prepare(model, cfg)
    set_quantizers_enabled(model, False)
    x, y = torch.randn(5, 3, 6, 6), torch.randint(0, 4, (5,))

    def loss_fn(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]), b[1], reduction="sum")

    got = collect(model, cfg, [(x, y)], forward_fn=lambda m, b: m(b[0]), loss_fn=loss_fn)
    grad_sq = got.observers["conv"].compute().grad_sq

    h = torch.relu(model.stem(x)).detach().requires_grad_(True)
    out = (model.conv(h) + 3.0 * h).mean(dim=(2, 3))
    (both,) = torch.autograd.grad(nn.functional.cross_entropy(out, y, reduction="sum"), h)
    (conv_only,) = torch.autograd.grad(
        nn.functional.cross_entropy((model.conv(h) + 3.0 * h.detach()).mean(dim=(2, 3)), y, reduction="sum"), h
    )
    want = both.double().square().sum(dim=(0, 2, 3))
    assert torch.allclose(grad_sq.double(), want, rtol=1e-4)
    assert not torch.allclose(want, conv_only.double().square().sum(dim=(0, 2, 3)), rtol=1e-2)  # the shortcut counts


def test_gradient_statistics_of_a_concatenated_skip_sum_every_reader():
    """A skip a max-pool reads and a decoder convolution reads through a concatenation (a U-Net's): with shared
    values its channels are stored once, as that convolution's codes, so their ``fisher`` statistics are of
    ``dL/dskip`` summed over both readers, not of the concatenation's gradient alone."""
    from lightning_dqa.calibration.collect import collect

    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.act, self.pool = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 1, 1)
            self.down, self.dec = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = self.act(self.stem(x))
            return self.dec(torch.cat([s, torch.relu(self.down(self.pool(s)))], dim=1)).mean(dim=(2, 3))

    torch.manual_seed(0)
    x, y = torch.randn(5, 3, 6, 6), torch.randint(0, 4, (5,))

    def loss_fn(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]), b[1], reduction="sum")

    grads = {}
    for shared in ("fp32", "int8", "codes"):
        torch.manual_seed(1)  # the same weights for all
        model = Skip().eval()
        cfg = DQAConfig(bits=3, ranking="fisher", first_layer_bits=None, shared_values=shared)
        prepare(model, cfg)
        set_quantizers_enabled(model, False)
        got = collect(model, cfg, [(x, y)], forward_fn=lambda m, b: m(b[0]), loss_fn=loss_fn)
        grads[shared] = got.observers["dec"].compute().grad_sq.double()

    s = model.act(model.stem(x)).detach().requires_grad_(True)
    d = torch.relu(model.down(model.pool(s)))
    ds, dd = torch.autograd.grad(loss_fn(lambda t: model.dec(torch.cat([s, d], 1)).mean(dim=(2, 3)), (x, y)), (s, d))
    cat_only = torch.autograd.grad(
        loss_fn(lambda t: model.dec(torch.cat([s, d.detach()], 1)).mean(dim=(2, 3)), (x, y)), s
    )[0]
    per_channel = lambda g: g.double().square().sum(dim=(0, 2, 3))  # noqa: E731
    assert torch.allclose(grads["codes"][:4], per_channel(ds), rtol=1e-4)  # both readers of the skip
    assert torch.allclose(grads["codes"][4:], per_channel(dd), rtol=1e-4)
    for shared in ("fp32", "int8"):  # its codes have no important channels: the convolution's own gradient ranks
        assert torch.allclose(grads[shared][:4], per_channel(cat_only), rtol=1e-4), shared
    assert not torch.allclose(grads["codes"][:4], grads["fp32"][:4], rtol=1e-2)
