"""Per-channel activation statistics, collected by forward hooks during calibration.

An observer *observes*: ``forward(x)`` folds detached statistics of ``x`` into its state and returns ``x``
unchanged. ``compute()`` turns the state into per-channel statistics, ``reset()`` clears it and
``reduce_(reducer)`` combines the state of all distributed ranks, so every rank computes the same result.

Gradient statistics (for the ``fisher`` and ``saliency`` rankings) come from a tensor hook that the
observer registers on ``x`` when ``x`` requires grad: the hook sees ``dL/dx`` during the backward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["ChannelStats", "ChannelStatsObserver", "Reducer"]

# reducer(tensor, op) -> tensor combined over ranks; op is "sum", "max", "min" or "cat" (concatenate dim -1).
Reducer = Callable[[Tensor, str], Tensor]


@dataclass
class ChannelStats:
    """Per-channel statistics of one activation tensor over the calibration set.

    Attributes:
        max_abs: ``(C,)`` maximum of ``|x|``.
        min: ``(C,)`` minimum of ``x`` (non-negative for post-ReLU tensors).
        energy: ``(C,)`` sum of ``x**2``.
        count: number of values per channel that were observed.
        grad_sq: ``(C,)`` sum of ``(dL/dx)**2`` (zeros when no gradient was seen).
        saliency: ``(C,)`` sum of ``|x| * |dL/dx|``.
        samples: ``(C, K)`` random sample of each channel's values (the same positions for all channels),
            used for percentile and MSE clipping and the code-book histogram.
        numel_per_sample: values of this tensor per input sample (for memory accounting).
        grad_seen: whether any gradient arrived.

    """

    max_abs: Tensor
    min: Tensor
    energy: Tensor
    count: int
    grad_sq: Tensor
    saliency: Tensor
    samples: Tensor
    numel_per_sample: int
    grad_seen: bool


class ChannelStatsObserver(nn.Module):
    """Accumulates :class:`ChannelStats` of the tensors it is called on.

    Args:
        num_channels: ``C``.
        channel_dim: channel axis of the observed tensors.
        samples_per_batch: values per channel sampled from each observed tensor (uniformly, without
            replacement, at the same positions for every channel).
        max_samples: cap on the stored sample per channel; beyond it the sample is thinned at random.
        track_gradients: register a gradient hook on observed tensors that require grad.
        name: layer name for error messages.
        generator_seed: seed of the sampling.

    Raises:
        ValueError: in ``forward``, when the tensor holds NaN or Inf (the message names the layer).

    """

    def __init__(
        self,
        num_channels: int,
        channel_dim: int = 1,
        samples_per_batch: int = 512,
        max_samples: int = 16384,
        track_gradients: bool = False,
        name: str = "",
        generator_seed: int = 0,
    ) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.channel_dim = channel_dim
        self.samples_per_batch = samples_per_batch
        self.max_samples = max_samples
        self.track_gradients = track_gradients
        self.name = name
        self._seed = generator_seed
        self.reset()

    def reset(self) -> None:
        """Clear all statistics."""
        c = self.num_channels
        self.max_abs = torch.zeros(c)
        self.min = torch.full((c,), float("inf"))
        self.energy = torch.zeros(c, dtype=torch.float64)
        self.grad_sq = torch.zeros(c, dtype=torch.float64)
        self.saliency = torch.zeros(c, dtype=torch.float64)
        self.count = 0
        self.numel_per_sample = 0
        self.grad_seen = False
        self._samples: list[Tensor] = []
        self._generator = torch.Generator().manual_seed(self._seed)

    def _dims(self, x: Tensor) -> tuple[int, ...]:
        """Every axis of ``x`` but the channel axis (reductions over them need no transposed copy)."""
        cd = self.channel_dim % x.ndim
        return tuple(d for d in range(x.ndim) if d != cd)

    @torch.no_grad()
    def _update(self, x: Tensor) -> None:
        x = x.detach()
        dims = self._dims(x)
        hi = x.amax(dim=dims).float()  # (C,); NaN propagates, so finiteness of hi/lo checks the whole tensor
        lo = x.amin(dim=dims).float()
        if not (torch.isfinite(hi).all() and torch.isfinite(lo).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(
                f"Layer {self.name!r}: activations must be finite for calibration, found {bad} NaN/Inf "
                f"values in a tensor of shape {tuple(x.shape)}"
            )
        if hi.device != self.max_abs.device:
            self.max_abs, self.min = self.max_abs.to(hi.device), self.min.to(hi.device)
            self.energy, self.grad_sq = self.energy.to(hi.device), self.grad_sq.to(hi.device)
            self.saliency = self.saliency.to(hi.device)
        self.max_abs = torch.maximum(self.max_abs, torch.maximum(hi, -lo))
        self.min = torch.minimum(self.min, lo)
        self.energy += torch.linalg.vector_norm(x.float(), 2, dim=dims).double().square()
        values = x.numel() // self.num_channels
        self.count += values
        batch = x.shape[0] if x.ndim > 1 else 1
        self.numel_per_sample = x.numel() // max(batch, 1)
        # k random positions (without replacement), the same for every channel: (k, C) by advanced indexing
        k = min(self.samples_per_batch, values)
        flat_pos = torch.randperm(values, generator=self._generator)[:k]
        xm = x.movedim(self.channel_dim % x.ndim, -1)  # a view with channels last
        coords = tuple(c.to(x.device) for c in torch.unravel_index(flat_pos, tuple(xm.shape[:-1])))
        self._samples.append(xm[coords].float().t().contiguous())  # (k, C) -> (C, k)
        if sum(s.shape[1] for s in self._samples) > 2 * self.max_samples:
            self._thin()

    def _thin(self) -> None:
        allv = torch.cat(self._samples, dim=1)
        keep = torch.randperm(allv.shape[1], generator=self._generator)[: self.max_samples].to(allv.device)
        self._samples = [allv.index_select(1, keep.sort().values)]

    def _on_grad(self, x: Tensor) -> Callable[[Tensor], None]:
        def hook(g: Tensor) -> None:
            dims = self._dims(g)
            g = g.detach().float()
            self.grad_sq += torch.linalg.vector_norm(g, 2, dim=dims).double().square().to(self.grad_sq.device)
            self.saliency += (x.float().abs() * g.abs()).sum(dim=dims).double().to(self.saliency.device)
            self.grad_seen = True

        return hook

    def forward(self, x: Tensor) -> Tensor:
        """Fold statistics of ``x`` in and return ``x`` unchanged."""
        self._update(x)
        if self.track_gradients and x.requires_grad:
            x.register_hook(self._on_grad(x.detach()))
        return x

    def samples(self) -> Tensor:
        """``(C, K)`` stored sample of values (empty when nothing was observed)."""
        if not self._samples:
            return torch.zeros(self.num_channels, 0)
        if len(self._samples) > 1 or self._samples[0].shape[1] > self.max_samples:
            allv = torch.cat(self._samples, dim=1)
            if allv.shape[1] > self.max_samples:
                keep = torch.randperm(allv.shape[1], generator=self._generator)[: self.max_samples]
                allv = allv.index_select(1, keep.sort().values.to(allv.device))
            self._samples = [allv]
        return self._samples[0]

    def reduce_(self, reducer: Reducer) -> None:
        """Combine the state of all ranks in place (every rank ends with the same state)."""
        self.max_abs = reducer(self.max_abs, "max")
        self.min = reducer(self.min, "min")
        self.energy = reducer(self.energy, "sum")
        self.grad_sq = reducer(self.grad_sq, "sum")
        self.saliency = reducer(self.saliency, "sum")
        flags = torch.tensor(
            [float(self.count), float(self.grad_seen)], dtype=torch.float64, device=self.max_abs.device
        )
        counts = reducer(flags, "sum")  # float64: counts stay exact far beyond 2**24
        self.count, self.grad_seen = int(counts[0]), bool(counts[1] > 0)
        self._samples = [reducer(self.samples(), "cat")]

    def compute(self) -> ChannelStats:
        """The statistics observed so far.

        Raises:
            ValueError: when nothing was observed.

        """
        if self.count == 0:
            raise ValueError(f"Layer {self.name!r}: no activations were observed; the calibration data is empty")
        return ChannelStats(
            max_abs=self.max_abs.clone(),
            min=self.min.clone(),
            energy=self.energy.clone(),
            count=self.count,
            grad_sq=self.grad_sq.clone(),
            saliency=self.saliency.clone(),
            samples=self.samples(),
            numel_per_sample=self.numel_per_sample,
            grad_seen=self.grad_seen,
        )
