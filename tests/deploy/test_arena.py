"""The arena planner: no two buffers live at once share a byte, the size is at least the live bytes, and the
greedy-by-size rule reaches that bound where it provably does; the compressed runtime reports the arena."""

from __future__ import annotations

import random

import pytest
import torch

from lightning_dqa import DQAConfig, calibrate, prepare
from lightning_dqa.demos.models import build_model
from lightning_dqa.deploy.arena import Arena, Buffer, live_bytes, overlaps_in_time, plan_arena
from lightning_dqa.deploy.compressed import run_compressed

SEEDS = range(300)


def random_buffers(rng: random.Random, steps: int, count: int, max_bytes: int) -> list[Buffer]:
    """``count`` buffers of ``0..max_bytes`` bytes, each live over a random inclusive range of ``steps`` steps."""
    out = []
    for k in range(count):
        first = rng.randrange(steps)
        last = min(steps - 1, first + rng.choice([0, 1, 1, 2, 3, rng.randrange(steps)]))
        out.append(Buffer(rng.randrange(max_bytes + 1), first, last, f"b{k}"))
    return out


def chain(sizes: list[int]) -> list[Buffer]:
    """A chain: buffer ``k`` is written at step ``k`` and read by step ``k + 1``."""
    return [Buffer(s, k, k + 1, f"b{k}") for k, s in enumerate(sizes)]


def check_disjoint(plan: Arena) -> None:
    """No two buffers live at one step share a byte, and every buffer lies inside the arena."""
    for p in plan.placements:
        assert 0 <= p.offset and p.end <= plan.nbytes
    for i, p in enumerate(plan.placements):
        for q in plan.placements[i + 1 :]:
            if overlaps_in_time(p.buffer, q.buffer) and p.buffer.nbytes and q.buffer.nbytes:
                assert p.end <= q.offset or q.end <= p.offset, (p, q)


def brute_live_bytes(buffers: list[Buffer]) -> int:
    """The live-sum bound the slow way: every step, every buffer."""
    steps = range(max((b.last for b in buffers), default=-1) + 1)
    return max((sum(b.nbytes for b in buffers if b.first <= t <= b.last) for t in steps), default=0)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_interval_sets_are_placed_without_overlap_and_above_the_live_bound(seed: int) -> None:
    rng = random.Random(seed)
    buffers = random_buffers(rng, steps=rng.randrange(1, 30), count=rng.randrange(0, 40), max_bytes=1000)
    plan = plan_arena(buffers)
    check_disjoint(plan)
    assert plan.buffers == buffers  # placements in the order given
    assert live_bytes(buffers) == brute_live_bytes(buffers)
    assert plan.nbytes >= live_bytes(buffers)
    assert plan.nbytes == max((p.end for p in plan.placements), default=0)
    first, best = plan_arena(buffers, order="first"), plan_arena(buffers, order="best")
    for other in (first, best):
        check_disjoint(other)
        assert other.buffers == buffers and other.nbytes >= live_bytes(buffers)
    assert best.nbytes <= min(plan.nbytes, first.nbytes)


@pytest.mark.parametrize("seed", SEEDS)
def test_each_buffer_sits_at_the_lowest_free_offset_in_size_order(seed: int) -> None:
    # the greedy rule itself: placed largest first, each at the lowest offset clear of what is placed and live
    rng = random.Random(seed)
    buffers = random_buffers(rng, steps=12, count=rng.randrange(1, 25), max_bytes=64)
    plan = plan_arena(buffers)
    order = sorted(range(len(buffers)), key=lambda i: (-buffers[i].nbytes, buffers[i].first, i))
    for rank, i in enumerate(order):
        me = plan.placements[i]
        before = [plan.placements[j] for j in order[:rank] if overlaps_in_time(buffers[j], buffers[i])]

        def clear(offset: int, size: int = me.buffer.nbytes, others=before) -> bool:
            return all(offset + size <= p.offset or p.end <= offset or not p.buffer.nbytes for p in others)

        assert clear(me.offset)
        assert not any(clear(o) for o in range(me.offset)), f"{me} had a lower free offset"


@pytest.mark.parametrize("seed", SEEDS)
def test_simple_chains_reach_the_live_bound(seed: int) -> None:
    # chains whose sizes never grow (a network that shrinks), always grow, or stay put; a chain that grows with
    # ties can exceed the bound (equal sizes go earliest-live first, against the growth)
    rng = random.Random(seed)
    sizes = [rng.randrange(1, 100) for _ in range(rng.randrange(1, 20))]
    for chain_sizes in (sorted(set(sizes)), sorted(sizes, reverse=True), [sizes[0]] * len(sizes)):
        buffers = chain(chain_sizes)
        plan = plan_arena(buffers)
        check_disjoint(plan)
        assert plan.nbytes == live_bytes(buffers)


@pytest.mark.parametrize("seed", SEEDS)
def test_equal_sizes_reach_the_live_bound(seed: int) -> None:
    # placing equal-size intervals in order of their first step is an optimal colouring
    rng = random.Random(seed)
    buffers = [Buffer(16, b.first, b.last) for b in random_buffers(rng, 25, rng.randrange(1, 40), 1)]
    assert plan_arena(buffers).nbytes == live_bytes(buffers)


def test_greedy_by_size_can_exceed_the_live_bound_on_a_chain() -> None:
    # why Peak keeps live_bytes beside the arena: 6 and 5 go first at offset 0, 4 above 6, then 3 fits no gap
    buffers = chain([5, 3, 4, 6])
    plan = plan_arena(buffers)
    check_disjoint(plan)
    assert [p.offset for p in plan.placements] == [0, 10, 6, 0]
    assert (plan.nbytes, live_bytes(buffers)) == (13, 10)


def test_disjoint_lifetimes_share_offset_zero_and_empty_input() -> None:
    plan = plan_arena([Buffer(7, 0, 0), Buffer(9, 1, 1), Buffer(0, 0, 1), Buffer(3, 2, 2)])
    assert [p.offset for p in plan.placements] == [0, 0, 0, 0] and plan.nbytes == 9
    assert plan_arena([]).nbytes == 0 and plan_arena([]).top is None and live_bytes([]) == 0


def test_unknown_order_is_named() -> None:
    with pytest.raises(ValueError, match=r"order.*'size', 'first', 'best'.*'largest'"):
        plan_arena([Buffer(1, 0, 0)], order="largest")


@pytest.mark.parametrize("bad", [Buffer(-1, 0, 0, "neg"), Buffer(4, 3, 2, "backwards")])
def test_invalid_buffers_are_named(bad: Buffer) -> None:
    with pytest.raises(ValueError, match=bad.name):
        plan_arena([Buffer(1, 0, 0), bad])


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_report_of_a_real_network_is_an_arena_over_its_live_bytes(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, **({"width_mult": 0.5} if name == "mobilenetv2" else {})).eval()
    config = DQAConfig(bits=3, ranking="energy")
    prepare(model, config)
    g = torch.Generator().manual_seed(0)
    calibrate(model, config, [torch.randn(2, 3, 16, 16, generator=g)], forward_fn=lambda m, b: m(b))
    _, report = run_compressed(model, torch.randn(1, 3, 16, 16, generator=g))
    for key in ("fp32", "int8", "stored"):
        peak = getattr(report, key)
        check_disjoint(peak.arena)
        assert peak.nbytes == peak.arena.nbytes >= peak.live_bytes == max(peak.per_step)
        assert peak.live_bytes == live_bytes(peak.arena.buffers)
        assert report.per_image()[key] == peak.nbytes and report.per_image(live=True)[key] == peak.live_bytes
    # the lower bound falls with the bytes of the codes, whatever the planner does
    assert report.fp32.live_bytes > report.int8.live_bytes > report.stored.live_bytes
    assert "arena" in report.table()
