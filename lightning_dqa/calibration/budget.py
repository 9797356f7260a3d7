"""Calibration under a memory budget: per-layer widths for ``target_bits``, then stepped down for ``target_peak_bytes``.

:func:`allocate_widths` is stage 4 when ``DQAConfig.target_bits`` is set (the plan of :mod:`.allocation`, then
counted as the meter counts); :func:`fit_peak` is stage 7 under ``target_peak_bytes``, which runs one calibration
sample through the compressed runtime (:func:`lightning_dqa.deploy.compressed.run_compressed`, or
:func:`lightning_dqa.deploy.banded.run_banded` with ``peak_runtime="banded"``) and steps down the layers live at
the measured peak until it fits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_dqa.calibration.allocation import HEADROOM, Allocation, plan, stored_bits_per_sample
from lightning_dqa.calibration.observers import ChannelStats
from lightning_dqa.calibration.scales import Quantizers, count_errors, freeze_scales
from lightning_dqa.calibration.selection import RANKINGS, RankInputs, important_mask
from lightning_dqa.core.attach import set_quantizers_enabled
from lightning_dqa.core.config import DQAConfig
from lightning_dqa.core.quantizers import ActivationQuantizer
from lightning_dqa.deploy.banded import run_banded
from lightning_dqa.deploy.compressed import run_compressed

__all__ = ["allocate_widths", "fit_peak"]


def allocate_widths(
    quantizers: Quantizers, stats: dict[str, ChannelStats], config: DQAConfig, inputs: RankInputs
) -> Allocation:
    """Stage 4 under ``target_bits``: per-layer ``n``, ratio and ``m`` (:mod:`lightning_dqa.calibration.allocation`).

    The plan works on estimates; once scales and error histograms are final, the bits are counted as the meter
    counts them and, while above the budget less its headroom (``Allocation.limit_bits``), the layer that loses
    least per bit saved steps down its options.
    """
    scores = RANKINGS[config.ranking].rank(inputs) if config.selects_channels else None
    allocation = plan(quantizers, stats, config, scores)
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
    count_errors(q, stats[name])


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

    Runs the first sample of ``example_input`` through :func:`lightning_dqa.deploy.compressed.run_compressed` (real
    blobs, liveness in execution order), or with ``config.peak_runtime == "banded"`` through
    :func:`lightning_dqa.deploy.banded.run_banded` (the arena's size; the layers live are those whose blobs are
    live at its fullest step). While the peak per sample exceeds the limit less
    :data:`~.allocation.HEADROOM` of it (other samples' blobs code a little longer), the layer whose
    codes are live at the peak step and whose next cheaper option adds the least estimated noise per bit saved
    steps down. Under DDP each rank measures its own sample; rank 0's choices and verdict are then broadcast and
    applied everywhere, so every rank ends equal or every rank raises.

    Raises:
        ValueError: when no layer live at the peak can step down further (the message gives the peak reached,
            its step and what is live there). The quantizers are then left uncalibrated and disabled.

    """
    assert config.target_peak_bytes is not None
    limit = config.target_peak_bytes * (1 - HEADROOM)  # other samples' blobs code a little longer, as for bits
    sample = example_input[:1]
    set_quantizers_enabled(model, True)
    try:
        failure = None
        while True:
            peak = _measure(model, sample, config.peak_runtime)
            allocation.peak_bytes = peak.nbytes
            if allocation.peak_bytes <= limit:
                break
            stepped = allocation.step_down(among=set(peak.live_layers))
            if stepped is None:
                live = ", ".join(f"{what} {size} B" for what, size in peak.live[:4])
                floor = math.ceil(allocation.peak_bytes / (1 - HEADROOM))
                failure = (
                    f"Expected target_peak_bytes >= {floor} bytes per sample: with every layer whose codes are live "
                    f"at the peak at its cheapest option, the {config.peak_runtime} runtime's peak is "
                    f"{allocation.peak_bytes:.0f}, at step {peak.step!r} (largest live: {live}), and {HEADROOM:.1%} "
                    f"is kept free; got {config.target_peak_bytes:g}"
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


@dataclass(frozen=True)
class _Peak:
    """One sample's measured peak: its bytes, the step it sits at, what is live there and which layers' codes."""

    nbytes: float
    step: str
    live: list[tuple[str, int]]
    live_layers: list[str]


def _measure(model: nn.Module, sample: Tensor, runtime: str) -> _Peak:
    """The peak of ``sample`` (one image) under ``runtime``: ``layer`` (run_compressed) or ``banded`` (run_banded)."""
    if runtime == "banded":
        _, banded = run_banded(model, sample)
        step = banded.peak_step()
        return _Peak(
            banded.peak / banded.batch, "" if step is None else banded.steps[step], banded.at_peak(),
            banded.live_layers,
        )  # fmt: skip
    _, report = run_compressed(model, sample)
    return _Peak(report.stored.nbytes / report.batch, report.stored.step, report.stored.live, report.stored.live_layers)


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
