"""The paper's greedy channel search (``DQA_METHOD.md`` section 3), with a plain and a fast way to score.

The search, faithful to the paper: walk the target layers in forward order. For layer ``l``, every earlier
layer is quantized except its already chosen best channel, layer ``l`` is quantized except one candidate
channel ``c`` (left in full precision), every later layer is in full precision; ``c``'s score is the
objective (e.g. correct predictions) summed over the calibration batches. The best channel of ``l`` (ties:
the lowest index) stays in full precision while the next layers are searched. That is one inference per
candidate channel: O(layers x channels) passes.

The plain path runs exactly that: one full forward pass per candidate and batch. The fast path gets the same
scores from :mod:`lightning_dqa.calibration.fxreplay`, which runs what layer ``l`` cannot change once per batch and
replays only the rest, for ``K`` candidates stacked along the batch dimension in one pass. Candidates share a
pass so that its largest tensor holds about :data:`DEFAULT_PASS_BYTES` (or ``samples_per_pass`` rows).

Only the full-precision layers after ``l`` then run on ``K * N`` rows instead of ``N``, where a convolution
may round its last bit differently; argmax-based objectives are unaffected in practice (the tests compare
against a plain per-candidate loop).

Fallback: when the fast path cannot run a model faithfully (:class:`~lightning_dqa.calibration.fxreplay.Unsupported`:
:mod:`torch.fx` cannot trace it, a quantized layer runs where the graph cannot see it, or a layer's first
candidate group disagrees with a plain forward pass, checked once per layer on the first batch) the search
warns and takes the plain path from there on. Any other error propagates: it would fail the plain path too.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dqa.calibration.fxreplay import GraphSearch, LayerReplay, Unsupported, as_unsupported
from lightning_dqa.core._checks import is_int
from lightning_dqa.core.quantizers import ActivationQuantizer

__all__ = ["DEFAULT_PASS_BYTES", "greedy_rank"]

Batch = Any
ForwardFn = Callable[[nn.Module, Batch], Any]
ObjectiveFn = Callable[[Any, Batch], Any]
ProgressFn = Callable[[int, int], None]

# Candidate passes are sized so that the largest tensor they compute holds about this many bytes. Measured on
# ResNet-32 on a 2-core CPU (examples/bench_rankings.py --speedup): larger passes spill the CPU caches and run
# slower per sample on the 32x32 stage; smaller ones pay per-operation overhead on the 8x8 stage.
DEFAULT_PASS_BYTES = 8 * 2**20


def greedy_rank(
    model: nn.Module,
    quantizers: dict[str, ActivationQuantizer],
    order: Sequence[str],
    batches: Sequence[Batch],
    forward_fn: ForwardFn,
    objective_fn: ObjectiveFn,
    *,
    progress: ProgressFn | None = None,
    fast: bool = True,
    samples_per_pass: int | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """Score every channel of every layer with the paper's greedy search (higher is more important).

    Expects the state :func:`lightning_dqa.calibration.engine.calibrate` leaves before ranking: scales frozen (static)
    or dynamic, no important channels, quantizers disabled. Every quantizer's ``enabled`` flag and
    ``fp_mask``, and the model's training mode, are restored on return, also when an exception escapes.

    Args:
        model: the model with quantizers installed (:func:`lightning_dqa.core.attach.prepare`).
        quantizers: quantizers by layer name.
        order: names to search, in forward execution order (a subset of ``quantizers``; the others stay in
            full precision throughout).
        batches: calibration batches; each candidate is scored on all of them.
        forward_fn: ``forward_fn(model, batch)`` returns the model output for a batch. On the fast path it is
            called with a stand-in module whose output holds ``K`` replicas of the batch along dimension 0,
            so it must treat the output row by row (e.g. ``lambda m, b: m(b[0])``).
        objective_fn: ``objective_fn(output, batch)`` returns the summed score of one batch, higher is
            better (e.g. ``(output.argmax(1) == batch[1]).sum()``).
        progress: called as ``progress(done, total)`` in candidate channels as the search advances.
        fast: use the traced, batched search; ``False`` runs one full forward pass per candidate.
        samples_per_pass: rows per candidate pass on the fast path: ``K = samples_per_pass // batch size``
            candidates share a pass (at least 1). ``None`` sizes each layer's passes so that the largest
            tensor they compute holds about :data:`DEFAULT_PASS_BYTES` (more candidates per pass for layers
            whose downstream activations are small).
        reduce: sums a layer's ``(C,)`` scores over distributed ranks (each rank scores its own batches), so
            every rank keeps the same best channel; ``None`` on a single process.

    Returns:
        ``(C,)`` float64 scores on the CPU for every name in ``order``: the objective summed over all
        batches with that channel in full precision; all zeros for a pass-through (``bits == 0``) layer.

    Raises:
        ValueError: when ``order`` names an unknown layer or one twice, ``batches`` is empty, or
            ``samples_per_pass`` is neither ``None`` nor a positive int.
        Exception: whatever ``forward_fn`` or ``objective_fn`` raise, and :class:`MemoryError` (or a device
            running out of memory) on either path, propagate unchanged; so does ``KeyboardInterrupt``.

    Warns:
        UserWarning: when the fast path cannot run the model faithfully (:mod:`torch.fx` cannot trace it, a
            searched layer runs where the graph cannot see it, or the first candidates of a layer disagree
            with a plain forward pass); the search then takes the slower plain path with the same scores.

    Example (``calibrate`` with ``DQAConfig(ranking="greedy")`` makes this call itself):
        >>> from lightning_dqa import DQAConfig
        >>> from lightning_dqa import calibrate, prepare
        >>> from lightning_dqa.core.attach import set_quantizers_enabled
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)).eval()
        >>> config = DQAConfig(bits=3, ratio=0.0, clipping="none")  # ratio 0: calibrate does not rank
        >>> quantizers = prepare(model, config)
        >>> batches = [(torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,)))]
        >>> report = calibrate(model, config, batches, forward_fn=lambda m, b: m(b[0]))
        >>> set_quantizers_enabled(model, False)
        >>> scores = greedy_rank(model, quantizers, report.order, batches, lambda m, b: m(b[0]),
        ...                      lambda out, b: (out.argmax(1) == b[1]).sum())
        >>> {name: tuple(s.shape) for name, s in scores.items()}
        {'0': (3,), '3': (144,)}

    """
    batches = list(batches)
    _check_arguments(quantizers, order, batches, samples_per_pass)
    saved = {name: (q.enabled, q.fp_mask) for name, q in quantizers.items()}
    was_training = model.training
    total = sum(quantizers[n].num_channels for n in order if not quantizers[n].passthrough)
    tracker = _Progress(progress, total)
    task = _Task(model, batches, forward_fn, objective_fn, samples_per_pass, tracker, reduce)
    model.eval()
    try:
        for q in quantizers.values():
            q.enabled, q.fp_mask = False, None
        with torch.inference_mode():
            search = _build_search(task, quantizers, order) if fast else None
            scores = _walk_layers(task, quantizers, order, search)
        # Ordinary tensors: inference tensors could not take part in in-place updates or autograd later.
        return {name: s.clone() for name, s in scores.items()}
    finally:
        for name, q in quantizers.items():
            q.enabled, q.fp_mask = saved[name]
        model.train(was_training)


def _check_arguments(
    quantizers: dict[str, ActivationQuantizer],
    order: Sequence[str],
    batches: list[Batch],
    samples_per_pass: int | None,
) -> None:
    unknown = [n for n in order if n not in quantizers]
    if unknown:
        raise ValueError(f"Expected order to name installed quantizers {list(quantizers)}, got unknown {unknown}")
    if len(set(order)) != len(order):
        raise ValueError(f"Expected order to name each layer once, got {list(order)}")
    if not batches:
        raise ValueError("Expected at least one calibration batch for the greedy search, got none")
    if samples_per_pass is not None and (
        not is_int(samples_per_pass) or samples_per_pass < 1
    ):
        raise ValueError(f"Expected samples_per_pass to be None or a positive int, got {samples_per_pass!r}")


@dataclass
class _Task:
    """What scoring a candidate needs: the model, the data, how to run and score it, and the progress."""

    model: nn.Module
    batches: list[Batch]
    forward_fn: ForwardFn
    objective_fn: ObjectiveFn
    samples_per_pass: int | None
    tracker: _Progress
    reduce: Callable[[Tensor], Tensor] | None = None


def _build_search(task: _Task, quantizers: dict[str, ActivationQuantizer], order: Sequence[str]) -> GraphSearch | None:
    """The fast path's traced model; ``None``, with a warning, when the model cannot take it."""
    try:
        return GraphSearch.build(task.model, quantizers, order, task.batches[0], task.forward_fn)
    except Unsupported as err:
        warnings.warn(
            f"Greedy ranking: torch.fx cannot run {type(task.model).__name__} piecewise ({err}); falling back to "
            f"one full forward pass per candidate channel (much slower)",
            UserWarning,
            stacklevel=3,
        )
        return None


def _walk_layers(
    task: _Task, quantizers: dict[str, ActivationQuantizer], order: Sequence[str], search: GraphSearch | None
) -> dict[str, Tensor]:
    """The search proper: score each layer's channels, then keep its best channel in full precision."""
    scores: dict[str, Tensor] = {}
    for name in order:
        q = quantizers[name]
        if q.passthrough:  # nothing to rank: the layer is in full precision anyway
            scores[name] = torch.zeros(q.num_channels, dtype=torch.float64)
            continue
        layer_scores = None
        if search is not None:
            try:
                layer_scores = _fast_layer_scores(task, search, name, q)
            except Unsupported as err:
                warnings.warn(
                    f"Greedy ranking: the piecewise, batched search disagrees with a plain forward pass at layer "
                    f"{name!r} ({err}); falling back to one full forward pass per candidate channel from this "
                    f"layer on (much slower)",
                    UserWarning,
                    stacklevel=3,
                )
                search = None
        if layer_scores is None:
            layer_scores = _reference_layer_scores(task, q)
        if task.reduce is not None:  # distributed: every rank scores its own batches; the sums add up
            layer_scores = task.reduce(layer_scores)
        scores[name] = layer_scores
        q.fp_mask = _one_hot(q, _best_channel(layer_scores))
        q.enabled = True
        task.tracker.finish_layer(q.num_channels)
    return scores


def _reference_layer_scores(task: _Task, q: ActivationQuantizer) -> Tensor:
    """One full forward pass per candidate channel and batch: the paper's loop, and the fallback."""
    scores = torch.zeros(q.num_channels, dtype=torch.float64)
    for c in range(q.num_channels):
        scores[c] = _plain_score(task, q, c)
        task.tracker.within_layer(q.num_channels, (c + 1) / q.num_channels)
    return scores


def _plain_score(task: _Task, q: ActivationQuantizer, channel: int) -> float:
    """The objective summed over all batches, layer ``q`` quantized except ``channel``."""
    return sum(float(task.objective_fn(_plain_output(task, q, channel, b), b)) for b in task.batches)


def _plain_output(task: _Task, q: ActivationQuantizer, channel: int, batch: Batch) -> Any:
    """A full forward pass, layer ``q`` quantized except ``channel`` (disabled again afterwards)."""
    q.enabled, q.fp_mask = True, _one_hot(q, channel)
    try:
        return task.forward_fn(task.model, batch)
    finally:
        q.enabled, q.fp_mask = False, None


def _fast_layer_scores(task: _Task, search: GraphSearch, name: str, q: ActivationQuantizer) -> Tensor:
    """Scores ``(C,)`` of layer ``name``'s candidates from the piecewise replay, in groups sharing a pass.

    Raises:
        Unsupported: when the replay cannot run this layer faithfully (the caller falls back).

    """
    c = q.num_channels
    replay = search.replay(name)
    if replay is None:  # the output does not depend on this layer: every candidate scores the same
        return torch.full((c,), _plain_score(task, q, 0), dtype=torch.float64)
    scores = torch.zeros(c, dtype=torch.float64)
    for b, batch in enumerate(task.batches):
        replay.new_batch()
        rows = _batch_rows(batch)
        per_pass = task.samples_per_pass or max(rows, DEFAULT_PASS_BYTES // max(replay.row_bytes, 1))
        groups = _candidate_groups(c, rows, per_pass)
        for g, group in enumerate(groups):
            if b == 0 and g == 0:
                outputs = _checked_outputs(task, q, replay, group, batch)
            else:
                outputs = replay.outputs(group, task.forward_fn, batch)
            for cand, out in zip(group, outputs, strict=True):
                scores[cand] += float(task.objective_fn(out, batch))
            task.tracker.within_layer(c, (b + (g + 1) / len(groups)) / len(task.batches))
    return scores


def _checked_outputs(
    task: _Task, q: ActivationQuantizer, replay: LayerReplay, group: list[int], batch: Batch
) -> list[Any]:
    """A layer's first candidate group, its last candidate checked against a plain forward pass.

    The plain pass runs first, so that its errors (the model's own) propagate; a failure of the replay on
    the same inputs after it is the replay's.

    Raises:
        Unsupported: when the replay fails where the plain pass ran, or their outputs disagree.

    """
    slow = _plain_output(task, q, group[-1], batch)
    with as_unsupported("the replay fails where a plain forward pass runs"):
        fast = replay.outputs(group, task.forward_fn, batch)
    _assert_close(fast[-1], slow)
    return fast


def _assert_close(fast: Any, slow: Any) -> None:
    """Raise :class:`Unsupported` unless two outputs (tensors, or dicts, lists and tuples of them) agree."""
    if isinstance(slow, Tensor):
        _assert_tensors_close(fast, slow)
    elif isinstance(slow, dict):
        if not isinstance(fast, dict) or fast.keys() != slow.keys():
            raise Unsupported("output keys differ")
        for key in slow:
            _assert_close(fast[key], slow[key])
    elif isinstance(slow, list | tuple):
        if not isinstance(fast, list | tuple) or len(fast) != len(slow):
            raise Unsupported("output structures differ")
        for f, s in zip(fast, slow, strict=True):
            _assert_close(f, s)
    elif fast != slow:
        raise Unsupported(f"outputs differ: {fast!r} != {slow!r}")


def _assert_tensors_close(fast: Any, slow: Tensor) -> None:
    """Raise :class:`Unsupported` unless ``fast`` equals ``slow`` up to the last bits a batch size may change."""
    if not isinstance(fast, Tensor) or fast.shape != slow.shape:
        raise Unsupported(f"output shape {getattr(fast, 'shape', None)} differs from {tuple(slow.shape)}")
    if not slow.is_floating_point():
        if not torch.equal(fast, slow):
            raise Unsupported("integer outputs differ")
        return
    tol = 1e-3 * (1.0 + float(slow.abs().max())) if slow.numel() else 0.0
    err = float((fast - slow).abs().max()) if slow.numel() else 0.0
    if not err <= tol:
        raise Unsupported(f"outputs differ by up to {err:.3g} (tolerance {tol:.3g})")


def _batch_rows(batch: Batch) -> int:
    """First dimension of the first tensor in a batch (to size candidate groups; 1 if none)."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, list | tuple) else ()
    for item in items:
        if isinstance(item, Tensor | dict | list | tuple):
            return _batch_rows(item)
    return 1


def _candidate_groups(channels: int, rows: int, samples_per_pass: int) -> list[list[int]]:
    """Channels in groups of about ``samples_per_pass / rows``, sizes balanced (16 by 5 gives 4 x 4)."""
    k = min(channels, max(1, samples_per_pass // max(rows, 1)))
    k = math.ceil(channels / math.ceil(channels / k))
    return [list(range(s, min(s + k, channels))) for s in range(0, channels, k)]


def _best_channel(scores: Tensor) -> int:
    """Index of the highest score; the lowest such index on ties (the paper's stable sort)."""
    return int(torch.nonzero(scores == scores.max())[0, 0])


def _one_hot(q: ActivationQuantizer, channel: int) -> Tensor:
    mask = torch.zeros(q.num_channels, dtype=torch.bool, device=q.scale.device)  # (C,)
    mask[channel] = True
    return mask


class _Progress:
    """Reports ``(done, total)`` candidate channels, never the same value twice and never going back.

    A layer that falls back to the plain path midway re-counts its candidates from the start: those reports
    are held back until they pass what was already reported.
    """

    def __init__(self, fn: ProgressFn | None, total: int) -> None:
        self.fn, self.total, self.done, self.last = fn, total, 0, -1

    def within_layer(self, channels: int, fraction: float) -> None:
        self._report(self.done + min(channels, int(channels * fraction)))

    def finish_layer(self, channels: int) -> None:
        self.done += channels
        self._report(self.done)

    def _report(self, value: int) -> None:
        if self.fn is not None and value > self.last:
            self.last = value
            self.fn(value, self.total)
