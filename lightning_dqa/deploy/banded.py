"""Banded compressed inference: no full-precision activation exists whole; stored activations are row-banded blobs.

:func:`run_compressed` runs a model layer by layer, so every convolution output, every shortcut and every
expanded tensor of an inverted residual is a whole float32 tensor at some step. :func:`run_banded` runs the same
calibrated model (its :mod:`torch.fx` trace, quantized layers kept whole) as a device runtime with row bands
does (MCUNetV2's patches, StreamNet's line buffers, without their line buffers: overlapping rows are computed
again):

1. **Stored values.** A value is *stored* whole, between the steps that write and read it, when

   * it is the model input, a model output or the input or output of a node that cannot run in bands;
   * more than one node reads it (a block input read by a convolution and by the residual shortcut, a U-Net skip);
   * a quantized pointwise convolution that widens its input (an inverted residual's expansion) reads it.

   Everything else is computed inside the *region* of the stored value it feeds: the nodes between the region's
   stored inputs and its stored output (e.g. conv - BN - ReLU - conv - BN - add - ReLU of a residual block, or
   expand - depthwise - project of an inverted residual).
2. **Codes.** A stored value is kept as codes, a :class:`BandedBlob` of one blob per band of rows
   (:func:`~.layer_bytes.quantizer_to_bytes`), when the fake-quantized model itself reads nothing but those codes:
   every reader is a quantized layer reading it as its input (one blob per quantizer), or it is a shared value
   coded at its producer (``DQAConfig(shared_values="codes"|"int8")``, :mod:`lightning_dqa.core.shared`), which
   every reader reads decoded. Otherwise it is kept in float32 (the model input, a shortcut with
   ``shared_values="fp32"``, a U-Net skip, the inputs of the classifier head).
3. **Bands.** A region computes its output ``band_rows`` rows at a time. The rows each node needs are propagated
   back from the band (a 3x3 convolution needs one more row above and below, a stride-2 one twice the rows, a
   transposed convolution half); stored codes are decoded only for the bands those rows fall in, every node
   runs on its rows only (zero padding added where the rows reach the tensor's border), and the band's output is
   encoded (or written into its float32 buffer) before the next band. A quantizer acts on one channel at a time,
   so quantizing a band is quantizing the tensor. A value only depthwise convolutions read (an inverted
   residual's expanded tensor) keeps its line buffer as codes in ``depthwise_chunks`` channel chunks, decoded
   and convolved one chunk at a time, so its rows are never all in float32 at once.
4. **The peak is an arena.** Every stored value is a buffer live from the step (region or whole node) that writes
   it to the last step that reads it; each step also holds its scratch, the most bytes of band tensors (decoded
   rows, intermediate rows, the output rows) live at once while it runs, measured on the tensors themselves. The
   buffers are placed by :func:`~.arena.plan_arena` (``order="best"``); :attr:`BandedReport.peak` is the arena's
   size, with the model input and the final output listed apart (:attr:`BandedReport.input_bytes`,
   ``output_bytes``).
5. **In place.** A step that reads a stored value for the last time frees its bands as it goes, and writes its
   output into them (:meth:`BandedReport.in_place`: a residual block's output over its input, a few bands
   below it). Chains of such values share one ring buffer, so a stage of blocks holds about one value, not two.

The report's types (:class:`BandedBlob`, :class:`Stored`, :class:`BandedReport`) live in :mod:`.banded_report`.

The nodes that run in bands: ``Conv2d`` (zero padding, any stride, dilation and groups), ``ConvTranspose2d``
(no output padding), ``MaxPool2d`` and ``AvgPool2d`` (``ceil_mode=False``), BatchNorm in eval mode, activations,
dropout, identity, element-wise arithmetic (an operand of one row, such as a squeeze-excitation scale, is read
whole), ``torch.cat`` along the channels, ``F.pad`` with non-negative padding, and strided row slicing
(``x[:, :, ::2, ::2]``). Any other node with a 4-D output of more than one row runs whole, in float32, and is
listed in :attr:`BandedReport.whole` with the reason; so are the values it makes stored whole.

Bands change no float sum of a convolution or a pooling (each output value is computed from the same inputs by the
same kernel), but a kernel may order its sums by the tensor's shape, so the output may differ from the
fake-quantized forward in the last bits of a value near a quantization step. :func:`run_banded` returns the output;
compare it (``BandedReport`` does not know the fake-quantized one).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_dqa import DQAConfig, calibrate, prepare
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
    >>> net = net.eval()
    >>> cfg = DQAConfig(bits=3, ranking="energy", first_layer_bits=None)
    >>> _ = prepare(net, cfg)
    >>> x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    >>> _ = calibrate(net, cfg, [x], forward_fn=lambda m, b: m(b))
    >>> out, report = run_banded(net, x, band_rows=2)
    >>> with torch.no_grad():
    ...     bool((out - net(x)).abs().max() < 1e-4)
    True
    >>> [(s.name, s.why) for s in report.stored]  # the ReLU between the convolutions is a line buffer only
    [('input_1', 'model input'), ('_3', 'model output')]
    >>> report.whole
    []

"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as TF
from torch import Tensor, fx, nn
from torch.utils._pytree import tree_leaves

from lightning_dqa.codec.entropy import DEFAULT_CODER
from lightning_dqa.codec.layout import check_coder
from lightning_dqa.core.attach import _input_hook
from lightning_dqa.core.quantizers import ActivationQuantizer
from lightning_dqa.core.shared import channel_quantizer, leading_quantizer, wide_quantizer
from lightning_dqa.deploy.banded_report import BandedBlob, BandedReport, InPlace, Stored, WholeNode
from lightning_dqa.deploy.compressed import (
    ELEMENTWISE_FUNCTIONS,
    ELEMENTWISE_MODULES,
    _active_quantizers,
    _trace,
    decode,
)
from lightning_dqa.deploy.layer_bytes import quantizer_to_bytes
from lightning_dqa.deploy.split_concat import split_concat_convs

__all__ = ["BandedBlob", "BandedReport", "InPlace", "Stored", "WholeNode", "run_banded"]


@dataclass
class _Band:
    """Rows ``start`` to ``start + rows`` of a value.

    ``coded`` maps the id of a quantizer to the rows decoded from its blob (``q(x)``: its layer does not quantize
    them again); ``t`` is the value itself (the first of them for codes).
    """

    t: Any
    start: int
    coded: dict[int, Tensor] = field(default_factory=dict)

    def rows(self, lo: int, hi: int, quantizer: int = 0) -> tuple[Tensor, bool]:
        """Rows ``lo`` to ``hi``, and whether they are ``q(x)`` of the quantizer with id ``quantizer``."""
        t = self.coded.get(quantizer, self.t) if quantizer else self.t
        return t[:, :, lo - self.start : hi - self.start], bool(quantizer) and quantizer in self.coded

    @property
    def nbytes(self) -> int:
        held = {id(t): t for t in (self.t, *self.coded.values()) if isinstance(t, Tensor)}
        return sum(_nbytes(t) for t in held.values())


@dataclass(frozen=True)
class _Bytes:
    """Bytes under the three ways of storing what is coded.

    ``stored`` (blobs), ``int8`` (a byte per value) and ``fp32`` (float32). Band tensors are float32 in all
    three; rows decoded from codes cost nothing in ``fp32`` (a float32 buffer is read in place).
    """

    stored: int = 0
    int8: int = 0
    fp32: int = 0

    @classmethod
    def same(cls, n: int) -> _Bytes:
        return cls(n, n, n)

    @classmethod
    def decoded(cls, n: int) -> _Bytes:
        return cls(n, n, 0)

    def __add__(self, o: _Bytes) -> _Bytes:
        return _Bytes(self.stored + o.stored, self.int8 + o.int8, self.fp32 + o.fp32)

    def __sub__(self, o: _Bytes) -> _Bytes:
        return _Bytes(self.stored - o.stored, self.int8 - o.int8, self.fp32 - o.fp32)

    def top(self, o: _Bytes) -> _Bytes:
        return _Bytes(max(self.stored, o.stored), max(self.int8, o.int8), max(self.fp32, o.fp32))


def _cost(b: Any) -> _Bytes:
    """What a band or a line buffer holds."""
    if isinstance(b, _HeldCodes):
        return _Bytes(len(b.blob), b.numel, 4 * b.numel)
    if isinstance(b, _HeldChunks):
        return sum((_cost(p) for p in b.parts), _Bytes())
    if isinstance(b, _SplitBand):
        held = _cost(b.held) if b.held is not None else _Bytes()
        return held + _Bytes.same(_nbytes(b.new) if b.new is not None else 0)
    return _Bytes.same(_nbytes(b))


@dataclass
class _HeldCodes:
    """A line buffer kept as codes: rows ``start`` to ``start + rows`` of a value its layer reads quantized."""

    q: ActivationQuantizer
    start: int
    rows: int
    blob: bytes
    numel: int

    @property
    def nbytes(self) -> int:
        return len(self.blob)

    def band(self) -> _Band:
        """The rows decoded (``q(x)``; its layer quantizes them again, which changes nothing)."""
        return _Band(decode(self.q, self.blob), self.start)


@dataclass
class _HeldChunks:
    """A depthwise convolution's line buffer as codes, one blob per channel chunk (rows ``start`` on)."""

    parts: list[_HeldCodes]

    @property
    def start(self) -> int:
        return self.parts[0].start

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


@dataclass
class _SplitBand:
    """The band of a value only depthwise convolutions read: its line buffer kept as chunk codes, new rows float.

    Rows ``start`` to ``new_start`` are in ``held`` (never decoded whole), rows from ``new_start`` in ``new``.
    """

    held: _HeldChunks | None
    new: Tensor | None
    start: int
    new_start: int
    chunks: list[tuple[ActivationQuantizer, tuple[int, int]]]
    _decoded: dict[int, Tensor] = field(default_factory=dict, repr=False)  # per chunk: decoded once per band

    @property
    def nbytes(self) -> int:
        return (self.held.nbytes if self.held is not None else 0) + (_nbytes(self.new) if self.new is not None else 0)

    def chunk(self, c: int, lo: int, hi: int) -> tuple[Tensor, int]:
        """Rows ``lo`` to ``hi`` of chunk ``c``'s channels: held rows decoded, new rows as they are.

        Returns the rows and the bytes decoded for them (scratch while the chunk runs; the depthwise convolution
        and the line buffer kept after it both read them, decoded once here as a speed-up of the simulation).
        """
        chunk = self.chunks[c][1]
        parts, decoded = [], 0
        if self.held is not None and lo < self.new_start:
            held = self.held.parts[c]
            if c not in self._decoded:
                self._decoded[c] = decode(held.q, held.blob)
            rows = self._decoded[c]
            decoded = _nbytes(rows)
            parts.append(rows[:, :, lo - held.start : min(hi, self.new_start) - held.start])
        if self.new is not None and hi > self.new_start:
            first, end = max(lo, self.new_start) - self.new_start, hi - self.new_start
            parts.append(self.new[:, chunk[0] : chunk[1], first:end])
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)), decoded


@torch.no_grad()
def run_banded(
    model: nn.Module, inputs: Tensor, band_rows: int = 1, coder: str = DEFAULT_CODER, strict: bool = False,
    depthwise_chunks: int = 4, split_concat: bool = True,
) -> tuple[Any, BandedReport]:
    """Run a calibrated model in row bands with its stored activations as banded blobs; see the module docstring.

    Args:
        model: a model with calibrated quantizers (:func:`lightning_dqa.prepare` + :func:`lightning_dqa.calibrate`)
            in eval mode, traceable with :mod:`torch.fx`.
        inputs: images ``(N, C, H, W)``.
        band_rows: output rows each region computes at a time (``>= 1``): fewer rows, less scratch, more rows
            computed again and more blob headers.
        coder: entropy coder of the shifting errors (:func:`~.layer_bytes.quantizer_to_bytes`).
        strict: refuse a model with a node that cannot run in bands (a ``ValueError`` naming each) instead of
            running it whole and listing it in :attr:`BandedReport.whole`.
        depthwise_chunks: a value only depthwise convolutions read (an inverted residual's expanded tensor) keeps
            its line buffer as codes in this many channel chunks, decoded and convolved one chunk at a time, so
            its rows are never all float32 at once (``1``: decoded whole).
        split_concat: run a quantized convolution of a channel concatenation (a U-Net decoder's skip and
            upsampled input) as one convolution per part, summed (:mod:`.split_concat`): no concatenated band, and
            each part's rows decoded and convolved in turn. The sums are added in another order, so the output
            may differ from the fake-quantized forward in the last bits of a value.

    Returns:
        ``(output, report)``.

    Raises:
        ValueError: for a ``band_rows`` below 1, an input that is not ``(N, C, H, W)``, a model in training mode,
            a layer with dynamic scales, a node that cannot run in bands with ``strict=True``, or what
            :func:`~.compressed.run_compressed` refuses (no quantizer, an uncalibrated one, no trace).

    """
    for name, value in (("band_rows", band_rows), ("depthwise_chunks", depthwise_chunks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Expected {name} to be an int >= 1, got {value!r}")
    if not isinstance(inputs, Tensor) or inputs.ndim != 4:
        raise ValueError(f"Expected inputs to be images (N, C, H, W), got {_describe(inputs)}")
    if model.training:
        raise ValueError("run_banded needs the model in eval mode (BatchNorm must use its running statistics)")
    quantizers = _active_quantizers(model)
    dynamic = [name for name, q in quantizers.items() if q.scale_mode == "dynamic"]
    if dynamic:
        raise ValueError(
            f"run_banded needs frozen scales (a band's maximum is not the tensor's), and these layers have dynamic "
            f"ones: {dynamic}; calibrate with scale_mode='static' or use run_compressed"
        )
    check_coder(coder, torch.ones(1))
    gm, readers, coded, _ = _trace(model, quantizers, "run_banded")
    return _Banded(
        model, gm, dict(readers), quantizers, coded, band_rows, coder, strict, depthwise_chunks, split_concat
    ).run(inputs)


def _describe(x: Any) -> str:
    return f"a tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


class _Recorder(fx.Interpreter):
    """Runs the graph whole once (the plan): every node's value kept as its shape, or as the value itself."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.meta: dict[fx.Node, Any] = {}
        self.tensors: set[fx.Node] = set()

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        self.meta[n] = value.shape if isinstance(value, Tensor) else value
        if isinstance(value, Tensor) and n.op != "output":
            self.tensors.add(n)
        return value


@dataclass
class _Rule:
    """How a node runs in bands: its rows' map to each tensor input's rows, and the call on bands.

    ``pointwise``: an element-wise node, which a device runs in place on an input band no later node reads
    (conv-BN-ReLU fused, a residual sum written into its operand). ``whole``: operands read whole (a
    squeeze-excitation scale of one row).
    """

    need: Callable[[int, int], dict[fx.Node, tuple[int, int]]]
    run: Callable[[int, int, Mapping[fx.Node, _Band]], Tensor]
    pointwise: bool = False
    whole: frozenset[fx.Node] = frozenset()


class _Stream:
    """One region's pass over its bands: the band of every node, the line buffers between bands, the bytes live.

    Attributes:
        held: the rows each node keeps for a later band (float32, or codes of the layer that reads them).
        bands: the rows of the band being computed, per node.
        live: the bytes held now; ``peak``: the most held at once.

    """

    def __init__(
        self, runner: _Banded, store: dict[fx.Node, Stored], region: list[fx.Node], last_use: dict[fx.Node, int]
    ) -> None:
        self.runner, self.store, self.inside, self.last_use = runner, store, set(region), last_use
        self.codes = {x: runner._line_quantizer(x, self.inside) for x in region}
        self.split = {x: c for x in region if (c := runner._chunks(x, self.codes[x], self.inside)) is not None}
        self.held: dict[fx.Node, Any] = {}
        self.bands: dict[fx.Node, Any] = {}
        self.live = self.peak = _Bytes()
        self.nxt: dict[fx.Node, tuple[int, int]] = {}

    def begin(self, nxt: dict[fx.Node, tuple[int, int]]) -> None:
        """Start a band; ``nxt``: the first row each node is read from in a later band."""
        self.nxt, self.bands = nxt, {}

    def step(
        self, n: fx.Node, rows: tuple[int, int], new: tuple[int, int] | None, reads: dict[fx.Node, tuple[int, int]]
    ) -> None:
        """Give node ``n`` its ``rows``: its line buffer, plus the ``new`` rows computed from ``reads``."""
        r, a = self.runner, rows[0]
        old: Any = self.held.pop(n, None)
        if n in self.split:  # read chunk by chunk: the line buffer stays codes
            if new is not None and new[0] == a and old is not None:  # nothing of it is read again
                self.live -= _cost(old)
                old = None
            band = _SplitBand(old, None, a, a + (_rows(old) if old is not None else 0), self.split[n])
        if isinstance(old, _HeldCodes):  # decoded for the node that reads it
            decoded = old.band()
            self.live += _cost(decoded) - _cost(old)
            self.peak = self.peak.top(self.live)
            old = decoded
        if new is None:  # every row it must give is in its line buffer
            self.bands[n] = band if n in self.split else old
            return
        local = {x: r._read(self.store[x], *rr, n) for x, rr in reads.items() if x not in self.inside}
        local_bytes = _Bytes.decoded(sum(v.nbytes for x, v in local.items() if self.store[x].fp32 is None))
        r.transient = 0
        value = r.rules[n].run(*new, {**self.bands, **local})
        transient = _Bytes.decoded(r.transient)  # chunk rows a split band decoded while ``n`` ran
        size = _nbytes(value)
        if n in self.split:
            t: Any = _SplitBand(band.held, value, a, new[0], self.split[n])
        else:
            t = value if new[0] == a else torch.cat([old.rows(a, new[0])[0], value], 2)
        order = r.order[n]
        dropped = [x for x in dict.fromkeys(n.all_input_nodes) if x in self.bands and self.last_use[x] <= order]
        kept = {x: self._keep(x, self.bands[x]) for x in dropped}  # read again later
        reuse = 0
        if r.rules[n].pointwise:  # run in place on an input band dropped here
            reuse = next((self.bands[x].nbytes for x in dropped if kept[x] is None and self.bands[x].nbytes == size), 0)
        # the new rows go into the node's line buffer (a ring of rows on a device): it grows from old to t; the part
        # of a ring that is kept costs nothing
        grows = size if t is value or n in self.split else _nbytes(t) - (old.nbytes if old is not None else 0)
        self.peak = self.peak.top(self.live + local_bytes + transient + _Bytes.same(grows - reuse))
        if old is not None:
            self.live -= _cost(old)
        self.bands[n] = t if n in self.split else _Band(t, a)
        self.live += _cost(self.bands[n])
        for x in dropped:
            self._hold(x, self.bands.pop(x), kept[x])

    def end(self, node: fx.Node) -> None:
        """Close a band: drop ``node``'s rows (handed on) and keep what a later band reads of the others."""
        self.live -= _cost(self.bands.pop(node))
        for x, band in list(self.bands.items()):
            self._hold(x, band, self._keep(x, band))
        self.bands = {}

    def _keep(self, x: fx.Node, band: Any) -> Any:
        """What ``x`` keeps of ``band`` for a later band (:meth:`_Banded._keep`; chunk codes for a split band)."""
        rows = self.nxt.get(x)
        if not isinstance(band, _SplitBand):
            return self.runner._keep(band, rows, self.codes[x])
        end = band.new_start + (int(band.new.shape[2]) if band.new is not None else 0)
        first = max(rows[0], band.start) if rows is not None else end
        if first >= end:
            return None
        parts = []
        for c, (q, _) in enumerate(band.chunks):
            t = band.chunk(c, first, end)[0]
            blob = quantizer_to_bytes(q, t, coder=self.runner.coder)
            parts.append(_HeldCodes(q, first, end - first, blob, t.numel()))
        return _HeldChunks(parts)

    def _hold(self, x: fx.Node, band: _Band, kept: _Band | _HeldCodes | None) -> None:
        self.live -= _cost(band)
        if kept is not None:
            self.held[x] = kept
            self.live += _cost(kept)


class _Banded:
    def __init__(
        self, model: nn.Module, gm: fx.GraphModule, readers: Mapping[fx.Node, str],
        quantizers: dict[str, ActivationQuantizer], coded: Mapping[fx.Node, tuple[str, str, bool]], band_rows: int,
        coder: str, strict: bool = False, chunks: int = 4, split_concat: bool = False,
    ) -> None:  # fmt: skip
        self.model, self.gm, self.readers, self.quantizers = model, gm, readers, quantizers
        self.coded, self.band_rows, self.coder, self.strict = coded, band_rows, coder, strict
        self.chunks, self.transient = chunks, 0
        self.split_concat = split_concat
        self.layer_of: dict[str, str] = {}  # part convolution's layer -> the layer it was split from
        self.nodes = list(gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.whole: list[WholeNode] = []
        self.tick = 0  # bands run so far, over every step (when each band of a stored value is written and read)

    # ----------------------------------------------------------------- plan
    def run(self, x: Tensor) -> tuple[Any, BandedReport]:
        rec = _Recorder(self.gm)
        rec.run(x)
        unpacked = _unpack_tuples(self.gm, self.readers, rec.meta)
        if self.split_concat:
            self.layer_of = split_concat_convs(self.gm, self.readers, self.quantizers, rec.meta)
        if unpacked or self.layer_of:  # the plan again, of the rewritten trace
            self.nodes = list(self.gm.graph.nodes)
            self.order = {n: i for i, n in enumerate(self.nodes)}
            rec = _Recorder(self.gm)
            rec.run(x)
        self.dtype, self.device = x.dtype, x.device
        self.meta, self.tensors = rec.meta, rec.tensors
        self.rules: dict[fx.Node, _Rule] = {}
        self.reductions: dict[fx.Node, fx.Node] = {}  # global average -> the value it averages
        for node in self.nodes:
            for value in tree_leaves(self.meta[node]) if not self._is_tensor(node) else ():
                if isinstance(value, Tensor):
                    raise ValueError(
                        f"run_banded runs nodes that return one tensor; {node.name} ({_op_name(self.gm, node)}) "
                        f"returns {type(self.meta[node]).__name__}"
                    )
            if self._is_tensor(node) and node.op not in ("placeholder", "output"):
                rule, why = self._rule(node)
                src = self._reduction(node)
                if rule is not None:
                    self.rules[node] = rule
                elif src is not None:
                    self.reductions[node] = src
                elif len(self.meta[node]) == 4 and self.meta[node][2] > 1:
                    self.whole.append(WholeNode(node.name, _op_name(self.gm, node), why))
        if self.strict and self.whole:
            raise ValueError(
                "run_banded(strict=True): these nodes cannot run in bands: "
                + "; ".join(f"{w.name} ({w.op}): {w.why}" for w in self.whole)
            )
        stored = self._stored_set()
        return self._execute(x, stored)

    def _reduction(self, node: fx.Node) -> fx.Node | None:
        """The value a global average pooling of ``node`` reads (computed in bands and summed), else ``None``.

        ``AdaptiveAvgPool2d(1)``, ``F.adaptive_avg_pool2d(x, 1)`` and ``x.mean((2, 3))`` / ``torch.mean(x, (-2, -1))``
        of a 4-D tensor of more than one row, keeping the dims or not.
        """
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node) or not self._is_tensor(src) or len(self.meta[src]) != 4:
            return None
        if self.meta[src][2] <= 1:
            return None
        if node.op == "call_module":
            m = self.gm.get_submodule(str(node.target))
            ok = isinstance(m, nn.AdaptiveAvgPool2d) and _pair(m.output_size) == (1, 1) and len(node.args) == 1
        elif node.target is TF.adaptive_avg_pool2d:
            size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
            ok = size in (1, (1, 1), [1, 1])
        elif node.target in (torch.mean, "mean"):
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = tuple(d % 4 for d in dims) if isinstance(dims, tuple | list) else ()
            ok = sorted(dims) == [2, 3] and "dtype" not in node.kwargs
        else:
            ok = False
        return src if ok else None

    def _is_tensor(self, node: fx.Node) -> bool:
        return node in self.tensors

    def _tensor_users(self, node: fx.Node) -> list[fx.Node]:
        """The nodes that read ``node``'s data (not only its shape), and the output."""
        return [u for u in node.users if u.op == "output" or self._is_tensor(u)]

    def _stored_set(self) -> dict[fx.Node, str]:
        """The values stored whole, with why (a value in no region's interior), and the global averages.

        A global average reads its value in bands and sums them, computing the value's region once more, so it
        does not count as a reader here.
        """
        stored: dict[fx.Node, str] = {}
        for node in self.nodes:
            if not self._is_tensor(node):
                continue
            users = [u for u in self._tensor_users(node) if self.reductions.get(u) is not node]
            if node.op == "placeholder":
                stored[node] = "model input"
            elif any(u.op == "output" for u in users):
                stored[node] = "model output"
            elif node in self.reductions:
                stored[node] = "global average (summed over bands)"
            elif node not in self.rules:
                stored[node] = "written by a node run whole"
            elif any(u not in self.rules for u in users):
                stored[node] = "read by a node run whole"
            elif len(users) > 1:
                stored[node] = f"read by {len(users)} nodes"
            elif any(self._expansion(u, node) for u in users):
                stored[node] = "read by a widening pointwise convolution (block input)"
            elif any(node in self.rules[u].whole for u in users):
                stored[node] = "read whole (broadcast)"
        return stored

    def _expansion(self, user: fx.Node, node: fx.Node) -> bool:
        if user.op != "call_module" or user not in self.readers:
            return False
        m = self.gm.get_submodule(str(user.target))
        return (
            isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (1, 1)
            and m.out_channels > m.in_channels and user.args[0] is node
        )  # fmt: skip

    # ------------------------------------------------------------- the rules
    def _rule(self, node: fx.Node) -> tuple[_Rule | None, str]:
        shape = self.meta[node]
        if len(shape) != 4 or shape[2] <= 1:
            return None, "not a 4-D tensor of more than one row"
        tensor_args = [a for a in node.all_input_nodes if self._is_tensor(a)]
        if not tensor_args:
            return None, "reads no tensor"
        if node.op == "call_module":
            return self._module_rule(node, self.gm.get_submodule(str(node.target)))
        if node.op in ("call_function", "call_method"):
            return self._function_rule(node)
        return None, f"{_op_name(self.gm, node)} has no banded rule"

    def _module_rule(self, node: fx.Node, m: nn.Module) -> tuple[_Rule | None, str]:
        if isinstance(m, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
            return self._window_rule(node, m)
        if isinstance(m, nn.ConvTranspose2d):
            return self._transpose_rule(node, m)
        if isinstance(m, ELEMENTWISE_MODULES):
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                return None, "BatchNorm in training mode"
            return self._pointwise_rule(node, lambda args, kwargs: m(*args, **kwargs))
        return None, f"{type(m).__name__} has no banded rule"

    def _function_rule(self, node: fx.Node) -> tuple[_Rule | None, str]:
        target = node.target
        if target in ELEMENTWISE_FUNCTIONS:
            return self._pointwise_rule(node, self._caller(node))
        if getattr(target, "__name__", "") == "stochastic_depth" and not _training_arg(node):
            return self._pointwise_rule(node, self._caller(node))  # the identity in eval
        if target is torch.cat:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            if dim not in (1, -3):
                return None, f"cat along dim {dim}, not the channels"
            return self._pointwise_rule(node, self._caller(node))
        if target is TF.pad:
            return self._pad_rule(node)
        if target is operator.getitem and isinstance(node.args[0], fx.Node):
            return self._slice_rule(node)
        return None, f"{_op_name(self.gm, node)} has no banded rule"

    def _caller(self, node: fx.Node) -> Callable[[tuple[Any, ...], dict[str, Any]], Any]:
        if node.op == "call_method":
            return lambda args, kwargs: getattr(args[0], str(node.target))(*args[1:], **kwargs)
        return lambda args, kwargs: node.target(*args, **kwargs)  # type: ignore[operator]

    def _bind(self, node: fx.Node, lo: int, hi: int, bands: Mapping[fx.Node, _Band]) -> Any:
        """The node's args and kwargs with every tensor input replaced by its rows ``lo..hi`` (or whole)."""
        out_h = self.meta[node][2]

        def value(a: fx.Node) -> Any:
            if not self._is_tensor(a):
                return self.meta[a]
            band = bands[a]
            shape = self.meta[a]
            if len(shape) == 4 and shape[2] == out_h:
                return band.rows(lo, hi)[0]
            return band.t

        return fx.node.map_arg((node.args, node.kwargs), value)

    def _pointwise_rule(
        self, node: fx.Node, call: Callable[[tuple[Any, ...], dict[str, Any]], Any]
    ) -> tuple[_Rule, str]:
        out_h = self.meta[node][2]
        args = [a for a in node.all_input_nodes if self._is_tensor(a)]
        for a in args:
            shape = self.meta[a]
            if len(shape) == 4 and shape[2] not in (1, out_h):
                return None, f"operand {a.name} has {shape[2]} rows, the output {out_h}"  # type: ignore[return-value]
        inplace = (
            node.target in (operator.iadd, operator.imul)
            or (node.op == "call_method" and str(node.target).endswith("_"))
            or getattr(self._module(node), "inplace", False)
        )

        def need(lo: int, hi: int) -> dict[fx.Node, tuple[int, int]]:
            h = {a: self.meta[a] for a in args}
            return {
                a: (lo, hi) if len(s) == 4 and s[2] == out_h else (0, s[2] if len(s) == 4 else 1) for a, s in h.items()
            }

        def run(lo: int, hi: int, bands: Mapping[fx.Node, _Band]) -> Tensor:
            a, kw = self._bind(node, lo, hi, bands)
            if inplace:  # never write into a band of a stored value
                a, kw = fx.node.map_aggregate((a, kw), lambda v: v.clone() if isinstance(v, Tensor) else v)
            return call(tuple(a), dict(kw))

        whole = frozenset(a for a in args if not (len(self.meta[a]) == 4 and self.meta[a][2] == out_h))
        return _Rule(need, run, pointwise=True, whole=whole), ""

    def _module(self, node: fx.Node) -> nn.Module | None:
        return self.gm.get_submodule(str(node.target)) if node.op == "call_module" else None

    def _window_rule(self, node: fx.Node, m: nn.Module) -> tuple[_Rule | None, str]:
        src = node.args[0]
        if len(node.args) != 1 or node.kwargs or not isinstance(src, fx.Node):
            return None, "called with more than its input"
        params, why = _window_params(m)
        if params is None:
            return None, why
        k, s, d, pad_h, pad_w, fill = params
        in_h = self.meta[src][2]
        quantizer_id = id(self.quantizers[self.readers[node]]) if node in self.readers else 0

        def need(lo: int, hi: int) -> dict[fx.Node, tuple[int, int]]:
            a, b = lo * s - pad_h, (hi - 1) * s - pad_h + d * (k - 1) + 1
            return {src: (max(a, 0), min(b, in_h))}

        def run(lo: int, hi: int, bands: Mapping[fx.Node, _Band]) -> Tensor:
            a, b = lo * s - pad_h, (hi - 1) * s - pad_h + d * (k - 1) + 1
            band = bands[src]
            if isinstance(band, _SplitBand):
                assert isinstance(m, nn.Conv2d)
                return self._depthwise(m, band, a, b, in_h, pad_w)
            rows, coded = band.rows(max(a, 0), min(b, in_h), quantizer_id)

            def call(t: Tensor) -> Tensor:
                top, bottom = max(-a, 0), max(b - in_h, 0)
                if top or bottom:
                    t = TF.pad(t, (0, 0, top, bottom), value=fill)
                if isinstance(m, nn.Conv2d):
                    return TF.conv2d(t, m.weight, m.bias, m.stride, (0, pad_w), m.dilation, m.groups)
                if isinstance(m, nn.MaxPool2d):
                    return TF.max_pool2d(t, m.kernel_size, m.stride, (0, pad_w), m.dilation, False, False)
                t = TF.pad(t, (pad_w, pad_w, 0, 0)) if pad_w else t
                return TF.avg_pool2d(t, m.kernel_size, m.stride, 0, False, True, None)

            return _hooked(m, rows, coded, call)

        return _Rule(need, run), ""

    def _depthwise(
        self, m: nn.Conv2d, band: _SplitBand, a: int, b: int, in_h: int, pad_w: int
    ) -> Tensor:
        """A depthwise convolution over input rows ``a`` to ``b`` (zero rows outside ``0..in_h``), chunk by chunk.

        Each chunk's held rows are decoded (``q(x)`` already), its new rows quantized with the chunk's quantizer
        (the layer's own on those channels, bit for bit), and convolved with the chunk's filters; the most bytes
        decoded for one chunk are left in :attr:`transient` for the step's scratch.
        """
        outs = []
        for c, (q, (c0, c1)) in enumerate(band.chunks):
            rows, decoded = band.chunk(c, max(a, 0), min(b, in_h))
            self.transient = max(self.transient, decoded)
            t = q.quantize_values(rows)
            top, bottom = max(-a, 0), max(b - in_h, 0)
            if top or bottom:
                t = TF.pad(t, (0, 0, top, bottom))
            bias = None if m.bias is None else m.bias[c0:c1]
            outs.append(TF.conv2d(t, m.weight[c0:c1], bias, m.stride, (0, pad_w), m.dilation, c1 - c0))
        return torch.cat(outs, dim=1)

    def _transpose_rule(self, node: fx.Node, m: nn.ConvTranspose2d) -> tuple[_Rule | None, str]:
        src = node.args[0]
        if len(node.args) != 1 or node.kwargs or not isinstance(src, fx.Node):
            return None, "called with an output size"
        if m.output_padding[0] or m.padding_mode != "zeros":
            return None, "output padding on the rows"
        k, s, p, d = m.kernel_size[0], m.stride[0], m.padding[0], m.dilation[0]
        in_h = self.meta[src][2]

        def need(lo: int, hi: int) -> dict[fx.Node, tuple[int, int]]:
            a = max(-(-(lo + p - d * (k - 1)) // s), 0)
            b = min((hi - 1 + p) // s + 1, in_h)
            return {src: (a, max(b, a + 1))}

        def run(lo: int, hi: int, bands: Mapping[fx.Node, _Band]) -> Tensor:
            ((a, b),) = need(lo, hi).values()
            quantizer_id = id(self.quantizers[self.readers[node]]) if node in self.readers else 0
            rows, coded = bands[src].rows(a, b, quantizer_id)

            def call(t: Tensor) -> Tensor:
                out = TF.conv_transpose2d(
                    t, m.weight, m.bias, m.stride, (0, m.padding[1]), (0, m.output_padding[1]), m.groups, m.dilation
                )
                first = a * s - p  # the global row of out's first row
                return out[:, :, lo - first : hi - first]

            return _hooked(m, rows, coded, call)

        return _Rule(need, run), ""

    def _pad_rule(self, node: fx.Node) -> tuple[_Rule | None, str]:
        src = node.args[0]
        pads = fx.node.map_arg(node.args[1] if len(node.args) > 1 else node.kwargs.get("pad"), lambda a: self.meta[a])
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        fill = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None) or 0.0
        if not isinstance(src, fx.Node) or mode != "constant" or any(int(v) < 0 for v in pads):
            return None, "pad that is not constant and non-negative"
        pads = [int(v) for v in pads]
        top = pads[2] if len(pads) >= 4 else 0
        in_h = self.meta[src][2]

        def need(lo: int, hi: int) -> dict[fx.Node, tuple[int, int]]:
            a, b = max(lo - top, 0), min(hi - top, in_h)
            return {src: (a, b)} if b > a else {}  # rows of padding only read nothing

        def run(lo: int, hi: int, bands: Mapping[fx.Node, _Band]) -> Tensor:
            a, b = lo - top, hi - top
            ca, cb = max(a, 0), min(b, in_h)
            if cb <= ca:  # rows of padding only
                shape = list(self.meta[src])
                shape[2] = 0
                rows = torch.zeros(shape, dtype=self.dtype, device=self.device)
            else:
                rows = bands[src].rows(ca, cb)[0]
            band_pads = list(pads)
            if len(band_pads) < 4:
                band_pads += [0, 0]
            band_pads[2], band_pads[3] = ca - a if cb > ca else b - a, b - cb if cb > ca else 0
            return TF.pad(rows, band_pads, value=fill)

        return _Rule(need, run), ""

    def _slice_rule(self, node: fx.Node) -> tuple[_Rule | None, str]:
        src, index = node.args[0], node.args[1]
        if not isinstance(index, tuple) or len(index) < 3 or not all(isinstance(i, slice) for i in index):
            return None, "an index that is not a tuple of slices"
        if any(i != slice(None) for j, i in enumerate(index) if j != 2 and j != 3):
            return None, "slices the batch or the channels"
        start, _, step = index[2].indices(self.meta[src][2])
        if step < 1:
            return None, "a negative row step"

        def need(lo: int, hi: int) -> dict[fx.Node, tuple[int, int]]:
            return {src: (start + lo * step, start + (hi - 1) * step + 1)}

        def run(lo: int, hi: int, bands: Mapping[fx.Node, _Band]) -> Tensor:
            a, b = start + lo * step, start + (hi - 1) * step + 1
            rows = bands[src].rows(a, b)[0]
            return rows[(slice(None), slice(None), slice(None, None, step), *index[3:])]

        return _Rule(need, run), ""

    # ------------------------------------------------------------- execution
    def _execute(self, x: Tensor, stored_why: dict[fx.Node, str]) -> tuple[Any, BandedReport]:
        producers = [n for n in self.nodes if n in stored_why and n.op != "placeholder"]
        store: dict[fx.Node, Stored] = {}
        last_read: dict[fx.Node, int] = {}
        steps: list[str] = []
        scratch: list[_Bytes] = []
        output_nodes = {a for a in tree_leaves(self.nodes[-1].args) if isinstance(a, fx.Node)}
        for p in (n for n in self.nodes if n.op == "placeholder"):
            store[p] = Stored(p.name, tuple(x.shape), fp32=x, why="model input")
        for step, node in enumerate(producers):
            steps.append(node.name)
            src = self.reductions.get(node)
            if node in self.rules or src is not None:
                top = node if src is None else src
                region = [] if src is not None and src in stored_why else self._region(top, stored_why)
                reads = {a for r in region for a in r.all_input_nodes if a in stored_why} or {top}
                if src is None:
                    store[node] = self._new_store(node, tuple(self.meta[node]), stored_why[node], step)
                    peak = self._bands(node, region, store, lambda lo, rows, s=store[node]: self._write(s, lo, rows))
                else:
                    peak = self._run_reduction(node, src, region, store, stored_why[node], step)
            else:
                peak = self._run_whole(node, store, stored_why, step)
                reads = {a for a in node.all_input_nodes if a in stored_why}
            for a in reads:
                last_read[a] = step
            scratch.append(peak)
        end = len(producers) - 1
        for n, s in store.items():
            s.last = end if n in output_nodes else max(last_read.get(n, s.first), s.first)
        out = fx.node.map_arg(self.nodes[-1].args[0], lambda n: self._whole_value(store[n]))
        report = BandedReport(
            batch=int(x.shape[0]), band_rows=self.band_rows, stored=list(store.values()),
            scratch={k: [getattr(b, k) for b in scratch] for k in ("stored", "int8", "fp32")},
            steps=steps, whole=self.whole, input_bytes=x.numel() * x.element_size(),
            output_bytes=sum(store[n].nbytes("fp32") for n in output_nodes),
            _inputs={n.name for n in self.nodes if n.op == "placeholder"}, _outputs={n.name for n in output_nodes},
        )  # fmt: skip
        return out, report

    def _region(self, node: fx.Node, stored: Mapping[fx.Node, str]) -> list[fx.Node]:
        """The nodes computed in bands for ``node``: back to stored values, in execution order."""
        seen: set[fx.Node] = set()
        todo = [node]
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            todo += [a for a in n.all_input_nodes if self._is_tensor(a) and a not in stored]
        return sorted(seen, key=self.order.__getitem__)

    def _needs(
        self, node: fx.Node, region: list[fx.Node], lo: int, hi: int, held: Mapping[fx.Node, tuple[int, int]]
    ) -> tuple[dict[fx.Node, tuple[int, int]], dict[fx.Node, tuple[int, int]], dict[fx.Node, dict]]:
        """The rows each node of ``region`` must hold for rows ``lo..hi`` of ``node``, and those it must compute.

        ``held``: the rows each node still holds from the previous band (its line buffer). A node computes only
        the rows past them; the rows its inputs must give follow from those alone.

        Returns:
            ``(need, new, reads)``: rows held after the band per node, rows computed per node, and per node the
            rows of each input its new rows read.
        """
        inside = set(region)
        need: dict[fx.Node, tuple[int, int]] = {node: (lo, hi)}
        new: dict[fx.Node, tuple[int, int]] = {}
        reads: dict[fx.Node, dict[fx.Node, tuple[int, int]]] = {}
        for n in reversed(region):
            if n not in need:
                continue
            a, b = need[n]
            h_lo, h_hi = held.get(n, (0, 0))
            start = max(a, h_hi) if h_lo <= a < h_hi else a
            if start >= b:
                continue
            new[n] = (start, b)
            reads[n] = self.rules[n].need(start, b)
            for x, (x_lo, x_hi) in reads[n].items():
                if x in inside:
                    old = need.get(x, (x_lo, x_hi))
                    need[x] = (min(x_lo, old[0]), max(x_hi, old[1]))
        return need, new, reads

    def _bands(
        self, node: fx.Node, region: list[fx.Node], store: dict[fx.Node, Stored],
        sink: Callable[[int, Tensor], None],
    ) -> _Bytes:  # fmt: skip
        """Compute ``node``'s rows band by band over ``region`` and hand each band to ``sink(first row, rows)``.

        With no region (``node`` is stored), its stored rows are read band by band. Each node of the region
        keeps, between bands, the rows the next band reads again (its line buffer: a 3x3 convolution's input
        keeps two rows), so no row is computed twice. Stored inputs are read for each node that reads them
        (decoded rows dropped after it). Returns the scratch: the most band bytes live at once (line buffers
        included), counting an element-wise node's output in the bytes of an input band dropped there (run in
        place).
        """
        inside = set(region)
        last_use: dict[fx.Node, int] = {}
        for n in region:
            for a in n.all_input_nodes:
                last_use[a] = max(last_use.get(a, -1), self.order[n])
        h, peak = self.meta[node][2], _Bytes()
        if not region:
            for lo in range(0, h, self.band_rows):
                self.tick += 1
                band = self._read(store[node], lo, min(lo + self.band_rows, h), None)
                peak = peak.top(_Bytes() if store[node].fp32 is not None else _Bytes.decoded(band.nbytes))
                sink(lo, band.rows(lo, min(lo + self.band_rows, h))[0])
            return peak
        st = _Stream(self, store, region, last_use)
        for lo in range(0, h, self.band_rows):
            self.tick += 1
            hi = min(lo + self.band_rows, h)
            spans = {n: (b.start, b.start + _rows(b)) for n, b in st.held.items()}
            need, new, reads = self._needs(node, region, lo, hi, spans)
            after = {**spans, **{n: r for n, r in need.items() if n in inside}}  # held once the band is done
            st.begin(self._lookahead(node, region, hi, after))
            for n in region:
                if n in need:
                    st.step(n, need[n], new.get(n), reads.get(n, {}))
            sink(lo, st.bands[node].rows(lo, hi)[0])
            st.end(node)
        return st.peak

    def _lookahead(
        self, node: fx.Node, region: list[fx.Node], lo: int, held: Mapping[fx.Node, tuple[int, int]]
    ) -> dict[fx.Node, tuple[int, int]]:
        """The rows each region node is read from again in the next band that reads it (bands from row ``lo``).

        A node of a coarser level (behind a stride-2 or transposed convolution) may be read every other band
        only; its line buffer must last until then. The bands are simulated in order, each node holding what
        the band before left it, up to 64 bands ahead.
        """
        first: dict[fx.Node, tuple[int, int]] = {}
        held = dict(held)
        h = self.meta[node][2]
        for _ in range(64):
            if lo >= h or len(first) == len(region):
                break
            need = self._needs(node, region, lo, min(lo + self.band_rows, h), held)[0]
            for n, rows in need.items():
                first.setdefault(n, rows)
                held[n] = (min(rows[0], held.get(n, rows)[0]), rows[1])
            lo += self.band_rows
        return first

    def _keep(
        self, band: _Band, rows: tuple[int, int] | None, q: ActivationQuantizer | None
    ) -> _Band | _HeldCodes | None:
        """The rows of ``band`` from ``rows[0]`` on (the rest is freed), or ``None`` when none is read again.

        Kept as ``q``'s codes when ``q`` (the quantizer of the layer that reads them) is given, else copied.
        """
        if rows is None:
            return None
        end = band.start + band.t.shape[2]
        first = max(rows[0], band.start)
        if first >= end:
            return None
        t = band.t[:, :, first - band.start :]
        if q is not None:
            return _HeldCodes(q, first, int(t.shape[2]), quantizer_to_bytes(q, t, coder=self.coder), t.numel())
        return _Band(t.clone(), first)

    def _line_quantizer(self, x: fx.Node, inside: set[fx.Node]) -> ActivationQuantizer | None:
        """The quantizer every reader of ``x`` in the region reads it with (a line buffer kept as its codes)."""
        users = [u for u in x.users if u in inside]
        qs = {id(self.quantizers[self.readers[u]]): self.quantizers[self.readers[u]]
              for u in users if u in self.readers and u.args and u.args[0] is x and x not in u.args[1:]}  # fmt: skip
        if len(qs) != 1 or len(users) != sum(u in self.readers for u in users):
            return None
        q = next(iter(qs.values()))
        return q if q.input_noise() is None and q.scale_mode != "dynamic" else None

    def _chunks(
        self, x: fx.Node, q: ActivationQuantizer | None, inside: set[fx.Node]
    ) -> list[tuple[ActivationQuantizer, tuple[int, int]]] | None:
        """Channel chunks (with their quantizers) to read ``x`` in, when only depthwise convolutions read it.

        A depthwise convolution's output channel reads its input channel alone, so its line buffer (held as
        ``q``'s codes) is decoded and convolved one chunk of channels at a time: a few rows of a chunk in float32
        at once, not of every channel. ``None`` with ``depthwise_chunks=1``, or when another node reads ``x``.
        """
        channels = self.meta[x][1] if len(self.meta[x]) == 4 else 0
        if q is None or self.chunks < 2 or channels < 2:
            return None
        for u in (u for u in x.users if u in inside):
            m = self._module(u)
            if not (
                isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels and m.padding_mode == "zeros"
                and list(m._forward_pre_hooks.values()) == [_input_hook] and not m._forward_hooks
                and u in self.rules
            ):  # fmt: skip
                return None
        size = -(-channels // self.chunks)
        spans = [(c, min(c + size, channels)) for c in range(0, channels, size)]
        return [(channel_quantizer(q, a, b), (a, b)) for a, b in spans]

    def _run_reduction(
        self, node: fx.Node, src: fx.Node, region: list[fx.Node], store: dict[fx.Node, Stored], why: str,
        step: int,
    ) -> _Bytes:  # fmt: skip
        """A global average: ``src`` computed (or read) in bands, each band summed; returns the scratch."""
        acc: list[Tensor] = []

        def add(lo: int, rows: Tensor) -> None:
            part = rows.sum(dim=(2, 3), keepdim=True)
            acc.append(part if not acc else acc.pop() + part)

        peak = self._bands(src, region, store, add)
        _, _, h, w = self.meta[src]
        value = (acc[0] / (h * w)).reshape(self.meta[node])
        s = self._new_store(node, tuple(value.shape), why, step)
        store[node] = s
        self._fill(s, value)
        return peak + _Bytes.same(_nbytes(value))

    def _run_whole(
        self, node: fx.Node, store: dict[fx.Node, Stored], stored: Mapping[fx.Node, str], step: int
    ) -> _Bytes:
        """Run ``node`` on whole inputs (decoded when coded); returns the decoded inputs' and the output's bytes."""
        self.tick += 1
        held: dict[fx.Node, Tensor] = {}
        scratch = _Bytes()
        for a in node.all_input_nodes:
            if a in store:
                held[a] = self._whole_value(store[a])
                scratch += _Bytes.decoded(_owned_bytes(held[a], store[a]))
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: held[a] if a in held else self.meta[a])
        value = getattr(fx.Interpreter(self.gm), node.op)(node.target, args, kwargs)
        if self._is_tensor(node):
            s = self._new_store(node, tuple(value.shape), stored.get(node, ""), step)
            store[node] = s
            self._fill(s, value)
            scratch += _Bytes() if s.fp32 is not None else _Bytes.decoded(_nbytes(value))
        return scratch

    def _fill(self, s: Stored, value: Tensor) -> None:
        """Store a whole value: copied into its float32 buffer, or its codes written band by band."""
        if s.fp32 is not None:
            s.fp32.copy_(value)
            return
        for lo in range(0, value.shape[2], self.band_rows):
            self._write(s, lo, value[:, :, lo : lo + self.band_rows])
        s.writes.clear()  # written whole: never written over another value

    def _new_store(self, node: fx.Node, shape: tuple[int, ...], why: str, step: int) -> Stored:
        """Codes (one blob per quantizer that reads it) when the model reads only codes of it; else float32."""
        codes = self._codes_of(node, shape)
        if codes is None:
            return Stored(node.name, shape, fp32=torch.empty(shape, dtype=self._dtype()), first=step, why=why)
        qs, layers = codes
        blobs = {id(q): BandedBlob(q, shape, self.coder) for q in qs}
        return Stored(node.name, shape, blobs=blobs, first=step, why=why, layers=layers)

    def _dtype(self) -> torch.dtype:
        return next((p.dtype for p in self.model.parameters()), torch.float32)

    def _codes_of(
        self, node: fx.Node, shape: tuple[int, ...]
    ) -> tuple[list[ActivationQuantizer], tuple[str, ...]] | None:
        """The quantizers ``node`` is stored as codes of, and their layers; ``None`` to store it in float32."""
        if len(shape) != 4 or any(u.op == "output" for u in node.users):
            return None
        if node in self.coded:
            layer, mode, leading = self.coded[node]
            q = self.quantizers[layer]
            q = leading_quantizer(q, shape[q.channel_dim]) if leading else q
            return [q if mode == "codes" else wide_quantizer(q, torch.empty(0))], (layer,)
        users = list(node.users)
        if users and all(u in self.readers and u.args[0] is node and node not in u.args[1:] for u in users):
            layers = tuple(dict.fromkeys(self.readers[u] for u in users))
            qs = list({id(q): q for q in (self.quantizers[name] for name in layers)}.values())
            return qs, tuple(dict.fromkeys(self.layer_of.get(name, name) for name in layers))
        return None

    def _write(self, s: Stored, lo: int, rows: Tensor) -> None:
        s.writes.append((self.tick, lo, lo + int(rows.shape[2])))
        if s.fp32 is not None:
            s.fp32[:, :, lo : lo + rows.shape[2]] = rows
            return
        for blob in s.blobs.values():
            blob.write(lo, rows)

    def _read(self, s: Stored, lo: int, hi: int, reader: fx.Node | None) -> _Band:
        """Rows ``lo`` to ``hi`` of a stored value for ``reader``.

        A view of its float32 tensor, or the bands of its blob decoded (the blob of ``reader``'s quantizer when it
        has one).
        """
        if len(s.shape) == 4:
            if not s.reads:
                s.reads = [-1] * s.shape[2]
            s.reads[lo:hi] = [self.tick] * (hi - lo)
        else:
            s.read_whole = True
        if s.fp32 is not None:
            return _Band(s.fp32[:, :, lo:hi] if s.fp32.ndim == 4 else s.fp32, lo if s.fp32.ndim == 4 else 0)
        wanted = {id(self.quantizers[self.readers[reader]])} if reader in self.readers else set()
        matched = [qid for qid in s.blobs if qid in wanted] or [next(iter(s.blobs))]
        coded: dict[int, Tensor] = {}
        start = lo
        for qid in matched:
            coded[qid], start = s.blobs[qid].read(lo, hi)
        return _Band(coded[matched[0]], start, coded if matched[0] in wanted else {})

    def _whole_value(self, s: Stored) -> Tensor:
        s.read_whole = True
        if s.fp32 is not None:
            return s.fp32
        blob = next(iter(s.blobs.values()))
        return blob.read(0, s.shape[2])[0] if len(s.shape) == 4 else decode(blob.q, blob.blob(0))


class _Output(nn.Module):
    """``module(...)[index]``: one output of a module that returns several (attention's output and weights)."""

    def __init__(self, module: nn.Module, index: int) -> None:
        super().__init__()
        self.module, self.index = module, index

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)[self.index]


def _unpack_tuples(gm: fx.GraphModule, readers: Mapping[fx.Node, str], meta: Mapping[fx.Node, Any]) -> bool:
    """Give a module node that returns a tuple of tensors one node per output read (``_Output``); whether any.

    ``out, weights = attention(q, k, v)`` traces to the module call and ``getitem`` nodes; the bands have one
    tensor per node, so each used item becomes a call of the module that returns that item (it then runs whole
    and is named in :attr:`BandedReport.whole`). Unused items are dropped. A quantized layer is left alone.
    """
    changed = False
    for node in list(gm.graph.nodes):
        value = meta.get(node)
        users = list(node.users)
        if (
            node.op != "call_module" or node in readers or not isinstance(value, tuple)
            or not any(isinstance(v, Tensor) for v in tree_leaves(value)) or not users
            or not all(u.target is operator.getitem and isinstance(u.args[1], int) for u in users)
        ):  # fmt: skip
            continue
        for u in users:
            if u.users:
                target = f"dqa_output_{u.name}"
                gm.add_submodule(target, _Output(gm.get_submodule(str(node.target)), int(u.args[1])))
                with gm.graph.inserting_before(u):
                    new = gm.graph.call_module(target, node.args, node.kwargs)
                u.replace_all_uses_with(new)
            gm.graph.erase_node(u)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.recompile()
    return changed


def _hooked(m: nn.Module, rows: Tensor, coded: bool, call: Callable[[Tensor], Tensor]) -> Tensor:
    """``call(rows)`` as ``m(rows)`` would run it, hooks included.

    ``m``'s forward pre-hooks first (the input quantizer, skipped for rows decoded from its own codes, which are
    ``q(x)`` already), its forward hooks after (an output quantizer, a shared value's producer hook).
    """
    args: tuple[Any, ...] = (rows,)
    for hook in m._forward_pre_hooks.values():
        if hook is _input_hook and coded:
            continue
        res = hook(m, args)
        if res is not None:
            args = res if isinstance(res, tuple) else (res,)
    out = call(args[0])
    for hook in m._forward_hooks.values():
        res = hook(m, args, out)
        if res is not None:
            out = res
    return out


def _window_params(m: nn.Module) -> tuple[tuple[int, int, int, int, int, float] | None, str]:
    """The row geometry of a convolution or a pooling, or ``(None, why it cannot run in bands)``.

    Returns:
        ``((kernel rows, stride, dilation, row padding, column padding, padding value), "")``.
    """
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros":
            return None, f"padding_mode={m.padding_mode!r}"
        k, s, d = m.kernel_size[0], m.stride[0], m.dilation[0]
        if not isinstance(m.padding, str):
            return (k, s, d, m.padding[0], m.padding[1], 0.0), ""
        if m.padding == "valid":
            return (k, s, d, 0, 0, 0.0), ""
        total_h, total_w = d * (k - 1), m.dilation[1] * (m.kernel_size[1] - 1)
        if s != 1 or total_h % 2 or total_w % 2:
            return None, "padding='same' with a stride or an even kernel"
        return (k, s, d, total_h // 2, total_w // 2, 0.0), ""
    k, s, d = _pair(m.kernel_size)[0], _pair(m.stride or m.kernel_size)[0], _pair(getattr(m, "dilation", 1))[0]
    pad_h, pad_w = _pair(m.padding)
    if m.ceil_mode:
        return None, "ceil_mode=True"
    if isinstance(m, nn.AvgPool2d) and (((pad_h or pad_w) and not m.count_include_pad) or m.divisor_override):
        return None, "count_include_pad=False with padding, or divisor_override"
    return (k, s, d, pad_h, pad_w, -math.inf if isinstance(m, nn.MaxPool2d) else 0.0), ""


def _rows(b: Any) -> int:
    if isinstance(b, _HeldChunks):
        return b.parts[0].rows
    if isinstance(b, _SplitBand):
        return b.new_start - b.start + (int(b.new.shape[2]) if b.new is not None else 0)
    return b.rows if isinstance(b, _HeldCodes) else int(b.t.shape[2])


def _training_arg(node: fx.Node) -> Any:
    """The ``training`` argument of ``torchvision.ops.stochastic_depth(input, p, mode, training=True)``."""
    return node.kwargs.get("training", node.args[3] if len(node.args) > 3 else True)


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _nbytes(t: Any) -> int:
    if isinstance(t, Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, _Band):
        return t.nbytes
    return sum(x.numel() * x.element_size() for x in tree_leaves(t) if isinstance(x, Tensor))


def _owned_bytes(t: Tensor, s: Stored | None) -> int:
    """Bytes ``t`` holds of its own: 0 for a view of a stored float32 tensor."""
    if s is not None and s.fp32 is not None:
        return 0
    return _nbytes(t)


def _op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    return getattr(node.target, "__name__", str(node.target))
