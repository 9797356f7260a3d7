"""NoisyQuant's per-layer search of the clip, noise range and noise shift minimising the layer's output error.

:func:`search_noisyquant` is the ``noisyquant`` method's calibration step (:data:`.methods.METHODS`);
the quantizer it configures is :class:`lightning_dqa.core.noisyquant.NoisyQuantizer`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_dqa.core import functional as F
from lightning_dqa.core.attach import QUANTIZER_ATTR, QuantPoint
from lightning_dqa.core.config import DQAConfig
from lightning_dqa.core.noisyquant import NoisyQuantizer, noise_draw
from lightning_dqa.core.quantizers import ActivationQuantizer

__all__ = [
    "CLIP_COARSE",
    "CLIP_STEP",
    "NOISE_RANGES",
    "NOISE_SHIFTS",
    "NOISE_STEP",
    "SEARCH_SAMPLES",
    "NoisyQuantSearch",
    "search_noisyquant",
]

# The search grid (see search_noisyquant). The official code tries 1000 clips x 400 shifts x 2000 noise
# ranges; this coordinate search scores about 35 candidates per layer on a sub-sample.
SEARCH_SAMPLES = 64  # calibration samples the grid is scored on; the final choice uses all of them
CLIP_COARSE: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)  # fraction of channel max
CLIP_STEP = 0.05  # first fine clip step around the best coarse clip, halved twice (down to 0.0125)
NOISE_SHIFTS: tuple[float, ...] = (-0.5, -0.25, 0.25, 0.5)  # constant noise offset, in quantization steps
NOISE_RANGES: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)  # uniform noise width, in quantization steps
NOISE_STEP = 0.125  # joint fine step of range and shift around the best pair

_CHUNK_ELEMENTS = 2**23  # bound on the candidate batch fed to the layer at once (input + output values)


@dataclass(frozen=True)
class NoisyQuantSearch:
    """Outcome of :func:`search_noisyquant` for one layer.

    Attributes:
        clip: chosen clip, a fraction of each channel's maximum on the calibration samples.
        noise_range: chosen width of the uniform noise, in quantization steps (0: no noise).
        noise_shift: chosen constant offset of the noise, in quantization steps.
        mse: layer-output MSE of the chosen configuration on all calibration samples.
        direct_clip: the best clip with zero noise (direct quantization with the same clip search).
        direct_mse: layer-output MSE of ``direct_clip`` with zero noise on all samples; ``mse <= direct_mse``.
        evaluations: candidate configurations scored.
        seconds: wall time of the search.

    """

    clip: float
    noise_range: float
    noise_shift: float
    mse: float
    direct_clip: float
    direct_mse: float
    evaluations: int
    seconds: float


@contextmanager
def _quantizers_off(layer: nn.Module, quantizer: ActivationQuantizer) -> Iterator[None]:
    """Run ``layer`` in full precision: its installed quantizer's hook must not fire during the search."""
    switched = [q for q in (quantizer, getattr(layer, QUANTIZER_ATTR, None)) if isinstance(q, ActivationQuantizer)]
    states = [q.enabled for q in switched]
    for q in switched:
        q.enabled = False
    try:
        yield
    finally:
        for q, state in zip(switched, states, strict=True):
            q.enabled = state


def _layer_runner(point: QuantPoint, quantizer: ActivationQuantizer) -> Callable[[Tensor], Tensor]:
    """The map from the quantized tensor to what the search compares: the layer output, or the tensor."""
    if point.where == "output":
        return lambda t: t

    def run(t: Tensor) -> Tensor:
        with _quantizers_off(point.layer, quantizer):
            return point.layer(t)

    return run


def _noise(scale: Tensor, max_abs: Tensor, uniform: Tensor, width: Tensor | float, shift: Tensor | float) -> Tensor:
    """Noise ``N = scale * (width * (u - 0.5) + shift)`` shaped like ``scale`` (``(C,)`` or ``(K, C)``).

    ``width`` and ``shift`` are floats or ``(K, 1)`` columns. Zero width and shift give exact zeros.
    """
    noise = scale * (width * (uniform - 0.5) + shift)
    # A channel that is zero throughout has a placeholder scale of 1; noise there would only add error.
    return torch.where(max_abs > 0, noise, torch.zeros_like(noise))


class _Objective:
    """Layer-output MSE of candidate configurations on fixed samples, many candidates per layer call."""

    def __init__(
        self, run: Callable[[Tensor], Tensor], x: Tensor, q: NoisyQuantizer, max_abs: Tensor, uniform: Tensor
    ) -> None:
        self.run, self.x, self.max_abs, self.uniform = run, x, max_abs, uniform
        self.bits, self.signed = q.n, bool(q.signed)
        self.lo, self.hi = F.quant_range(self.bits, self.signed)
        self.channel_axis = 1 + q.channel_dim % x.ndim  # in the (K, S, ...) candidate batch
        self.y_ref = run(x)  # (S, ...) full-precision reference
        per_candidate = x.numel() + self.y_ref.numel()
        self.chunk = max(1, _CHUNK_ELEMENTS // per_candidate)
        self.evaluations = 0

    def _view(self, t: Tensor) -> Tensor:
        """``(K, C)`` -> broadcastable against the ``(K, S, ...)`` candidate batch."""
        shape = [t.shape[0]] + [1] * self.x.ndim
        shape[self.channel_axis] = t.shape[1]
        return t.reshape(shape)

    def __call__(self, cand: Tensor) -> Tensor:
        """MSE ``(K,)`` of candidates ``(K, 3)``."""
        out = []
        for part in cand.split(self.chunk):
            clip, width, shift = part[:, :1], part[:, 1:2], part[:, 2:]  # (K, 1) each
            scale = F.scale_from_max(self.max_abs * clip, self.bits, self.signed)  # (K, C)
            noise = _noise(scale, self.max_abs, self.uniform, width, shift)  # (K, C)
            s, n = self._view(scale), self._view(noise)  # (K, 1.., C, 1..)
            inv = 1.0 / s
            # Q(x + N) - N in four passes over the (K, S, ...) batch: codes (x + N) / s, round, clamp, back.
            codes = torch.addcmul(n * inv, self.x.unsqueeze(0), inv).round_().clamp_(self.lo, self.hi)
            xq = torch.addcmul(-n, codes, s, out=codes)  # (K, S, ...)
            y = self.run(xq.flatten(0, 1)).unflatten(0, (part.shape[0], -1))  # (K, S, ...)
            err = torch.linalg.vector_norm((y - self.y_ref).flatten(1), dim=1)  # (K,)
            out.append(err.square() / self.y_ref.numel())
        self.evaluations += cand.shape[0]
        return torch.cat(out)


class _CoordinateSearch:
    """Keeps the best candidate seen; every grid it scores contains the incumbent, so it never gets worse."""

    def __init__(self, objective: _Objective) -> None:
        self.objective = objective
        self.seen: dict[tuple[float, float, float], float] = {}
        self.best = (1.0, 0.0, 0.0)
        self.best_mse = math.inf

    def consider(self, clips: list[float], widths: list[float], shifts: list[float]) -> tuple[float, float, float]:
        """Score the grid ``clips x widths x shifts`` (values seen before are not re-scored); returns the best."""
        grid = [(round(c, 6), round(w, 6), round(s, 6)) for c in clips for w in widths for s in shifts]
        new = list(dict.fromkeys(g for g in grid if g not in self.seen))
        if new:
            mses = self.objective(torch.tensor(new, dtype=torch.float32, device=self.objective.x.device))
            self.seen.update(zip(new, mses.tolist(), strict=True))
        for g in grid:  # strict: the incumbent wins ties, then the earliest (zero noise comes first)
            if self.seen[g] < self.best_mse:
                self.best, self.best_mse = g, self.seen[g]
        return self.best

    def refine_clip(self, step: float, levels: int) -> float:
        """Coarse to fine along the clip: try the best clip +- ``step``, keep the better, halve; ``levels`` times."""
        for _ in range(levels):
            clip, width, shift = self.best
            self.consider([c for c in (clip - step, clip + step) if 0.0 < c <= 1.0], [width], [shift])
            step /= 2
        return self.best[0]


@torch.no_grad()
def _apply(q: NoisyQuantizer, max_abs: Tensor, uniform: Tensor, clip: float, width: float, shift: float) -> None:
    """Write one configuration into the quantizer's buffers (the scale exactly as direct quantization's)."""
    scale = F.scale_from_max(max_abs * clip, q.n, bool(q.signed))  # (C,)
    q.set_static_scale(scale)
    q.set_noise(_noise(scale, max_abs, uniform, width, shift), clip, width, shift)


def _quantizer_mse(q: NoisyQuantizer, run: Callable[[Tensor], Tensor], x: Tensor, y_ref: Tensor) -> float:
    """Layer-output MSE of the quantizer as installed (its own forward maths, whatever ``enabled`` says).

    Runs over chunks of samples, so a large layer never holds more than a few copies of one chunk.
    """
    chunk = max(1, _CHUNK_ELEMENTS // (x[0].numel() + y_ref[0].numel()))
    total = 0.0
    for xs, ys in zip(x.split(chunk), y_ref.split(chunk), strict=True):
        total += float((run(q.quantize_values(xs)) - ys).square().sum(dtype=torch.float64))
    return total / y_ref.numel()


@torch.no_grad()
def search_noisyquant(
    point: QuantPoint, quantizer: ActivationQuantizer, inputs: Tensor, config: DQAConfig
) -> NoisyQuantSearch:
    """Search one layer's clip, noise range and noise shift; freeze them into ``quantizer``.

    The objective is the MSE of the layer's output: ``layer(x)`` against ``layer(Q(x + N) - N)`` for
    ``where="input"`` (the layer runs its own forward with its quantizer switched off), the tensor itself
    for ``where="output"``. Candidates are (clip ``a``, range ``b``, shift ``g``), giving per channel ``c``
    the scale ``s_c`` of the clipped maximum ``a * max_c`` and the noise ``N_c = s_c * (b * (u_c - 0.5) + g)``
    with a fixed draw ``u ~ U[0, 1)`` seeded by ``config.seed`` and the layer name (:func:`noise_draw`).

    Coordinate search, scored on :data:`SEARCH_SAMPLES` evenly spaced samples (about 35 candidates):

    1. clip on :data:`CLIP_COARSE` with zero noise, then coarse to fine: +- :data:`CLIP_STEP` around the
       best, halving the step twice (resolution 0.0125): the direct-quantization clip;
    2. at that clip, the shift on :data:`NOISE_SHIFTS` with zero range, then the range on
       :data:`NOISE_RANGES` at the best shift, then both +- :data:`NOISE_STEP` jointly (3 x 3);
    3. the clip again, +- ``CLIP_STEP / 2`` halved once, with that noise.

    Each step keeps the incumbent unless a candidate is strictly better, and zero noise is the incumbent
    the noise steps start from.
    Finally the best noisy and the best zero-noise configurations are scored on all ``inputs`` through the
    quantizer's own forward maths and the better one is kept, so the result is never worse than direct
    quantization with the same clip search (a tie when noise does not help).

    Args:
        point: the layer and where its quantized tensor sits.
        quantizer: the layer's :class:`NoisyQuantizer` (its ``signed`` already resolved); its ``scale``,
            ``noise`` and record buffers are set, ``important`` cleared.
        inputs: calibration samples of the quantized tensor, e.g. ``(S, C, H, W)`` with ``S <= 256``
            (the layer's input for ``where="input"``, its output for ``where="output"``).
        config: supplies ``seed``.

    Returns:
        A :class:`NoisyQuantSearch` with the choice and its MSE.

    Raises:
        TypeError: when ``quantizer`` is not a :class:`NoisyQuantizer`.
        ValueError: for a pass-through quantizer, empty or non-finite ``inputs``, or a channel count that
            does not match the quantizer.

    """
    t0 = time.perf_counter()
    if not isinstance(quantizer, NoisyQuantizer):
        raise TypeError(f"Expected quantizer to be a NoisyQuantizer, got {type(quantizer).__name__}")
    if quantizer.passthrough:
        raise ValueError(f"Layer {point.name!r}: expected a quantizer with bits > 0, got bits=0 (pass-through)")
    if inputs.ndim < 2 or inputs.shape[0] == 0:
        raise ValueError(
            f"Layer {point.name!r}: expected inputs of shape (S, ...) with S >= 1, got {tuple(inputs.shape)}"
        )
    if inputs.shape[quantizer.channel_dim] != quantizer.num_channels:
        raise ValueError(
            f"Layer {point.name!r}: expected inputs with {quantizer.num_channels} channels on dim "
            f"{quantizer.channel_dim}, got shape {tuple(inputs.shape)}"
        )
    if not bool(torch.isfinite(inputs).all()):
        raise ValueError(f"Layer {point.name!r}: expected finite calibration inputs, got NaN or inf")

    x = inputs.detach().to(quantizer.scale.device, torch.float32)  # (S, ...)
    max_abs = F.channel_absmax(x, quantizer.channel_dim)  # (C,)
    uniform = noise_draw(config.seed, point.name, quantizer.num_channels).to(x.device)  # (C,)
    run = _layer_runner(point, quantizer)
    pick = torch.linspace(0, x.shape[0] - 1, min(SEARCH_SAMPLES, x.shape[0]), device=x.device).round().long()
    search = _CoordinateSearch(_Objective(run, x[pick], quantizer, max_abs, uniform))

    search.consider(list(CLIP_COARSE), [0.0], [0.0])
    direct_clip = search.refine_clip(CLIP_STEP, levels=3)
    search.consider([direct_clip], [0.0], list(NOISE_SHIFTS))
    search.consider([direct_clip], list(NOISE_RANGES), [search.best[2]])
    _, width, shift = search.best
    widths = [w for w in (width - NOISE_STEP, width, width + NOISE_STEP) if w >= 0.0]
    search.consider([direct_clip], widths, [shift - NOISE_STEP, shift, shift + NOISE_STEP])
    search.refine_clip(CLIP_STEP / 2, levels=2)
    clip, width, shift = search.best

    quantizer.important.zero_()
    y_ref = run(x)
    _apply(quantizer, max_abs, uniform, direct_clip, 0.0, 0.0)
    direct_mse = _quantizer_mse(quantizer, run, x, y_ref)
    mse = direct_mse
    if width or shift or clip != direct_clip:
        _apply(quantizer, max_abs, uniform, clip, width, shift)
        mse = _quantizer_mse(quantizer, run, x, y_ref)
        if not mse < direct_mse:  # the sub-sample's pick does not hold on all samples: keep direct
            clip, width, shift, mse = direct_clip, 0.0, 0.0, direct_mse
            _apply(quantizer, max_abs, uniform, clip, width, shift)
    return NoisyQuantSearch(
        clip=clip,
        noise_range=width,
        noise_shift=shift,
        mse=mse,
        direct_clip=direct_clip,
        direct_mse=direct_mse,
        evaluations=search.objective.evaluations + 2,
        seconds=time.perf_counter() - t0,
    )
