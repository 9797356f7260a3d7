"""Measure the bits of every stored activation during evaluation: forward hooks on the quantizers.

For each quantized tensor the meter computes the real DQA codes, counts ``n`` bits per main code, the
exact Huffman-coded bits of the shifting errors (code book built from the calibration histogram
``error_counts``), and the side information (per-channel scales and the code book), and adds them to a
:class:`lightning_dqa.accounting.MemoryLedger` (a torchmetrics Metric, so totals sync under DDP).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_dqa import functional as F
from lightning_dqa.accounting import MemoryLedger, histogram_bits
from lightning_dqa.attach import quantizers_of
from lightning_dqa.codec import HuffmanCodebook
from lightning_dqa.quantizers import ActivationQuantizer

__all__ = ["MemoryMeter"]


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
        self._books: dict[str, HuffmanCodebook] = {}
        self._handles = [q.register_forward_hook(self._hook(name)) for name, q in self.quantizers.items()]

    def build_codebooks(self, report: Any = None) -> None:
        """(Re)build each layer's code book from its calibration histogram of shifting errors."""
        self._books = {name: HuffmanCodebook.from_counts(q.error_counts.cpu()) for name, q in self.quantizers.items()}

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

        Runs outside any ``torch.compile`` graph: the code book and the ledger are host-side (numpy) work.
        A pass-through quantizer (a layer left in full precision) stores float32: 32 bits per value; an
        uncalibrated quantizer is not measured.
        """
        if not bool(q.calibrated):
            return
        self.ledger.to(x.device)
        samples = int(x.shape[0]) if x.ndim > 1 else 1
        if q.passthrough:
            self.ledger.update(name, numel=x.numel(), main_bits=32 * x.numel(), tensors=samples)
            return
        if name not in self._books:
            self.build_codebooks()
        # Main codes cost n bits each whatever their values: only the important channels are quantized here,
        # at n + m bits, for the histogram of their shifting errors.
        scale_n = q.current_scale(x).detach()
        hist = None
        if bool(q.important.any()):
            _, _, err = F.important_codes(x.detach(), scale_n, q.important, q.n, q.m, q.is_signed, q.channel_dim)
            hist = torch.bincount(err.flatten(), minlength=2**q.m).cpu()
        scales: Literal["dynamic", "static"] = "dynamic" if q.scale_mode == "dynamic" else "static"
        counts = histogram_bits(x.numel(), samples, q.n, q.num_channels, hist, self._books[name], scales)
        self.ledger.update_bits(name, counts)

    def reset(self) -> None:
        """Clear the ledger (start of an evaluation epoch)."""
        self.ledger.reset()

    def has_data(self) -> bool:
        """Whether anything was measured since the last reset (on this rank)."""
        return bool(self.ledger.ledger[:, -1].sum() > 0)

    def compute(self) -> dict[str, Any]:
        """Summary over all ranks: bits per value, bytes per sample (quantized and FP32), saving, per layer.

        Returns:
            ``bits_per_value``, ``bytes_per_sample``, ``fp32_bytes_per_sample``, ``saving`` (floats),
            ``per_layer_bits_per_value`` (dict) and ``ledger`` (the ledger's full dict of tensors).
        """
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
