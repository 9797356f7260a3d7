"""The paper's greedy channel search (``DQA_METHOD.md`` section 3), engineered to run only what changes.

The search, faithful to the paper: walk the target layers in forward order. For layer ``l``, every earlier
layer is quantized except its already chosen best channel, layer ``l`` is quantized except one candidate
channel ``c`` (left in full precision), every later layer is in full precision; ``c``'s score is the
objective (e.g. correct predictions) summed over the calibration batches. The best channel of ``l`` (ties:
the lowest index) stays in full precision while the next layers are searched. That is one inference per
candidate channel: O(layers x channels) passes.

Two things make it cheap without changing a single score:

1. **Run only what changes.** The model is traced with :mod:`torch.fx`. For layer ``l`` the graph splits into
   the nodes *downstream* of ``l`` (its call and everything that depends on it) and the rest. Per batch the
   rest runs once and the *boundary* (values of upstream nodes that downstream nodes read) is cached; every
   candidate then runs only the downstream nodes. With ``where="output"`` the layer itself is upstream: its
   output is cached before quantization and only the quantizer and what follows run per candidate. The
   graph calls the model's own submodule instances, so the quantizers' hooks fire as in a normal forward.
2. **Batch candidates.** The boundary is repeated ``K`` times along the batch dimension and replica ``k``
   leaves channel ``c_k`` of layer ``l`` in full precision, so ``K`` candidates cost one larger pass. Each
   replica is quantized on its own by :meth:`ActivationQuantizer.quantize_values` (dynamic scales therefore
   take the maximum over that replica's ``N`` rows, exactly as a single-candidate pass does).

Exactness: quantization is elementwise, so layer ``l`` quantizes every replica exactly as the reference
does. Only the full-precision layers after ``l`` run on ``K * N`` rows instead of ``N``, and a convolution
or matrix product may round its last bit differently for a different batch size; argmax-based objectives
are unaffected in practice (the tests compare against a plain per-candidate loop).

Safety: a model :mod:`torch.fx` cannot trace, a quantized layer the graph cannot see, or a first candidate
group whose outputs disagree with a plain forward pass (checked once per layer, on the first batch) make the
search fall back to one full forward pass per candidate, with a warning that says why.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from lightning_dqa.attach import QUANTIZER_ATTR, output_hook
from lightning_dqa.quantizers import ActivationQuantizer

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
) -> dict[str, Tensor]:
    """Score every channel of every layer with the paper's greedy search (higher is more important).

    Expects the state :func:`lightning_dqa.engine.calibrate` leaves before ranking: scales frozen (static)
    or dynamic, no important channels, quantizers disabled. Every quantizer's ``enabled`` flag and
    ``fp_mask``, and the model's training mode, are restored on return, also when an exception escapes.

    Args:
        model: the model with quantizers installed (:func:`lightning_dqa.engine.prepare`).
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

    Returns:
        ``(C,)`` float64 scores on the CPU for every name in ``order``: the objective summed over all
        batches with that channel in full precision; all zeros for a pass-through (``bits == 0``) layer.

    Raises:
        ValueError: when ``order`` names an unknown layer or one twice, ``batches`` is empty, or
            ``samples_per_pass`` is neither ``None`` nor a positive int.

    Example (``calibrate`` with ``DQAConfig(ranking="greedy")`` makes this call itself):
        >>> from lightning_dqa import DQAConfig
        >>> from lightning_dqa.engine import calibrate, prepare, set_quantizers_enabled
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
    model.eval()
    try:
        for q in quantizers.values():
            q.enabled, q.fp_mask = False, None
        with torch.inference_mode():
            search = _GraphSearch.build(model, quantizers, order, batches[0], forward_fn) if fast else None
            scores = _walk_layers(
                model, quantizers, order, batches, forward_fn, objective_fn, search, samples_per_pass, tracker
            )
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
        isinstance(samples_per_pass, bool) or not isinstance(samples_per_pass, int) or samples_per_pass < 1
    ):
        raise ValueError(f"Expected samples_per_pass to be None or a positive int, got {samples_per_pass!r}")


def _walk_layers(
    model: nn.Module,
    quantizers: dict[str, ActivationQuantizer],
    order: Sequence[str],
    batches: list[Batch],
    forward_fn: ForwardFn,
    objective_fn: ObjectiveFn,
    search: _GraphSearch | None,
    samples_per_pass: int | None,
    tracker: _Progress,
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
            layer_scores = search.layer_scores(name, batches, forward_fn, objective_fn, samples_per_pass, tracker)
            if layer_scores is None:  # the self-check failed (it warned): the plain loop from here on
                search = None
        if layer_scores is None:
            layer_scores = _reference_layer_scores(model, q, batches, forward_fn, objective_fn, tracker)
        scores[name] = layer_scores
        q.fp_mask = _one_hot(q, _best_channel(layer_scores))
        q.enabled = True
        tracker.finish_layer(q.num_channels)
    return scores


def _reference_layer_scores(
    model: nn.Module,
    q: ActivationQuantizer,
    batches: list[Batch],
    forward_fn: ForwardFn,
    objective_fn: ObjectiveFn,
    tracker: _Progress,
) -> Tensor:
    """One full forward pass per candidate channel and batch: the paper's loop, and the fallback."""
    scores = torch.zeros(q.num_channels, dtype=torch.float64)
    q.enabled = True
    try:
        for c in range(q.num_channels):
            q.fp_mask = _one_hot(q, c)
            scores[c] = sum(float(objective_fn(forward_fn(model, batch), batch)) for batch in batches)
            tracker.within_layer(q.num_channels, (c + 1) / q.num_channels)
    finally:
        q.enabled, q.fp_mask = False, None
    return scores


def _best_channel(scores: Tensor) -> int:
    """Index of the highest score; the lowest such index on ties (the paper's stable sort)."""
    return int(torch.nonzero(scores == scores.max())[0, 0])


def _one_hot(q: ActivationQuantizer, channel: int) -> Tensor:
    mask = torch.zeros(q.num_channels, dtype=torch.bool, device=q.scale.device)  # (C,)
    mask[channel] = True
    return mask


class _Progress:
    """Reports ``(done, total)`` candidate channels, never the same value twice."""

    def __init__(self, fn: ProgressFn | None, total: int) -> None:
        self.fn, self.total, self.done, self.last = fn, total, 0, -1

    def within_layer(self, channels: int, fraction: float) -> None:
        self._report(self.done + min(channels, int(channels * fraction)))

    def finish_layer(self, channels: int) -> None:
        self.done += channels
        self._report(self.done)

    def _report(self, value: int) -> None:
        if self.fn is not None and value != self.last:
            self.last = value
            self.fn(value, self.total)


# --------------------------------------------------------------------------------------------- fast path
def _quantize_replicas(q: ActivationQuantizer, x: Tensor, fp_rows: Tensor) -> Tensor:
    """Quantize ``K`` stacked replicas of a tensor, replica ``k`` with full-precision mask ``fp_rows[k]``.

    Each replica goes through :meth:`ActivationQuantizer.quantize_values` on its own, so a dynamic scale is
    the maximum over that replica's rows: the same values a single-candidate pass computes.

    Args:
        q: the quantizer (its own ``fp_mask`` is restored afterwards).
        x: ``(K * N, ...)`` replicas stacked along dimension 0.
        fp_rows: ``(K, C)`` bool, channels each replica leaves in full precision.

    Returns:
        Tensor like ``x``.

    Raises:
        RuntimeError: when ``x``'s first dimension is not a multiple of ``K``.

    """
    k = fp_rows.shape[0]
    if x.shape[0] % k:
        raise RuntimeError(f"Layer {q.name!r}: expected {k} replicas along dimension 0, got shape {tuple(x.shape)}")
    saved = q.fp_mask
    try:
        parts = []
        for chunk, fp in zip(x.split(x.shape[0] // k), fp_rows.unbind(0), strict=True):  # (N, ...) each
            q.fp_mask = fp
            parts.append(q.quantize_values(chunk))
    finally:
        q.fp_mask = saved
    return torch.cat(parts)


@contextmanager
def _replica_mode(pairs: list[tuple[ActivationQuantizer, Tensor]]) -> Iterator[None]:
    """Make each quantizer quantize replica by replica (``(quantizer, (K, C) fp rows)`` pairs) for a while.

    The quantizer is disabled, so its own forward passes the tensor through (after its ``pre_transform``),
    and a forward hook quantizes that result per replica instead.
    """
    handles = []
    enabled = [q.enabled for q, _ in pairs]
    try:
        for q, rows in pairs:
            q.enabled = False
            handles.append(q.register_forward_hook(_replica_hook(rows)))
        yield
    finally:
        for h in handles:
            h.remove()
        for (q, _), e in zip(pairs, enabled, strict=True):
            q.enabled = e


def _replica_hook(rows: Tensor) -> Callable[[nn.Module, tuple[Any, ...], Tensor], Tensor]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        assert isinstance(module, ActivationQuantizer)
        return _quantize_replicas(module, output, rows)

    return hook


@dataclass
class _Plan:
    """How the graph splits for one layer.

    Attributes:
        upstream: nodes the cache pass runs, in graph order (placeholders excluded: they are bound).
        boundary: upstream nodes whose values downstream nodes read; cached per batch.
        downstream: nodes every candidate pass runs, in graph order, ending with the output node.
        raw: ``where="output"``: the layer's call, cached unquantized (its quantizer runs per candidate).
        free_up / free_down: values that can be dropped once a node ran (memory of ``K * N`` rows matters).
        row_bytes: bytes per batch row of the largest tensor the downstream nodes compute.

    """

    upstream: list[fx.Node]
    boundary: list[fx.Node]
    downstream: list[fx.Node]
    raw: fx.Node | None
    free_up: dict[fx.Node, list[fx.Node]]
    free_down: dict[fx.Node, list[fx.Node]]
    row_bytes: int


class _LeafTracer(fx.Tracer):
    """Keeps every quantized layer a single ``call_module`` node, so its quantizer hook runs at call time."""

    def __init__(self, leaves: set[int]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) in self.leaves or super().is_leaf_module(m, module_qualified_name)


class _Unsupported(Exception):
    """The model cannot take the fast path; the message says why."""


class _GraphSearch:
    """The traced model and what the fast path needs to run one layer's candidates."""

    def __init__(self, gm: fx.GraphModule, quantizers: dict[str, ActivationQuantizer], model: nn.Module) -> None:
        self.gm = gm
        self.model = model
        self.quantizers = quantizers
        self.interp = fx.Interpreter(gm, garbage_collect_values=False)
        self.nodes = list(gm.graph.nodes)
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.output = next(n for n in self.nodes if n.op == "output")
        self.signature = inspect.signature(gm.forward)
        self.data = _descendants(self.placeholders)  # values that carry the batch
        by_module: dict[int, list[fx.Node]] = {}
        for node in self.nodes:
            if node.op == "call_module":
                by_module.setdefault(id(gm.get_submodule(str(node.target))), []).append(node)
        self.calls = {name: by_module.get(id(_layer_of(q, model, name)), []) for name, q in quantizers.items()}
        self.row_bytes: dict[fx.Node, int] = {}

    @classmethod
    def build(
        cls,
        model: nn.Module,
        quantizers: dict[str, ActivationQuantizer],
        order: Sequence[str],
        probe_batch: Batch,
        forward_fn: ForwardFn,
    ) -> _GraphSearch | None:
        """Trace ``model``; ``None`` (with a warning) when the fast path cannot be trusted for it."""
        try:
            layers = {name: _layer_of(q, model, name) for name, q in quantizers.items()}
            tracer = _LeafTracer({id(m) for m in layers.values()})
            gm = fx.GraphModule(model, tracer.trace(model))
            search = cls(gm, quantizers, model)
            search._probe(layers, [n for n in order if not quantizers[n].passthrough], probe_batch, forward_fn)
        except Exception as err:  # any tracing failure only costs speed
            warnings.warn(
                f"Greedy ranking: torch.fx cannot run {type(model).__name__} piecewise ({type(err).__name__}: "
                f"{err}); falling back to one full forward pass per candidate channel (much slower)",
                stacklevel=3,
            )
            return None
        return search

    def _probe(self, layers: dict[str, nn.Module], names: list[str], batch: Batch, forward_fn: ForwardFn) -> None:
        """Check the graph against one real forward pass, then measure its tensors on the same inputs.

        Raises unless every searched layer ran as often as the graph says it does: a layer called where the
        graph cannot see it (inside a leaf module or a wrapped function) would look unaffected by its
        candidates.
        """
        counts = dict.fromkeys(names, 0)
        inputs: list[tuple[tuple[Any, ...], dict[str, Any]]] = []  # (args, kwargs) of each model call
        handles = [self.model.register_forward_pre_hook(lambda m, a, kw: inputs.append((a, kw)), with_kwargs=True)]
        for name in names:
            handles.append(layers[name].register_forward_pre_hook(lambda m, a, n=name: _bump(counts, n)))
        try:
            forward_fn(self.model, batch)
        finally:
            for h in handles:
                h.remove()
        for name in names:
            if counts[name] != len(self.calls[name]) * len(inputs):
                raise _Unsupported(
                    f"layer {name!r} ran {counts[name]} times in {len(inputs)} model calls but appears "
                    f"{len(self.calls[name])} times in the traced graph"
                )
        if inputs:
            self._measure_rows(*inputs[0])

    def _measure_rows(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Bytes per batch row of every node's tensor value (sizes the candidate passes)."""
        env = self._bind(args, kwargs)
        rows = _rows_of(env)
        nodes = [n for n in self.nodes if n.op != "placeholder"]
        free = _last_uses(nodes, keep=set())
        self.interp.env = env
        for node in nodes:
            value = env[node] = self.interp.run_node(node)
            if isinstance(value, Tensor) and value.ndim and value.shape[0] == rows:
                self.row_bytes[node] = value[0].numel() * value.element_size()
            for dead in free.get(node, ()):
                del env[dead]

    # ------------------------------------------------------------------ one layer
    def layer_scores(
        self,
        name: str,
        batches: list[Batch],
        forward_fn: ForwardFn,
        objective_fn: ObjectiveFn,
        samples_per_pass: int | None,
        tracker: _Progress,
    ) -> Tensor | None:
        """Scores ``(C,)`` of layer ``name``'s candidates; ``None`` (with a warning) if the self-check failed."""
        q = self.quantizers[name]
        plan = self._plan(name)
        if plan is None:
            return self._unaffected_scores(q, batches, forward_fn, objective_fn)
        c = q.num_channels
        runner = _Runner(self, plan, q, self._overrides(name, plan))
        scores = torch.zeros(c, dtype=torch.float64)
        for b, batch in enumerate(batches):
            runner.new_batch()
            rows = _batch_rows(batch)
            per_pass = samples_per_pass or max(rows, DEFAULT_PASS_BYTES // max(plan.row_bytes, 1))
            groups = _candidate_groups(c, rows, per_pass)
            for g, group in enumerate(groups):
                runner.candidates(group)
                try:
                    parts = _split_rows(runner.evaluate(forward_fn, batch), len(group))
                    if b == 0 and g == 0:  # once per layer: the fast path must agree with a plain pass
                        self._self_check(q, group[-1], parts[-1], batch, forward_fn)
                except Exception as err:
                    if b or g:
                        raise
                    warnings.warn(
                        f"Greedy ranking: the piecewise, batched search disagrees with a plain forward pass "
                        f"at layer {name!r} ({type(err).__name__}: {err}); falling back to one full forward "
                        f"pass per candidate channel from this layer on (much slower)",
                        stacklevel=4,
                    )
                    return None
                for cand, part in zip(group, parts, strict=True):
                    scores[cand] += float(objective_fn(part, batch))
                tracker.within_layer(c, (b + (g + 1) / len(groups)) / len(batches))
        return scores

    def _plan(self, name: str) -> _Plan | None:
        """Split the graph for layer ``name``; ``None`` when the layer cannot change the output."""
        starts = self.calls[name]
        down = _descendants(starts)
        if self.output not in down:
            return None
        layer = starts[0].target
        raw = None
        if len(starts) == 1 and output_hook in self.gm.get_submodule(str(layer))._forward_hooks.values():
            raw = starts[0]  # quantizing the output: the layer's computation itself does not change
            down.discard(raw)
        downstream = [n for n in self.nodes if n in down]
        boundary = [n for n in self.nodes if n not in down and any(u in down for u in n.users)]
        needed = _ancestors(boundary)
        upstream = [n for n in self.nodes if n in needed and n.op != "placeholder"]
        return _Plan(
            upstream=upstream,
            boundary=boundary,
            downstream=downstream,
            raw=raw,
            free_up=_last_uses(upstream, keep=set(boundary)),
            free_down=_last_uses(downstream, keep={self.output}),
            row_bytes=max((self.row_bytes.get(n, 0) for n in downstream), default=0),
        )

    def _overrides(self, name: str, plan: _Plan) -> list[ActivationQuantizer]:
        """Other enabled quantizers that run downstream: they too must quantize replica by replica."""
        down = set(plan.downstream)
        active = {other: q for other, q in self.quantizers.items() if other != name and q.enabled and not q.passthrough}
        return [q for other, q in active.items() if any(n in down for n in self.calls[other])]

    def _unaffected_scores(
        self, q: ActivationQuantizer, batches: list[Batch], forward_fn: ForwardFn, objective_fn: ObjectiveFn
    ) -> Tensor:
        """The output does not depend on this layer: every candidate scores what the current state scores."""
        q.enabled, q.fp_mask = True, _one_hot(q, 0)
        try:
            base = sum(float(objective_fn(forward_fn(self.model, batch), batch)) for batch in batches)
        finally:
            q.enabled, q.fp_mask = False, None
        return torch.full((q.num_channels,), base, dtype=torch.float64)

    def _self_check(self, q: ActivationQuantizer, channel: int, fast: Any, batch: Batch, forward_fn: ForwardFn) -> None:
        """Raise unless the fast output of one candidate matches a plain forward pass of the model."""
        q.enabled, q.fp_mask = True, _one_hot(q, channel)
        try:
            slow = forward_fn(self.model, batch)
        finally:
            q.enabled, q.fp_mask = False, None
        _assert_close(fast, slow)

    # ------------------------------------------------------------------ execution
    def run_upstream(self, plan: _Plan, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[dict, int]:
        """Run the cache pass on one model call's inputs; returns the boundary values and the batch rows."""
        env = self._bind(args, kwargs)
        rows = _rows_of(env)
        self._run(plan.upstream, env, plan.free_up)
        return {n: env[n] for n in plan.boundary}, rows

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[fx.Node, Any]:
        """The placeholders' values for one call of the model."""
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(zip(self.placeholders, bound.arguments.values(), strict=True))

    def run_downstream(
        self,
        plan: _Plan,
        boundary: dict[fx.Node, Any],
        rows: int,
        pairs: list[tuple[ActivationQuantizer, Tensor]],
    ) -> Any:
        """Run the downstream nodes on ``K`` replicas of the boundary; returns the model output."""
        k = pairs[0][1].shape[0]
        env = {n: _repeat(v, k, rows) if n in self.data else v for n, v in boundary.items()}
        if plan.raw is not None:
            env[plan.raw] = _quantize_replicas(pairs[0][0], env[plan.raw], pairs[0][1])
        with _replica_mode(pairs):
            self._run(plan.downstream, env, plan.free_down)
        return env[self.output]

    def _run(self, nodes: list[fx.Node], env: dict[fx.Node, Any], free: dict[fx.Node, list[fx.Node]]) -> None:
        self.interp.env = env
        for node in nodes:
            env[node] = self.interp.run_node(node)
            for dead in free.get(node, ()):
                del env[dead]


class _Runner(nn.Module):
    """Stands in for the model inside ``forward_fn``: cached upstream, then ``K`` candidates downstream.

    Each call of the stand-in within one ``forward_fn`` call gets its own cache (a ``forward_fn`` may call
    the model more than once, e.g. test-time augmentation). The model is a child, so ``forward_fn`` can read
    its parameters' device.
    """

    def __init__(
        self, search: _GraphSearch, plan: _Plan, q: ActivationQuantizer, overrides: list[ActivationQuantizer]
    ) -> None:
        super().__init__()
        self.dqa_model = search.model
        # A tuple, not attributes: nn.Module would register the quantizers as children of the stand-in.
        self._job = (search, plan, q, overrides)
        self._caches: list[tuple[dict[fx.Node, Any], int]] = []
        self._calls = 0
        self._pairs: list[tuple[ActivationQuantizer, Tensor]] = []

    def new_batch(self) -> None:
        """Forget the cached boundary: the next call computes it for a new batch."""
        self._caches = []

    def candidates(self, channels: list[int]) -> None:
        """Replica ``k`` of the next passes leaves channel ``channels[k]`` in full precision."""
        _, _, q, overrides = self._job
        k = len(channels)
        rows = torch.zeros(k, q.num_channels, dtype=torch.bool, device=q.scale.device)  # (K, C)
        rows[torch.arange(k), torch.tensor(channels)] = True
        self._pairs = [(q, rows)]
        for other in overrides:  # the same mask for every replica: its chosen channel
            fp = other.fp_mask if other.fp_mask is not None else torch.zeros(other.num_channels, dtype=torch.bool)
            self._pairs.append((other, fp.to(other.scale.device).expand(k, -1)))

    def evaluate(self, forward_fn: ForwardFn, batch: Batch) -> Any:
        """``forward_fn`` on the stand-in: the output for the current candidates (``K * N`` rows)."""
        self._calls = 0
        return forward_fn(self, batch)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model output for ``K`` replicas of the inputs (``K * N`` rows)."""
        search, plan, _, _ = self._job
        call = self._calls
        self._calls += 1
        if call == len(self._caches):
            self._caches.append(search.run_upstream(plan, args, kwargs))
        boundary, rows = self._caches[call]
        return search.run_downstream(plan, boundary, rows, self._pairs)


# --------------------------------------------------------------------------------------------- helpers
def _layer_of(q: ActivationQuantizer, model: nn.Module, name: str) -> nn.Module:
    layer = model.get_submodule(name)
    if getattr(layer, QUANTIZER_ATTR, None) is not q:
        raise _Unsupported(f"quantizer {name!r} is not installed on module {name!r} of the model")
    return layer


def _rows_of(env: dict[fx.Node, Any]) -> int:
    """Batch size of a model call: the first dimension of its first tensor input."""
    rows = next((int(v.shape[0]) for v in env.values() if isinstance(v, Tensor) and v.ndim), None)
    if rows is None:
        raise _Unsupported("the model takes no tensor with a batch dimension")
    return rows


def _bump(counts: dict[Any, int], key: Any) -> None:
    counts[key] += 1


def _descendants(starts: Sequence[fx.Node]) -> set[fx.Node]:
    """``starts`` and every node that depends on them."""
    seen, stack = set(starts), list(starts)
    while stack:
        for user in stack.pop().users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return seen


def _ancestors(starts: Sequence[fx.Node]) -> set[fx.Node]:
    """``starts`` and every node they depend on."""
    seen, stack = set(starts), list(starts)
    while stack:
        for dep in stack.pop().all_input_nodes:
            if dep not in seen:
                seen.add(dep)
                stack.append(dep)
    return seen


def _last_uses(nodes: list[fx.Node], keep: set[fx.Node]) -> dict[fx.Node, list[fx.Node]]:
    """For each node of ``nodes``, the values (not in ``keep``) read for the last time by it."""
    last: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        for dep in node.all_input_nodes:
            last[dep] = node
    out: dict[fx.Node, list[fx.Node]] = {}
    for dep, node in last.items():
        if dep not in keep:
            out.setdefault(node, []).append(dep)
    return out


def _repeat(value: Any, k: int, rows: int) -> Any:
    """``k`` stacked copies of a batch tensor (always a fresh tensor: downstream ops may work in place)."""
    if isinstance(value, Tensor) and value.ndim and value.shape[0] == rows:
        return value.repeat(k, *([1] * (value.ndim - 1)))  # (K * N, ...)
    return value


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


def _split_rows(output: Any, k: int) -> list[Any]:
    """Split a ``K * N``-row output (a tensor, or tuples, lists and dicts of them) into ``K`` outputs."""
    if isinstance(output, Tensor):
        if not output.ndim or output.shape[0] % k:
            raise _Unsupported(f"cannot split an output of shape {tuple(output.shape)} into {k} replicas")
        return list(output.split(output.shape[0] // k))
    if isinstance(output, dict):
        split = {key: _split_rows(v, k) for key, v in output.items()}
        return [{key: v[i] for key, v in split.items()} for i in range(k)]
    if isinstance(output, list | tuple):
        columns = [_split_rows(v, k) for v in output]
        return [type(output)(col[i] for col in columns) for i in range(k)]
    raise _Unsupported(f"cannot split an output of type {type(output).__name__} into replicas")


def _assert_close(fast: Any, slow: Any) -> None:
    """Raise unless two outputs agree (up to the last bits a different batch size may round differently)."""
    if isinstance(slow, Tensor):
        if not isinstance(fast, Tensor) or fast.shape != slow.shape:
            raise _Unsupported(f"output shape {getattr(fast, 'shape', None)} differs from {tuple(slow.shape)}")
        if slow.is_floating_point():
            tol = 1e-3 * (1.0 + float(slow.abs().max())) if slow.numel() else 0.0
            err = float((fast - slow).abs().max()) if slow.numel() else 0.0
            if not err <= tol:
                raise _Unsupported(f"outputs differ by up to {err:.3g} (tolerance {tol:.3g})")
        elif not torch.equal(fast, slow):
            raise _Unsupported("integer outputs differ")
    elif isinstance(slow, dict):
        if not isinstance(fast, dict) or fast.keys() != slow.keys():
            raise _Unsupported("output keys differ")
        for key in slow:
            _assert_close(fast[key], slow[key])
    elif isinstance(slow, list | tuple):
        if not isinstance(fast, list | tuple) or len(fast) != len(slow):
            raise _Unsupported("output structures differ")
        for f, s in zip(fast, slow, strict=True):
            _assert_close(f, s)
    elif fast != slow:
        raise _Unsupported(f"outputs differ: {fast!r} != {slow!r}")
