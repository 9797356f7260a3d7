"""What :func:`lightning_dqa.run_banded` reports: band-wise blobs, stored values, in-place rings and the arena.

:class:`BandedBlob` holds a stored activation as codes written and read band by band; :class:`Stored` is a value
stored whole between two steps (with when each band was written and read); :class:`BandedReport` places every
stored value and every step's scratch in one arena (:mod:`.arena`), writing a value over the one its step reads
for the last time where the bands allow (:class:`InPlace`, :meth:`BandedReport.in_place`). The runner is
:mod:`lightning_dqa.deploy.banded`.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_dqa.codec.entropy import DEFAULT_CODER
from lightning_dqa.codec.layout import join_band, split_band
from lightning_dqa.core.quantizers import ActivationQuantizer
from lightning_dqa.deploy.arena import Arena, Buffer, plan_arena
from lightning_dqa.deploy.compressed import decode
from lightning_dqa.deploy.layer_bytes import quantizer_to_bytes

__all__ = ["BandedBlob", "BandedReport", "InPlace", "Stored", "WholeNode"]


@dataclass
class BandedBlob:
    """A stored activation as codes, written and read band by band of rows (dim 2).

    Each band is coded as a blob of its own (:func:`~.layer_bytes.quantizer_to_bytes`), kept as one head shared
    by all bands (header, shape, important channels: written once) and a record per band (its rows, payload sizes,
    payloads and checksum; :func:`lightning_dqa.codec.layout.split_band`). Reading a band rebuilds its blob byte
    for byte and decodes it, checksum checked.

    Attributes:
        q: the quantizer whose codes the blobs hold.
        shape: the whole tensor's shape ``(N, C, H, W)``.
        starts: first row of each band, ascending; band ``i`` covers ``starts[i]`` to ``starts[i + 1]``.
        head: the bands' shared head (empty before the first band).
        records: each band's record, in row order.
        coder: entropy coder of the shifting errors.

    """

    q: ActivationQuantizer
    shape: tuple[int, ...]
    coder: str = DEFAULT_CODER
    starts: list[int] = field(default_factory=list)
    head: bytes = b""
    records: list[bytes] = field(default_factory=list)

    def write(self, start: int, rows: Tensor) -> None:
        """Append the codes of ``rows`` (``(N, C, h, W)``, the tensor's rows from ``start``); bands come in order."""
        end = self.starts[-1] + self._rows(-1) if self.starts else 0
        if start != end or start + rows.shape[2] > self.shape[2]:
            raise ValueError(f"Layer {self.q.name!r}: a band must start at row {end}, got rows {start} to "
                             f"{start + rows.shape[2]} of {self.shape[2]}")  # fmt: skip
        head, record = split_band(quantizer_to_bytes(self.q, rows, coder=self.coder), 2, self.head or None)
        self.head = head
        self.starts.append(start)
        self.records.append(record)
        self._heights.append(int(rows.shape[2]))

    def blob(self, i: int) -> bytes:
        """Band ``i``'s blob, as :func:`~.layer_bytes.quantizer_to_bytes` wrote it."""
        return join_band(self.head, self.records[i], 2)

    def read(self, lo: int, hi: int) -> tuple[Tensor, int]:
        """The decoded values of the bands that hold rows ``lo`` to ``hi`` (``hi`` exclusive).

        Returns:
            ``(values, first row)``: ``q(x)`` of whole bands, ``(N, C, h, W)``, from the first band's row.

        """
        if not self.starts or lo < 0 or hi > self.starts[-1] + self._rows(-1) or lo >= hi:
            raise ValueError(f"Layer {self.q.name!r}: rows {lo} to {hi} are not stored")
        first = bisect.bisect_right(self.starts, lo) - 1
        last = bisect.bisect_left(self.starts, hi) - 1
        for i in [i for i in self._decoded if i < first - 1]:  # rows are read top to bottom: older bands go
            del self._decoded[i]
        parts = [self._band(i) for i in range(first, last + 1)]
        return (parts[0].clone() if len(parts) == 1 else torch.cat(parts, dim=2)), self.starts[first]

    def _band(self, i: int) -> Tensor:
        """Band ``i`` decoded, once while the next bands' halos read it again.

        A speed-up of this simulation only: the bytes are counted as a device holds them (decoded rows dropped
        after each read, decoded again by the next).
        """
        if i not in self._decoded:
            self._decoded[i] = decode(self.q, self.blob(i))
        return self._decoded[i]

    @property
    def nbytes(self) -> int:
        """Bytes held: the shared head and every band's record."""
        return len(self.head) + sum(len(r) for r in self.records)

    @property
    def numel(self) -> int:
        """Values in the whole tensor."""
        return math.prod(self.shape)

    def __post_init__(self) -> None:
        self._heights: list[int] = []
        self._decoded: dict[int, Tensor] = {}

    def _rows(self, i: int) -> int:
        return self._heights[i]


@dataclass
class Stored:
    """A value stored whole between the step that writes it and the last step that reads it.

    Attributes:
        name: the fx node's name.
        shape: its shape.
        fp32: its float32 tensor when stored in full precision, else ``None``.
        blobs: its codes, one :class:`BandedBlob` per quantizer it is coded with (by the quantizer's ``id``).
        first: the step that writes it; ``last``: the last step that reads it.
        why: why it is stored in float32 (empty for codes).
        layers: the quantized layers whose codes its blobs are (what ``target_peak_bytes`` can step down).
        writes: ``(tick, first row, end row)`` of each band written, in order (empty when written whole); a tick
            counts the bands of every step, in execution order.
        reads: per row, the tick of its last read (``-1``: never read); ``read_whole``: read whole at some step.

    """

    name: str
    shape: tuple[int, ...]
    fp32: Tensor | None = None
    blobs: dict[int, BandedBlob] = field(default_factory=dict)
    first: int = 0
    last: int = 0
    why: str = ""
    layers: tuple[str, ...] = ()
    writes: list[tuple[int, int, int]] = field(default_factory=list)
    reads: list[int] = field(default_factory=list)
    read_whole: bool = False

    def band_bytes(self, scheme: str) -> tuple[int, list[int]]:
        """``(head, bytes of each band written)`` under ``scheme`` (as :meth:`nbytes`); the head is shared."""
        per_row = math.prod(self.shape) // self.shape[2] if len(self.shape) == 4 else 0
        if self.fp32 is not None or scheme != "stored":
            size = 1 if scheme == "int8" and self.fp32 is None else 4
            return 0, [size * per_row * (hi - lo) for _, lo, hi in self.writes]
        blobs = list(self.blobs.values())
        head = sum(len(b.head) for b in blobs)
        return head, [sum(len(b.records[i]) for b in blobs) for i in range(len(self.writes))]

    def nbytes(self, scheme: str) -> int:
        """Bytes held: ``stored`` (blob bytes, float32 as is), ``int8`` (one byte per coded value) or ``fp32``.

        A value two quantizers read is stored as two blobs, but as one int8 or one float32 tensor.
        """
        numel = math.prod(self.shape)
        if self.fp32 is not None or scheme == "fp32":
            return 4 * numel
        if scheme == "int8":
            return numel
        return sum(b.nbytes for b in self.blobs.values())


@dataclass(frozen=True)
class WholeNode:
    """A node run whole, in float32, on whole inputs: its name, its op and why it cannot run in bands."""

    name: str
    op: str
    why: str


@dataclass(frozen=True)
class InPlace:
    """Stored value ``y`` written over ``x`` (its step's last read of ``x``): ``y`` starts ``gap`` bytes below.

    ``nbytes``: what the pair's bands need, ``max(gap + |x|, |y|)`` (band bytes; heads apart).
    """

    x: str
    y: str
    gap: int
    nbytes: int


def _gap(x: Stored, y: Stored, scheme: str) -> int | None:
    """How far ``y``'s written band bytes run ahead of ``x``'s freed ones at the worst band (``>= 0``).

    Heads are left out: each value's head is a buffer of its own (it is read with every band). ``None`` when
    ``x`` is read after ``y``'s last band is written, or never read in bands.
    """
    _, x_bands = x.band_bytes(scheme)
    _, y_bands = y.band_bytes(scheme)
    free_at = [max(x.reads[lo:hi], default=-1) for _, lo, hi in x.writes]  # tick after which a band is free
    if not x.reads or max(free_at) > y.writes[-1][0]:  # a band never read (-1) is free from the start
        return None
    order = sorted(range(len(free_at)), key=free_at.__getitem__)
    freed = k = written = gap = 0
    for (tick, _, _), size in zip(y.writes, y_bands, strict=True):
        while k < len(order) and free_at[order[k]] <= tick:  # reads of a tick come before its write
            freed += x_bands[order[k]]
            k += 1
        written += size
        gap = max(gap, written - freed)
    return gap


def _chains(pairs: list[InPlace]) -> dict[str, tuple[list[str], int]]:
    """In-place pairs joined into chains ``x0 > x1 > ...``: per chain's first value, its members and ring size.

    Each value dies into at most one successor and is written over at most one predecessor, so the pairs form
    paths. In a ring of ``max`` over its pairs of ``gap + |x|`` (and every member's size), each value starts
    ``gap`` bytes below its predecessor, modulo the ring: only a pair is live at once.
    """
    nxt = {p.x: p for p in pairs}
    heads = [p.x for p in pairs if p.x not in {q.y for q in pairs}]
    out: dict[str, tuple[list[str], int]] = {}
    for head in heads:
        members, size, name = [head], 0, head
        while name in nxt:
            pair = nxt[name]
            size = max(size, pair.nbytes)
            name = pair.y
            members.append(name)
        out[head] = (members, size)
    return out


@dataclass
class BandedReport:
    """Outcome of :func:`run_banded`.

    Attributes:
        batch: images in the pass.
        band_rows: output rows per band.
        stored: every stored value, in the order written.
        scratch: the scratch bytes of every step (the most band and line-buffer bytes live at once), per way of
            storing coded values (``stored``, ``int8``, ``fp32``; line buffers a layer reads quantized are kept as
            its codes, and in the other two as bytes or floats).
        steps: the steps, a region's or a whole node's name, in execution order.
        whole: the nodes run whole, with why.
        input_bytes / output_bytes: the model input and the final outputs (float32), listed apart.

    """

    batch: int
    band_rows: int
    stored: list[Stored]
    scratch: dict[str, list[int]]
    steps: list[str]
    whole: list[WholeNode]
    input_bytes: int
    output_bytes: int
    _inputs: set[str] = field(default_factory=set)
    _outputs: set[str] = field(default_factory=set)

    def arena(self, scheme: str = "stored", apart: bool = True, in_place: bool = True) -> Arena:
        """The arena of the stored values (``scheme`` as :meth:`Stored.nbytes`) and every step's scratch.

        Args:
            scheme: ``stored`` (the blobs), ``int8`` (every coded value at one byte) or ``fp32`` (every stored
                value in float32: FP32 under the banded schedule).
            apart: leave the model input and the final outputs out (listed apart).
            in_place: a stored value may be written over the one its step reads for the last time
                (:meth:`in_place`): each chain of such values is one ring buffer. A ring is as large as its
                largest pair, so it may hold more than its values at a step where one lives alone; the smaller
                of the two arenas, with and without, is returned.

        """
        plain = self._arena(scheme, apart, {})
        if not in_place:
            return plain
        merged = self._arena(scheme, apart, _chains(self.in_place(scheme)))
        return merged if merged.nbytes <= plain.nbytes else plain

    def _arena(self, scheme: str, apart: bool, chains: dict[str, tuple[list[str], int]]) -> Arena:
        outside = self._inputs | self._outputs if apart else set()
        by_name = {s.name: s for s in self.stored}
        buffers: list[Buffer] = []
        for members, size in chains.values():
            first, last = by_name[members[0]].first, by_name[members[-1]].last
            buffers.append(Buffer(size, first, last, " > ".join(members) + " (in place)"))
            for name in members:  # the heads, beside the ring
                head, s = by_name[name].band_bytes(scheme)[0], by_name[name]
                if head:
                    buffers.append(Buffer(head, s.first, s.last, f"{name} head"))
        inside = {name for members, _ in chains.values() for name in members}
        buffers += [
            Buffer(s.nbytes(scheme), s.first, s.last, s.name)
            for s in self.stored
            if s.name not in outside and s.name not in inside
        ]
        buffers += [Buffer(n, i, i, f"scratch of {self.steps[i]}") for i, n in enumerate(self.scratch[scheme])]
        return plan_arena(buffers, order="best")

    def in_place(self, scheme: str = "stored") -> list[InPlace]:
        """The stored values written over the value their step reads for the last time, as a device would.

        A step writes its output ``y`` band by band while it reads the bands of an input ``x`` for the last time
        (a residual block's output over its input, read by its first convolution and its shortcut). The bands
        of ``x`` no later band reads are free, so ``y`` can be written into them if it starts ``gap`` bytes
        below ``x``: ``gap`` is the most that ``y``'s written band bytes ever run ahead of ``x``'s freed ones,
        measured on the ticks of every band read and written. The pair's bands then need
        ``max(gap + |x|, |y|)`` bytes instead of ``|x| + |y|``; each value's head (a blob's shared part, read
        with every band) is a buffer of its own. A step pairs its output with
        the largest such input; the model input and outputs, values read or written whole, and values of
        another height are never paired.
        """
        by_name = {s.name: s for s in self.stored}
        outside = self._inputs | self._outputs
        pairs: list[InPlace] = []
        for y in self.stored:
            if y.name in outside or not y.writes:
                continue
            best: InPlace | None = None
            for x in self.stored:
                if x.name in outside or x.read_whole or x.last != y.first or x.first >= y.first or not x.writes:
                    continue
                gap = _gap(x, y, scheme)
                if gap is None:
                    continue
                size = max(gap + sum(x.band_bytes(scheme)[1]), sum(y.band_bytes(scheme)[1]))
                pair = InPlace(x.name, y.name, gap, size)
                if best is None or x.nbytes(scheme) > by_name[best.x].nbytes(scheme):
                    best = pair
            if best is not None:
                pairs.append(best)
        return pairs

    @property
    def peak(self) -> int:
        """The arena's size with every value stored as written (blobs), input and output listed apart."""
        return self.arena("stored").nbytes

    def per_image(self) -> dict[str, float]:
        """KiB per image of the arenas and of the input and output listed apart.

        Keys: ``fp32_banded``, ``int8_banded``, ``stored``, ``input``, ``output``.
        """
        n = max(self.batch, 1) * 1024
        return {
            "fp32_banded": self.arena("fp32").nbytes / n,
            "int8_banded": self.arena("int8").nbytes / n,
            "stored": self.peak / n,
            "input": self.input_bytes / n,
            "output": self.output_bytes / n,
        }

    def peak_step(self, scheme: str = "stored") -> int | None:
        """The step with the most arena bytes live (the first such; input and output apart), ``None`` for none."""
        return _fullest(self.arena(scheme).buffers, len(self.steps))

    def at_peak(self, scheme: str = "stored") -> list[tuple[str, int]]:
        """What is live at :meth:`peak_step`: ``(name, bytes)``, largest first."""
        buffers = self.arena(scheme).buffers
        step = _fullest(buffers, len(self.steps))
        if step is None:
            return []
        return sorted(((b.name, b.nbytes) for b in buffers if b.first <= step <= b.last), key=lambda t: -t[1])

    @property
    def live_layers(self) -> list[str]:
        """The quantized layers whose blobs hold the arena's fullest step: stepping one down shrinks the peak.

        The blobs live there, and for a ring (:meth:`in_place`) live there, the pair that sets its size as well.
        Input and output are left out, as from the peak; a step's scratch holds float32 bands and line buffers,
        which no layer's width changes much.
        """
        plan = self.arena()
        step = _fullest(plan.buffers, len(self.steps))
        if step is None:
            return []
        pairs = self.in_place()
        rings = {" > ".join(m) + " (in place)": m for m, _ in _chains(pairs).values()}
        by_name = {s.name: s for s in self.stored}
        names: list[str] = []
        for buf in plan.buffers:
            if not buf.first <= step <= buf.last:
                continue
            if buf.name in rings:
                members = rings[buf.name]
                top = max((p for p in pairs if p.x in members), key=lambda p: p.nbytes)
                names += [top.x, top.y] + [n for n in members if by_name[n].first <= step <= by_name[n].last]
            elif buf.name in by_name:
                names.append(buf.name)
            elif buf.name.endswith(" head") and buf.name[: -len(" head")] in by_name:
                names.append(buf.name[: -len(" head")])
        return list(dict.fromkeys(layer for n in names for layer in by_name[n].layers))

    def table(self) -> str:
        """The step-by-step scratch and stored bytes, and the peaks, as text."""
        rows = [f"{'step':<40}{'scratch B':>12}"]
        rows += [f"{s[-40:]:<40}{n:>12}" for s, n in zip(self.steps, self.scratch["stored"], strict=True)]
        rows += [f"{k:<22}{v:>10.2f} KiB/image" for k, v in self.per_image().items()]
        rows += [f"whole: {w.name} ({w.op}): {w.why}" for w in self.whole]
        return "\n".join(rows)


def _fullest(buffers: list[Buffer], steps: int) -> int | None:
    """The first step with the most bytes of ``buffers`` live, ``None`` without buffers."""
    if not buffers:
        return None
    return max(range(steps), key=lambda i: sum(b.nbytes for b in buffers if b.first <= i <= b.last))
