"""Measure the bits of every stored activation during evaluation: forward hooks on the quantizers.

For each quantized tensor the meter computes the real DQA codes, counts ``n`` bits per main code, the
exact Huffman-coded bits of the shifting errors (code book built from the calibration histogram
``error_counts``), and the side information (per-channel scales and the code book), and adds them to a
:class:`lightning_dqa.deploy.accounting.MemoryLedger` (a torchmetrics Metric, so totals sync under DDP).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_dqa.codec import HuffmanCodebook
from lightning_dqa.core import functional as F
from lightning_dqa.core.attach import quantizers_of
from lightning_dqa.core.quantizers import ActivationQuantizer
from lightning_dqa.deploy.accounting import MemoryLedger, histogram_bits

__all__ = ["MemoryMeter"]


@dataclass
class _Layer:
    """A quantizer's frozen state, read once: calibrated, its code book and important channels ``(K,)``."""

    calibrated: bool
    book: HuffmanCodebook
    index: Tensor | None  # None: no important channel

    @classmethod
    def of(cls, q: ActivationQuantizer) -> _Layer:
        index = torch.nonzero(q.important).flatten()
        return cls(
            bool(q.calibrated), HuffmanCodebook.from_counts(q.error_counts.cpu()), index if index.numel() else None
        )


@dataclass
class _Pending:
    """What :meth:`MemoryMeter.measure` accumulated for one layer since the last flush."""

    device: torch.device
    symbols: int
    numel: int = 0
    samples: int = 0
    hist: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.hist = torch.zeros(self.symbols, dtype=torch.long, device=self.device)


class MemoryMeter:
    """Adds every quantized activation of ``model`` to a memory ledger while ``active``.

    Args:
        model: a model with quantizers installed.

    Example:
        >>> from lightning_dqa import DQAConfig, calibrate, prepare
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
        >>> config = DQAConfig(bits=4, ranking="energy", first_layer_bits=None)
        >>> _ = prepare(net, config)
        >>> x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        >>> _ = calibrate(net, config, [x], forward_fn=lambda m, b: m(b))
        >>> meter = MemoryMeter(net); meter.build_codebooks(); meter.active = True
        >>> _ = net(x)
        >>> 4.0 < meter.compute()["bits_per_value"] < 4.0 + 0.4 * 3 + 0.1  # n + r * m at most, plus code books
        True
    """

    def __init__(self, model: nn.Module) -> None:
        self.quantizers = quantizers_of(model)
        self.names = list(self.quantizers)
        self.ledger = MemoryLedger(self.names)
        self.active = False
        self._layers: dict[str, _Layer] = {}
        self._pending: dict[str, _Pending] = {}
        self._handles = [q.register_forward_hook(self._hook(name)) for name, q in self.quantizers.items()]

    def build_codebooks(self, report: Any = None) -> None:
        """(Re)read each layer's frozen state: code book (from ``error_counts``), important channels, calibrated."""
        self.flush()
        self._layers = {name: _Layer.of(q) for name, q in self.quantizers.items()}

    def _hook(self, name: str) -> Any:
        # The hook runs inside the model's forward, so ``torch.compile`` traces it: only Python flags are read
        # here (an inactive meter adds nothing to the graph); the measurement itself runs eagerly.
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            if self.active and isinstance(module, ActivationQuantizer) and module.enabled:
                self.measure(name, module, args[0])

        return hook

    @torch.compiler.disable
    @torch.no_grad()
    def measure(self, name: str, q: ActivationQuantizer, x: Tensor) -> None:
        """Add one stored tensor ``x`` (a batch; each sample counted on its own) to the ledger.

        No host-device synchronisation: counts are Python ints and the shifting errors' histogram accumulates on
        ``x``'s device; :meth:`flush` turns them into bits once (at :meth:`compute`). Runs outside any
        ``torch.compile`` graph. A pass-through quantizer (a layer left in full precision) stores float32: 32
        bits per value; an uncalibrated quantizer is not measured.
        """
        if name not in self._layers:  # first use without build_codebooks (e.g. a calibrated checkpoint)
            self._layers[name] = _Layer.of(q)
        layer = self._layers[name]
        if not layer.calibrated:
            return
        pending = self._pending.setdefault(name, _Pending(x.device, 2**q.m))
        pending.numel += x.numel()
        pending.samples += int(x.shape[0]) if x.ndim > 1 else 1
        if q.passthrough or layer.index is None:
            return
        # Main codes cost n bits each whatever their values: only the important channels are quantized here,
        # at n + m bits, for the histogram of their shifting errors.
        scale_n = q.current_scale(x).detach()
        index = layer.index.to(x.device)
        _, _, err = F.important_codes(x.detach(), scale_n, q.important, q.n, q.m, q.is_signed, q.channel_dim, index)
        flat = err.flatten().long()
        pending.hist.scatter_add_(0, flat, torch.ones(1, dtype=torch.long, device=flat.device).expand_as(flat))

    def flush(self) -> None:
        """Move what :meth:`measure` accumulated into the ledger (one host read per layer)."""
        for name, pending in self._pending.items():
            q, layer = self.quantizers[name], self._layers[name]
            self.ledger.to(pending.device)
            if q.passthrough:
                self.ledger.update(name, numel=pending.numel, main_bits=32 * pending.numel, tensors=pending.samples)
                continue
            hist = pending.hist.cpu() if layer.index is not None else None
            scales: Literal["dynamic", "static"] = "dynamic" if q.scale_mode == "dynamic" else "static"
            counts = histogram_bits(pending.numel, pending.samples, q.n, q.num_channels, hist, layer.book, scales)
            self.ledger.update_bits(name, counts)
        self._pending = {}

    def reset(self) -> None:
        """Clear the ledger (start of an evaluation epoch)."""
        self._pending = {}
        self.ledger.reset()

    def has_data(self) -> bool:
        """Whether anything was measured since the last reset (on this rank)."""
        return any(p.samples for p in self._pending.values()) or bool(self.ledger.ledger[:, -1].sum() > 0)

    def compute(self) -> dict[str, Any]:
        """Summary over all ranks: bits per value, bytes per sample (quantized and FP32), saving, per layer.

        Returns:
            ``bits_per_value``, ``bytes_per_sample``, ``fp32_bytes_per_sample``, ``saving`` (floats),
            ``per_layer_bits_per_value`` (dict) and ``ledger`` (the ledger's full dict of tensors).
        """
        self.flush()
        out = self.ledger.compute()
        samples = float(max(float(out[f"{n}/tensors"]) for n in self.names))
        return {
            "bits_per_value": float(out["total/bits_per_value"]),
            "bytes_per_sample": float(out["total/memory_bytes"]) / samples,
            "fp32_bytes_per_sample": float(out["total/fp32_bytes"]) / samples,
            "saving": float(out["total/saving_vs_fp32"]),
            "per_layer_bits_per_value": {n: float(out[f"{n}/bits_per_value"]) for n in self.names},
            "ledger": out,
        }

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
