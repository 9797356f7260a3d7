"""Replay a model piecewise with :mod:`torch.fx`: run what one layer cannot change once, the rest per candidate.

The fast path of the greedy search (:mod:`lightning_dqa.calibration.greedy`) uses this engine; it changes no score.

1. **Partition.** The model is traced with quantized layers kept as single ``call_module`` nodes. For layer
   ``l`` the graph splits into the nodes *downstream* of ``l`` (its call and everything that depends on it)
   and the rest. Per batch the rest runs once and the *boundary* (values of upstream nodes that downstream
   nodes read) is cached; every candidate then runs only the downstream nodes. With ``where="output"`` the
   layer itself is upstream: its output is cached before quantization and only its quantizer and what
   follows run per candidate. The graph calls the model's own submodules, so the quantizers' hooks fire.
2. **Replicas.** The boundary is repeated ``K`` times along the batch dimension and replica ``k`` leaves
   channel ``c_k`` of layer ``l`` in full precision, so ``K`` candidates cost one larger pass. Each replica is
   quantized on its own (:mod:`lightning_dqa.calibration.replicas`: a dynamic scale is the maximum over that replica's
   ``N`` rows, exactly as a single-candidate pass computes it).

Quantization is elementwise, so layer ``l`` quantizes every replica exactly as a plain pass does; only the
full-precision layers after it run on ``K * N`` rows instead of ``N``, where a convolution may round its last
bit differently. What the engine cannot run faithfully raises :class:`Unsupported`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from lightning_dqa.calibration.replicas import quantize_replicas, repeat_rows, replica_mode, split_rows
from lightning_dqa.core.attach import QUANTIZER_ATTR, output_hook
from lightning_dqa.core.fxgraph import LeafTracer, ancestors, descendants, last_uses
from lightning_dqa.core.quantizers import ActivationQuantizer

__all__ = ["GraphSearch", "LayerReplay", "Unsupported", "as_unsupported"]

Batch = Any
ForwardFn = Callable[[nn.Module, Batch], Any]
Inputs = tuple[tuple[Any, ...], dict[str, Any]]  # (args, kwargs) of one model call


class Unsupported(Exception):
    """The model cannot take the piecewise path (the message says why); a plain forward pass still can."""


@contextmanager
def as_unsupported(what: str) -> Iterator[None]:
    """Re-raise a failure of the piecewise machinery as :class:`Unsupported` (``"what: Type: message"``).

    Use it only around code that runs inputs the model itself has just run without error, so that a failure
    is the machinery's (a :class:`torch.fx.proxy.TraceError`, a graph that reads the batch size upstream, ...),
    not the model's. Running out of memory is no such failure: :class:`MemoryError` and
    :class:`torch.cuda.OutOfMemoryError` propagate unchanged, as do exceptions that are not :class:`Exception`
    (``KeyboardInterrupt``).

    Raises:
        Unsupported: for any other exception raised in the block.

    Example:
        >>> with as_unsupported("replay"):
        ...     raise RuntimeError("shape mismatch")
        Traceback (most recent call last):
        ...
        lightning_dqa.calibration.fxreplay.Unsupported: replay: RuntimeError: shape mismatch

    """
    try:
        yield
    except (Unsupported, MemoryError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as err:
        raise Unsupported(f"{what}: {type(err).__name__}: {err}") from err


class GraphSearch:
    """The traced model, and a :class:`LayerReplay` per layer on demand.

    Build it with :meth:`build`, which checks that the graph can stand in for the model. The graph calls the
    model's own submodule instances, so weights, buffers and quantizer hooks are shared, not copied.

    Example:
        >>> from lightning_dqa import DQAConfig
        >>> from lightning_dqa.core.attach import prepare, set_quantizers_enabled
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)).eval()
        >>> quantizers = prepare(model, DQAConfig(bits=3))
        >>> set_quantizers_enabled(model, False)
        >>> x = torch.randn(2, 3, 8, 8)  # (N, C, H, W)
        >>> search = GraphSearch.build(model, quantizers, ["0", "3"], x, lambda m, b: m(b))
        >>> [tuple(out.shape) for out in search.replay("3").outputs([0, 5, 7], lambda m, b: m(b), x)]
        [(2, 3), (2, 3), (2, 3)]

    """

    def __init__(self, gm: fx.GraphModule, quantizers: dict[str, ActivationQuantizer], model: nn.Module) -> None:
        self.gm = gm
        self.model = model
        self.quantizers = quantizers
        self.interp = fx.Interpreter(gm, garbage_collect_values=False)
        self.nodes = list(gm.graph.nodes)
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.output = next(n for n in self.nodes if n.op == "output")
        self.signature = inspect.signature(gm.forward)
        self.data = descendants(self.placeholders)  # values that carry the batch
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
    ) -> GraphSearch:
        """Trace ``model`` after one plain forward pass, and check the graph against that pass.

        Args:
            model: the model with its quantizers installed (and disabled).
            quantizers: quantizers by layer name.
            order: the layers to search (pass-through ones are not checked).
            probe_batch: a batch for the plain pass, which also measures the graph's tensors.
            forward_fn: ``forward_fn(model, batch)`` returns the model output.

        Returns:
            The search, ready for :meth:`replay`.

        Raises:
            Unsupported: when a quantizer is not installed on its layer, :mod:`torch.fx` cannot trace the
                model, or a searched layer runs where the graph cannot see it (inside a leaf module or a
                wrapped function: it would look unaffected by its candidates). Errors of the plain pass itself
                propagate.

        """
        layers = {name: _layer_of(q, model, name) for name, q in quantizers.items()}
        names = [n for n in order if not quantizers[n].passthrough]
        counts, inputs = _count_calls(model, {n: layers[n] for n in names}, probe_batch, forward_fn)
        with as_unsupported("tracing"):  # the model has just run: a failure here is the tracer's, not the model's
            gm = fx.GraphModule(model, LeafTracer({id(m) for m in layers.values()}).trace(model))
        search = cls(gm, quantizers, model)
        for name in names:
            if counts[name] != len(search.calls[name]) * len(inputs):
                raise Unsupported(
                    f"layer {name!r} ran {counts[name]} times in {len(inputs)} model calls but appears "
                    f"{len(search.calls[name])} times in the traced graph"
                )
        if inputs:
            with as_unsupported("the traced graph fails where the model runs"):
                search._measure_rows(*inputs[0])
        return search

    def _measure_rows(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Bytes per batch row of every node's tensor value (sizes the candidate passes)."""
        env = self._bind(args, kwargs)
        rows = _rows_of(env)
        nodes = [n for n in self.nodes if n.op != "placeholder"]
        free = last_uses(nodes, keep=set())
        self.interp.env = env
        for node in nodes:
            value = env[node] = self.interp.run_node(node)
            if isinstance(value, Tensor) and value.ndim and value.shape[0] == rows:
                self.row_bytes[node] = value[0].numel() * value.element_size()
            for dead in free.get(node, ()):
                del env[dead]

    def replay(self, name: str) -> LayerReplay | None:
        """The piecewise runner for layer ``name``'s candidates.

        Args:
            name: a quantized layer; its quantizer is the one the candidates vary, the other quantizers keep
                their current ``enabled`` flag and ``fp_mask``.

        Returns:
            The runner, or ``None`` when the model output does not depend on the layer (every candidate would
            score the same).

        """
        plan = self._plan(name)
        if plan is None:
            return None
        down = set(plan.downstream)
        # Other enabled quantizers that run downstream: they too must quantize replica by replica.
        overrides = [
            q
            for other, q in self.quantizers.items()
            if other != name and q.enabled and not q.passthrough and any(n in down for n in self.calls[other])
        ]
        return LayerReplay(self, plan, self.quantizers[name], overrides)

    def _plan(self, name: str) -> _Plan | None:
        """Split the graph for layer ``name``; ``None`` when the output does not depend on it."""
        starts = self.calls[name]
        down = descendants(starts)
        if self.output not in down:
            return None
        raw = None
        if len(starts) == 1 and output_hook in self.gm.get_submodule(str(starts[0].target))._forward_hooks.values():
            raw = starts[0]  # quantizing the output: the layer's computation itself does not change
            down.discard(raw)
        downstream = [n for n in self.nodes if n in down]
        boundary = [n for n in self.nodes if n not in down and any(u in down for u in n.users)]
        needed = ancestors(boundary)
        upstream = [n for n in self.nodes if n in needed and n.op != "placeholder"]
        return _Plan(
            upstream=upstream,
            boundary=boundary,
            downstream=downstream,
            raw=raw,
            free_up=last_uses(upstream, keep=set(boundary)),
            free_down=last_uses(downstream, keep={self.output}),
            row_bytes=max((self.row_bytes.get(n, 0) for n in downstream), default=0),
        )

    def _run_upstream(self, plan: _Plan, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[dict, int]:
        """Run ``plan``'s upstream nodes on one model call's inputs: ``(boundary values, batch size N)``."""
        env = self._bind(args, kwargs)
        rows = _rows_of(env)
        self._run(plan.upstream, env, plan.free_up)
        return {n: env[n] for n in plan.boundary}, rows

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[fx.Node, Any]:
        """The placeholders' values for one call of the model."""
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(zip(self.placeholders, bound.arguments.values(), strict=True))

    def _run_downstream(
        self, plan: _Plan, boundary: dict[fx.Node, Any], rows: int, pairs: list[tuple[ActivationQuantizer, Tensor]]
    ) -> Any:
        """Run ``plan``'s downstream nodes on ``K`` replicas of the boundary: the output for ``K * N`` rows.

        ``pairs`` holds the layer's quantizer, then any other one that runs downstream, each with the ``(K, C)``
        bool mask of the channels its replicas leave in full precision.
        """
        k = pairs[0][1].shape[0]
        env = {n: repeat_rows(v, k, rows) if n in self.data else v for n, v in boundary.items()}
        if plan.raw is not None:
            env[plan.raw] = quantize_replicas(pairs[0][0], env[plan.raw], pairs[0][1])
        with replica_mode(pairs):
            self._run(plan.downstream, env, plan.free_down)
        return env[self.output]

    def _run(self, nodes: list[fx.Node], env: dict[fx.Node, Any], free: dict[fx.Node, list[fx.Node]]) -> None:
        self.interp.env = env
        for node in nodes:
            env[node] = self.interp.run_node(node)
            for dead in free.get(node, ()):
                del env[dead]


class LayerReplay(nn.Module):
    """Stands in for the model inside ``forward_fn``: cached upstream, then ``K`` candidates downstream.

    Each call of the stand-in within one ``forward_fn`` call gets its own cache (a ``forward_fn`` may call
    the model more than once, e.g. test-time augmentation). The model is a child, so ``forward_fn`` can read
    its parameters' device.
    """

    def __init__(
        self, search: GraphSearch, plan: _Plan, q: ActivationQuantizer, overrides: list[ActivationQuantizer]
    ) -> None:
        super().__init__()
        self.dqa_model = search.model
        # A tuple, not attributes: nn.Module would register the quantizers as children of the stand-in.
        self._job = (search, plan, q, overrides)
        self.row_bytes = plan.row_bytes  # per batch row, of the largest tensor a candidate pass computes
        self._caches: list[tuple[dict[fx.Node, Any], int]] = []
        self._calls = 0
        self._pairs: list[tuple[ActivationQuantizer, Tensor]] = []

    def new_batch(self) -> None:
        """Forget the cached boundary: the next call computes it for a new batch."""
        self._caches = []

    def outputs(self, channels: list[int], forward_fn: ForwardFn, batch: Batch) -> list[Any]:
        """``forward_fn``'s output with each of ``channels`` in full precision, in one pass.

        Args:
            channels: the ``K`` candidate channels of the layer.
            forward_fn: ``forward_fn(model, batch)``; called with this stand-in as the model.
            batch: the batch (the same one until :meth:`new_batch`).

        Returns:
            ``K`` outputs, each as a plain pass returns it (``N`` rows).

        Raises:
            Unsupported: when the output cannot be split into ``K`` replicas along dimension 0.

        """
        _, _, q, overrides = self._job
        k = len(channels)
        rows = torch.zeros(k, q.num_channels, dtype=torch.bool, device=q.scale.device)  # (K, C)
        rows[torch.arange(k), torch.tensor(channels)] = True
        self._pairs = [(q, rows)]
        for other in overrides:  # the same mask for every replica: its chosen channel
            fp = other.fp_mask if other.fp_mask is not None else torch.zeros(other.num_channels, dtype=torch.bool)
            self._pairs.append((other, fp.to(other.scale.device).expand(k, -1)))  # (K, C_other)
        self._calls = 0
        output = forward_fn(self, batch)
        try:
            return split_rows(output, k)
        except ValueError as err:
            raise Unsupported(str(err)) from err

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model output for ``K`` replicas of the inputs (``K * N`` rows)."""
        search, plan, _, _ = self._job
        call = self._calls
        self._calls += 1
        if call == len(self._caches):
            self._caches.append(search._run_upstream(plan, args, kwargs))
        boundary, rows = self._caches[call]
        return search._run_downstream(plan, boundary, rows, self._pairs)


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




# --------------------------------------------------------------------------------------------- graph
def _count_calls(
    model: nn.Module, layers: dict[str, nn.Module], batch: Batch, forward_fn: ForwardFn
) -> tuple[dict[str, int], list[Inputs]]:
    """One plain pass: how often each layer ran, and the inputs of each model call."""
    counts = dict.fromkeys(layers, 0)
    inputs: list[Inputs] = []
    handles = [model.register_forward_pre_hook(lambda m, a, kw: inputs.append((a, kw)), with_kwargs=True)]
    for name, layer in layers.items():
        handles.append(layer.register_forward_pre_hook(lambda m, a, n=name: _bump(counts, n)))
    try:
        forward_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
    return counts, inputs


def _bump(counts: dict[str, int], key: str) -> None:
    counts[key] += 1


def _layer_of(q: ActivationQuantizer, model: nn.Module, name: str) -> nn.Module:
    layer = model.get_submodule(name)
    if getattr(layer, QUANTIZER_ATTR, None) is not q:
        raise Unsupported(f"quantizer {name!r} is not installed on module {name!r} of the model")
    return layer


def _rows_of(env: dict[fx.Node, Any]) -> int:
    """Batch size of a model call: the first dimension of its first tensor input."""
    rows = next((int(v.shape[0]) for v in env.values() if isinstance(v, Tensor) and v.ndim), None)
    if rows is None:
        raise Unsupported("the model takes no tensor with a batch dimension")
    return rows
