"""The quantization settings shared by the engine, the callback and the examples, validated once.

``DQAConfig`` is a frozen dataclass of flat primitives, so LightningCLI, YAML files and JSON records can
express every field. Every check names the argument, the rule and the value given.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Literal, get_args

from lightning_dqa.core._checks import is_int
from lightning_dqa.core.widths import MAX_BITS, MAX_TOTAL_BITS, MIN_BITS, RATIOS

__all__ = [
    "CLIPPINGS",
    "CODES",
    "GRADIENT_RANKINGS",
    "METHODS",
    "PAPER_QUANTIZER",
    "PAPER_SETTING",
    "PEAK_RUNTIMES",
    "RANKINGS",
    "SCALE_MODES",
    "SHARED_VALUES",
    "WHERE",
    "DQAConfig",
    "paper_config",
]

# The names a setting may take. The calibration registries (``calibration.methods.METHODS``,
# ``calibration.selection.RANKINGS``, ``calibration.clipping.CLIPPINGS``) implement exactly these names, and
# ``tests/calibration/test_registries.py`` holds them equal, so the settings never import the registries.
Method = Literal["dqa", "direct", "noisyquant", "fp32"]
Ranking = Literal["fisher", "saliency", "energy", "max", "random", "greedy"]
ScaleMode = Literal["dynamic", "static", "learnable"]
Code = Literal["signed", "unsigned", "auto"]
Clipping = Literal["none", "percentile", "mse"]
Where = Literal["input", "output"]
SharedValues = Literal["fp32", "codes", "int8", "uniform"]
PeakRuntime = Literal["layer", "banded"]

METHODS: tuple[str, ...] = get_args(Method)
RANKINGS: tuple[str, ...] = get_args(Ranking)
CLIPPINGS: tuple[str, ...] = get_args(Clipping)
SCALE_MODES: tuple[str, ...] = get_args(ScaleMode)
CODES: tuple[str, ...] = get_args(Code)
WHERE: tuple[str, ...] = get_args(Where)
SHARED_VALUES: tuple[str, ...] = get_args(SharedValues)
PEAK_RUNTIMES: tuple[str, ...] = get_args(PeakRuntime)
LAYER_TYPES: tuple[str, ...] = ("Conv1d", "Conv2d", "Conv3d", "Linear", "ConvTranspose2d")
MAX_SEED = 2**32 - 1  # seeds are mixed into 64-bit sampling keys and torch generators; Lightning's own bound
SELECTING_METHODS: tuple[str, ...] = ("dqa",)
"""Methods that rank channels and keep a fraction of them at ``n + m`` bits."""
FULL_PRECISION_METHODS: tuple[str, ...] = ("fp32",)
"""Methods whose quantizers pass every tensor through (``bits == 0``)."""
GRADIENT_RANKINGS: tuple[str, ...] = ("fisher", "saliency")
"""Rankings whose scores need activation gradients (calibration then runs a backward pass)."""


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"Expected {name} to be one of {list(allowed)}, got {value!r}")


def _int_in(name: str, value: Any, lo: int, hi: int, hint: str = "") -> None:
    if not is_int(value) or not lo <= value <= hi:
        raise ValueError(f"Expected {name} to be an int in [{lo}, {hi}], got {value!r}{hint}")


@dataclass(frozen=True)
class DQAConfig:
    """What to quantize and how.

    Args:
        bits: ``n``, the width of every stored main code (3, 4 or 5 in the paper; 2..8 accepted).
        extra_bits: ``m``, the extra precision of important channels; ``n + m`` must not exceed 16.
        ratio: ``r``, the fraction of each layer's channels that is important (0 gives direct quantization).
        method: a key of :data:`METHODS`: ``dqa``; ``direct`` (no important channels);
            ``noisyquant`` (the NoisyQuant baseline); ``fp32`` (quantizers installed but pass-through).
        ranking: name of the channel-ranking criterion (one of :data:`RANKINGS`).
        scale_mode: ``dynamic`` takes each channel's maximum from the tensor at run time (the paper);
            ``static`` freezes scales from calibration; ``learnable`` starts from the static scales and
            trains them with the LSQ gradient during fine-tuning.
        code: ``signed`` codes (the paper); ``unsigned`` for non-negative tensors; ``auto`` picks unsigned
            for a layer whose calibration activations were all non-negative (e.g. after ReLU).
        clipping: a key of :data:`CLIPPINGS`, how static scales clip outliers: ``none``
            (calibration maximum), ``percentile`` or ``mse`` (per-channel clip minimising the quantization
            error on calibration samples).
        percentile: the percentile of ``|x|`` used by ``clipping="percentile"``, in (0, 100].
        where: quantize the ``input`` of each target layer (what a deployment stores between layers) or
            its ``output`` (the third-party reproduction's choice).
        layer_types: class names of target layers.
        include: regular expressions; when non-empty, only layers whose qualified name matches one are
            targets.
        exclude: regular expressions of layer names that are never targets.
        first_layer_bits: code width of the first target layer instead of ``bits`` (``None`` keeps
            ``bits``; ``0`` leaves that layer in full precision). Its input is the image, stored at 8 bits
            by any camera, hence the default 8 for ``where="input"``.
        last_layer_bits: likewise for the last target layer.
        seed: an int in ``[0, 2**32 - 1]``, the seed of everything random here (the ``random`` ranking,
            NoisyQuant's noise, sampling).
        target_bits: a memory budget, average stored bits per activation value (``None``: every layer gets
            ``bits``, ``ratio`` and ``extra_bits``). Calibration then chooses each layer's ``n`` (2..8), ratio
            and ``m`` to lose the least (Fisher-weighted quantization noise) within the budget, counted as the
            logged ``bits_per_value`` counts (:mod:`lightning_dqa.calibration.allocation`); ``bits``, ``ratio`` and
            ``extra_bits`` are then ignored except by ``first_layer_bits`` / ``last_layer_bits`` layers.
            Needs method ``dqa`` or ``direct`` and a loss for the Fisher statistics.
        target_peak_bytes: with ``target_bits``, also a limit on the whole network's peak activation memory per
            sample, in bytes, as :func:`lightning_dqa.deploy.compressed.run_compressed` measures it (every live tensor
            in execution order, full-precision shortcuts and skips included, placed in one arena: its size).
            After the ``target_bits``
            allocation, calibration runs one sample compressed and, while its peak is above the limit, steps
            down the layer whose codes are live at the peak and lose least per bit saved. A limit below what
            the full-precision tensors at the peak need alone is refused with the figure. ``peak_runtime``
            says which runtime's peak it limits.
        peak_runtime: the device runtime whose peak ``target_peak_bytes`` limits and the callback logs:
            ``layer`` (default), :func:`lightning_dqa.deploy.compressed.run_compressed`, layer by layer; ``banded``,
            :func:`lightning_dqa.run_banded` (row bands of one row, the arena of :mod:`lightning_dqa.deploy.banded`;
            pair it with ``shared_values="codes"``). ``banded`` needs static or learnable scales (a band's maximum
            is not the tensor's).
        shared_values: what becomes of a value that a quantized layer reads *and* something else reads in full
            precision (a ResNet block's input, feeding its first convolution and the residual shortcut; an
            inverted residual's input): ``fp32`` (default) keeps it in float32 beside the layer's codes;
            ``codes`` quantizes it once, where it is produced, with the reading layer's quantizer, so every
            reader (convolution, residual add, concatenation) reads the same values and the compressed runtime
            stores only that layer's blob (:mod:`lightning_dqa.core.shared`); ``int8`` stores it instead as 8-bit
            codes on the reading layer's calibrated clip range (a separate width for the residual stream), which
            the residual add reads and the layer re-quantizes to its own codes; ``uniform`` does the same at
            ``shared_bits`` bits. All but ``fp32`` need ``where="input"``,
            a static or learnable scale (re-quantizing must be exact), a method other than ``noisyquant``, and a
            ranking other than ``greedy`` (its fx replay does not run the producers' hooks).
        shared_bits: the width of ``shared_values="uniform"`` codes, 2..8 (8, the default, is ``int8``): the
            residual stream and skips on the reading layer's clip range at ``2**shared_bits`` levels, no important
            channels. Narrower codes make a smaller peak; below ``bits + extra_bits`` the layer rounds them again.

    """

    bits: int = 4
    extra_bits: int = 3
    ratio: float = 0.4
    method: Method = "dqa"
    ranking: Ranking = "fisher"
    scale_mode: ScaleMode = "static"
    code: Code = "auto"
    clipping: Clipping = "mse"
    percentile: float = 99.99
    where: Where = "input"
    layer_types: tuple[str, ...] = ("Conv2d", "Linear")
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    first_layer_bits: int | None = 8
    last_layer_bits: int | None = None
    seed: int = 0
    target_bits: float | None = None
    target_peak_bytes: float | None = None
    shared_values: SharedValues = "fp32"
    shared_bits: int = 8
    peak_runtime: PeakRuntime = "layer"

    def __post_init__(self) -> None:
        self._check_widths()
        self._check_choices()
        for name in ("layer_types", "include", "exclude"):
            value = getattr(self, name)
            if (
                isinstance(value, str)
                or not isinstance(value, list | tuple)
                or not all(isinstance(v, str) for v in value)
            ):
                raise ValueError(f"Expected {name} to be a list of strings, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        self._check_layers()
        if not is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(
                f"Expected seed to be an int in [0, {MAX_SEED}] (as Lightning's seed_everything), got {self.seed!r}"
            )
        self._check_budget()

    def _check_budget(self) -> None:
        t = self.target_bits
        if t is None:
            if self.target_peak_bytes is not None:
                raise ValueError(
                    f"Expected target_bits with target_peak_bytes (the peak limit refines a bits budget's "
                    f"allocation), got target_bits=None and target_peak_bytes={self.target_peak_bytes!r}"
                )
            return
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or not 0 < t <= 32:
            raise ValueError(f"Expected target_bits to be a finite number in (0, 32] bits per value or None, got {t!r}")
        if self.method not in ("dqa", "direct"):
            raise ValueError(
                f"Expected method 'dqa' or 'direct' with target_bits (the budget chooses their widths), "
                f"got method={self.method!r}"
            )
        object.__setattr__(self, "target_bits", float(t))
        p = self.target_peak_bytes
        if p is None:
            return
        if isinstance(p, bool) or not isinstance(p, int | float) or not math.isfinite(p) or not p > 0:
            raise ValueError(f"Expected target_peak_bytes to be a finite number of bytes > 0 or None, got {p!r}")
        object.__setattr__(self, "target_peak_bytes", float(p))

    def _check_widths(self) -> None:
        _int_in("bits", self.bits, MIN_BITS, MAX_BITS)
        _int_in("extra_bits", self.extra_bits, 1, MAX_TOTAL_BITS - MIN_BITS)
        for name in ("first_layer_bits", "last_layer_bits"):
            value = getattr(self, name)
            if value is None or (type(value) is int and value == 0):
                continue
            _int_in(name, value, MIN_BITS, MAX_BITS, " (or 0 for full precision, None for bits)")
        for name in ("bits", "first_layer_bits", "last_layer_bits"):
            width = getattr(self, name)
            if width and width + self.extra_bits > MAX_TOTAL_BITS:
                raise ValueError(
                    f"Expected {name} + extra_bits <= {MAX_TOTAL_BITS}, got {width} + {self.extra_bits} = "
                    f"{width + self.extra_bits}; lower extra_bits"
                )
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, int | float) or not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"Expected ratio to be a float in [0, 1], got {self.ratio!r}")

    def _check_choices(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("ranking", self.ranking, RANKINGS)
        _choice("clipping", self.clipping, CLIPPINGS)
        _choice("scale_mode", self.scale_mode, SCALE_MODES)
        _choice("code", self.code, CODES)
        _choice("where", self.where, WHERE)
        _choice("shared_values", self.shared_values, SHARED_VALUES)
        if self.shared_values != "fp32":
            self._check_shared()
        _int_in("shared_bits", self.shared_bits, MIN_BITS, MAX_BITS)
        if self.shared_bits != 8 and self.shared_values != "uniform":
            raise ValueError(
                f"Expected shared_bits=8 unless shared_values='uniform' (only uniform codes take another width), got "
                f"shared_bits={self.shared_bits} with shared_values={self.shared_values!r}"
            )
        _choice("peak_runtime", self.peak_runtime, PEAK_RUNTIMES)
        if self.peak_runtime == "banded" and self.scale_mode == "dynamic":
            raise ValueError(
                "Expected scale_mode 'static' or 'learnable' with peak_runtime='banded' (a band's maximum is not the "
                "tensor's, so dynamic scales cannot run in bands), got scale_mode='dynamic'"
            )
        if (
            isinstance(self.percentile, bool)
            or not isinstance(self.percentile, int | float)
            or not 0.0 < float(self.percentile) <= 100.0
        ):
            raise ValueError(f"Expected percentile to be a number in (0, 100], got {self.percentile!r}")
        if self.scale_mode == "dynamic" and self.clipping != "none":
            raise ValueError(
                f"Expected clipping='none' with scale_mode='dynamic' (dynamic scales take the run-time "
                f"maximum), got clipping={self.clipping!r}; use scale_mode='static' to clip"
            )

    def _check_shared(self) -> None:
        """``shared_values`` other than ``fp32`` needs input quantizers whose re-quantization is exact."""
        rules = [
            ("where", self.where, self.where == "input", "'input' (shared values are layer inputs)"),
            ("scale_mode", self.scale_mode, self.scale_mode != "dynamic",
             "'static' or 'learnable' (a dynamic scale re-quantizes q(x) with another maximum)"),
            ("method", self.method, self.method != "noisyquant",
             "not 'noisyquant' (its noise makes re-quantizing the coded values inexact)"),
            ("ranking", self.ranking, self.ranking != "greedy" or not self.selects_channels,
             "not 'greedy' (its fx replay does not run the producers' hooks)"),
        ]  # fmt: skip
        for name, value, ok, rule in rules:
            if not ok:
                raise ValueError(
                    f"Expected {name} to be {rule} with shared_values={self.shared_values!r}, got {name}={value!r}; "
                    "hint: shared_values='fp32' accepts every setting"
                )

    def _check_layers(self) -> None:
        for name in ("include", "exclude"):
            for pattern in getattr(self, name):
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(
                        f"Expected {name} entries to be regular expressions, got {pattern!r}: {err}"
                    ) from None
        for t in self.layer_types:
            _choice("layer_types entry", t, LAYER_TYPES)
        if not self.layer_types:
            raise ValueError("Expected layer_types to name at least one layer type, got []")

    @property
    def selects_channels(self) -> bool:
        """Whether calibration ranks channels: the method keeps important channels and ``ratio > 0``."""
        return self.method in SELECTING_METHODS and (self.ratio > 0 or self.target_bits is not None)

    @property
    def full_precision(self) -> bool:
        """Whether the method installs pass-through quantizers (``fp32``: baselines and memory accounting)."""
        return self.method in FULL_PRECISION_METHODS

    @property
    def effective_ratio(self) -> float:
        """The fraction of important channels used: 0 unless the method selects channels.

        With ``target_bits``, the largest fraction the allocation may choose.
        """
        if self.target_bits is not None and self.selects_channels:
            return max(RATIOS)
        return float(self.ratio) if self.selects_channels else 0.0

    @property
    def needs_gradients(self) -> bool:
        """Whether calibration must run a backward pass (gradient-based rankings, budget allocation)."""
        return (self.selects_channels and self.ranking in GRADIENT_RANKINGS) or self.target_bits is not None

    def replace(self, **changes: Any) -> DQAConfig:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict of every field."""
        d = dataclasses.asdict(self)
        for k in ("layer_types", "include", "exclude"):
            d[k] = list(d[k])
        return d


PAPER_QUANTIZER: dict[str, Any] = dict(
    scale_mode="dynamic",
    code="signed",
    clipping="none",
    where="output",
    first_layer_bits=None,
    last_layer_bits=None,
)
"""How the paper quantizes (``DQA_METHOD.md`` sections 2 and 5): dynamic per-channel maxima, signed codes, no
clipping, every Conv2d and Linear *output* quantized, first and last layers included."""

PAPER_SETTING: dict[str, Any] = {**PAPER_QUANTIZER, "extra_bits": 3, "ratio": 0.4, "method": "dqa", "ranking": "greedy"}
"""The paper's exact setting, every field but ``bits``: :data:`PAPER_QUANTIZER` with ``r = 0.4``, ``m = 3`` and
the greedy ranking, as in the extended version (``DQA_METHOD.md`` sections 3-4). Defined here only."""


def paper_config(bits: int, **changes: Any) -> DQAConfig:
    """The paper's exact setting (:data:`PAPER_SETTING`) at ``bits`` bits, with ``changes`` applied.

    >>> paper_config(3, ranking="fisher").where
    'output'
    """
    return DQAConfig(**{**PAPER_SETTING, "bits": bits, **changes})
