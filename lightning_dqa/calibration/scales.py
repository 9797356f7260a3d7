"""Calibration stages 3 and 4 and the error histograms: scales frozen from statistics, channels selected.

Every rule here works channel by channel on the reduced statistics (:class:`~.observers.ChannelStats`), so the
engine (:mod:`.engine`) and the budget (:mod:`.budget`) call the same functions when a layer's widths change.
"""

from __future__ import annotations

import torch

from lightning_dqa.calibration.clipping import clip_max
from lightning_dqa.calibration.observers import ChannelStats
from lightning_dqa.calibration.selection import RANKINGS, RankInputs, important_mask
from lightning_dqa.core.config import DQAConfig
from lightning_dqa.core.functional import scale_from_max
from lightning_dqa.core.quantizers import ActivationQuantizer

__all__ = ["Quantizers", "count_errors", "freeze_scales", "select_channels"]

Quantizers = dict[str, ActivationQuantizer]


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


@torch.no_grad()
def count_errors(q: ActivationQuantizer, st: ChannelStats) -> None:
    """Histogram of the shifting errors of important channels on the calibration sample (code book source)."""
    q.error_counts.zero_()
    if q.passthrough or not bool(q.important.any()) or st.samples.shape[1] == 0:
        return
    x = st.samples.t().to(q.scale.device)  # (K, C): channels on dim 1 (== -1), as every quantizer expects
    _, err, _ = q.codes(x)
    q.error_counts.copy_(torch.bincount(err.flatten().long(), minlength=2**q.m)[: 2**q.m])
