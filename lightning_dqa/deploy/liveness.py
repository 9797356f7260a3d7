"""Peak activation memory of one forward pass: a liveness analysis over the steps of a graph, in execution order.

The analysis knows nothing about models or quantizers; :mod:`lightning_dqa.deploy.compressed` records the
:class:`Step` list of a real pass (from a :mod:`torch.fx` trace) and calls :func:`peak_memory` once per way of
storing the quantized activations (full precision, 8-bit codes, the DQA blobs).

The rule:

1. **Buffers.** A step that produces a tensor allocates a buffer of its size in bytes, except
   (a) a *view* or an *in-place* op, whose output shares the storage of a value it reads (``alias``; seen at run
   time by comparing storages), and (b) an *elementwise* op (BatchNorm in eval, activations, ``+``) whose read
   value has the same size and is read by no later step: it runs in place, as a deployment fuses conv-BN-ReLU
   and writes a residual sum into one of its operands. Model inputs are never written in place.
2. **Liveness.** A buffer is live from the step that allocates it to the last step that reads any value stored
   in it (the model outputs are read by the final ``output`` step, so they stay live to the end). A step that
   produces no tensor (``x.shape``) reads metadata only: the recorder lists no reads for it.
3. **Quantized reads.** A read through a quantizer (:class:`QRead`) needs the value's codes, not its full
   precision copy. When the buffer is still live in full precision at the reading step (a residual shortcut, a
   concatenated skip, the model input), nothing more is counted: the layer quantizes that copy as it reads it.
   Otherwise the codes are made when the value is produced, its full-precision buffer ends there, and the codes
   live until the reading step. The producing step holds both copies when it writes into an existing buffer
   (a ReLU run in place after conv-BN); a step that allocates a value read only through quantizers (a pooling,
   a concatenation) writes the codes directly and holds no full-precision copy. Decoding is taken as fused
   into the reading layer: the decoded values are not counted (a runtime that decodes a whole tensor before
   the layer runs adds one full-precision copy of that input at that step). Reads that name one ``blob`` (a
   shared value coded once, read by a convolution and by a residual add or a concatenation, decoding fused
   into each) share one run of codes, live from the value's step to the last of them.
4. **Peak.** Every buffer and every run of codes is placed at an offset in one arena
   (:func:`lightning_dqa.deploy.arena.plan_arena`, greedy by size as TFLite Micro plans its arena), and the peak
   is the arena's size: what a device must reserve. The live bytes of a step are the sizes of the buffers and
   codes live at it; their maximum over the steps (:attr:`Peak.live_bytes`) is a lower bound on any arena and
   the peak of a runtime that allocates each tensor on its own heap without fragmentation. Weights, buffers of
   the model and workspace of the kernels are not activations and are not counted.

Example:
    >>> steps = [Step("x", nbytes=12, is_input=True), Step("conv", reads=("x",), nbytes=32),
    ...          Step("relu", reads=("conv",), nbytes=32, elementwise=True), Step("output", reads=("relu",))]
    >>> peak = peak_memory(steps)
    >>> peak.nbytes, peak.live_bytes  # x and the conv output; the ReLU runs in place
    (44, 44)

"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lightning_dqa.deploy.arena import Arena, Buffer, plan_arena

__all__ = ["Peak", "QRead", "Step", "peak_memory"]


@dataclass(frozen=True)
class QRead:
    """A read of ``value`` through a quantizer: the reading step needs the value's codes.

    Attributes:
        value: name of the step that produced the value.
        nbytes: bytes of the stored codes (a blob's length).
        numel: values in the tensor (for a width-based count, e.g. 8 bits per value).
        layer: the quantized layer that reads it.
        blob: a name shared by the reads of one stored run of codes (a shared value coded once and read by
            several steps: its codes are counted once, live to the last of those reads); ``""`` for a run of
            codes of its own.

    """

    value: str
    nbytes: int
    numel: int
    layer: str = ""
    blob: str = ""


@dataclass(frozen=True)
class Step:
    """One step of the execution order: an fx node.

    Attributes:
        name: unique name (the node's).
        reads: values read in full precision (names of earlier steps).
        qreads: values read through a quantizer.
        nbytes: bytes of the new storage the step's tensor output needs; 0 for no tensor.
        alias: the read value whose storage the output shares (a view or an in-place op), else ``None``.
        elementwise: may run in place on a read value of the same size that no later step reads.
        is_input: a model input (allocated before the pass, never written in place).

    """

    name: str
    reads: tuple[str, ...] = ()
    qreads: tuple[QRead, ...] = ()
    nbytes: int = 0
    alias: str | None = None
    elementwise: bool = False
    is_input: bool = False


@dataclass
class Peak:
    """The peak of :func:`peak_memory`.

    Attributes:
        nbytes: the size of the arena that holds every buffer and every run of codes at its planned offset
            (:attr:`arena`): the peak a device must reserve. At least :attr:`live_bytes`.
        step: the first step where the live bytes are largest.
        live: what is live there, ``(description, bytes)``, largest first.
        per_step: the live bytes of every step, in execution order.
        live_layers: the quantized layers whose codes are live there (:attr:`QRead.layer`), in read order.
        live_bytes: the largest live bytes over the steps (``max(per_step)``): the lower bound of any arena,
            reached by a fragmentation-free allocator (the figure this module reported as the peak before the
            arena).
        arena: the plan: each buffer (named as in :attr:`live`) with its steps and offset.

    """

    nbytes: int
    step: str
    live: list[tuple[str, int]] = field(default_factory=list)
    per_step: list[int] = field(default_factory=list)
    live_layers: list[str] = field(default_factory=list)
    live_bytes: int = 0
    arena: Arena = field(default_factory=lambda: Arena(0))


@dataclass
class _Buffer:
    size: int
    start: int
    owner: str
    is_input: bool
    values: list[str] = field(default_factory=list)


def peak_memory(steps: Sequence[Step], codes_bytes: Callable[[QRead], int] | None = None) -> Peak:
    """Peak activation bytes of ``steps`` under the module's rule: the arena's size and the live-sum bound.

    Args:
        steps: the pass in execution order; names unique, reads refer to earlier steps.
        codes_bytes: bytes stored for a quantized read, e.g. ``lambda r: r.nbytes`` (the blobs) or
            ``lambda r: r.numel`` (8-bit codes); ``None`` reads every quantized value in full precision (the
            FP32 network).

    Returns:
        The :class:`Peak`.

    Raises:
        ValueError: for a duplicate name or a read of a value no earlier step produced.

    """
    index = _check(steps)
    last = _last_reads(steps, index)
    buffer_of, buffers = _plan_buffers(steps, last)
    with_fp = codes_bytes is None
    spans: list[tuple[str, int, int, int, str]] = []  # (what, bytes, first step, last step, layer of codes or "")
    fp_end = {id(b): _end(b, steps, index, last, with_fp) for b in buffers}
    coded = {r.value for s in steps for r in s.qreads} if codes_bytes is not None else set()
    for b in buffers:
        if not (fp_end[id(b)] == b.start and not b.is_input and b.owner in coded):  # else written as codes at once
            what = b.owner if len(b.values) == 1 else f"{b.owner}..{b.values[-1]}"
            spans.append((f"{what} (full precision)", b.size, b.start, fp_end[id(b)], ""))
    if codes_bytes is not None:
        runs: dict[str, tuple[str, int, int, int, str]] = {}  # one span per shared run of codes, to its last read
        for i, step in enumerate(steps):
            for r in step.qreads:
                held = buffer_of.get(r.value)
                if held is not None and fp_end[id(held)] >= i:  # the layer quantizes the live copy on the fly
                    continue
                if r.blob:
                    what = f"{r.value} -> {r.layer or step.name} and every reader (shared codes)"
                    runs[r.blob] = (what, codes_bytes(r), index[r.value], i, r.layer)
                else:
                    what = f"{r.value} -> {r.layer or step.name} (codes)"
                    spans.append((what, codes_bytes(r), index[r.value], i, r.layer))
        spans += runs.values()
    per_step = [sum(size for _, size, lo, hi, _ in spans if lo <= i <= hi) for i in range(len(steps))]
    at = max(range(len(steps)), key=lambda i: (per_step[i], -i)) if steps else 0
    live = sorted(((what, size) for what, size, lo, hi, _ in spans if lo <= at <= hi), key=lambda t: -t[1])
    layers = [layer for _, _, lo, hi, layer in spans if layer and lo <= at <= hi]
    arena = plan_arena([Buffer(size, lo, hi, what) for what, size, lo, hi, _ in spans])
    bound = per_step[at] if steps else 0
    return Peak(arena.nbytes, steps[at].name if steps else "", live, per_step, layers, bound, arena)


def _check(steps: Sequence[Step]) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, step in enumerate(steps):
        if step.name in index:
            raise ValueError(f"Expected unique step names, got {step.name!r} twice")
        for name in (*step.reads, *(r.value for r in step.qreads), *([step.alias] if step.alias else [])):
            if name not in index:
                raise ValueError(f"Step {step.name!r} reads {name!r}, which no earlier step produced")
        index[step.name] = i
    return index


def _last_reads(steps: Sequence[Step], index: dict[str, int]) -> dict[str, int]:
    """Last step reading each value, quantized reads included (a value never read: its own step)."""
    last = {s.name: i for i, s in enumerate(steps)}
    for i, step in enumerate(steps):
        for name in (*step.reads, *(r.value for r in step.qreads)):
            last[name] = max(last[name], i)
    return last


def _plan_buffers(steps: Sequence[Step], last: dict[str, int]) -> tuple[dict[str, _Buffer], list[_Buffer]]:
    """The buffer of every tensor value: new, shared with an alias, or reused in place by an elementwise op."""
    buffer_of: dict[str, _Buffer] = {}
    buffers: list[_Buffer] = []
    for i, step in enumerate(steps):
        target = buffer_of.get(step.alias) if step.alias is not None else None
        if target is None and step.elementwise and step.nbytes > 0:
            target = next((buffer_of[r] for r in step.reads if _reusable(buffer_of.get(r), step, i, last)), None)
        if target is None and step.nbytes > 0:
            target = _Buffer(step.nbytes, i, step.name, step.is_input)
            buffers.append(target)
        if target is not None:
            target.values.append(step.name)
            buffer_of[step.name] = target
    return buffer_of, buffers


def _reusable(b: _Buffer | None, step: Step, i: int, last: dict[str, int]) -> bool:
    return b is not None and not b.is_input and b.size == step.nbytes and all(last[v] <= i for v in b.values)


def _end(b: _Buffer, steps: Sequence[Step], index: dict[str, int], last: dict[str, int], with_qreads: bool) -> int:
    """Last step that needs the buffer in full precision (quantized reads count only for the FP32 network)."""
    end = b.start
    for v in b.values:
        end = max(end, index[v])
    names = set(b.values)
    for i, step in enumerate(steps):
        if i <= end:
            continue
        reads = set(step.reads)
        if with_qreads or b.is_input:
            reads |= {r.value for r in step.qreads}
        if reads & names:
            end = i
    return end
