"""The framework-free DQA engine: install quantizers, calibrate them, freeze the selection.

Flow (``STYLE.md``): calibration statistics (:mod:`observers`) -> scales and clipping (:mod:`clipping`) ->
channel selection (:mod:`selection`, :mod:`greedy`) -> frozen quantizer buffers (:mod:`quantizers`).

Usable on any ``nn.Module`` without a Trainer::

    quantizers = prepare(model, config)
    report = calibrate(model, config, loader, forward_fn=lambda m, b: m(b[0]), num_samples=1000,
                       loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]))

The Lightning callback passes its strategy's reduce/broadcast so that every rank ends with the same state.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dqa.attach import attach_quantizers, find_quant_points, quantizers_of, tap
from lightning_dqa.clipping import clip_max
from lightning_dqa.config import DQAConfig
from lightning_dqa.functional import scale_from_max
from lightning_dqa.observers import ChannelStats, ChannelStatsObserver, Reducer
from lightning_dqa.quantizers import ActivationQuantizer
from lightning_dqa.selection import important_mask, rank_channels

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

    """

    samples: int
    stats_seconds: float
    rank_seconds: float
    order: list[str]
    layers: list[LayerReport]
    stats: dict[str, ChannelStats] = field(repr=False, default_factory=dict)

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


def default_batch_size(batch: Batch) -> int:
    """Samples in a batch: the first dimension of its first tensor (tuples, lists and dicts are searched)."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, list | tuple) else ()
    for item in items:
        try:
            return default_batch_size(item)
        except TypeError:
            continue
    raise TypeError(f"Cannot find a tensor in a batch of type {type(batch).__name__} to count its samples")


def prepare(model: nn.Module, config: DQAConfig) -> dict[str, ActivationQuantizer]:
    """Install (uncalibrated, disabled) quantizers on ``model`` as ``config`` says; returns them by name."""
    factory = None
    if config.method == "noisyquant":
        from lightning_dqa.noisyquant import noisyquant_factory

        factory = noisyquant_factory(config)
    quantizers = attach_quantizers(model, config, factory)
    set_quantizers_enabled(model, False)
    return quantizers


def set_quantizers_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every installed quantizer on (fake quantization) or off (full precision pass-through)."""
    for q in quantizers_of(model).values():
        q.enabled = enabled


class _Collector:
    """Observers on every quantization point for one statistics pass; keeps the first raw inputs on request."""

    def __init__(self, model: nn.Module, config: DQAConfig, keep_inputs: int) -> None:
        points = {p.name: p for p in find_quant_points(model, config)}
        self.observers = {
            name: ChannelStatsObserver(
                p.num_channels,
                p.channel_dim,
                track_gradients=config.needs_gradients,
                name=name,
                generator_seed=config.seed + i,
            )
            for i, (name, p) in enumerate(points.items())
        }
        self.order: list[str] = []
        self.activations: list[Tensor] = []
        self.kept: dict[str, list[Tensor]] = {name: [] for name in points}
        self.keep_inputs = keep_inputs
        self.handles = [tap(p.layer, p.where, self._hook(name)) for name, p in points.items()]

    def _hook(self, name: str) -> Callable[[Tensor], Tensor | None]:
        def fn(x: Tensor) -> Tensor | None:
            replaced = None
            if self.observers[name].track_gradients and torch.is_grad_enabled() and not x.requires_grad:
                # Nothing upstream needs gradients (e.g. the image): a leaf lets dL/dx reach this layer.
                x = replaced = x.detach().requires_grad_(True)
            if name not in self.order:
                self.order.append(name)
            self.observers[name](x)
            if x.requires_grad:
                self.activations.append(x)
            kept = self.kept[name]
            have = sum(t.shape[0] for t in kept)
            if have < self.keep_inputs:
                kept.append(x.detach()[: self.keep_inputs - have].clone())
            return replaced

        return fn

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def calibrate(*args: Any, **kwargs: Any) -> CalibrationReport:
    """Collect statistics, rank channels, freeze scales and selection, and switch the quantizers on.

    Runs outside ``torch.inference_mode`` (Lightning evaluates under it, and tensors created there could
    neither update statistics in place later nor join autograd). See :func:`_calibrate` for the arguments.
    """
    model = args[0] if args else kwargs["model"]
    was_training = model.training
    try:
        with torch.inference_mode(False):
            return _calibrate(*args, **kwargs)
    finally:
        model.train(was_training)


def _calibrate(
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
) -> CalibrationReport:
    """Collect statistics, rank channels, freeze scales and selection, and switch the quantizers on.

    The model runs in eval mode (BatchNorm uses its running statistics) with quantizers off; its training
    mode is restored afterwards. Parameter gradients are never touched: activation gradients for the
    ``fisher`` and ``saliency`` rankings come from ``torch.autograd.grad``.

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

    Returns:
        A :class:`CalibrationReport`.

    Raises:
        ValueError: when the model has no quantizers, the data is empty, activations are not finite, or
            a ranking lacks what it needs.

    """
    quantizers = quantizers_of(model)
    if not quantizers:
        raise ValueError("Expected a model with quantizers installed (call prepare(model, config) first), found none")
    if num_samples is not None and num_samples <= 0:
        raise ValueError(f"Expected num_samples to be a positive int or None, got {num_samples!r}")
    if config.needs_gradients and loss_fn is None:
        raise ValueError(f"Ranking {config.ranking!r} needs gradients: pass loss_fn")
    needs_greedy = config.method == "dqa" and config.ratio > 0 and config.ranking == "greedy"
    if needs_greedy and objective_fn is None:
        raise ValueError("Ranking 'greedy' needs objective_fn(output, batch) to score candidates")

    was_training = model.training
    model.eval()
    set_quantizers_enabled(model, False)
    keep = 256 if config.method == "noisyquant" else 0
    collector = _Collector(model, config, keep_inputs=keep)
    used: list[Batch] = []
    seen = 0
    t0 = time.perf_counter()
    try:
        for batch in batches:
            if num_samples is not None and seen >= num_samples:
                break
            size = batch_size_fn(batch)
            if num_samples is not None and seen + size > num_samples:
                batch = _truncate(batch, num_samples - seen)
                size = num_samples - seen
            if config.needs_gradients:
                assert loss_fn is not None
                # Lightning evaluates under inference_mode, which enable_grad alone does not lift; tensors
                # made inside it (the batch) cannot join autograd, so they are cloned out of it.
                with torch.inference_mode(False), torch.enable_grad():
                    loss = loss_fn(model, _clone_inference(batch))
                    acts, collector.activations = collector.activations, []
                    if acts:
                        torch.autograd.grad(loss, acts, allow_unused=True)
            else:
                with torch.no_grad():
                    forward_fn(model, batch)
            collector.activations = []
            if needs_greedy:
                used.append(batch)
            seen += size
            if progress is not None:
                progress(size)
    finally:
        collector.remove()
    stats_seconds = time.perf_counter() - t0
    if seen == 0:
        raise ValueError("Expected calibration data with at least one sample, got an empty set of batches")

    t1 = time.perf_counter()
    for obs in collector.observers.values():
        if reducer is not None:
            obs.reduce_(reducer)
    unreached = [name for name, obs in collector.observers.items() if obs.count == 0]
    if unreached:
        raise ValueError(
            f"Layers {unreached} were never reached by the forward pass during calibration, so they cannot be "
            f"calibrated; leave them out with exclude={[f'^{re.escape(n)}$' for n in unreached]}"
        )
    stats = {name: obs.compute() for name, obs in collector.observers.items()}
    order = collector.order + [n for n in quantizers if n not in collector.order]
    _freeze_scales(quantizers, stats, config, important_bits=False)

    if config.method == "dqa" and config.ratio > 0:
        scores = _rank(model, quantizers, stats, order, config, used, forward_fn, objective_fn)
        for name, q in quantizers.items():
            if not q.passthrough:
                q.important.copy_(important_mask(scores[name], config.ratio).to(q.important.device))
        _freeze_scales(quantizers, stats, config, important_bits=True)
    if config.method == "noisyquant":
        from lightning_dqa.noisyquant import search_noisyquant

        points = {p.name: p for p in find_quant_points(model, config)}
        for name, q in quantizers.items():
            inputs = torch.cat(collector.kept[name]) if collector.kept[name] else None
            if inputs is not None and not q.passthrough:
                search_noisyquant(points[name], q, inputs, config)

    for name, q in quantizers.items():
        _count_errors(q, stats[name])
        q.calibrated.fill_(True)
        if broadcast is not None:
            for buf in q.buffers():
                buf.copy_(broadcast(buf))
            if isinstance(q.scale, nn.Parameter):
                with torch.no_grad():
                    q.scale.copy_(broadcast(q.scale.detach()))
    set_quantizers_enabled(model, True)
    model.train(was_training)
    rank_seconds = time.perf_counter() - t1
    layers = [_layer_report(name, quantizers[name], stats[name]) for name in order]
    return CalibrationReport(seen, stats_seconds, rank_seconds, order, layers, stats)


def _clone_inference(batch: Batch) -> Batch:
    """The batch with every inference-mode tensor replaced by an ordinary copy."""
    if isinstance(batch, Tensor):
        return batch.clone() if batch.is_inference() else batch
    if isinstance(batch, dict):
        return {k: _clone_inference(v) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_clone_inference(v) for v in batch)
    return batch


def _truncate(batch: Batch, n: int) -> Batch:
    """The first ``n`` samples of a batch (tensors, tuples, lists and dicts of them)."""
    if isinstance(batch, Tensor):
        return batch[:n]
    if isinstance(batch, dict):
        return {k: _truncate(v, n) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_truncate(v, n) for v in batch)
    return batch


def _freeze_scales(
    quantizers: dict[str, ActivationQuantizer], stats: dict[str, ChannelStats], config: DQAConfig, important_bits: bool
) -> None:
    """Resolve code signedness and (static modes) set clipped per-channel scales.

    With ``important_bits`` the clip of each important channel is searched at ``n + m`` bits, the width it is
    quantized at; otherwise every channel is clipped for ``n`` bits (what the ranking runs with).
    """
    for name, q in quantizers.items():
        st = stats[name]
        if config.code == "auto":
            q.signed.fill_(bool((st.min < 0).any()))
        if q.passthrough or config.scale_mode == "dynamic":
            continue
        signed = bool(q.signed)
        bits = torch.full_like(st.max_abs, q.n, dtype=torch.int64)
        if important_bits:
            bits = torch.where(q.important.to(bits.device), q.n + q.m, q.n)
        max_abs = clip_max(config.clipping, st.max_abs, st.samples, bits, signed, config.percentile)
        q.set_static_scale(scale_from_max(max_abs, q.n, signed))


def _rank(
    model: nn.Module,
    quantizers: dict[str, ActivationQuantizer],
    stats: dict[str, ChannelStats],
    order: list[str],
    config: DQAConfig,
    used: list[Batch],
    forward_fn: ForwardFn,
    objective_fn: ObjectiveFn | None,
) -> dict[str, Tensor]:
    """Scores ``(C,)`` per layer from the configured ranking."""
    if config.ranking == "greedy":
        from lightning_dqa.greedy import greedy_rank

        assert objective_fn is not None
        return greedy_rank(model, quantizers, order, used, forward_fn, objective_fn)
    out = {}
    for i, name in enumerate(order):
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + i)
        out[name] = rank_channels(config.ranking, stats[name], gen, layer=name)
    return out


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
