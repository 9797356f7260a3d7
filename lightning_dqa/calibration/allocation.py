"""A memory budget in, per-layer widths out: choose each layer's ``n``, ratio ``r`` and ``m`` under ``target_bits``.

The user states the average stored bits per activation value (``DQAConfig.target_bits``); calibration picks, for
every quantized layer, one option ``(n, r, m)`` (``n`` in 2..8, ``r`` in :data:`RATIOS`, ``m`` in 1..4; ``r = 0``
for ``method="direct"``) so that the estimated loss increase is smallest while the bits stay within the budget.

Cost of an option: the accounting that is logged (:func:`lightning_dqa.deploy.accounting.histogram_bits`): ``n`` bits
per value, the Huffman-coded shifting errors of the important channels (their code book built from the error
histogram the option would produce on the calibration sample) and the side information, per sample.

Damage of an option: the estimated loss increase of its quantization noise, summed over channels. A channel's
error at width ``w`` splits into its mean ``b_c(w)`` (clipping and rounding of skewed values shift a channel on
average) and the rest, of variance ``mse_c(w) - b_c(w)**2``, independent from value to value; under the usual
second-order model the loss grows by half of

    ``F_c * (mse_c(w) - b_c(w)**2) + G_c * b_c(w)**2``,

where ``F_c`` is the channel's summed squared loss gradient (the ``fisher`` statistics) and ``G_c`` the sum over
samples of the squared per-sample gradient sums (``ChannelStats.grad_coherent``): a constant shift adds up
coherently over a feature map's positions, so on large maps it can cost tens to hundreds of times what ``F_c``
says (measured on the CamVid U-Net: ``G_c / F_c`` medians of 4 to 870 per layer; leaving the term out ranked
its layers' measured sensitivities with Spearman 0.50, with it 0.70). ``mse_c`` is measured on 2,048 sampled
values at the clip the configured rule picks for ``w`` bits, ``b_c`` on all sampled values (8,192) at that clip,
its square corrected for the sampling noise of a mean. ``w_c`` is ``n + m`` for the ``round(r * C)`` channels
the ranking puts first and ``n`` for the rest; layers add up.

The solver takes each layer's options on their lower convex hull (cost, noise) and, starting from the cheapest
everywhere, applies the hull step with the largest noise reduction per bit that still fits in the budget,
until none fits (the Lagrangian solution, filled greedily). Layers whose width is fixed by
``first_layer_bits`` / ``last_layer_bits`` or left in full precision keep it, and their bits count against the
budget.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from lightning_dqa.calibration.clipping import clip_max_coarse
from lightning_dqa.calibration.observers import ChannelStats
from lightning_dqa.codec import HuffmanCodebook, bit_count
from lightning_dqa.core import functional as F

if TYPE_CHECKING:
    from lightning_dqa.core.config import DQAConfig
    from lightning_dqa.core.quantizers import ActivationQuantizer

__all__ = [
    "EXTRA_BITS",
    "HEADROOM",
    "RATIOS",
    "WIDTHS",
    "Allocation",
    "LayerOption",
    "allocate",
    "layer_options",
    "plan",
    "stored_bits_per_sample",
]

WIDTHS = tuple(range(2, 9))
RATIOS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
EXTRA_BITS = (1, 2, 3, 4)
MAX_EXTRA_BITS = max(EXTRA_BITS)  # what a loaded checkpoint or artifact may say of an allocated layer: bits in
# WIDTHS, extra_bits in [0, MAX_EXTRA_BITS] (0 when no channel is important)
NOISE_SAMPLES = 2048  # sampled positions per layer used for the estimates
SEARCH_RATIOS = 21  # clip ratios tried per width in the estimates (the final clip uses the full grid)
HEADROOM = 0.005  # fraction of the budget kept free on the calibration sample: the code books come from that
# sample, so other data codes the shifting errors a little longer (seen: up to +0.15 % of the budget on CamVid)


@dataclass(frozen=True)
class LayerOption:
    """One choice for one layer.

    Attributes:
        bits: ``n``.
        ratio: ``r``, the requested fraction of important channels.
        extra_bits: ``m`` (0 when no channel is important).
        important: ``round(r * C)``.
        bits_per_sample: estimated stored bits of the layer's tensor per sample (main codes, errors, side).
        noise: estimated Fisher-weighted quantization noise.

    """

    bits: int
    ratio: float
    extra_bits: int
    important: int
    bits_per_sample: float
    noise: float


@dataclass
class Allocation:
    """The chosen option per layer and the budget it was chosen for.

    Attributes:
        target_bits: the budget, bits per value.
        choices: layer name -> chosen option (layers whose width is fixed are absent).
        fixed_bits_per_sample: bits per sample of the fixed layers.
        values_per_sample: activation values per sample over every quantized layer.
        achieved_bits: bits per value counted on the calibration sample once scales and code books are final.
        limit_bits: what ``achieved_bits`` is held to: ``target_bits`` less :data:`HEADROOM` of it, but never
            below the cheapest option everywhere.

    """

    target_bits: float
    choices: dict[str, LayerOption]
    fixed_bits_per_sample: float
    values_per_sample: int
    hulls: dict[str, list[LayerOption]] = field(repr=False, default_factory=dict)
    achieved_bits: float = float("nan")
    limit_bits: float = float("nan")
    target_peak_bytes: float | None = None
    peak_bytes: float = float("nan")
    scores: dict[str, Tensor] | None = field(repr=False, default=None)

    @property
    def estimated_bits(self) -> float:
        """Estimated average bits per value of the whole allocation."""
        total = self.fixed_bits_per_sample + sum(o.bits_per_sample for o in self.choices.values())
        return total / max(self.values_per_sample, 1)

    def metrics(self) -> dict[str, float]:
        """What the callback logs: the budget, the bits achieved on the calibration sample, each layer's choice."""
        out = {"dqa/target_bits": self.target_bits, "dqa/calibration_bits_per_value": self.achieved_bits}
        if self.target_peak_bytes is not None:
            out["dqa/target_peak_bytes"] = self.target_peak_bytes
            out["dqa/calibration_peak_bytes"] = self.peak_bytes
        for layer, choice in self.choices.items():
            out[f"dqa/layer/{layer}/bits"] = float(choice.bits)
            out[f"dqa/layer/{layer}/extra_bits"] = float(choice.extra_bits)
            out[f"dqa/layer/{layer}/important"] = float(choice.important)
        return out

    def step_down(self, among: Collection[str] | None = None) -> str | None:
        """Move the layer whose next cheaper hull option adds the least noise per bit saved; its name, or ``None``.

        Used when the bits measured after calibration exceed the budget the estimates kept to, and, with
        ``among`` (the layers whose codes are live at the peak), while the peak exceeds ``target_peak_bytes``.
        """
        best, best_cost = None, math.inf
        for name, choice in self.choices.items():
            if among is not None and name not in among:
                continue
            hull = self.hulls[name]
            i = hull.index(choice)
            if i == 0:
                continue
            saved = choice.bits_per_sample - hull[i - 1].bits_per_sample
            cost = (hull[i - 1].noise - choice.noise) / max(saved, 1e-12)
            if cost < best_cost:
                best, best_cost = name, cost
        if best is not None:
            hull = self.hulls[best]
            self.choices[best] = hull[hull.index(self.choices[best]) - 1]
        return best


def _width_table(
    values: Tensor, max_abs: Tensor, signed: bool, clipping: str, percentile: float, bias_values: Tensor | None = None
) -> tuple[dict[int, Tensor], dict[int, Tensor], dict[int, Tensor]]:
    """Per width ``w`` in 2..12: ``(C,)`` squared error, ``(C, K)`` codes and ``(C,)`` squared bias of the values.

    The mean squared error and the int64 codes are of ``values (C, K)``; the squared mean error (bias) is of
    ``bias_values (C, K')`` (``values`` when ``None``), at the clip searched on ``values``. The squared bias is
    corrected for the sampling noise of a mean (``var / (K' - 1)`` subtracted, floored at 0): it is multiplied by
    gradient sums that can be hundreds of times the per-value ones.
    """
    bias_values = values if bias_values is None else bias_values
    k = bias_values.shape[1]
    mse: dict[int, Tensor] = {}
    codes: dict[int, Tensor] = {}
    bias_sq: dict[int, Tensor] = {}
    for w in range(min(WIDTHS), max(WIDTHS) + max(EXTRA_BITS) + 1):
        bits = torch.full_like(max_abs, w, dtype=torch.int64)
        clip = clip_max_coarse(clipping, max_abs, values, bits, signed, percentile, SEARCH_RATIOS)
        scale = F.scale_from_max(clip, w, signed)[:, None]
        lo, hi = F.quant_range(w, signed)
        q = torch.clamp(torch.round(values / scale), lo, hi)
        mse[w] = (q * scale - values).square().mean(dim=1).double()
        codes[w] = q.long()
        err = (torch.clamp(torch.round(bias_values / scale), lo, hi) * scale - bias_values).double()
        mean = err.mean(dim=1) if k else torch.zeros_like(mse[w])
        spread = err.var(dim=1) / (k - 1) if k > 1 else torch.zeros_like(mse[w])
        bias_sq[w] = (mean.square() - spread).clamp_min(0.0)
    return mse, codes, bias_sq


def layer_options(
    stats: ChannelStats,
    scores: Tensor | None,
    signed: bool,
    clipping: str,
    percentile: float,
    static_scales: bool,
) -> list[LayerOption]:
    """Every option of one layer with its estimated cost and noise.

    Args:
        stats: the layer's reduced calibration statistics (sample, Fisher sums, values per sample).
        scores: ``(C,)`` ranking scores (higher: more important), or ``None`` for direct quantization only.
        signed: code signedness.
        clipping: the clipping rule (``DQAConfig.clipping``).
        percentile: its percentile.
        static_scales: scales are stored once (static/learnable) rather than per sample (dynamic).

    """
    values = stats.samples[:, :NOISE_SAMPLES].float().cpu()
    max_abs = stats.max_abs.float().cpu()
    channels = max_abs.numel()
    weights = stats.grad_sq.double().cpu() if stats.grad_seen else torch.ones(channels, dtype=torch.float64)
    coherent = stats.grad_coherent.double().cpu() if stats.grad_seen else None
    mse, codes, bias_sq = _width_table(values, max_abs, signed, clipping, percentile, stats.samples.float().cpu())
    # (C,) noise per width: a channel's constant error (bias) weighs by its squared per-sample gradient sums,
    # the rest of the error by the summed squared gradients (the second-order loss change, halved, per channel).
    if coherent is None:
        noise = {w: weights * e for w, e in mse.items()}
    else:
        noise = {w: weights * (e - bias_sq[w]).clamp_min(0.0) + coherent * bias_sq[w] for w, e in mse.items()}
    if scores is None:
        order = torch.arange(channels)
    else:
        order = torch.sort(scores.float().cpu(), descending=True, stable=True).indices
    numel = stats.numel_per_sample
    side = 0.0 if static_scales else float(F.SCALE_BITS * channels)
    options = []
    for n in WIDTHS:
        base = float(noise[n].sum())
        options.append(LayerOption(n, 0.0, 0, 0, n * numel + side, base))
        if scores is None:
            continue
        for m in EXTRA_BITS:
            gain = (noise[n + m] - noise[n])[order].cumsum(0)  # (C,) noise change of the top k
            errors = codes[n + m][order] & (2**m - 1)  # (C, K) shifting errors, channels in rank order
            hist = torch.zeros(channels, 2**m, dtype=torch.int64).scatter_add_(1, errors, torch.ones_like(errors))
            hist = hist.cumsum(0)  # row k-1: the histogram of the top k channels
            for r in RATIOS[1:]:
                k = int(round(r * channels))
                if k == 0:
                    continue
                bits = n * numel + side + _error_bits(hist[k - 1].numpy(), numel * k / channels)
                options.append(LayerOption(n, r, m, k, bits, base + float(gain[k - 1])))
    return options


def _hull(options: list[LayerOption]) -> list[LayerOption]:
    """The options on the lower convex hull of (bits, noise), cheapest first."""
    best: list[LayerOption] = []
    for o in sorted(options, key=lambda o: (o.bits_per_sample, o.noise)):
        if best and o.noise >= best[-1].noise:
            continue  # dominated: costs no less, reduces nothing
        while len(best) >= 2:
            a, b = best[-2], best[-1]
            # b lies on or above the segment a -> o: not on the hull
            if (b.noise - a.noise) * (o.bits_per_sample - a.bits_per_sample) >= (o.noise - a.noise) * (
                b.bits_per_sample - a.bits_per_sample
            ):
                best.pop()
            else:
                break
        best.append(o)
    return best


def solve(hulls: dict[str, list[LayerOption]], budget_bits: float) -> dict[str, LayerOption]:
    """The hull step with the most noise removed per bit, repeatedly, while it fits in ``budget_bits``."""
    at = dict.fromkeys(hulls, 0)
    spent = sum(h[0].bits_per_sample for h in hulls.values())
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        h, i = hulls[name], at[name]
        if i + 1 < len(h):
            gain = (h[i].noise - h[i + 1].noise) / max(h[i + 1].bits_per_sample - h[i].bits_per_sample, 1e-12)
            heapq.heappush(heap, (-gain, name))

    for name in hulls:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        h, i = hulls[name], at[name]
        step = h[i + 1].bits_per_sample - h[i].bits_per_sample
        if spent + step > budget_bits:
            continue  # this layer's next step does not fit; cheaper steps of other layers still may
        spent += step
        at[name] = i + 1
        push(name)
    return {name: hulls[name][i] for name, i in at.items()}


def allocate(
    options: dict[str, list[LayerOption]],
    fixed_bits_per_sample: float,
    values_per_sample: int,
    target_bits: float,
    headroom: float = HEADROOM,
) -> Allocation:
    """Choose one option per layer so that the estimated bits per value stay within ``target_bits``.

    Args:
        options: per allocatable layer, its options (:func:`layer_options`).
        fixed_bits_per_sample: bits per sample of the layers whose width is fixed.
        values_per_sample: values per sample over every quantized layer (fixed ones included).
        target_bits: the budget in bits per value.
        headroom: fraction of the budget left unspent (:data:`HEADROOM`), as far as the cheapest options allow.

    Raises:
        ValueError: when even the cheapest option everywhere exceeds the budget (the message gives that minimum).

    """
    budget = target_bits * values_per_sample - fixed_bits_per_sample
    cheapest = sum(min(o.bits_per_sample for o in opts) for opts in options.values())
    if cheapest > budget + 1e-9:
        minimum = (cheapest + fixed_bits_per_sample) / values_per_sample
        raise ValueError(
            f"Expected target_bits >= {math.ceil(minimum * 1000) / 1000:.3f} (2-bit codes on every layer whose "
            f"width is not fixed, plus the fixed layers), got {target_bits}"
        )
    limit = max(budget - headroom * target_bits * values_per_sample, cheapest)
    hulls = {name: _hull(opts) for name, opts in options.items()}
    limit_bits = (limit + fixed_bits_per_sample) / values_per_sample
    return Allocation(
        target_bits, solve(hulls, limit), fixed_bits_per_sample, values_per_sample, hulls, limit_bits=limit_bits
    )


def stored_bits_per_sample(q: ActivationQuantizer, stats: ChannelStats, static_scales: bool) -> float:
    """A calibrated layer's stored bits per sample as the meter counts them, errors from its ``error_counts``.

    Main codes ``n`` bits per value (32 for a layer left in full precision), the important channels' errors at
    their Huffman code's mean length on the calibration sample, the code book and per-sample scales (dynamic).
    """
    numel = stats.numel_per_sample
    if q.passthrough:
        return 32.0 * numel
    bits = float(q.n * numel) + (0.0 if static_scales else float(F.SCALE_BITS * q.num_channels))
    return bits + _error_bits(q.error_counts.cpu().numpy(), numel * int(q.important.sum()) / q.num_channels)


def _error_bits(counts: np.ndarray, values: float) -> float:
    """Bits of ``values`` shifting errors distributed as ``counts``, Huffman-coded with their own book, plus the book.

    The rule :func:`~lightning_dqa.deploy.accounting.histogram_bits` applies,
    for a fractional number of values per sample.
    """
    total = int(counts.sum())
    if values == 0 or total == 0:
        return 0.0
    book = HuffmanCodebook.from_counts(counts)
    return values * bit_count(counts, book) / total + book.size_bits


def plan(
    quantizers: dict[str, ActivationQuantizer],
    stats: dict[str, ChannelStats],
    config: DQAConfig,
    scores: dict[str, Tensor] | None,
) -> Allocation:
    """Options for every allocated layer (:attr:`ActivationQuantizer.allocated`), then :func:`allocate`."""
    assert config.target_bits is not None
    static = config.scale_mode != "dynamic"
    options, fixed, values = {}, 0.0, 0
    for name, q in quantizers.items():
        st = stats[name]
        values += st.numel_per_sample
        if not q.allocated:
            fixed += stored_bits_per_sample(q, st, static)  # fixed width, direct (no important channels)
            continue
        layer_scores = None if scores is None else scores[name]
        options[name] = layer_options(st, layer_scores, bool(q.signed), config.clipping, config.percentile, static)
    allocation = allocate(options, fixed, values, config.target_bits)
    return dataclasses.replace(allocation, scores=scores, target_peak_bytes=config.target_peak_bytes)
