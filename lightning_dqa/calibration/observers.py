"""Per-channel activation statistics, collected by forward hooks during calibration.

An observer *observes*: ``forward(x)`` folds detached statistics of ``x`` into its state and returns ``x``
unchanged. ``compute()`` turns the state into per-channel statistics, ``reset()`` clears it and
``reduce_(reducer)`` combines the state of all distributed ranks, so every rank computes the same result.

Gradient statistics (for the ``fisher`` and ``saliency`` rankings) come from a tensor hook that the
observer registers on ``x`` when ``x`` requires grad: the hook sees ``dL/dx`` during the backward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_dqa.calibration.sampling import bottom_k, mix64, position_keys, sample_keys

__all__ = ["EXTRAS", "ChannelStats", "ChannelStatsObserver", "Reducer"]

EXTRAS = ("energy", "saliency")  # statistics only one ranking each reads

# reducer(tensor, op) -> tensor combined over ranks; op is "sum", "max", "min" or "cat" (concatenate dim -1).
Reducer = Callable[[Tensor, str], Tensor]


@dataclass
class ChannelStats:
    """Per-channel statistics of one activation tensor over the calibration set.

    Attributes:
        max_abs: ``(C,)`` maximum of ``|x|``.
        min: ``(C,)`` minimum of ``x`` (non-negative for post-ReLU tensors).
        energy: ``(C,)`` sum of ``x**2`` (zeros unless collected: the ``energy`` ranking).
        count: number of values per channel that were observed.
        grad_sq: ``(C,)`` sum of ``(dL/dx)**2`` (zeros when no gradient was seen).
        grad_coherent: ``(C,)`` sum over samples of the squared per-sample channel sum of ``dL/dx``: what a
            constant error in the channel costs (a shift of every value by ``b`` moves the loss by about
            ``b * sum(dL/dx)``), against ``grad_sq`` for errors independent from value to value.
        saliency: ``(C,)`` sum of ``|x| * |dL/dx|`` (zeros unless collected: the ``saliency`` ranking).
        samples: ``(C, K)`` sample of each channel's values at the same ``K`` positions for all channels, chosen
            by content keys (:mod:`lightning_dqa.calibration.sampling`), so equal on one process and on any number of
            ranks; used for percentile and MSE clipping and the code-book histogram.
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
    grad_coherent: Tensor


class ChannelStatsObserver(nn.Module):
    """Accumulates :class:`ChannelStats` of the tensors it is called on.

    Args:
        num_channels: ``C``.
        channel_dim: channel axis of the observed tensors.
        max_samples: ``K``, positions kept: those with the smallest keys over everything observed (a uniform
            sample without replacement, the same positions for every channel).
        track_gradients: register a gradient hook on observed tensors that require grad.
        name: layer name for error messages.
        seed: salt of the position keys (another seed, another sample).
        extras: which of the statistics that only one ranking reads are collected: ``energy`` (the ``energy``
            ranking), ``saliency`` (the ``saliency`` ranking). Left out, they stay zero and cost nothing
            (default: both).

    The keys of a batch's samples come from :meth:`set_batch_keys` (the statistics pass hashes each sample's
    contents); without them, or when the tensor's leading axis is not the batch, each row is keyed by the bytes
    of its own activations.

    Raises:
        ValueError: in ``forward``, when the tensor holds NaN or Inf (the message names the layer).

    """

    def __init__(
        self,
        num_channels: int,
        channel_dim: int = 1,
        max_samples: int = 8192,
        track_gradients: bool = False,
        name: str = "",
        seed: int = 0,
        extras: Collection[str] = EXTRAS,
    ) -> None:
        super().__init__()
        unknown = set(extras) - set(EXTRAS)
        if unknown:
            raise ValueError(f"Expected extras to be a subset of {sorted(EXTRAS)}, got unknown {sorted(unknown)}")
        self.extras = frozenset(extras)
        self.num_channels = num_channels
        self.channel_dim = channel_dim
        self.max_samples = max_samples
        self.track_gradients = track_gradients
        self.name = name
        self._salt = int(mix64(torch.tensor([seed], dtype=torch.int64)))
        self._batch_keys: Tensor | None = None
        self._elsewhere: tuple[int, int] | None = None  # channels whose gradients gradient_from takes
        self.reset()

    def reset(self) -> None:
        """Clear all statistics."""
        c = self.num_channels
        self.max_abs = torch.zeros(c)
        self.min = torch.full((c,), float("inf"))
        self.energy = torch.zeros(c, dtype=torch.float64)
        self.grad_sq = torch.zeros(c, dtype=torch.float64)
        self.grad_coherent = torch.zeros(c, dtype=torch.float64)
        self.saliency = torch.zeros(c, dtype=torch.float64)
        self.count = 0
        self.numel_per_sample = 0
        self.grad_seen = False
        self._keys = torch.zeros(0, dtype=torch.int64)
        self._values = torch.zeros(c, 0)

    def set_batch_keys(self, keys: Tensor | None) -> None:
        """Set the ``(B,)`` int64 content keys of the samples in the next tensors observed.

        ``None`` keys each row by its activations instead: equal across ranks only where they are bit-identical.
        """
        self._batch_keys = keys

    def _dims(self, x: Tensor) -> tuple[int, ...]:
        """Every axis of ``x`` but the channel axis (reductions over them need no transposed copy)."""
        cd = self.channel_dim % x.ndim
        return tuple(d for d in range(x.ndim) if d != cd)

    @torch.compiler.disable  # eager statistics: nothing to gain from a graph, and int64 hashing trips inductor
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
            self.saliency, self.grad_coherent = self.saliency.to(hi.device), self.grad_coherent.to(hi.device)
        self.max_abs = torch.maximum(self.max_abs, torch.maximum(hi, -lo))
        self.min = torch.minimum(self.min, lo)
        if "energy" in self.extras:
            self.energy += torch.linalg.vector_norm(x.float(), 2, dim=dims).double().square()
        values = x.numel() // self.num_channels
        self.count += values
        batch = x.shape[0] if x.ndim > 1 else 1
        self.numel_per_sample = x.numel() // max(batch, 1)
        self._sample(x)

    def _sample(self, x: Tensor) -> None:
        """Merge the positions of ``x`` with the smallest keys into the kept bottom-``K`` sample."""
        xm = x.movedim(self.channel_dim % x.ndim, -1)  # a view with channels last: (rows, ..., C)
        xm = xm if xm.ndim > 1 else xm[None]
        rows = xm.shape[0]
        keys = self._batch_keys
        if keys is None or keys.numel() != rows:
            keys = sample_keys(xm, rows)  # each row keyed by its own activations (one extra pass)
            assert keys is not None
        keys = position_keys(keys.to(x.device), xm[0].numel() // self.num_channels, self._salt).flatten()
        cand = torch.arange(keys.numel(), device=x.device)
        if self._keys.numel() >= self.max_samples:
            cand = cand[keys < self._keys[-1].to(x.device)]
        if cand.numel() > self.max_samples:
            cand = cand[torch.topk(keys[cand], self.max_samples, largest=False).indices]
        coords = torch.unravel_index(cand, tuple(xm.shape[:-1]))
        values = xm[coords].float().t()  # (k, C) -> (C, k)
        self._keys, self._values = bottom_k(
            torch.cat([self._keys.to(x.device), keys[cand]]),
            torch.cat([self._values.to(x.device), values], dim=1),
            self.max_samples,
        )

    def _on_grad(self, x: Tensor, span: tuple[int, int] | None = None) -> Callable[[Tensor], None]:
        """The tensor hook folding ``dL/dx`` into the gradient statistics of all channels, or of ``span``'s.

        For the layer's own input (``span=None``) the channels :meth:`gradient_from` took over are left out.
        """

        def hook(g: Tensor) -> None:
            dims = self._dims(g)
            g = g.detach().float()
            parts = {"grad_sq": torch.linalg.vector_norm(g, 2, dim=dims).double().square()}
            parts["grad_coherent"] = _per_sample_channel_sums(g, self.channel_dim).double().square().sum(0)
            if "saliency" in self.extras:
                parts["saliency"] = (x.float().abs() * g.abs()).sum(dim=dims).double()
            for key, value in parts.items():
                total = getattr(self, key)
                value = value.to(total.device)
                if span is not None:
                    total[span[0] : span[1]] += value
                    continue
                if self._elsewhere is not None:
                    value[self._elsewhere[0] : self._elsewhere[1]] = 0.0
                total += value
            self.grad_seen = True

        return hook

    def gradient_from(self, x: Tensor, start: int = 0) -> None:
        """Take the gradient statistics of channels ``start..start + C`` from ``x`` instead of the layer's input.

        For a value the layer reads as part of a concatenation and another layer reads too (a U-Net skip, read
        by the decoder's convolution and by a max-pool): ``dL/dx`` sums both paths, the gradient of the
        concatenation only the convolution's. With ``shared_values`` the value is stored once, as the codes of
        these channels, so its channels are ranked by what they cost every reader.

        Args:
            x: the value, ``C`` channels on :attr:`channel_dim`; its gradient is folded in when it arrives.
            start: its first channel in the layer's input.
        """
        stop = start + x.shape[self.channel_dim]
        if not 0 <= start < stop <= self.num_channels:
            raise ValueError(f"Layer {self.name!r}: channels {start}..{stop} of a {self.num_channels}-channel input")
        self._elsewhere = (start, stop)
        if self.track_gradients and x.requires_grad:
            x.register_hook(self._on_grad(x.detach(), (start, stop)))

    def forward(self, x: Tensor) -> Tensor:
        """Fold statistics of ``x`` in and return ``x`` unchanged."""
        self._update(x)
        if self.track_gradients and x.requires_grad:
            x.register_hook(self._on_grad(x.detach()))
        return x

    def samples(self) -> Tensor:
        """``(C, K)`` kept sample of values in key order (``K = 0`` when nothing was observed)."""
        return self._values

    def reduce_(self, reducer: Reducer) -> None:
        """Combine the state of all ranks in place (every rank ends with the same state)."""
        self.max_abs = reducer(self.max_abs, "max")
        self.min = reducer(self.min, "min")
        self.energy = reducer(self.energy, "sum")
        self.grad_sq = reducer(self.grad_sq, "sum")
        self.grad_coherent = reducer(self.grad_coherent, "sum")
        self.saliency = reducer(self.saliency, "sum")
        flags = torch.tensor(
            [float(self.count), float(self.grad_seen)], dtype=torch.float64, device=self.max_abs.device
        )
        counts = reducer(flags, "sum")  # float64: counts stay exact far beyond 2**24
        self.count, self.grad_seen = int(counts[0]), bool(counts[1] > 0)
        # The bottom K of the union of every rank's bottom K is the bottom K of all positions: one process's sample.
        self._keys, self._values = bottom_k(reducer(self._keys, "cat"), reducer(self._values, "cat"), self.max_samples)

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
            grad_coherent=self.grad_coherent.clone(),
            saliency=self.saliency.clone(),
            samples=self.samples(),
            numel_per_sample=self.numel_per_sample,
            grad_seen=self.grad_seen,
        )


def _per_sample_channel_sums(g: Tensor, channel_dim: int) -> Tensor:
    """``(B, C)`` sums of ``g`` over every axis but the leading (sample) one and the channel axis.

    A tensor whose channel axis is the leading one, or a 1-d tensor, counts as one sample: ``(1, C)``.
    """
    cd = channel_dim % g.ndim
    if g.ndim == 1 or cd == 0:
        return g.movedim(cd, -1).reshape(-1, g.shape[cd]).sum(0, keepdim=True)
    dims = tuple(d for d in range(1, g.ndim) if d != cd)
    return g.sum(dim=dims) if dims else g
