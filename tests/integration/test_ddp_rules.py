"""Distributed calibration per ranking: 2 gloo processes on uneven shards end equal to one process on the union.

The engine runs with the reducer and broadcast the callback builds from its strategy
(:mod:`~lightning_dqa.integration.distributed`),
here over a minimal strategy on ``torch.distributed`` so that one pair of
processes checks every ranking (with clipping ``none``, so that scales are exact maxima), every clipping rule
(with the default ranking) and a ``target_bits`` allocation. ``percentile`` and ``mse`` clipping and the code
book read a sample of values chosen by content keys (:mod:`~lightning_dqa.calibration.sampling`),
so the ranks' merged sample
is one process's sample.
"""

from __future__ import annotations

import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from tiny import TinyNet, make_data

from lightning_dqa import DQAConfig, calibrate, prepare
from lightning_dqa.calibration.greedy import greedy_rank
from lightning_dqa.core.attach import quantizers_of
from lightning_dqa.integration.distributed import strategy_broadcast, strategy_reducer

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gloo spawn test runs on Linux/macOS")

RANKINGS = ("fisher", "saliency", "energy", "max", "random", "greedy")
CLIPPINGS = ("percentile", "mse")
BUDGET = 4.5  # target_bits of the allocation run (per-layer widths from the reduced statistics)
PEAK = 4330.0  # target_peak_bytes with BUDGET: binding (the bits-only peak of TinyNet here is 4,395 B per sample)


class TorchDistributed:
    """The three collectives of a Lightning strategy that calibration uses, on ``torch.distributed``."""

    root_device = torch.device("cpu")

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(out, t.contiguous())
        return torch.stack(out)

    def reduce(self, t: torch.Tensor, reduce_op) -> torch.Tensor:
        dist.all_reduce(t, op=reduce_op)
        return t

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        t = t.clone()
        dist.broadcast(t, src)
        return t


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """80 samples in batches of 32, 32, 16: rank 0 reads 48, rank 1 reads 32."""
    x, y = make_data(80, 3).tensors
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, 80, 32)]


def calibrated_state(
    ranking: str,
    rank: int = 0,
    world: int = 1,
    clipping: str = "none",
    target_bits: float | None = None,
    target_peak_bytes: float | None = None,
) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = TinyNet().net.eval()
    config = DQAConfig(
        bits=3, ranking=ranking, clipping=clipping, first_layer_bits=None, target_bits=target_bits,
        target_peak_bytes=target_peak_bytes,
    )  # fmt: skip
    prepare(model, config)
    shard = [b for i, b in enumerate(batches()) if i % world == rank]
    strategy = TorchDistributed()
    calibrate(
        model,
        config,
        shard,
        forward_fn=lambda m, b: m(b[0]),
        loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        objective_fn=lambda out, b: (out.argmax(dim=1) == b[1]).sum(),
        reducer=strategy_reducer(strategy, world) if world > 1 else None,
        broadcast=strategy_broadcast(strategy, world),
        example_input=shard[0][0],  # each rank its own: rank 0's choices must win
    )
    return {
        f"{name}.{buf}": value.detach().clone()
        for name, q in quantizers_of(model).items()
        for buf, value in q.state_dict().items()
    }


def greedy_scores(rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """The greedy search's raw scores (summed objective per candidate channel) on this rank's shard."""
    torch.manual_seed(0)
    model = TinyNet().net.eval()
    config = DQAConfig(bits=3, method="direct", clipping="none", first_layer_bits=None)
    prepare(model, config)
    shard = [b for i, b in enumerate(batches()) if i % world == rank]
    reducer = strategy_reducer(TorchDistributed(), world) if world > 1 else None
    report = calibrate(model, config, shard, forward_fn=lambda m, b: m(b[0]), reducer=reducer)
    return greedy_rank(
        model,
        quantizers_of(model),
        report.order,
        shard,
        lambda m, b: m(b[0]),
        lambda out, b: (out.argmax(dim=1) == b[1]).sum(),
        reduce=None if reducer is None else (lambda t: reducer(t, "sum")),
    )


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        states = {ranking: calibrated_state(ranking, rank, world) for ranking in RANKINGS}
        states.update({f"clip-{c}": calibrated_state("fisher", rank, world, clipping=c) for c in CLIPPINGS})
        states["budget"] = calibrated_state("fisher", rank, world, clipping="mse", target_bits=BUDGET)
        states["peak"] = calibrated_state(
            "fisher", rank, world, clipping="mse", target_bits=BUDGET, target_peak_bytes=PEAK
        )
        states["greedy_scores"] = greedy_scores(rank, world)
        try:  # below the floor: every rank must raise (a rank left waiting in a broadcast would hang the test)
            calibrated_state("fisher", rank, world, clipping="mse", target_bits=BUDGET, target_peak_bytes=1000.0)
        except ValueError as err:
            states["refused"] = {"message": torch.tensor(list(str(err).encode()), dtype=torch.uint8)}
        torch.save(states, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_ranking_and_clipping_on_uneven_shards_equals_one_process(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    runs = [(ranking, ranking, "none", None, None) for ranking in RANKINGS]
    runs += [(f"clip-{c}", "fisher", c, None, None) for c in CLIPPINGS]
    runs += [("budget", "fisher", "mse", BUDGET, None), ("peak", "fisher", "mse", BUDGET, PEAK)]
    for name, ranking, clipping, budget, peak in runs:
        single = calibrated_state(ranking, clipping=clipping, target_bits=budget, target_peak_bytes=peak)
        for key, value in single.items():
            assert torch.equal(r0[name][key], r1[name][key]), f"{name}: ranks disagree at {key}"
            assert torch.equal(r0[name][key], value), f"{name}: {key} differs from one process"
        important = sum(int(v.sum()) for k, v in single.items() if k.endswith("important"))
        assert important > 0, name
        assert sum(int(v.sum()) for k, v in single.items() if k.endswith("error_counts")) > 0, name
    for r in (r0, r1):
        assert b"Expected target_peak_bytes >= " in bytes(r["refused"]["message"].tolist())
    budget_state = calibrated_state("fisher", clipping="mse", target_bits=BUDGET)
    widths = {int(v) for k, v in budget_state.items() if k.endswith(".bits")}
    assert len(widths) > 1, f"the budget run chose one width everywhere ({widths}): it tests nothing per layer"
    peak_state = calibrated_state("fisher", clipping="mse", target_bits=BUDGET, target_peak_bytes=PEAK)
    assert any(not torch.equal(peak_state[k], v) for k, v in budget_state.items()), "the peak limit did not bind"
    # the clipping rules did clip: some scale below the unclipped one
    unclipped = calibrated_state("fisher")
    for c in CLIPPINGS:
        clipped = calibrated_state("fisher", clipping=c)
        assert any(bool((clipped[k] < unclipped[k]).any()) for k in unclipped if k.endswith(".scale")), (
            f"{c} clipped nothing"
        )
    # the search's own sums: without the reduction each rank would score only its own 48 or 32 samples
    single = greedy_scores()
    assert single.keys() == r0["greedy_scores"].keys()
    for name, scores in single.items():
        assert torch.equal(r0["greedy_scores"][name], scores), name
        assert torch.equal(r1["greedy_scores"][name], scores), name
