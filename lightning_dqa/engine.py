"""The framework-free DQA engine: install quantizers, calibrate them, freeze the selection.

Calibration runs named stages, each reading what the method and the ranking need from their registries
(:data:`lightning_dqa.methods.METHODS`, :data:`lightning_dqa.selection.RANKINGS`,
:data:`lightning_dqa.clipping.CLIPPINGS`):

1. **collect** (:mod:`lightning_dqa.collect`): one pass with observers on every quantization point;
2. **reduce**: statistics combined over distributed ranks;
3. **freeze scales**: code signedness and clipped static scales at ``n`` bits;
4. **select** (methods that keep important channels): rank, mark the top ``ratio``, re-clip them at
   ``n + m`` bits;
5. **method step**: e.g. NoisyQuant's noise search;
6. **finish**: the code book's error histogram, ``calibrated`` set, state broadcast from rank 0, and the report.

Usable on any ``nn.Module`` without a Trainer::

    quantizers = prepare(model, config)
    report = calibrate(model, config, loader, forward_fn=lambda m, b: m(b[0]), num_samples=1000,
                       loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]))

The Lightning callback passes its strategy's reduce/broadcast so that every rank ends with the same state.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dqa.allocation import HEADROOM, Allocation, plan, stored_bits_per_sample
from lightning_dqa.attach import attach_quantizers, quantizers_of
from lightning_dqa.batches import default_batch_size
from lightning_dqa.clipping import clip_max
from lightning_dqa.collect import Collected, collect
from lightning_dqa.config import DQAConfig
from lightning_dqa.functional import scale_from_max
from lightning_dqa.methods import MethodContext, get_method
from lightning_dqa.observers import ChannelStats, Reducer
from lightning_dqa.quantizers import ActivationQuantizer
from lightning_dqa.selection import RANKINGS, RankInputs, important_mask

__all__ = [
    "CalibrationReport",
    "LayerReport",
    "calibrate",
    "default_batch_size",
    "prepare",
    "set_quantizers_enabled",
]

Batch = Any
ForwardFn = Callable[[nn.Module, Batch], Tensor]
LossFn = Callable[[nn.Module, Batch], Tensor]
ObjectiveFn = Callable[[Tensor, Batch], Tensor]
Progress = Callable[[int], None]  # called with the number of samples just consumed
Quantizers = dict[str, ActivationQuantizer]


@dataclass
class LayerReport:
    """What calibration decided for one layer (one row of the summary table)."""

    name: str
    channels: int
    bits: int
    extra_bits: int
    important: int
    signed: bool
    scale_min: float
    scale_max: float
    numel_per_sample: int


@dataclass
class CalibrationReport:
    """Outcome of :func:`calibrate`.

    Attributes:
        samples: calibration samples read (on this rank).
        stats_seconds: time of the statistics pass.
        rank_seconds: time of the ranking (greedy search included) and clipping.
        order: target layers in the order the forward pass reached them.
        layers: one :class:`LayerReport` per target layer, in ``order``.
        stats: the reduced per-layer statistics (kept for accounting and ablations).
        allocation: the per-layer choices under ``target_bits`` (``None`` without a budget).

    """

    samples: int
    stats_seconds: float
    rank_seconds: float
    order: list[str]
    layers: list[LayerReport]
    stats: dict[str, ChannelStats] = field(repr=False, default_factory=dict)
    allocation: Allocation | None = None

    def summary(self, config: DQAConfig, samples: int | None = None) -> str:
        """One line on what ran (``samples`` over all ranks; default: this rank's), then :meth:`table`."""
        return (
            f"DQA calibration: {self.samples if samples is None else samples} samples, statistics "
            f"{self.stats_seconds:.1f}s, ranking {self.rank_seconds:.1f}s ({config.method}, {config.ranking}, "
            f"{self._widths(config)})\n{self.table()}"
        )

    def _widths(self, config: DQAConfig) -> str:
        if self.allocation is None:
            return f"n={config.bits}, m={config.extra_bits}, r={config.effective_ratio}"
        a = self.allocation
        peak = ""
        if a.target_peak_bytes is not None:
            peak = f", peak {a.peak_bytes:.0f} B per sample (target_peak_bytes={a.target_peak_bytes:g})"
        return (
            f"per-layer widths for target_bits={a.target_bits:g}: "
            f"{a.achieved_bits:.3f} bits per value on the calibration sample{peak}"
        )

    def table(self) -> str:
        """The summary as an aligned text table."""
        head = f"{'layer':<28}{'ch':>5}{'n':>3}{'m':>3}{'n+m ch':>8}{'code':>6}{'scale min':>11}{'scale max':>11}"
        rows = [head, "-" * len(head)]
        for r in self.layers:
            bits = "fp" if r.bits == 0 else str(r.bits)
            rows.append(
                f"{r.name[-28:]:<28}{r.channels:>5}{bits:>3}{r.extra_bits:>3}{r.important:>8}"
                f"{'s' if r.signed else 'u':>6}{r.scale_min:>11.4g}{r.scale_max:>11.4g}"
            )
        return "\n".join(rows)


def prepare(model: nn.Module, config: DQAConfig) -> Quantizers:
    """Install (uncalibrated, disabled) quantizers on ``model`` as ``config`` says; returns them by name."""
    quantizers = attach_quantizers(model, config)
    set_quantizers_enabled(model, False)
    return quantizers


def set_quantizers_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every installed quantizer on (fake quantization) or off (full precision pass-through)."""
    for q in quantizers_of(model).values():
        q.enabled = enabled


def calibrate(
    model: nn.Module,
    config: DQAConfig,
    batches: Iterable[Batch],
    *,
    forward_fn: ForwardFn,
    loss_fn: LossFn | None = None,
    objective_fn: ObjectiveFn | None = None,
    num_samples: int | None = None,
    batch_size_fn: Callable[[Batch], int] = default_batch_size,
    reducer: Reducer | None = None,
    broadcast: Callable[[Tensor], Tensor] | None = None,
    progress: Progress | None = None,
    rank_progress: Callable[[int, int], None] | None = None,
    example_input: Tensor | Callable[[], Tensor | None] | None = None,
) -> CalibrationReport:
    """Collect statistics, rank channels, freeze scales and selection, and switch the quantizers on.

    The model runs in eval mode (BatchNorm uses its running statistics) with quantizers off, outside
    ``torch.inference_mode`` (Lightning evaluates under it; tensors made there could neither update statistics
    in place later nor join autograd); its training mode is restored afterwards, also on failure.

    Args:
        model: a model with quantizers installed by :func:`prepare`.
        config: the settings the quantizers were installed with.
        batches: calibration batches; read until ``num_samples`` samples were seen.
        forward_fn: ``forward_fn(model, batch)`` runs the model on a batch (moving it to the device).
        loss_fn: ``loss_fn(model, batch)`` returns a scalar loss; needed by gradient rankings.
        objective_fn: ``objective_fn(output, batch)`` returns the summed score of a batch, higher is
            better (e.g. correct predictions); needed by the ``greedy`` ranking.
        num_samples: samples to read; ``None`` reads every batch.
        batch_size_fn: counts the samples of a batch.
        reducer: combines statistics over distributed ranks (the Lightning strategy's reduce).
        broadcast: copies rank 0's final quantizer state to every rank.
        progress: called after each batch with its number of samples.
        rank_progress: ``rank_progress(done, total)`` during a search-based ranking (greedy), in candidates.
        example_input: the model's input for a batch (a tensor whose first axis is the batch), or a function
            returning it once the statistics pass ran; needed by ``target_peak_bytes``, whose limit is checked by
            running its first sample compressed (:func:`fit_peak`).

    Returns:
        A :class:`CalibrationReport`.

    Raises:
        ValueError: when the model has no quantizers, the data is empty, activations are not finite, or
            a ranking lacks what it needs.

    """
    quantizers = _check_call(model, config, num_samples, loss_fn, objective_fn, example_input)
    method, ranking = get_method(config.method), RANKINGS[config.ranking]
    was_training = model.training
    try:
        with torch.inference_mode(False):
            model.eval()
            set_quantizers_enabled(model, False)
            collected = collect(
                model, config, batches, forward_fn=forward_fn, loss_fn=loss_fn, num_samples=num_samples,
                batch_size_fn=batch_size_fn, progress=progress, keep_inputs=method.keep_inputs,
                keep_batches=config.selects_channels and ranking.needs_batches,
            )  # fmt: skip
            t1 = time.perf_counter()
            stats = _reduce(collected, reducer)
            order = collected.order + [n for n in quantizers if n not in collected.order]
            freeze_scales(quantizers, stats, config, important_bits=False)
            inputs = RankInputs(stats, order, config.seed, model, quantizers, collected.batches, forward_fn)
            inputs.objective_fn, inputs.progress = objective_fn, rank_progress
            inputs.reduce_sum = None if reducer is None else (lambda t: reducer(t, "sum"))
            allocation = None
            if config.target_bits is not None:
                allocation = allocate_widths(quantizers, stats, config, inputs)
            elif config.selects_channels:
                select_channels(quantizers, stats, config, inputs)
            if method.step is not None:
                method.step(MethodContext(model, config, quantizers, collected.inputs))
            _finish(quantizers, stats, broadcast)
            if config.target_peak_bytes is not None:
                assert allocation is not None  # target_peak_bytes needs target_bits (DQAConfig checks)
                fit_peak(model, quantizers, stats, config, allocation, _example(example_input), broadcast)
            set_quantizers_enabled(model, True)
            layers = [_layer_report(name, quantizers[name], stats[name]) for name in order]
            rank_seconds = time.perf_counter() - t1
            report = CalibrationReport(collected.samples, collected.seconds, rank_seconds, order, layers, stats)
            report.allocation = allocation
            return report
    finally:
        model.train(was_training)


def _example(example_input: Tensor | Callable[[], Tensor | None] | None) -> Tensor:
    """The example input of ``calibrate``, called if it is a function; a tensor with a batch axis, or an error."""
    x = example_input() if callable(example_input) else example_input
    if not isinstance(x, Tensor) or x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(
            f"Expected example_input to be a tensor of at least one sample for target_peak_bytes (the model's "
            f"input, run compressed), got {type(x).__name__}"
        )
    return x


def _check_call(
    model: nn.Module,
    config: DQAConfig,
    num_samples: int | None,
    loss_fn: LossFn | None,
    objective_fn: ObjectiveFn | None,
    example_input: object = None,
) -> Quantizers:
    """The installed quantizers, after checking that the call gives what the configuration needs."""
    quantizers = quantizers_of(model)
    if not quantizers:
        raise ValueError("Expected a model with quantizers installed (call prepare(model, config) first), found none")
    if num_samples is not None and (
        isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0
    ):
        raise ValueError(f"Expected num_samples to be a positive int or None, got {num_samples!r}")
    if config.needs_gradients and loss_fn is None:
        what = f"target_bits={config.target_bits}" if config.target_bits is not None else f"Ranking {config.ranking!r}"
        raise ValueError(f"{what} needs gradients (Fisher statistics): pass loss_fn")
    if config.selects_channels and RANKINGS[config.ranking].needs_batches and objective_fn is None:
        raise ValueError(f"Ranking {config.ranking!r} needs objective_fn(output, batch) to score candidates")
    if config.target_peak_bytes is not None and example_input is None:
        raise ValueError(
            f"target_peak_bytes={config.target_peak_bytes:g} needs example_input (the model's input for a batch), "
            "whose first sample is run compressed to measure the peak"
        )
    return quantizers


def _reduce(collected: Collected, reducer: Reducer | None) -> dict[str, ChannelStats]:
    """Stage 2: statistics combined over ranks; every layer must have been reached."""
    if collected.samples == 0:
        raise ValueError("Expected calibration data with at least one sample, got an empty set of batches")
    for obs in collected.observers.values():
        if reducer is not None:
            obs.reduce_(reducer)
    unreached = [name for name, obs in collected.observers.items() if obs.count == 0]
    if unreached:
        raise ValueError(
            f"Layers {unreached} were never reached by the forward pass during calibration, so they cannot be "
            f"calibrated; leave them out with exclude={[f'^{re.escape(n)}$' for n in unreached]}"
        )
    return {name: obs.compute() for name, obs in collected.observers.items()}


def freeze_scales(
    quantizers: Quantizers,
    stats: dict[str, ChannelStats],
    config: DQAConfig,
    important_bits: bool,
    important_only: bool = False,
) -> None:
    """Stage 3: resolve code signedness and (static modes) set clipped per-channel scales.

    With ``important_bits`` the clip of each important channel is searched at ``n + m`` bits, the width it is
    quantized at; otherwise every channel is clipped for ``n`` bits (what the ranking runs with). With
    ``important_only`` only the important channels are clipped again and the others keep the scale already
    frozen (for the same ``n``), which is what a full pass would give them: every rule clips channels
    independently.
    """
    for name, q in quantizers.items():
        st = stats[name]
        if config.code == "auto":
            q.set_signed(bool((st.min < 0).any()))
        if q.passthrough or config.scale_mode == "dynamic":
            continue
        signed = bool(q.signed)
        bits = torch.full_like(st.max_abs, q.n, dtype=torch.int64)
        if important_bits:
            bits = torch.where(q.important.to(bits.device), q.n + q.m, q.n)
        if not important_only:
            max_abs = clip_max(config.clipping, st.max_abs, st.samples, bits, signed, config.percentile)
            q.set_static_scale(scale_from_max(max_abs, q.n, signed))
            continue
        idx = q.important.nonzero().squeeze(1).to(st.max_abs.device)
        if idx.numel():
            max_abs = clip_max(config.clipping, st.max_abs[idx], st.samples[idx], bits[idx], signed, config.percentile)
            scale = q.scale.detach().clone()
            scale[idx.to(scale.device)] = scale_from_max(max_abs, q.n, signed).to(scale)
            q.set_static_scale(scale)


def select_channels(
    quantizers: Quantizers, stats: dict[str, ChannelStats], config: DQAConfig, inputs: RankInputs
) -> None:
    """Stage 4: rank every layer's channels, mark the top ``ratio`` important, re-clip them at ``n + m`` bits."""
    scores = RANKINGS[config.ranking].rank(inputs)
    for name, q in quantizers.items():
        if not q.passthrough:
            q.important.copy_(important_mask(scores[name], config.ratio).to(q.important.device))
    freeze_scales(quantizers, stats, config, important_bits=True, important_only=True)


def allocate_widths(
    quantizers: Quantizers, stats: dict[str, ChannelStats], config: DQAConfig, inputs: RankInputs
) -> Allocation:
    """Stage 4 under ``target_bits``: per-layer ``n``, ratio and ``m`` (:mod:`lightning_dqa.allocation`).

    The plan works on estimates; once scales and error histograms are final, the bits are counted as the meter
    counts them and, while above the budget less its headroom (``Allocation.limit_bits``), the layer that loses
    least per bit saved steps down its options.
    """
    scores = RANKINGS[config.ranking].rank(inputs) if config.selects_channels else None
    allocation = plan(quantizers, stats, config, scores)
    allocation.scores, allocation.target_peak_bytes = scores, config.target_peak_bytes
    changed: list[str] = list(allocation.choices)
    while changed:
        for name in changed:
            _apply_choice(name, quantizers[name], allocation, stats, config)
        _count_bits(quantizers, stats, config, allocation)
        stepped = allocation.step_down() if allocation.achieved_bits > allocation.limit_bits else None
        changed = [stepped] if stepped is not None else []
    return allocation


def _apply_choice(
    name: str, q: ActivationQuantizer, allocation: Allocation, stats: dict[str, ChannelStats], config: DQAConfig
) -> None:
    """Give layer ``name`` its chosen widths and important channels, then its scales and error histogram."""
    choice = allocation.choices[name]
    q.set_widths(choice.bits, choice.extra_bits)
    mask = torch.zeros(q.num_channels, dtype=torch.bool)
    if allocation.scores is not None and choice.important:
        mask = important_mask(allocation.scores[name], choice.important / q.num_channels)
    q.important.copy_(mask.to(q.important.device))
    freeze_scales({name: q}, stats, config, important_bits=True)
    _count_errors(q, stats[name])


def _count_bits(
    quantizers: Quantizers, stats: dict[str, ChannelStats], config: DQAConfig, allocation: Allocation
) -> None:
    """``allocation.achieved_bits``: bits per value of every quantized layer on the calibration sample."""
    static = config.scale_mode != "dynamic"
    total = sum(stored_bits_per_sample(q, stats[n], static) for n, q in quantizers.items())
    allocation.achieved_bits = total / allocation.values_per_sample


def fit_peak(
    model: nn.Module,
    quantizers: Quantizers,
    stats: dict[str, ChannelStats],
    config: DQAConfig,
    allocation: Allocation,
    example_input: Tensor,
    broadcast: Callable[[Tensor], Tensor] | None = None,
) -> None:
    """Stage 7 under ``target_peak_bytes``: step layers down until one sample's measured peak fits.

    Runs the first sample of ``example_input`` through :func:`lightning_dqa.compressed.run_compressed` (real
    blobs, liveness in execution order). While the peak per sample exceeds the limit less
    :data:`~lightning_dqa.allocation.HEADROOM` of it (other samples' blobs code a little longer), the layer whose
    codes are live at the peak step and whose next cheaper option adds the least estimated noise per bit saved
    steps down. Under DDP each rank measures its own sample; rank 0's choices and verdict are then broadcast and
    applied everywhere, so every rank ends equal or every rank raises.

    Raises:
        ValueError: when no layer live at the peak can step down further (the message gives the peak reached,
            its step and what is live there). The quantizers are then left uncalibrated and disabled.

    """
    from lightning_dqa.compressed import run_compressed

    assert config.target_peak_bytes is not None
    limit = config.target_peak_bytes * (1 - HEADROOM)  # other samples' blobs code a little longer, as for bits
    sample = example_input[:1]
    set_quantizers_enabled(model, True)
    try:
        failure = None
        while True:
            _, report = run_compressed(model, sample)
            allocation.peak_bytes = report.stored.nbytes / report.batch
            if allocation.peak_bytes <= limit:
                break
            stepped = allocation.step_down(among=set(report.stored.live_layers))
            if stepped is None:
                live = ", ".join(f"{what} {size} B" for what, size in report.stored.live[:4])
                floor = math.ceil(allocation.peak_bytes / (1 - HEADROOM))
                failure = (
                    f"Expected target_peak_bytes >= {floor} bytes per sample: with every layer whose codes are live "
                    f"at the peak at its cheapest option, the peak is {allocation.peak_bytes:.0f}, at step "
                    f"{report.stored.step!r} (largest live: {live}), and {HEADROOM:.1%} is kept free; got "
                    f"{config.target_peak_bytes:g}"
                )
                break
            _apply_choice(stepped, quantizers[stepped], allocation, stats, config)  # still calibrated: _finish ran
        if broadcast is not None:  # rank 0's verdict and choices hold on every rank
            if _share_choices(quantizers, stats, config, allocation, broadcast, failure):
                failure = failure or f"target_peak_bytes={config.target_peak_bytes:g} is below what rank 0 reached"
            else:
                failure = None
        if failure is not None:
            raise ValueError(failure)
        _count_bits(quantizers, stats, config, allocation)
    except BaseException:
        for q in quantizers.values():
            q.calibrated.fill_(False)
        set_quantizers_enabled(model, False)
        raise


def _share_choices(
    quantizers: Quantizers,
    stats: dict[str, ChannelStats],
    config: DQAConfig,
    allocation: Allocation,
    broadcast: Callable[[Tensor], Tensor],
    failure: str | None,
) -> bool:
    """Rank 0's hull position of every allocated layer applied on every rank; whether rank 0 failed."""
    names = list(allocation.choices)
    mine = [int(failure is not None)] + [allocation.hulls[n].index(allocation.choices[n]) for n in names]
    device = next(iter(quantizers.values())).bits.device
    theirs = broadcast(torch.tensor(mine, dtype=torch.int64, device=device)).cpu().tolist()
    for name, i, j in zip(names, mine[1:], theirs[1:], strict=True):
        if i != j:
            allocation.choices[name] = allocation.hulls[name][j]
            _apply_choice(name, quantizers[name], allocation, stats, config)
    return bool(theirs[0])


def _finish(
    quantizers: Quantizers, stats: dict[str, ChannelStats], broadcast: Callable[[Tensor], Tensor] | None
) -> None:
    """Stage 6: the code book's histogram, ``calibrated`` set, and rank 0's state on every rank."""
    for name, q in quantizers.items():
        _count_errors(q, stats[name])
        q.calibrated.fill_(True)
        if broadcast is None:
            continue
        for buf in q.buffers():
            buf.copy_(broadcast(buf))
        q.sync_mirrors()
        if isinstance(q.scale, nn.Parameter):
            with torch.no_grad():
                q.scale.copy_(broadcast(q.scale.detach()))


@torch.no_grad()
def _count_errors(q: ActivationQuantizer, st: ChannelStats) -> None:
    """Histogram of the shifting errors of important channels on the calibration sample (code book source)."""
    q.error_counts.zero_()
    if q.passthrough or not bool(q.important.any()) or st.samples.shape[1] == 0:
        return
    x = st.samples.t().to(q.scale.device)  # (K, C): channels on dim 1 (== -1), as every quantizer expects
    _, err, _ = q.codes(x)
    q.error_counts.copy_(torch.bincount(err.flatten().long(), minlength=2**q.m)[: 2**q.m])


def _layer_report(name: str, q: ActivationQuantizer, st: ChannelStats) -> LayerReport:
    scale = q.scale.detach().float()
    if q.scale_mode == "dynamic":
        scale = scale_from_max(st.max_abs.float(), q.n, bool(q.signed)) if not q.passthrough else scale
    return LayerReport(
        name=name,
        channels=q.num_channels,
        bits=q.n,
        extra_bits=q.m,
        important=int(q.important.sum()),
        signed=bool(q.signed),
        scale_min=float(scale.min()),
        scale_max=float(scale.max()),
        numel_per_sample=st.numel_per_sample,
    )
