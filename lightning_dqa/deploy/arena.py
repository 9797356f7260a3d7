"""One arena for every activation buffer of a pass: offsets planned greedy by size, as TFLite Micro does.

A device does not allocate tensors one by one: its runtime reserves one block of memory (the *arena*) and gives
each buffer a fixed offset in it, planned before the first inference. Two buffers may share bytes only when they
are never live at the same step. The arena's size, not the sum of the bytes live at one step, is what the
device must have free; it is at least that sum (the buffers live at one step are disjoint), and more when the
plan leaves gaps that no later buffer fits.

The rule is TensorFlow Lite Micro's ``GreedyMemoryPlanner``:

1. sort the buffers by size, largest first; equal sizes in the order they become live (then as given). TFLite
   Micro breaks ties by its tensor order instead; earliest-live first places equal buffers as the optimal
   interval colouring does, and it matters: on the residual demo networks latest-live first left arenas well
   above the live bytes (equal-size shortcut and convolution buffers took three slots where two are live);
2. place each at the lowest offset where it overlaps, in bytes, no already placed buffer that is live at an
   overlapping time (lifetimes are inclusive step ranges, ``first <= step <= last``);
3. the arena's size is the largest ``offset + nbytes``.

Greedy by size is a heuristic: it reaches the live-sum bound when every buffer has one size (placing intervals
in order of their first step is an optimal colouring), on chains whose sizes never grow or always grow, and
where at most one buffer is live at a time, but not on every chain (sizes ``5, 3, 4, 6`` on
steps ``[0, 1], [1, 2], [2, 3], [3, 4]`` give 13 bytes where 10 suffice; ``tests/deploy/test_arena.py`` keeps
that case). :func:`live_bytes` gives the lower bound.

Example:
    >>> plan = plan_arena([Buffer(8, 0, 1, "a"), Buffer(4, 1, 2, "b"), Buffer(8, 2, 3, "c")])
    >>> [p.offset for p in plan.placements], plan.nbytes, live_bytes(plan.buffers)
    ([0, 8, 0], 12, 12)

"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Arena", "Buffer", "Placement", "live_bytes", "overlaps_in_time", "plan_arena"]


@dataclass(frozen=True)
class Buffer:
    """A buffer to place: its size and the steps it is live at.

    Attributes:
        nbytes: its size in bytes (``>= 0``; an empty buffer is placed at offset 0 and takes no byte).
        first: the first step it is live at (written).
        last: the last step it is live at (read), ``>= first``; inclusive.
        name: what it holds, for reports.

    """

    nbytes: int
    first: int
    last: int
    name: str = ""


@dataclass(frozen=True)
class Placement:
    """A buffer at its offset in the arena: it takes bytes ``[offset, offset + buffer.nbytes)``."""

    buffer: Buffer
    offset: int

    @property
    def end(self) -> int:
        """One past its last byte."""
        return self.offset + self.buffer.nbytes


@dataclass
class Arena:
    """The plan of :func:`plan_arena`.

    Attributes:
        nbytes: the arena's size, ``max(offset + nbytes)`` over the buffers (0 for none).
        placements: every buffer with its offset, in the order the buffers were given.

    """

    nbytes: int
    placements: list[Placement] = field(default_factory=list)

    @property
    def buffers(self) -> list[Buffer]:
        """The buffers placed, in the order given."""
        return [p.buffer for p in self.placements]

    @property
    def top(self) -> Placement | None:
        """The placement that reaches the arena's end (the first such, in the order given); ``None`` when empty."""
        return max(self.placements, key=lambda p: p.end, default=None)


def overlaps_in_time(a: Buffer, b: Buffer) -> bool:
    """Whether ``a`` and ``b`` are live at one step at least (inclusive ranges)."""
    return a.first <= b.last and b.first <= a.last


def live_bytes(buffers: Sequence[Buffer]) -> int:
    """The most bytes live at one step: ``max over steps of sum(nbytes of the buffers live there)``.

    No plan can use fewer bytes than this (buffers live at one step must not share a byte), so it is a lower
    bound on :func:`plan_arena`'s size. Computed from the change points, ``O(n log n)`` for ``n`` buffers.
    """
    events: list[tuple[int, int]] = []  # (step, +nbytes at first / -nbytes one past last)
    for b in buffers:
        events += [(b.first, b.nbytes), (b.last + 1, -b.nbytes)]
    best = live = 0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):  # frees before allocations at one step
        live += delta
        best = max(best, live)
    return best


def plan_arena(buffers: Sequence[Buffer], order: str = "size") -> Arena:
    """Place every buffer in one arena, greedy by size (TFLite Micro's ``GreedyMemoryPlanner`` rule).

    Args:
        buffers: the buffers, each with its size and inclusive live range of steps.
        order: the order buffers are placed in, each at the lowest offset that fits: ``size`` (largest first,
            TFLite Micro's), ``first`` (by the step they become live, then largest first) or ``best``: both
            orders, each also with sizes rounded up to 256 and to 1,024 bytes while placing (so near-equal
            buffers fit each other's slots; the arena still counts their true sizes), the smallest of the six
            plans kept. On the banded runtime's chains of near-equal blobs beside one-step scratch buffers,
            exact sizes left a third more than the live bytes; rounded ones reach them.

    Returns:
        The :class:`Arena`: an offset per buffer (placements in the order given) and the arena's size. No two
        buffers live at one step share a byte, and the size is at least :func:`live_bytes`.

    Raises:
        ValueError: for a negative size or a range with ``last < first``.

    """
    for b in buffers:
        if b.nbytes < 0 or b.last < b.first:
            raise ValueError(
                f"Expected buffers with nbytes >= 0 and first <= last, got {b.name or 'a buffer'!r} with "
                f"nbytes={b.nbytes}, first={b.first}, last={b.last}"
            )
    if order not in ("size", "first", "best"):
        raise ValueError(f"Expected order to be one of ['size', 'first', 'best'], got {order!r}")
    if order == "best":
        plans = (_plan(buffers, o, q) for o in ("size", "first") for q in (1, 256, 1024))
        return min(plans, key=lambda a: a.nbytes)
    return _plan(buffers, order, 1)


def _plan(buffers: Sequence[Buffer], order: str, quantum: int) -> Arena:
    """Greedy placement in ``order``, each buffer taking its size rounded up to ``quantum`` bytes while placed."""
    sizes = [-(-b.nbytes // quantum) * quantum for b in buffers]
    if order == "size":
        ranks = sorted(range(len(buffers)), key=lambda i: (-sizes[i], buffers[i].first, i))
    else:
        ranks = sorted(range(len(buffers)), key=lambda i: (buffers[i].first, -sizes[i], i))
    offsets: dict[int, int] = {}
    by_offset: list[tuple[int, int, int]] = []  # (offset, end, index) of the placed buffers, sorted by offset
    for i in ranks:
        b = buffers[i]
        candidate = 0
        for offset, end, j in by_offset:  # the first gap, in offset order, among buffers live with b
            if not overlaps_in_time(b, buffers[j]):
                continue
            if offset - candidate >= sizes[i]:
                break
            candidate = max(candidate, end)
        offsets[i] = candidate
        _insert_sorted(by_offset, (candidate, candidate + sizes[i], i))
    placements = [Placement(b, offsets[i]) for i, b in enumerate(buffers)]
    return Arena(max((p.end for p in placements), default=0), placements)


def _insert_sorted(items: list[tuple[int, int, int]], item: tuple[int, int, int]) -> None:
    """Insert after every entry of an offset not above ``item``'s (TFLite Micro's list order)."""
    at = len(items)
    for k, (offset, _, _) in enumerate(items):
        if offset > item[0]:
            at = k
            break
    items.insert(at, item)
