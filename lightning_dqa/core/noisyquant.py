"""NoisyQuant baseline (Liu et al., CVPR 2023, arXiv 2211.16056; ``DQA_METHOD.md`` section 6).

A fixed noise vector ``N`` (one value per channel of the quantized tensor, drawn once from a uniform
distribution) is added before quantization and its effect removed after the layer:
``y = W Q(x + N) - W N``. A deployment stores the codes of ``x + N`` and folds ``-W N`` into the layer's
bias, so the noise costs nothing at run time.

In fake quantization :class:`NoisyQuantizer` outputs ``Q(x + N) - N`` instead, which gives the same layer
output because the layer is linear: ``W Q(x + N) - W N == W (Q(x + N) - N)``. It is also *exact* at
convolution borders, where a folded bias is slightly off (the padding zeros carry no noise, yet the folded
``-W N`` subtracts the noise of every kernel tap).

:func:`~lightning_dqa.calibration.noisyquant_search.search_noisyquant`
chooses, per layer, the clip, the noise range and a
constant noise shift that minimise the error of the layer's output on the calibration samples;
:func:`lightning_dqa.core.attach.prepare` installs it with ``method="noisyquant"``.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_dqa.core import functional as F
from lightning_dqa.core._fields import fail, read_float, read_float_list
from lightning_dqa.core.quantizers import ActivationQuantizer

__all__ = ["NoisyQuantizer", "noise_draw"]



class NoisyQuantizer(ActivationQuantizer):
    """Fake-quantizes one activation tensor as NoisyQuant does: ``Q(x + N) - N`` with per-channel noise ``N``.

    ``Q`` is direct ``bits``-bit quantization with the per-channel static ``scale`` (no important
    channels). NoisyQuant always uses static scales, so ``scale_mode`` is ``"static"`` whatever the config
    says. ``Q(x + N) - N`` equals the deployed ``W Q(x + N) - W N`` after the layer (the noise term folds
    into the bias); see the module docstring for why this form is exact at convolution borders too.
    Disabled and pass-through (``bits == 0``) quantizers return ``x`` unchanged, as the base class does.

    Buffers, in addition to :class:`ActivationQuantizer`'s, saved in the ``state_dict``:
        ``noise``: ``(C,)`` the noise vector ``N`` (zeros until :func:`search_noisyquant` runs).
        ``clip_ratio`` / ``noise_range`` / ``noise_shift``: scalars, what the search chose (a record; the
        forward pass uses ``scale`` and ``noise`` only).

    Args:
        num_channels: ``C``, the size of the channel axis.
        bits: ``n``; 0 makes a pass-through quantizer.
        extra_bits: ``m``; unused by NoisyQuant, kept so the buffers match every other quantizer.
        signed: initial signedness of codes (calibration may switch it with ``code="auto"``).
        channel_dim: channel axis of the quantized tensor (1 for conv activations, -1 for linear ones).
        name: qualified name of the layer it serves, used in error messages and to seed the noise.

    Example:
        >>> q = NoisyQuantizer(4, bits=3)
        >>> q.set_static_scale(torch.full((4,), 0.5))
        >>> q.set_noise(torch.tensor([0.1, -0.2, 0.0, 0.3]))
        >>> q(torch.randn(2, 4, 5, 5)).shape
        torch.Size([2, 4, 5, 5])

    """

    noise: Tensor
    clip_ratio: Tensor
    noise_range: Tensor
    noise_shift: Tensor

    def __init__(
        self,
        num_channels: int,
        bits: int,
        extra_bits: int = 3,
        signed: bool = True,
        channel_dim: int = 1,
        name: str = "",
    ) -> None:
        super().__init__(
            num_channels,
            bits=bits,
            extra_bits=extra_bits,
            scale_mode="static",
            signed=signed,
            channel_dim=channel_dim,
            name=name,
        )
        self.register_buffer("noise", torch.zeros(num_channels))
        self.register_buffer("clip_ratio", torch.tensor(1.0))
        self.register_buffer("noise_range", torch.tensor(0.0))
        self.register_buffer("noise_shift", torch.tensor(0.0))

    def _noise_for(self, x: Tensor) -> Tensor:
        """``noise`` shaped to broadcast against ``x``."""
        return F.channel_view(self.noise.to(x.dtype), x.ndim, self.channel_dim)

    def quantize_values(self, x: Tensor, important: Tensor | None = None) -> Tensor:
        """``Q(x + N) - N``; the base ``forward`` calls it when enabled and not pass-through.

        Args:
            x: activations, channels on ``channel_dim``, e.g. ``(N, C, H, W)``.
            important: passed on to the base class (NoisyQuant leaves every channel unimportant).

        Returns:
            Tensor shaped like ``x``.

        """
        noise = self._noise_for(x)
        return super().quantize_values(x + noise, important) - noise

    def codes(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Integer codes of ``x + N``: what a deployment stores (dequantized, they give ``Q(x + N)``).

        Args:
            x: activations, channels on ``channel_dim``.

        Returns:
            ``(main, error, scale_n)`` as :meth:`ActivationQuantizer.codes` returns them, for ``x + N``.

        """
        return super().codes(self.code_input(x))

    def code_input(self, x: Tensor) -> Tensor:
        """``x + N``: the tensor whose codes a deployment stores."""
        return x + self._noise_for(x)

    def input_noise(self) -> Tensor:
        """``N`` ``(C,)``, the frozen noise added before coding."""
        return self.noise

    @torch.no_grad()
    def set_noise(
        self, noise: Tensor, clip_ratio: float = 1.0, noise_range: float = 0.0, noise_shift: float = 0.0
    ) -> None:
        """Freeze the noise vector and record the search's choice.

        Args:
            noise: ``(C,)`` the noise ``N``.
            clip_ratio: the clip it was searched with, a fraction of each channel's maximum.
            noise_range: width of the uniform noise, in quantization steps.
            noise_shift: constant offset of the noise, in quantization steps.

        """
        self.noise.copy_(noise.detach().to(self.noise.device, self.noise.dtype))
        self.clip_ratio.fill_(clip_ratio)
        self.noise_range.fill_(noise_range)
        self.noise_shift.fill_(noise_shift)

    def artifact_entry(self) -> dict[str, Any]:
        """The base entry plus ``noise`` (``(C,)`` floats), ``clip_ratio``, ``noise_range`` and ``noise_shift``.

        Returns:
            A JSON-ready dict; every float32 value reads back bit for bit.

        Example:
            >>> NoisyQuantizer(2, bits=3).artifact_entry()["noise"]
            [0.0, 0.0]
        """
        entry = super().artifact_entry()
        entry["noise"] = [float(v) for v in self.noise.detach().float().cpu()]
        for name in ("clip_ratio", "noise_range", "noise_shift"):
            entry[name] = float(getattr(self, name))
        return entry

    def check_artifact_entry(self, entry: Mapping[str, Any], owner: str = "") -> dict[str, Tensor]:
        """Validate an entry: the base checks, plus the noise and the search record.

        No important channel, finite ``noise`` of ``C`` values, ``clip_ratio`` in ``(0, 1]``,
        ``noise_range >= 0`` and a finite ``noise_shift``.

        Args:
            entry: a dict as :meth:`artifact_entry` writes it.
            owner: how errors name the entry; default: this quantizer's name.

        Returns:
            The tensors :meth:`load_artifact_entry` takes, by buffer name.

        Raises:
            ValueError: naming the field, the rule and the value.
        """
        owner = owner or f"layer {self.name!r}"
        out = super().check_artifact_entry(entry, owner)
        if bool(out["important"].any()):
            raise fail(owner, "important", "empty (NoisyQuant has no important channels)", entry["important"])
        noise = torch.tensor(read_float_list(entry, "noise", owner, self.num_channels))
        if not bool(torch.isfinite(noise).all()):
            raise fail(owner, "noise", "numbers representable in float32", entry["noise"])
        clip = read_float(entry, "clip_ratio", owner, lo=0.0, hi=1.0)
        if clip == 0.0:
            raise fail(owner, "clip_ratio", "a number in (0, 1]", clip)
        out["noise"] = noise
        out["clip_ratio"] = torch.tensor(clip)
        out["noise_range"] = torch.tensor(read_float(entry, "noise_range", owner, lo=0.0, hi=1e6))
        out["noise_shift"] = torch.tensor(read_float(entry, "noise_shift", owner, lo=-1e6, hi=1e6))
        return out

    def extra_repr(self) -> str:
        """Summary shown by ``print(model)``."""
        return (
            f"{super().extra_repr()}, clip={float(self.clip_ratio):.4g}, "
            f"noise_range={float(self.noise_range):.4g}, noise_shift={float(self.noise_shift):.4g}"
        )


def noise_draw(seed: int, name: str, num_channels: int) -> Tensor:
    """The fixed uniform draw ``u ~ U[0, 1)`` ``(C,)`` behind a layer's noise, a function of seed and name.

    The name is hashed with CRC-32 (Python's ``hash`` of a string changes from process to process), so a
    layer gets the same draw in every run and on every rank.
    """
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.rand(num_channels, generator=gen)
