"""What calibration decided, layer by layer: the report :func:`~lightning_dqa.calibration.engine.calibrate` returns.

The callback prints :meth:`CalibrationReport.summary` at the end of calibration; its first line also says whether
the byte path runs its native kernel (:func:`lightning_dqa.codec.native.native_status`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lightning_dqa.calibration.allocation import Allocation
from lightning_dqa.calibration.observers import ChannelStats
from lightning_dqa.codec.native import native_status
from lightning_dqa.core.config import DQAConfig
from lightning_dqa.core.functional import scale_from_max
from lightning_dqa.core.quantizers import ActivationQuantizer

__all__ = ["CalibrationReport", "LayerReport", "layer_report"]


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
        objective: what the gradient statistics or the greedy score were computed from (set by the caller that
            chose it, e.g. the callback's ``training_step`` or the label-free output objective); empty if unknown.

    """

    samples: int
    stats_seconds: float
    rank_seconds: float
    order: list[str]
    layers: list[LayerReport]
    stats: dict[str, ChannelStats] = field(repr=False, default_factory=dict)
    allocation: Allocation | None = None
    objective: str = ""

    def summary(self, config: DQAConfig, samples: int | None = None) -> str:
        """One line on what ran (``samples`` over all ranks; default: this rank's), then :meth:`table`."""
        return (
            f"DQA calibration: {self.samples if samples is None else samples} samples, statistics "
            f"{self.stats_seconds:.1f}s, ranking {self.rank_seconds:.1f}s ({config.method}, {config.ranking}, "
            f"{self._widths(config)}; byte path: {native_status()})\n"
            + (f"objective: {self.objective}\n" if self.objective else "")
            + self.table()
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


def layer_report(name: str, q: ActivationQuantizer, st: ChannelStats) -> LayerReport:
    """One row of the summary: ``q``'s widths, important channels, code and scale range after calibration."""
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
