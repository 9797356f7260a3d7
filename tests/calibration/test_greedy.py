"""The greedy search: the fast path (fx partition + batched candidates) against a plain per-candidate loop."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dqa import DQAConfig, paper_config
from lightning_dqa.calibration.engine import calibrate
from lightning_dqa.calibration.fxreplay import GraphSearch
from lightning_dqa.calibration.greedy import _candidate_groups, greedy_rank
from lightning_dqa.calibration.replicas import quantize_replicas as _quantize_replicas
from lightning_dqa.calibration.selection import important_mask
from lightning_dqa.core.attach import prepare, quantizers_of, set_quantizers_enabled
from lightning_dqa.core.fxgraph import LeafTracer
from lightning_dqa.core.quantizers import ActivationQuantizer

pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------------------------- models
class Block(nn.Module):
    """conv-bn-relu-conv-bn plus an identity shortcut, then relu (a ResNet basic block)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + x)


class TinyResNet(nn.Module):
    def __init__(self, width: int = 6, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.block1 = Block(width)
        self.block2 = Block(width)
        self.linear = nn.Linear(width, classes)

    def features(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.block2(self.block1(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class Untraceable(TinyResNet):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 1e9:
            x = x * 0
        return super().forward(x)


class PythonOnBatchSize(TinyResNet):
    """Python's range() on the batch size: symbolic tracing fails with a TypeError, not a TraceError."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * len(range(x.shape[0])) / x.shape[0]


class BatchSizeUpstream(TinyResNet):
    """Reads the batch size at the top and uses it at the end: wrong once replicas are stacked."""

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        return self.linear(F.adaptive_avg_pool2d(self.features(x), 1).reshape(n, -1))


class DeadBranch(TinyResNet):
    """A quantized layer whose result never reaches the output, and one that never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Conv2d(6, 4, 1)
        self.unused = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        f = self.features(x)
        self.aux(f)
        return self.linear(F.adaptive_avg_pool2d(f, 1).flatten(1))


def forward_fn(m: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
    return m(b[0])


def objective_fn(out: Tensor, b: tuple[Tensor, Tensor]) -> Tensor:
    return (out.argmax(1) == b[1]).sum()


def make_model(cls: type[nn.Module] = TinyResNet, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = cls()
    for m in model.modules():  # non-trivial BatchNorm statistics, so eval mode is not an identity
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
        if isinstance(m, nn.Conv2d):
            m.weight.data.mul_(3.0)  # a residual branch that matters next to the shortcut
    model.linear.weight.data.normal_(0.0, 2.0)  # spread the logits: predictions must vary between images
    model.linear.bias.data.zero_()
    return model.eval()


def make_batches(model: nn.Module, sizes: tuple[int, ...] = (16, 16, 9), seed: int = 1) -> list:
    """Random images labelled by the full-precision model, so quantization can only lose."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, 3, 8, 8, generator=g) + torch.randn(n, 3, 1, 1, generator=g) for n in sizes]
    with torch.no_grad():
        # Centre the logits on this data: every class gets predicted, and predictions sit near ties.
        feats = F.adaptive_avg_pool2d(model.features(torch.cat(xs)), 1).flatten(1)
        model.linear.bias.copy_(-model.linear(feats).mean(0) + model.linear.bias)
        return [(x, model(x).argmax(1)) for x in xs]


def setup(cls=TinyResNet, where="input", scale_mode="static", bits=2, code="signed", **kw):
    """A model in the state calibrate() hands to greedy_rank: scales frozen or dynamic, quantizers off."""
    model = make_model(cls)
    batches = make_batches(model)
    config = DQAConfig(bits=bits, ratio=0.0, scale_mode=scale_mode, clipping="none", where=where, code=code, **kw)
    prepare(model, config)
    report = calibrate(model, config, batches, forward_fn=forward_fn)
    set_quantizers_enabled(model, False)
    return model, quantizers_of(model), report.order, batches


def one_hot(q: ActivationQuantizer, c: int) -> Tensor:
    mask = torch.zeros(q.num_channels, dtype=torch.bool)
    mask[c] = True
    return mask


def reference_greedy(model, quantizers, order, batches, fwd=forward_fn) -> dict[str, Tensor]:
    """The paper's loop, written plainly: set the masks, one full forward per candidate and batch."""
    scores = {}
    with torch.no_grad():
        for name in order:
            q = quantizers[name]
            if q.passthrough:
                scores[name] = torch.zeros(q.num_channels, dtype=torch.float64)
                continue
            q.enabled = True
            s = []
            for c in range(q.num_channels):
                q.fp_mask = one_hot(q, c)
                s.append(sum(float(objective_fn(fwd(model, b), b)) for b in batches))
            scores[name] = torch.tensor(s, dtype=torch.float64)
            q.fp_mask = one_hot(q, max(range(len(s)), key=lambda i: (s[i], -i)))
    for q in quantizers.values():
        q.enabled, q.fp_mask = False, None
    return scores


def assert_same_scores(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name], want[name]), (name, got[name], want[name])


# ----------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("where", ["input", "output"])
@pytest.mark.parametrize("scale_mode", ["static", "dynamic"])
def test_fast_path_matches_reference(where: str, scale_mode: str) -> None:
    model, quantizers, order, batches = setup(where=where, scale_mode=scale_mode)
    want = reference_greedy(model, quantizers, order, batches)
    assert any(len(set(s.tolist())) > 1 for s in want.values()), "the candidates should matter"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback may happen
        # None: sized by bytes, every candidate of a layer in one pass here (tiny activations); 40 rows:
        # groups of 2 candidates for the 16-row batches, 4 for the 9-row one; 1: one candidate per pass.
        for samples_per_pass in (None, 40, 1):
            got = greedy_rank(
                model, quantizers, order, batches, forward_fn, objective_fn, samples_per_pass=samples_per_pass
            )
            assert_same_scores(got, want)
    assert not any(s.is_inference() for s in got.values())


def test_plain_path_matches_reference() -> None:
    model, quantizers, order, batches = setup(where="output", scale_mode="dynamic")
    got = greedy_rank(model, quantizers, order, batches, forward_fn, objective_fn, fast=False)
    assert_same_scores(got, reference_greedy(model, quantizers, order, batches))


def test_untraceable_model_falls_back_with_identical_scores() -> None:
    model, quantizers, order, batches = setup(Untraceable)
    with pytest.warns(UserWarning, match="torch.fx cannot run Untraceable"):
        got = greedy_rank(model, quantizers, order, batches, forward_fn, objective_fn)
    assert_same_scores(got, reference_greedy(model, quantizers, order, batches))


def test_model_that_fails_tracing_warns_and_scores_like_the_reference() -> None:
    model, quantizers, order, batches = setup(PythonOnBatchSize)
    with pytest.warns(UserWarning, match=r"cannot run PythonOnBatchSize piecewise \(tracing: TypeError.*much slower"):
        got = greedy_rank(model, quantizers, order, batches, forward_fn, objective_fn)
    assert_same_scores(got, reference_greedy(model, quantizers, order, batches))


def raise_(err: BaseException):
    def fail(*args, **kwargs):
        raise err

    return fail


@pytest.mark.parametrize(
    "err", [MemoryError(), torch.cuda.OutOfMemoryError("CUDA out of memory"), KeyboardInterrupt()], ids=type
)
@pytest.mark.parametrize("where", ["replay", "tracing"])
def test_out_of_memory_and_interrupts_in_the_fast_path_propagate(
    monkeypatch: pytest.MonkeyPatch, err: BaseException, where: str
) -> None:
    model, quantizers, order, batches = setup(where="output", scale_mode="dynamic")
    if where == "replay":
        monkeypatch.setattr(GraphSearch, "_run_downstream", raise_(err))
    else:
        monkeypatch.setattr(LeafTracer, "trace", raise_(err))
    with warnings.catch_warnings(), pytest.raises(type(err)):
        warnings.simplefilter("error")  # no fallback to the plain path either
        greedy_rank(model, quantizers, order, batches, forward_fn, objective_fn)
    assert all(not q.enabled and q.fp_mask is None for q in quantizers.values())
    assert all(not h for q in quantizers.values() for h in (q._forward_hooks, q._forward_pre_hooks))


def test_errors_of_the_model_itself_propagate_without_a_fallback() -> None:
    model, quantizers, order, batches = setup(where="input")
    layer = model.get_submodule(order[1])

    def fails_at_the_second_layer(m: nn.Module, args: tuple[Tensor, ...]) -> None:
        # The quantizer is enabled only in the plain pass that checks the second layer's first candidates
        # (the replay disables it and quantizes through a hook): a failure of the model, not of the replay.
        if layer.dqa_quantizer.enabled:
            raise ValueError("the model's own error")

    layer.register_forward_pre_hook(fails_at_the_second_layer, prepend=True)
    with warnings.catch_warnings(), pytest.raises(ValueError, match="the model's own error"):
        warnings.simplefilter("error")
        greedy_rank(model, quantizers, order, batches, forward_fn, objective_fn)

    def failing_forward(m: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        raise ValueError("the forward_fn's own error")

    with warnings.catch_warnings(), pytest.raises(ValueError, match="the forward_fn's own error"):
        warnings.simplefilter("error")
        greedy_rank(model, quantizers, order, batches, failing_forward, objective_fn)


def test_batch_size_captured_upstream_fails_the_self_check_and_falls_back() -> None:
    model, quantizers, order, batches = setup(BatchSizeUpstream)
    with pytest.warns(UserWarning, match="disagrees with a plain forward pass"):
        got = greedy_rank(model, quantizers, order, batches, forward_fn, objective_fn, samples_per_pass=40)
    assert_same_scores(got, reference_greedy(model, quantizers, order, batches))


def test_layers_that_cannot_change_the_output() -> None:
    # The engine refuses to calibrate a layer that never runs, so "unused" gets its quantizer by hand.
    model, quantizers, order, batches = setup(DeadBranch, where="input", exclude=("unused",))
    model.unused.add_module("dqa_quantizer", ActivationQuantizer(6, bits=2, name="unused"))
    model.unused.register_forward_pre_hook(lambda m, args: (m.dqa_quantizer(args[0]),))
    quantizers, order = quantizers_of(model), [*order, "unused"]
    set_quantizers_enabled(model, False)
    assert "aux" in order
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = greedy_rank(model, quantizers, order, batches, forward_fn, objective_fn, samples_per_pass=40)
    assert_same_scores(got, reference_greedy(model, quantizers, order, batches))
    assert len(set(got["aux"].tolist())) == len(set(got["unused"].tolist())) == 1


def test_forward_fn_calling_the_model_twice() -> None:
    def tta(m: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:  # test-time augmentation: two model calls
        return m(b[0]).softmax(1) + m(b[0].flip(3)).softmax(1)

    model, quantizers, order, batches = setup(where="input", scale_mode="dynamic")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = greedy_rank(model, quantizers, order, batches, tta, objective_fn, samples_per_pass=40)
    assert_same_scores(got, reference_greedy(model, quantizers, order, batches, fwd=tta))


def test_passthrough_layer_scores_zero() -> None:
    model, quantizers, order, batches = setup(where="input", first_layer_bits=0)
    assert quantizers["conv1"].passthrough
    got = greedy_rank(model, quantizers, order, batches, forward_fn, objective_fn, samples_per_pass=40)
    assert torch.equal(got["conv1"], torch.zeros(3, dtype=torch.float64))
    assert_same_scores(got, reference_greedy(model, quantizers, order, batches))


@pytest.mark.parametrize("scale_mode", ["static", "dynamic"])
def test_replicas_quantize_like_single_candidates(scale_mode: str) -> None:
    q = ActivationQuantizer(5, bits=3, scale_mode=scale_mode)
    q.set_static_scale(torch.rand(5) * 0.5 + 0.1)
    x = torch.randn(7, 5, 4, 4) * 2  # (N, C, H, W)
    rows = torch.zeros(3, 5, dtype=torch.bool)
    rows[0, 1] = rows[1, 4] = True  # replica 2 leaves nothing in full precision
    got = _quantize_replicas(q, x.repeat(3, 1, 1, 1), rows).split(7)
    for k in range(3):
        q.fp_mask = rows[k]
        assert torch.equal(got[k], q.quantize_values(x))
    q.fp_mask = None
    # Identical replicas: the maximum over the stacked batch is the maximum over one copy.
    assert torch.equal(q.quantize_values(x.repeat(3, 1, 1, 1)), q.quantize_values(x).repeat(3, 1, 1, 1))
    assert q.fp_mask is None


def test_traced_graph_calls_the_model_submodules_with_their_hooks() -> None:
    model, quantizers, _, batches = setup(where="input")
    layers = {name: model.get_submodule(name) for name in quantizers}
    gm = torch.fx.GraphModule(model, LeafTracer({id(m) for m in layers.values()}).trace(model))
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert set(quantizers) <= targets
    for name in quantizers:
        assert gm.get_submodule(name) is layers[name]
    x = batches[0][0]
    set_quantizers_enabled(model, True)
    with torch.no_grad():
        quantized = gm(x)
        assert torch.equal(quantized, model(x))
        set_quantizers_enabled(model, False)
        assert not torch.equal(quantized, gm(x))


def test_state_restored_after_an_exception() -> None:
    model, quantizers, order, batches = setup(where="output", scale_mode="dynamic")
    model.train()
    calls = []

    def failing(out: Tensor, b: tuple[Tensor, Tensor]) -> Tensor:
        calls.append(1)
        if len(calls) > 10:  # deep into the second layer's search
            raise RuntimeError("boom")
        return objective_fn(out, b)

    with pytest.raises(RuntimeError, match="boom"):
        greedy_rank(model, quantizers, order, batches, forward_fn, failing, samples_per_pass=40)
    assert model.training
    assert all(not q.enabled and q.fp_mask is None for q in quantizers.values())
    assert all(not h for q in quantizers.values() for h in (q._forward_hooks, q._forward_pre_hooks))


def test_progress_reaches_the_total() -> None:
    model, quantizers, order, batches = setup(where="input")
    seen: list[tuple[int, int]] = []
    greedy_rank(model, quantizers, order, batches, forward_fn, objective_fn, progress=lambda d, t: seen.append((d, t)))
    total = sum(q.num_channels for q in quantizers.values())
    assert seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted({d for d, _ in seen})


def test_arguments_are_validated() -> None:
    model, quantizers, order, batches = setup()
    with pytest.raises(ValueError, match="unknown"):
        greedy_rank(model, quantizers, [*order, "nope"], batches, forward_fn, objective_fn)
    with pytest.raises(ValueError, match="once"):
        greedy_rank(model, quantizers, [order[0], order[0]], batches, forward_fn, objective_fn)
    with pytest.raises(ValueError, match="at least one calibration batch"):
        greedy_rank(model, quantizers, order, [], forward_fn, objective_fn)
    with pytest.raises(ValueError, match="samples_per_pass"):
        greedy_rank(model, quantizers, order, batches, forward_fn, objective_fn, samples_per_pass=0)


def test_candidate_groups_are_balanced() -> None:
    assert [len(g) for g in _candidate_groups(16, 100, 500)] == [4, 4, 4, 4]
    assert _candidate_groups(3, 512, 256) == [[0], [1], [2]]
    assert _candidate_groups(3, 8, 512) == [[0, 1, 2]]


@pytest.mark.parametrize("config", [paper_config(2), DQAConfig(bits=2, ratio=0.5, ranking="greedy", clipping="none")])
def test_calibrate_end_to_end(config: DQAConfig) -> None:
    model = make_model()
    batches = make_batches(model)
    prepare(model, config)
    calibrate(model, config, batches, forward_fn=forward_fn, objective_fn=objective_fn)
    quantizers = quantizers_of(model)
    assert all(q.enabled and q.fp_mask is None for q in quantizers.values())
    # The same selection from the plain loop on a fresh copy in the pre-ranking state.
    ref_model, ref_q, order, _ = setup(
        where=config.where,
        scale_mode=config.scale_mode,
        bits=2,
        code=config.code,
        first_layer_bits=config.first_layer_bits,
        last_layer_bits=config.last_layer_bits,
    )
    want = reference_greedy(ref_model, ref_q, order, batches)
    for name, q in quantizers.items():
        assert torch.equal(q.important, important_mask(want[name], config.ratio)), name
