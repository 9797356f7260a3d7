"""Calibration stage 1: one pass over the calibration batches with an observer on every quantization point.

The model runs with its quantizers off. Each observer folds per-channel statistics of its tensor
(:mod:`lightning_dqa.calibration.observers`); when the ranking needs activation gradients the pass runs a backward
through ``loss_fn`` with ``torch.autograd.grad`` (parameter gradients are never touched). What the method or
the ranking asks for is kept on the side: raw inputs per layer (NoisyQuant) or the batches (greedy).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dqa.calibration.batches import clone_inference, default_batch_size, truncate
from lightning_dqa.calibration.observers import EXTRAS, ChannelStatsObserver
from lightning_dqa.calibration.sampling import sample_keys
from lightning_dqa.core.attach import QUANTIZER_ATTR, find_quant_points, tap
from lightning_dqa.core.config import DQAConfig
from lightning_dqa.core.shared import SHARED_ATTR, is_leading, shared_mode

__all__ = ["Collected", "collect"]

Batch = Any
ForwardFn = Callable[[nn.Module, Batch], Any]
LossFn = Callable[[nn.Module, Batch], Tensor]


def _extras(config: DQAConfig) -> tuple[str, ...]:
    """The optional statistics (:data:`~lightning_dqa.calibration.observers.EXTRAS`) that ``config`` reads.

    Each is read only by the ranking of the same name.
    """
    return (config.ranking,) if config.selects_channels and config.ranking in EXTRAS else ()


@dataclass
class Collected:
    """What the statistics pass gathered (on this rank).

    Attributes:
        observers: one observer per quantization point, by layer name (state not yet reduced over ranks).
        order: layers in the order the forward pass reached them.
        samples: calibration samples read.
        seconds: wall time of the pass.
        inputs: per layer, the first raw inputs of its quantized tensor (``keep_inputs`` samples).
        batches: the batches read (only when asked to keep them).

    """

    observers: dict[str, ChannelStatsObserver]
    order: list[str] = field(default_factory=list)
    samples: int = 0
    seconds: float = 0.0
    inputs: dict[str, Tensor] = field(default_factory=dict)
    batches: list[Batch] = field(default_factory=list)


class _Taps:
    """Forward taps feeding the observers; keep the first raw inputs and the tensors awaiting gradients."""

    def __init__(self, model: nn.Module, config: DQAConfig, keep_inputs: int) -> None:
        points = find_quant_points(model, config)
        self.observers = {
            p.name: ChannelStatsObserver(
                p.num_channels,
                p.channel_dim,
                track_gradients=config.needs_gradients,
                name=p.name,
                seed=config.seed + i,
                extras=_extras(config),
            )
            for i, p in enumerate(points)
        }
        self.order: list[str] = []
        self.awaiting_grad: list[Tensor] = []
        self.kept: dict[str, list[Tensor]] = {p.name: [] for p in points}
        self.keep_inputs = keep_inputs
        self.handles = [tap(p.layer, p.where, self._hook(p.name)) for p in points]
        by_quantizer = {id(getattr(p.layer, QUANTIZER_ATTR, None)): p.name for p in points}
        for producer in model.modules():  # a skip stored as a layer's codes that another layer reads too
            name = by_quantizer.get(id(producer.__dict__.get(SHARED_ATTR)))
            codes = name is not None and is_leading(producer) and shared_mode(producer) == "codes"
            if codes and config.needs_gradients:
                self.handles.append(producer.register_forward_hook(self._skip_hook(name)))

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
                self.awaiting_grad.append(x)
            have = sum(t.shape[0] for t in self.kept[name])
            if have < self.keep_inputs:
                self.kept[name].append(x.detach()[: self.keep_inputs - have].clone())
            return replaced

        return fn

    def _skip_hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        """The forward hook on a leading shared value's producer: layer ``name`` takes its channels' gradients.

        Only with ``shared_values="codes"``: every reader then reads the layer's DQA codes, whose important
        channels this ranking picks. ``int8`` and ``uniform`` codes have none; the important channels act only
        in the layer's own re-quantization, which the concatenation's gradient ranks.
        """

        def fn(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
            if isinstance(output, Tensor) and output.requires_grad:
                self.observers[name].gradient_from(output, 0)

        return fn

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def collect(
    model: nn.Module,
    config: DQAConfig,
    batches: Iterable[Batch],
    *,
    forward_fn: ForwardFn,
    loss_fn: LossFn | None = None,
    num_samples: int | None = None,
    batch_size_fn: Callable[[Batch], int] = default_batch_size,
    progress: Callable[[int], None] | None = None,
    keep_inputs: int = 0,
    keep_batches: bool = False,
) -> Collected:
    """Run the statistics pass: read batches until ``num_samples`` samples (the last batch truncated).

    Args:
        model: the model, quantizers installed and switched off, in eval mode.
        config: the settings (which points, whether gradients are needed, the seed).
        batches: calibration batches.
        forward_fn: ``forward_fn(model, batch)`` runs the model.
        loss_fn: ``loss_fn(model, batch)``, a scalar loss; used when ``config.needs_gradients``.
        num_samples: samples to read; ``None`` reads every batch.
        batch_size_fn: counts the samples of a batch.
        progress: called after each batch with its number of samples.
        keep_inputs: raw inputs to keep per layer.
        keep_batches: keep the batches read (for search-based rankings).

    Returns:
        The :class:`Collected` state.

    """
    taps = _Taps(model, config, keep_inputs)
    out = Collected(taps.observers)
    t0 = time.perf_counter()
    try:
        for batch in batches:
            if num_samples is not None and out.samples >= num_samples:
                break
            size = batch_size_fn(batch)
            if num_samples is not None and out.samples + size > num_samples:
                batch, size = truncate(batch, num_samples - out.samples), num_samples - out.samples
            keys = sample_keys(batch, size, config.seed)
            for obs in taps.observers.values():
                obs.set_batch_keys(keys)
            _observe(model, batch, taps, forward_fn, loss_fn if config.needs_gradients else None)
            if keep_batches:
                out.batches.append(batch)
            out.samples += size
            if progress is not None:
                progress(size)
    finally:
        taps.remove()
    out.order, out.seconds = taps.order, time.perf_counter() - t0
    out.inputs = {name: torch.cat(kept) for name, kept in taps.kept.items() if kept}
    return out


def _observe(model: nn.Module, batch: Batch, taps: _Taps, forward_fn: ForwardFn, loss_fn: LossFn | None) -> None:
    """One batch through the model; with ``loss_fn``, also the activation gradients."""
    if loss_fn is None:
        with torch.no_grad():
            forward_fn(model, batch)
        taps.awaiting_grad = []
        return
    # Lightning evaluates under inference_mode, which enable_grad alone does not lift; tensors made inside it
    # (the batch) cannot join autograd, so they are cloned out of it.
    with torch.inference_mode(False), torch.enable_grad():
        loss = loss_fn(model, clone_inference(batch))
        acts, taps.awaiting_grad = taps.awaiting_grad, []
        if acts:
            torch.autograd.grad(loss, acts, allow_unused=True)
    taps.awaiting_grad = []
