"""The framework-free DQA engine: install quantizers, calibrate them, freeze the selection.

Calibration runs named stages, each reading what the method and the ranking need from their registries
(:data:`lightning_dqa.calibration.methods.METHODS`, :data:`lightning_dqa.calibration.selection.RANKINGS`,
:data:`lightning_dqa.calibration.clipping.CLIPPINGS`):

1. **collect** (:mod:`lightning_dqa.calibration.collect`): one pass with observers on every quantization point;
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

import re
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dqa.calibration.batches import default_batch_size
from lightning_dqa.calibration.budget import allocate_widths, fit_peak
from lightning_dqa.calibration.collect import Collected, collect
from lightning_dqa.calibration.methods import MethodContext, get_method
from lightning_dqa.calibration.observers import ChannelStats, Reducer
from lightning_dqa.calibration.report import CalibrationReport, layer_report
from lightning_dqa.calibration.scales import Quantizers, count_errors, freeze_scales, select_channels
from lightning_dqa.calibration.selection import RANKINGS, RankInputs
from lightning_dqa.core._checks import is_int
from lightning_dqa.core.attach import quantizers_of, set_quantizers_enabled
from lightning_dqa.core.config import DQAConfig

__all__ = ["calibrate"]

Batch = Any
ForwardFn = Callable[[nn.Module, Batch], Tensor]
LossFn = Callable[[nn.Module, Batch], Tensor]
ObjectiveFn = Callable[[Tensor, Batch], Tensor]
Progress = Callable[[int], None]  # called with the number of samples just consumed


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
            quantizers = _skip_unreached(quantizers, stats)
            order = collected.order + [n for n in quantizers if n not in collected.order]
            freeze_scales(quantizers, stats, config, important_bits=False)
            inputs = RankInputs(
                stats, order, config.seed, model, quantizers, collected.batches, forward_fn, objective_fn,
                progress=rank_progress, reduce_sum=None if reducer is None else (lambda t: reducer(t, "sum")),
            )  # fmt: skip
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
            layers = [layer_report(name, quantizers[name], stats[name]) for name in order]
            rank_seconds = time.perf_counter() - t1
            return CalibrationReport(
                collected.samples, collected.seconds, rank_seconds, order, layers, stats, allocation
            )
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
        not is_int(num_samples) or num_samples <= 0
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
    """Stage 2: statistics combined over ranks, for the layers the forward pass reached."""
    if collected.samples == 0:
        raise ValueError("Expected calibration data with at least one sample, got an empty set of batches")
    for obs in collected.observers.values():
        if reducer is not None:
            obs.reduce_(reducer)
    return {name: obs.compute() for name, obs in collected.observers.items() if obs.count > 0}


def _skip_unreached(quantizers: Quantizers, stats: dict[str, ChannelStats]) -> Quantizers:
    """The quantizers of reached layers; those never reached are made pass-through, with one warning.

    ``nn.MultiheadAttention`` (every torchvision ViT) reads ``out_proj.weight`` without calling ``out_proj``, and
    Swin's attention does the same with its ``qkv`` and ``proj`` layers: no hook of theirs ever fires, so what they
    read cannot be observed. They stay in full precision (``bits = 0``, saved so, so a checkpoint reloads the
    same way), and the counts are reduced over ranks first, so every rank skips the same layers.

    Raises:
        ValueError: when no layer at all was reached (the forward function does not run the model).

    """
    unreached = [name for name in quantizers if name not in stats]
    if not unreached:
        return quantizers
    if len(unreached) == len(quantizers):
        raise ValueError(
            f"None of the {len(quantizers)} quantized layers was reached by the forward pass during calibration: "
            f"does the forward function run the model on the batches?"
        )
    for name in unreached:
        q = quantizers[name]
        q.set_widths(0, int(q.extra_bits))
        q.allocated = False
        q.calibrated.fill_(True)
    warnings.warn(
        f"DQA calibration: layers {unreached} were never called as modules by the forward pass (their weight is "
        f"used directly, as nn.MultiheadAttention does with out_proj, or the data never reached them), so their "
        f"inputs cannot be observed; they stay in full precision. Leave them out with "
        f"exclude={[f'^{re.escape(n)}$' for n in unreached]} to silence this warning",
        stacklevel=3,
    )
    return {name: q for name, q in quantizers.items() if name in stats}


def _finish(
    quantizers: Quantizers, stats: dict[str, ChannelStats], broadcast: Callable[[Tensor], Tensor] | None
) -> None:
    """Stage 6: the code book's histogram, ``calibrated`` set, and rank 0's state on every rank."""
    for name, q in quantizers.items():
        count_errors(q, stats[name])
        q.calibrated.fill_(True)
        if broadcast is None:
            continue
        for buf in q.buffers():
            buf.copy_(broadcast(buf))
        q.sync_mirrors()
        if isinstance(q.scale, nn.Parameter):
            with torch.no_grad():
                q.scale.copy_(broadcast(q.scale.detach()))
