"""Tracing with quantized layers kept whole, reachability and last uses on a :mod:`torch.fx` graph."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from torch import fx, nn

__all__ = ["LeafTracer", "ancestors", "descendants", "last_uses"]


class LeafTracer(fx.Tracer):
    """Keeps every module whose ``id`` is in ``leaves`` one ``call_module`` node (its hooks run when it runs)."""

    def __init__(self, leaves: set[int]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """Quantized layers are leaves, besides what :class:`torch.fx.Tracer` keeps whole."""
        return id(m) in self.leaves or super().is_leaf_module(m, module_qualified_name)


def descendants(starts: Sequence[fx.Node]) -> set[fx.Node]:
    """``starts`` and every node that depends on them."""
    return _closure(starts, lambda node: node.users)


def ancestors(starts: Sequence[fx.Node]) -> set[fx.Node]:
    """``starts`` and every node they depend on."""
    return _closure(starts, lambda node: node.all_input_nodes)


def _closure(starts: Sequence[fx.Node], step: Callable[[fx.Node], Iterable[fx.Node]]) -> set[fx.Node]:
    seen, stack = set(starts), list(starts)
    while stack:
        for nxt in step(stack.pop()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def last_uses(nodes: list[fx.Node], keep: set[fx.Node]) -> dict[fx.Node, list[fx.Node]]:
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
