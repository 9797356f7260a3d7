"""Memory accounting: exact bits of every stored activation tensor, summed per layer in a torchmetrics ``Metric``.

The accounting rule (``DQA_METHOD.md`` sections 4 and 8), **per layer and per sample** (the batch-1
deployment view: each sample's activation tensor is stored, and decodable, on its own):

* ``n`` bits for every activation value (the main codes, all channels);
* the exact Huffman-coded bits of the shifting errors of the important channels (payload only: a device
  decodes sequentially, so the chunk index that speeds up :func:`lightning_dqa.codec.decode` is not charged);
* side information, charged once per sample: 32 bits per channel scale when scales are dynamic (computed from
  the tensor at run time, so stored with it), and the serialized code book (:attr:`HuffmanCodebook.size_bits`)
  whenever errors are stored. Static scales are constants of the model, fixed at calibration and stored once
  with the weights, so like the weights they are not activation memory and are not charged. The code book is
  charged per sample even when it was built at calibration: the conservative choice, and a small one (a few
  dozen bits for ``m = 3``).

Figures come from these bit counts, never from file sizes (``STYLE.md`` habit 8). Bits are kept as float64,
exact up to ``2**53`` bits.

Example:
    >>> ledger = MemoryLedger(["conv1"])
    >>> ledger.update("conv1", numel=1000, main_bits=3000, error_bits=500, side_bits=300)
    >>> out = ledger.compute()
    >>> float(out["total/bits_per_value"]), float(out["conv1/saving_vs_fp32"])
    (3.8, 0.88125)

"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_dqa.codec import HuffmanCodebook, bit_count, symbol_counts
from lightning_dqa.core._checks import is_int
from lightning_dqa.core.functional import SCALE_BITS

__all__ = ["COLUMNS", "SCALE_BITS", "MemoryLedger", "TensorBits", "histogram_bits", "tensor_bits"]

COLUMNS: tuple[str, ...] = ("numel", "main_bits", "error_bits", "side_bits", "raw_error_bits", "tensors")
"""Columns of the ledger's ``(L, 6)`` state, in order."""


@dataclass(frozen=True)
class TensorBits:
    """Exact bit counts of one stored activation tensor (one ledger update).

    Attributes:
        numel: activation values stored.
        main_bits: bits of the ``n``-bit main codes, ``numel * n``.
        error_bits: exact Huffman payload bits of the shifting errors.
        side_bits: scales and code books, all samples together.
        raw_error_bits: the shifting errors uncoded, ``m`` bits each (for the nominal ``n + r * m`` figure).
        tensors: samples in the tensor, each of which carries its own side information.

    """

    numel: int
    main_bits: int
    error_bits: int = 0
    side_bits: int = 0
    raw_error_bits: int = 0
    tensors: int = 1


def tensor_bits(
    main: Tensor,
    error: Tensor,
    scale_n: Tensor,
    bits: int,
    codebook: HuffmanCodebook | None,
    scales: Literal["dynamic", "static"] = "dynamic",
    batch_dim: int | None = 0,
) -> TensorBits:
    """Bits of one stored activation tensor from its DQA codes, by the module's accounting rule.

    Args:
        main: ``n``-bit main codes of every channel, e.g. ``(N, C, H, W)`` (the first output of
            :meth:`ActivationQuantizer.codes` / :func:`lightning_dqa.core.functional.dqa_quantize`).
        error: shifting errors of the important channels, e.g. ``(N, C_imp, H, W)``, in ``[0, 2**m - 1]``.
        scale_n: ``(C,)`` per-channel scales.
        bits: ``n``.
        codebook: the Huffman code of the errors, over ``2**m`` symbols; ``None`` only when ``error`` is empty.
        scales: ``dynamic`` charges ``32 * C`` bits per sample; ``static`` charges none (model constants).
        batch_dim: the batch axis: each of its ``N`` samples is charged its own side information; ``None`` when
            the tensor is a single sample.

    Returns:
        The :class:`TensorBits` to pass to :meth:`MemoryLedger.update`.

    Raises:
        ValueError: for a bad ``bits`` or ``scales``, a missing code book, or an error outside its alphabet.

    Example:
        >>> main = torch.zeros(2, 4, 3, 3, dtype=torch.int32)
        >>> error = torch.zeros(2, 1, 3, 3, dtype=torch.int32)
        >>> book = HuffmanCodebook.from_counts([18, 0, 0, 0, 0, 0, 0, 0])
        >>> tb = tensor_bits(main, error, torch.ones(4), bits=3, codebook=book)
        >>> book.lengths.tolist(), book.size_bits  # 23-bit header + 8 two-bit fields (length - shortest)
        ([1, 3, 4, 4, 4, 4, 4, 4], 39)
        >>> tb.main_bits, tb.error_bits, tb.side_bits  # 72 * 3; 18 zeros at 1 bit; 2 samples * (4 * 32 + 39)
        (216, 18, 334)

    """
    samples = 1 if batch_dim is None or main.ndim == 0 else int(main.shape[batch_dim])
    if error.numel() > 0 and codebook is None:
        raise ValueError("Expected a codebook to count the bits of a non-empty error tensor, got None")
    histogram = symbol_counts(error, codebook.num_symbols) if codebook is not None and error.numel() else None
    return histogram_bits(main.numel(), samples, bits, scale_n.numel(), histogram, codebook, scales)


def histogram_bits(
    numel: int,
    samples: int,
    bits: int,
    channels: int,
    error_histogram: np.ndarray | Tensor | None,
    codebook: HuffmanCodebook | None,
    scales: Literal["dynamic", "static"] = "dynamic",
) -> TensorBits:
    """The accounting rule from counts alone: ``numel`` values of ``samples`` samples and an error histogram.

    This is what :func:`tensor_bits` computes, without needing the main codes (their size is ``numel * n``
    whatever their values): the memory meter quantizes only the important channels to get the histogram.

    Args:
        numel: activation values stored (all channels, all samples).
        samples: samples among them, each charged its own side information.
        bits: ``n``.
        channels: ``C``, the number of per-channel scales.
        error_histogram: ``(2**m,)`` counts of the shifting errors of important channels, or ``None``.
        codebook: their Huffman code (required with a non-empty histogram).
        scales: ``dynamic`` charges ``32 * C`` bits per sample; ``static`` none.

    Returns:
        The :class:`TensorBits`.

    Raises:
        ValueError: for a bad ``bits`` or ``scales``, or a histogram without code book.
    """
    if not is_int(bits) or not 1 <= bits <= 16:
        raise ValueError(f"Expected bits to be an int in [1, 16], got {bits!r}")
    if scales not in ("dynamic", "static"):
        raise ValueError(f"Expected scales to be one of ['dynamic', 'static'], got {scales!r}")
    side_per_sample = SCALE_BITS * channels if scales == "dynamic" else 0
    error_bits = raw_error_bits = 0
    hist = None if error_histogram is None else np.asarray(error_histogram, dtype=np.int64)
    if hist is not None and hist.sum() > 0:
        if codebook is None:
            raise ValueError("Expected a codebook to count the bits of a non-empty error histogram, got None")
        extra_bits = (codebook.num_symbols - 1).bit_length()
        error_bits = bit_count(hist, codebook)
        raw_error_bits = int(hist.sum()) * extra_bits
        side_per_sample += codebook.size_bits
    return TensorBits(
        numel=numel,
        main_bits=numel * bits,
        error_bits=error_bits,
        side_bits=samples * side_per_sample,
        raw_error_bits=raw_error_bits,
        tensors=samples,
    )


class MemoryLedger(Metric):
    """Exact activation memory per layer and in total, synced across processes like any torchmetrics metric.

    State: one ``(L, 6)`` float64 tensor with the :data:`COLUMNS` of every layer, summed by :meth:`update`
    and reduced by sum under DDP.

    :meth:`compute` returns a flat dict of scalar tensors (ready for ``LightningModule.log_dict``), keyed
    ``"total/<figure>"`` and ``"<layer>/<figure>"`` for each figure:

    * ``numel``, ``tensors``: activation values and stored tensors (samples) counted;
    * ``bits``: all bits, main codes + coded errors + side information;
    * ``bits_per_value``: ``bits / numel``, the measured figure;
    * ``uniform_bits_per_value``: main-code bits per value, i.e. ``n``: nominal uniform ``n``-bit quantization;
    * ``nominal_bits_per_value``: DQA before coding and without side information, ``n + r * m``;
    * ``error_bits_per_value``, ``side_bits_per_value``: the parts of ``bits_per_value``;
    * ``memory_bytes``, ``bytes_per_tensor``: ``bits / 8`` in total and per stored tensor;
    * ``fp32_bits``, ``fp32_bytes``: the same values in float32;
    * ``saving_vs_fp32``: ``1 - bits_per_value / 32``.

    A layer with nothing recorded gets ``nan`` ratios.

    Args:
        layer_names: the layers, in order; :meth:`update` takes a name or an index into this list.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> ledger = MemoryLedger(["a", "b"])
        >>> ledger.update(0, numel=10, main_bits=30)
        >>> ledger.update("b", numel=10, main_bits=30, error_bits=8, side_bits=2)
        >>> float(ledger.compute()["total/bits_per_value"])
        3.5

    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    ledger: Tensor

    def __init__(self, layer_names: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        names = list(layer_names)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"Expected layer_names to be a non-empty list of non-empty strings, got {layer_names!r}")
        if len(set(names)) != len(names) or "total" in names:
            raise ValueError(f"Expected unique layer names other than 'total', got {names!r}")
        self.layer_names = names
        self._index = {n: i for i, n in enumerate(names)}
        self.add_state(
            "ledger", default=torch.zeros(len(names), len(COLUMNS), dtype=torch.float64), dist_reduce_fx="sum"
        )

    def _row(self, layer: str | int) -> int:
        if isinstance(layer, str):
            if layer not in self._index:
                raise ValueError(f"Unknown layer {layer!r}; expected one of {self.layer_names}")
            return self._index[layer]
        if not is_int(layer) or not 0 <= layer < len(self.layer_names):
            raise ValueError(
                f"Expected layer to be a name or an index in [0, {len(self.layer_names) - 1}], got {layer!r}"
            )
        return layer

    def update(
        self,
        layer: str | int,
        numel: int,
        main_bits: int,
        error_bits: int = 0,
        side_bits: int = 0,
        raw_error_bits: int = 0,
        tensors: int = 1,
    ) -> None:
        """Record one stored activation tensor of ``layer`` (see :class:`TensorBits` for the fields).

        Raises:
            ValueError: for an unknown layer or a negative count.

        """
        row = self._row(layer)
        values = (numel, main_bits, error_bits, side_bits, raw_error_bits, tensors)
        for name, v in zip(COLUMNS, values, strict=True):
            if not is_int(v) or v < 0:
                raise ValueError(f"Expected {name} to be a non-negative int, got {v!r}")
        self.ledger[row] += torch.tensor(values, dtype=torch.float64, device=self.ledger.device)

    def update_bits(self, layer: str | int, counts: TensorBits) -> None:
        """Record a :class:`TensorBits` (what :func:`tensor_bits` returns)."""
        self.update(layer, **asdict(counts))

    def compute(self) -> dict[str, Tensor]:
        """Memory figures per layer and in total; see the class docstring for the keys."""
        out: dict[str, Tensor] = {}
        rows = [("total", self.ledger.sum(dim=0))] + [(n, self.ledger[i]) for i, n in enumerate(self.layer_names)]
        for name, row in rows:
            for key, value in _figures(row).items():
                out[f"{name}/{key}"] = value
        return out


def _figures(row: Tensor) -> dict[str, Tensor]:
    """Memory figures of one ledger row ``(6,)`` (one layer, or the column sums)."""
    numel, main, error, side, raw_error, tensors = row.unbind()
    bits = main + error + side
    return {
        "numel": numel,
        "tensors": tensors,
        "bits": bits,
        "bits_per_value": bits / numel,
        "uniform_bits_per_value": main / numel,
        "nominal_bits_per_value": (main + raw_error) / numel,
        "error_bits_per_value": error / numel,
        "side_bits_per_value": side / numel,
        "memory_bytes": bits / 8,
        "bytes_per_tensor": bits / 8 / tensors,
        "fp32_bits": numel * 32,
        "fp32_bytes": numel * 4,
        "saving_vs_fp32": 1 - bits / numel / 32,
    }
