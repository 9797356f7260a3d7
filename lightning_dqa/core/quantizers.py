"""``nn.Module`` quantizers: per-layer state (scales, important-channel masks) as registered buffers.

One :class:`ActivationQuantizer` sits on each target layer as its submodule ``dqa_quantizer`` (see
:mod:`lightning_dqa.core.attach`), so its state is part of the model's ``state_dict``: it moves with
``.to(device)``, is saved in checkpoints and restored on resume, and a checkpoint whose quantizer layout does
not match the model is caught by key or shape. All maths is delegated to :mod:`lightning_dqa.core.functional`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dqa.core import functional as F
from lightning_dqa.core._fields import fail, read_bool, read_float_list, read_int, read_int_list
from lightning_dqa.core.widths import MAX_EXTRA_BITS, WIDTHS

__all__ = ["ActivationQuantizer"]


class ActivationQuantizer(nn.Module):
    """Fake-quantizes one activation tensor per channel: DQA on important channels, direct on the rest.

    Important channels are quantized at ``bits + extra_bits`` with scale ``scale / 2**extra_bits``; every
    other channel at ``bits`` with ``scale``. The stored result would be ``bits``-wide main codes for all
    channels plus the shifting errors of the important ones; here the values are dequantized straight away
    (fake quantization), which is exact: see :func:`lightning_dqa.core.functional.dqa_dequantize`.

    Buffers (all ``(C,)`` unless noted), saved in the ``state_dict``:
        ``scale``: ``bits``-bit per-channel scales (static and learnable modes; a Parameter when learnable).
        ``important``: bool mask of the channels kept at ``bits + extra_bits``.
        ``signed``: scalar bool, whether codes are signed.
        ``calibrated``: scalar bool, set once calibration froze scales and selection.
        ``bits`` / ``extra_bits``: scalar int, so a checkpoint records the widths it was made with.
        ``error_counts``: ``(2**extra_bits,)`` calibration histogram of shifting errors (the code book's source).

    ``bits``, ``extra_bits`` and ``signed`` have Python mirrors (:attr:`n`, :attr:`m`, :attr:`is_signed`) that the
    forward pass reads, so it never waits for the device; ``load_state_dict``, :meth:`load_artifact_entry` and
    :meth:`set_signed` keep them current, and code that writes those buffers in place otherwise calls
    :meth:`sync_mirrors` afterwards.

    Deployment artifacts (:mod:`lightning_dqa.deploy.artifact`): :meth:`artifact_entry` writes this state as JSON,
    :meth:`check_artifact_entry` validates an entry against this quantizer's layout without changing anything,
    :meth:`load_artifact_entry` writes the checked tensors into the buffers. Subclasses with more state extend
    the first two (see :class:`lightning_dqa.core.noisyquant.NoisyQuantizer`).

    Args:
        num_channels: ``C``, the size of the channel axis.
        bits: ``n``; 0 makes a pass-through quantizer (a layer left in full precision).
        extra_bits: ``m``.
        scale_mode: ``dynamic``, ``static`` or ``learnable`` (see :class:`lightning_dqa.DQAConfig`).
        signed: initial signedness of codes (calibration may switch it with ``code="auto"``).
        channel_dim: channel axis of the quantized tensor (1 for conv activations, -1 for linear ones).
        name: qualified name of the layer it serves, used in error messages.
        allocated: the widths are chosen by calibration under a memory budget (``DQAConfig.target_bits``), so a
            checkpoint or artifact brings its own ``bits`` / ``extra_bits`` (in range) rather than matching these.

    Example:
        >>> q = ActivationQuantizer(4, bits=3, scale_mode="dynamic")
        >>> x = torch.randn(2, 4, 5, 5)
        >>> q(x).shape
        torch.Size([2, 4, 5, 5])

    """

    scale: Tensor
    important: Tensor
    signed: Tensor
    calibrated: Tensor
    bits: Tensor
    extra_bits: Tensor
    error_counts: Tensor

    def __init__(
        self,
        num_channels: int,
        bits: int,
        extra_bits: int = 3,
        scale_mode: str = "static",
        signed: bool = True,
        channel_dim: int = 1,
        name: str = "",
        allocated: bool = False,
    ) -> None:
        super().__init__()
        if scale_mode not in ("dynamic", "static", "learnable"):
            raise ValueError(
                f"Layer {name!r}: expected scale_mode to be one of ['dynamic', 'static', 'learnable'], "
                f"got {scale_mode!r}"
            )
        self.num_channels = int(num_channels)
        self.scale_mode = scale_mode
        self.channel_dim = channel_dim
        self.name = name
        self.allocated = bool(allocated)
        self.register_buffer("bits", torch.tensor(int(bits)))
        self.register_buffer("extra_bits", torch.tensor(int(extra_bits)))
        if scale_mode == "learnable":
            # A Parameter from the start, so the user's configure_optimizers (which runs before calibration)
            # already sees it; calibration writes its initial value in place.
            self.scale = nn.Parameter(torch.ones(num_channels))
        else:
            self.register_buffer("scale", torch.ones(num_channels))
        self.register_buffer("important", torch.zeros(num_channels, dtype=torch.bool))
        self.register_buffer("signed", torch.tensor(bool(signed)))
        self.register_buffer("calibrated", torch.tensor(False))
        # Histogram of shifting errors on calibration data; the Huffman code book is built from it.
        self.register_buffer("error_counts", torch.zeros(2 ** int(extra_bits), dtype=torch.int64))
        self.enabled = True
        # Channels left in full precision for one search step (the greedy ranking); never saved.
        self.fp_mask: Tensor | None = None
        # Python mirrors of ``bits``, ``extra_bits`` and ``signed``: the forward pass reads these, never the
        # buffers, since reading a device tensor on the host (``int(t)``, ``bool(t)``) waits for the device.
        self._n, self._m, self._signed = int(bits), int(extra_bits), bool(signed)

    # ------------------------------------------------------------------ state
    @property
    def n(self) -> int:
        """``bits`` as a Python int (a mirror of the buffer: no device read)."""
        return self._n

    @property
    def m(self) -> int:
        """``extra_bits`` as a Python int (a mirror of the buffer: no device read)."""
        return self._m

    @property
    def is_signed(self) -> bool:
        """``signed`` as a Python bool (a mirror of the buffer: no device read)."""
        return self._signed

    @torch.no_grad()
    def set_signed(self, signed: bool) -> None:
        """Set whether codes are signed: the buffer and its Python mirror (calibration's ``code="auto"``).

        Args:
            signed: the new signedness.
        """
        self.signed.fill_(bool(signed))
        self._signed = bool(signed)

    def sync_mirrors(self) -> None:
        """Re-read ``bits``, ``extra_bits`` and ``signed`` into their Python mirrors.

        Call it after writing those buffers in place (``load_state_dict`` and :meth:`load_artifact_entry` do).
        It reads the buffers on the host, so it belongs with state changes, never in a forward pass.
        """
        if not self.bits.is_meta:  # a module built on the meta device has no values to read yet
            self._n, self._m, self._signed = int(self.bits), int(self.extra_bits), bool(self.signed)

    @torch.no_grad()
    def set_widths(self, bits: int, extra_bits: int) -> None:
        """Set ``bits`` and ``extra_bits`` (budget allocation, or the widths a checkpoint recorded).

        Buffers and mirrors change together; the ``(2**extra_bits,)`` error histogram is replaced by zeros when
        its size changes. Scales, selection and histogram must be (re)computed afterwards.
        """
        self.bits.fill_(int(bits))
        self.extra_bits.fill_(int(extra_bits))
        if self.error_counts.numel() != 2 ** int(extra_bits):
            self.error_counts = torch.zeros(2 ** int(extra_bits), dtype=torch.int64, device=self.error_counts.device)
        self._n, self._m = int(bits), int(extra_bits)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Load this module's own tensors as usual, then refresh the Python mirrors of the widths and sign.

        An allocated quantizer first takes the checkpoint's widths (their ranges were checked before loading, see
        :func:`lightning_dqa.deploy.checkpoint.check_quantizer_layout`), so its error histogram has the saved size.
        """
        bits, extra = state_dict.get(prefix + "bits"), state_dict.get(prefix + "extra_bits")
        if self.allocated and isinstance(bits, Tensor) and isinstance(extra, Tensor):
            if 0 <= int(extra) <= MAX_EXTRA_BITS:  # out of range: the load below fails on the histogram's shape
                self.set_widths(int(bits), int(extra))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.sync_mirrors()

    @property
    def passthrough(self) -> bool:
        """True when this quantizer leaves its tensor in full precision (``bits == 0``)."""
        return self.n == 0

    @torch.no_grad()
    def set_static_scale(self, scale: Tensor) -> None:
        """Freeze per-channel ``bits``-bit scales ``(C,)`` (the starting point of a learnable scale)."""
        self.scale.copy_(scale.detach().to(self.scale.device, self.scale.dtype))

    # ------------------------------------------------------------------ artifact entries
    def artifact_entry(self) -> dict[str, Any]:
        """This quantizer's state as a JSON-ready dict (the per-layer fields of the deployment artifact).

        Scales are written as Python floats, which hold every float32 exactly, so they read back bit for bit.

        Returns:
            ``{"channel_dim", "channels", "bits", "extra_bits", "signed", "scale_mode", "scales" (``None`` when
            dynamic), "important" (sorted channel indices), "error_counts"}``.

        Example:
            >>> ActivationQuantizer(2, bits=3, extra_bits=1).artifact_entry()["important"]
            []
        """
        dynamic = self.scale_mode == "dynamic"
        return {
            "channel_dim": self.channel_dim,
            "channels": self.num_channels,
            "bits": self.n,
            "extra_bits": self.m,
            "signed": self._signed,
            "scale_mode": self.scale_mode,
            "scales": None if dynamic else [float(s) for s in self.scale.detach().abs().float().cpu()],
            "important": torch.nonzero(self.important.cpu()).flatten().tolist(),
            "error_counts": [int(c) for c in self.error_counts.cpu()],
        }

    def check_artifact_entry(self, entry: Mapping[str, Any], owner: str = "") -> dict[str, Tensor]:
        """Validate an artifact entry against this quantizer's layout; nothing is changed.

        Args:
            entry: a dict as :meth:`artifact_entry` writes it (parsed JSON).
            owner: how errors name the entry, e.g. ``"layer 'net.0'"``; default: this quantizer's name.

        Returns:
            The tensors :meth:`load_artifact_entry` takes, by buffer name.

        Raises:
            ValueError: naming the field, the rule and the value, when a field is missing, of another JSON type,
                out of range, or does not match this quantizer's channels, widths, channel axis or scale mode.
        """
        owner = owner or f"layer {self.name!r}"
        fields = [("channels", self.num_channels, 1, 2**31), ("channel_dim", self.channel_dim, -8, 7)]
        widths = {}
        if self.allocated:  # chosen by calibration under a budget: the entry says what was chosen
            n = read_int(entry, "bits", owner, min(WIDTHS), max(WIDTHS))
            m = read_int(entry, "extra_bits", owner, 0, MAX_EXTRA_BITS)
            widths = {"bits": torch.tensor(n), "extra_bits": torch.tensor(m)}
        elif read_int(entry, "bits", owner, 0, 16) == 0 and self.n != 0:
            # a layer calibration left in full precision (never called as a module, e.g. an attention out_proj)
            widths = {"bits": torch.tensor(0), "extra_bits": torch.tensor(self.m)}
            fields += [("extra_bits", self.m, 0, 16)]
        else:
            fields += [("bits", self.n, 0, 16), ("extra_bits", self.m, 0, 16)]
        for field, mine, lo, hi in fields:
            if read_int(entry, field, owner, lo, hi) != mine:
                raise fail(owner, field, f"{mine} (the model's value; the config gives it)", entry[field])
        m = int(widths["extra_bits"]) if widths else self.m
        if entry.get("scale_mode") != self.scale_mode:
            raise fail(owner, "scale_mode", f"{self.scale_mode!r} (the config's)", entry.get("scale_mode"))
        out = {
            **widths,
            "signed": torch.tensor(read_bool(entry, "signed", owner)),
            "important": self._check_important(entry, owner),
            "error_counts": torch.tensor(
                read_int_list(entry, "error_counts", owner, 0, 2**62, length=2**m), dtype=torch.int64
            ),
        }
        if self.scale_mode == "dynamic":
            if entry.get("scales", None) is not None:
                raise fail(owner, "scales", "null with scale_mode 'dynamic'", entry["scales"])
        else:
            out["scale"] = self._check_scales(entry, owner)
        return out

    def _check_scales(self, entry: Mapping[str, Any], owner: str) -> Tensor:
        """``(C,)`` float32 scales, finite and positive once in float32 too."""
        scale = torch.tensor(read_float_list(entry, "scales", owner, self.num_channels, positive=True))
        bad = ~(torch.isfinite(scale) & (scale > 0))  # float64 values that overflow or vanish in float32
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            raise fail(owner, f"scales[{i}]", "a positive number representable in float32", entry["scales"][i])
        return scale

    def _check_important(self, entry: Mapping[str, Any], owner: str) -> Tensor:
        """``(C,)`` bool mask from a list of distinct channel indices (empty for a pass-through layer)."""
        index = read_int_list(entry, "important", owner, 0, self.num_channels - 1)
        if len(set(index)) != len(index):
            raise fail(owner, "important", "distinct channel indices", index)
        if index and self.passthrough:
            raise fail(owner, "important", "empty for a layer left in full precision (bits 0)", index)
        mask = torch.zeros(self.num_channels, dtype=torch.bool)
        mask[torch.tensor(index, dtype=torch.long)] = True
        return mask

    @torch.no_grad()
    def load_artifact_entry(self, checked: Mapping[str, Tensor]) -> None:
        """Write tensors returned by :meth:`check_artifact_entry` into the buffers; mark calibrated and enable.

        Args:
            checked: buffer name -> tensor of that buffer's shape (``"scale"`` goes through
                :meth:`set_static_scale`, so a learnable scale stays the same Parameter).
        """
        if "bits" in checked:  # an allocated quantizer takes the widths its entry recorded
            self.set_widths(int(checked["bits"]), int(checked["extra_bits"]))
        for name, value in checked.items():
            if name == "scale":
                self.set_static_scale(value)
            elif name not in ("bits", "extra_bits"):
                getattr(self, name).copy_(value)
        self.calibrated.fill_(True)
        self.enabled = True
        self.sync_mirrors()

    # ------------------------------------------------------------------ maths
    def current_scale(self, x: Tensor) -> Tensor:
        """The ``bits``-bit scales used for ``x``: run-time maxima (dynamic) or the frozen ones."""
        if self.scale_mode == "dynamic":
            return F.scale_from_max(F.channel_absmax(x, self.channel_dim), self.n, self._signed)
        scale = self.scale
        if self.scale_mode == "learnable":
            scale = scale.abs() + 1e-12  # an optimizer step may push a scale through zero
        return scale

    def code_ranges(self, important: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Per-channel ``(shift, qmin, qmax)``: ``2**m`` on important channels, 1 elsewhere, and code bounds."""
        imp = self.important if important is None else important
        n, m = self.n, self.m
        signed = self._signed
        lo_n, hi_n = F.quant_range(n, signed)
        lo_h, hi_h = F.quant_range(n + m, signed)
        shift = torch.where(imp, 2.0**m, 1.0).to(self.scale.device)
        qmin = torch.where(imp, lo_h, lo_n).to(self.scale.device)
        qmax = torch.where(imp, hi_h, hi_n).to(self.scale.device)
        return shift, qmin, qmax

    def quantize_values(self, x: Tensor, important: Tensor | None = None) -> Tensor:
        """Fake-quantize ``x`` (same shape) with this layer's scales and the given important mask."""
        scale_n = self.current_scale(x)
        shift, qmin, qmax = self.code_ranges(important)
        return F.mixed_fake_quantize(x, scale_n / shift, qmin, qmax, self.channel_dim, self.fp_mask)

    def forward(self, x: Tensor) -> Tensor:
        """Fake-quantized ``x`` (same shape); ``x`` itself when disabled or pass-through."""
        if not self.enabled or self.passthrough:
            return x
        if x.shape[self.channel_dim] != self.num_channels:
            raise ValueError(
                f"Layer {self.name!r}: expected {self.num_channels} channels on dim {self.channel_dim}, "
                f"got a tensor of shape {tuple(x.shape)}"
            )
        return self.quantize_values(x)

    def code_input(self, x: Tensor) -> Tensor:
        """The tensor whose codes are stored for ``x`` (``x`` itself; NoisyQuant adds its noise).

        The byte codec (:func:`lightning_dqa.deploy.layer_bytes.quantizer_to_bytes`) quantizes this tensor.
        """
        return x

    def input_noise(self) -> Tensor | None:
        """The per-channel offset ``(C,)`` :meth:`code_input` adds before coding, or ``None`` (none is added).

        Deployment code asks this instead of testing the quantizer's class: a decoder subtracts it from the
        decoded values, an ONNX export adds it before ``QuantizeLinear``.
        """
        return None

    def codes(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Integer DQA codes of ``x``: ``(main, error, scale_n)`` as :func:`functional.dqa_quantize` returns."""
        scale_n = self.current_scale(x).detach()
        max_abs = scale_n * 2.0 ** (self.n - int(self._signed))
        return F.dqa_quantize(x.detach(), max_abs, self.n, self.m, self.important, self._signed, self.channel_dim)

    def extra_repr(self) -> str:
        """Summary shown by ``print(model)``."""
        return (
            f"name={self.name!r}, channels={self.num_channels}, bits={self.n}, extra_bits={self.m}, "
            f"scale_mode={self.scale_mode}, important={int(self.important.sum())}"
        )
